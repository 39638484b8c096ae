"""--quantize int8: ONNX Runtime's quantization as the last stage, judged by the gate like any
rewrite. Dynamic int8 for MatMul / Gemm models, static QDQ for convolutional ones with calibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import assert_interface_kept, model_from_text, op_counts, output_errors, run_ort

from models.synthetic import low_rank_matrix
from onnx_lowrank import optimize
from onnx_lowrank.errors import OptionError

MODELS = Path(__file__).resolve().parents[1] / "models"
RNG = np.random.default_rng(12)


def test_a_matmul_model_is_factorized_then_quantized_dynamically():
    model = model_from_text("(float[N, 256] x) => (float[N, 256] y) { [fc] h = MatMul(x, W) y = Relu(h) }",
                            W=low_rank_matrix(RNG, 256, 256, 16, noise=0))
    optimized, report = optimize(model, quantize="int8", measure=False)
    assert report.decomposed and report.quantized.startswith("dynamic int8")
    ops = op_counts(optimized)
    assert ops.get("MatMulInteger") == 2 and "MatMul" not in ops   # both factors run as int8
    assert report.parity.passed and report.parity.criterion.startswith("rel_l2 <= 2.5e-01 (the quality gate")
    # int8 weights and activations: ~1% relative, not the float rounding of the low-rank factors
    assert 1e-4 < max(output_errors(model, optimized)) < 0.05
    assert_interface_kept(model, optimized)


def test_int8_alone_when_nothing_is_decomposed():
    model = model_from_text("(float[N, 64] x) => (float[N, 64] y) { y = MatMul(x, W) }",
                            W=RNG.standard_normal((64, 64)).astype(np.float32))
    optimized, report = optimize(model, quantize="int8", measure=False)
    assert not report.decomposed and "MatMulInteger" in op_counts(optimized) and report.parity.passed


def test_a_cnn_with_calibration_is_quantized_static_qdq_and_keeps_its_accuracy():
    source = onnx.load(str(MODELS / "cnn_digits.onnx"))
    optimized, report = optimize(source, quantize="int8", calibration=str(MODELS / "digits_calib.npz"),
                                 measure=False)
    assert report.quantized.startswith("static QDQ int8")
    ops = op_counts(optimized)
    assert ops["QuantizeLinear"] >= 9 and ops["DequantizeLinear"] >= 9
    test = np.load(MODELS / "digits_test.npz")
    name = source.graph.input[0].name

    def accuracy(model):
        logits = run_ort(model, {name: test["input"].astype(np.float32)})[0]
        return float(np.mean(np.argmax(logits, axis=1) == test["label"]))

    # measured 99.56% -> 99.56%; a point is 4.5 of the 450 digits
    assert accuracy(optimized) >= accuracy(source) - 0.01


def test_an_unknown_quantize_mode_is_refused():
    with pytest.raises(OptionError, match="--quantize: unknown mode 'int4'"):
        optimize(model_from_text("(float[N, 4] x) => (float[N, 4] y) { y = Relu(x) }"), quantize="int4")


def test_sweep_with_quantize_puts_the_int8_alone_point_beside_its_targets(tmp_path):
    from onnx_lowrank.sweep import sweep
    model = model_from_text("(float[N, 256] x) => (float[N, 256] y) { [fc] h = MatMul(x, W) y = Relu(h) }",
                            W=low_rank_matrix(RNG, 256, 256, 16, noise=0.05))
    from onnx_lowrank.options import Options
    result = sweep(model, [0.5], Options(quantize="int8", measure=False), out_dir=tmp_path)
    alone, point = result.points
    assert alone.label == "int8 alone" and alone.decomposed == 0 and alone.speedup is not None
    assert point.label == "" and point.decomposed == 1
    assert (tmp_path / "model.int8_alone.onnx").is_file() and (tmp_path / "model.flops0.5.onnx").is_file()
    assert "MatMulInteger" in op_counts(onnx.load(str(tmp_path / "model.int8_alone.onnx")))
