"""fold_batchnorm: BatchNormalization and constant per-channel Mul/Add/Sub/Div folded into the
adjacent Conv / Gemm / MatMul, exactly, and nowhere it would not be exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from helpers import model_from_text, op_counts, output_errors, pass_records, run_ort

from models.synthetic import conv_bn_relu_model
from onnx_lowrank import optimize
from onnx_lowrank.passes.fold_batchnorm import NAME

#: Folding reorders float32 products (W s instead of (x W) s): ~1e-7 relative per layer here. A
#: dropped shift or a scale on the wrong axis is an O(1) error.
FOLD_EXACT = 1e-5

ROOT_MODELS = Path(__file__).resolve().parents[1] / "models"


def _bn(rng, ch, prefix="bn"):
    return {f"{prefix}_scale": (1 + 0.3 * rng.standard_normal(ch)).astype(np.float32),
            f"{prefix}_bias": (0.2 * rng.standard_normal(ch)).astype(np.float32),
            f"{prefix}_mean": (0.5 * rng.standard_normal(ch)).astype(np.float32),
            f"{prefix}_var": rng.uniform(0.3, 2.0, ch).astype(np.float32)}


def test_acceptance_conv3x3_bn_relu_keeps_no_batchnorm():
    model = conv_bn_relu_model()
    optimized, report, records = pass_records(model, NAME)
    assert op_counts(optimized) == {"Conv": 1, "Relu": 1}
    assert [r.status for r in records] == ["folded"] and "BatchNormalization" in records[0].reason
    assert report.passes[NAME] == 1
    assert max(output_errors(model, optimized)) <= 1e-4


def test_gemm_then_batchnorm_and_matmul_then_div_sub():
    rng = np.random.default_rng(1)
    model = model_from_text(
        """(float[N, 32] x) => (float[N, 24] y, float[N, 16] z) {
            [fc] g = Gemm <alpha = 0.5, beta = 2.0, transB = 1> (x, B, C)
            [bn] y = BatchNormalization <epsilon = 0.001> (g, bn_scale, bn_bias, bn_mean, bn_var)
            [mm] m = MatMul(x, W)
            [scale] s = Div(m, S)
            [shift] z = Sub(s, T)
        }""",
        B=rng.standard_normal((24, 32)).astype(np.float32), C=rng.standard_normal(24).astype(np.float32),
        W=rng.standard_normal((32, 16)).astype(np.float32), S=rng.standard_normal(16).astype(np.float32),
        T=rng.standard_normal((1, 16)).astype(np.float32), **_bn(rng, 24))
    optimized, _, records = pass_records(model, NAME, ops="conv")
    assert op_counts(optimized) == {"Gemm": 1, "MatMul": 1, "Add": 1}   # the MatMul keeps its shift as an Add
    assert sorted(r.name for r in records) == ["fc", "mm"]
    assert max(output_errors(model, optimized)) <= FOLD_EXACT


def test_mul_before_a_padded_conv_folds_but_an_add_does_not():
    rng = np.random.default_rng(2)
    weights = dict(W=rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
                   S=rng.uniform(0.5, 2.0, (4, 1, 1)).astype(np.float32),
                   T=rng.standard_normal((1, 4, 1, 1)).astype(np.float32))
    graph = """(float[N, 4, 10, 10] x) => (float[N, 8, 10, 10] y) {{
        [pre] p = {op}(x, {c})
        [conv] y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (p, W)
    }}"""
    scaled = model_from_text(graph.format(op="Mul", c="S"), **weights)
    optimized, _, records = pass_records(scaled, NAME, ops="matmul")
    assert op_counts(optimized) == {"Conv": 1} and records[0].reason == "folded Mul into Conv"
    assert max(output_errors(scaled, optimized)) <= FOLD_EXACT

    shifted = model_from_text(graph.format(op="Add", c="T"), **weights)
    optimized, report, records = pass_records(shifted, NAME, ops="matmul")
    assert not records   # padding zeros are not shifted: folding would be wrong at the borders
    assert op_counts(optimized) == {"Add": 1, "Conv": 1}


def test_add_before_an_unpadded_conv_folds_into_its_bias():
    rng = np.random.default_rng(3)
    model = model_from_text(
        """(float[N, 4, 6, 6] x) => (float[N, 8, 4, 4] y) {
            [pre] p = Add(T, x)
            [conv] y = Conv <kernel_shape = [3, 3], strides = [1, 1]> (p, W, B)
        }""",
        W=rng.standard_normal((8, 4, 3, 3)).astype(np.float32), B=rng.standard_normal(8).astype(np.float32),
        T=rng.standard_normal((4, 1, 1)).astype(np.float32))
    optimized, _, records = pass_records(model, NAME, ops="matmul")
    assert op_counts(optimized) == {"Conv": 1} and records[0].status == "folded"
    assert max(output_errors(model, optimized)) <= FOLD_EXACT


def test_nothing_folds_through_a_shared_tensor_a_graph_output_or_a_relu():
    rng = np.random.default_rng(4)
    weights = dict(W=rng.standard_normal((8, 4, 1, 1)).astype(np.float32), **_bn(rng, 8))
    shared = model_from_text(
        """(float[N, 4, 5, 5] x) => (float[N, 8, 5, 5] y, float[N, 8, 5, 5] c) {
            [conv] c = Conv <kernel_shape = [1, 1]> (x, W)
            [bn] y = BatchNormalization (c, bn_scale, bn_bias, bn_mean, bn_var)
        }""", **weights)
    behind_relu = model_from_text(
        """(float[N, 4, 5, 5] x) => (float[N, 8, 5, 5] y) {
            [conv] c = Conv <kernel_shape = [1, 1]> (x, W)
            [relu] r = Relu(c)
            [bn] y = BatchNormalization (r, bn_scale, bn_bias, bn_mean, bn_var)
        }""", **weights)
    for model in (shared, behind_relu):
        optimized, _, records = pass_records(model, NAME, ops="matmul")
        assert not records
        assert op_counts(optimized) == op_counts(model)


def test_float16_weights_fold_in_float64_and_stay_float16():
    rng = np.random.default_rng(5)
    model = model_from_text(
        """(float16[N, 16, 6, 6] x) => (float16[N, 16, 6, 6] y) {
            [conv] c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, W, B)
            [bn] y = BatchNormalization (c, bn_scale, bn_bias, bn_mean, bn_var)
        }""",
        W=(rng.standard_normal((16, 16, 3, 3)) / 12).astype(np.float16), B=rng.standard_normal(16).astype(np.float16),
        **{k: v.astype(np.float16) for k, v in _bn(rng, 16).items()})
    optimized, _, records = pass_records(model, NAME, ops="matmul")
    assert op_counts(optimized) == {"Conv": 1}
    assert {t.data_type for t in optimized.graph.initializer} == {onnx.TensorProto.FLOAT16}
    # fp16 has 11 bits: each layer rounds to ~5e-4 relative, whichever side the scale is applied
    assert max(output_errors(model, optimized)) <= 3e-3


def test_skip_fold_batchnorm_keeps_the_batchnorm():
    optimized, report = optimize(conv_bn_relu_model(), skip=NAME, validate=False)
    assert op_counts(optimized) == {"Conv": 1, "BatchNormalization": 1, "Relu": 1}
    assert NAME not in report.passes


def test_cnn_digits_loses_every_batchnorm_and_keeps_its_predictions():
    path = ROOT_MODELS / "cnn_digits.onnx"
    original = onnx.load(str(path))
    optimized, report = optimize(str(path))
    assert "BatchNormalization" not in op_counts(optimized)
    assert report.passes[NAME] == op_counts(original)["BatchNormalization"] == 8
    assert report.parity.passed and report.parity.outputs[0].rel_l2_error <= 1e-4
    data = np.load(ROOT_MODELS / "digits_test.npz")
    feeds = {"input": data["input"].astype(np.float32)}
    (before,), (after,) = run_ort(original, feeds), run_ort(optimized, feeds)
    assert np.linalg.norm(after - before) / np.linalg.norm(before) <= 1e-4
    assert np.array_equal(after.argmax(1), before.argmax(1))


def test_folds_inside_an_if_branch():
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(6)
    stats = _bn(rng, 8)
    then_graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], name="then_conv", kernel_shape=[1, 1]),
         helper.make_node("BatchNormalization", ["c", *stats], ["then_y"], name="then_bn")],
        "then", [], [helper.make_tensor_value_info("then_y", TensorProto.FLOAT, [2, 8, 3, 3])],
        initializer=[numpy_helper.from_array(v, k) for k, v in stats.items()])
    else_graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["else_y"], name="else_conv", kernel_shape=[1, 1])],
        "else", [], [helper.make_tensor_value_info("else_y", TensorProto.FLOAT, [2, 8, 3, 3])])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph)],
        "if_model", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                     helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 3, 3])],
        initializer=[numpy_helper.from_array(rng.standard_normal((8, 4, 1, 1)).astype(np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", 17)])
    model.ir_version = 8
    optimized, _, records = pass_records(model, NAME, ops="matmul")
    then_ops = [n.op_type for n in optimized.graph.node[0].attribute[0].g.node]
    assert [r.name for r in records] == ["then_conv"] and then_ops == ["Conv"]
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": x}
        (before,), (after,) = run_ort(model, feeds), run_ort(optimized, feeds)
        assert np.linalg.norm(after - before) / np.linalg.norm(before) <= FOLD_EXACT


def test_a_fold_that_would_overflow_float16_is_refused():
    rng = np.random.default_rng(7)
    stats = {k: v.astype(np.float16) for k, v in _bn(rng, 4).items()}
    stats["bn_var"] = np.full(4, 1e-6, dtype=np.float16)   # scale ~1000: 100 x 1000 > float16's 65504
    model = model_from_text(
        """(float16[N, 4, 3, 3] x) => (float16[N, 4, 3, 3] y) {
            [conv] c = Conv <kernel_shape = [1, 1]> (x, W)
            [bn] y = BatchNormalization <epsilon = 0.0> (c, bn_scale, bn_bias, bn_mean, bn_var)
        }""", W=np.full((4, 4, 1, 1), 100, dtype=np.float16), **stats)
    optimized, _, records = pass_records(model, NAME, ops="matmul")
    assert op_counts(optimized) == {"Conv": 1, "BatchNormalization": 1}
    assert records[0].status == "skipped" and "overflows float16" in records[0].reason


def test_batchnorm_after_a_depthwise_conv_folds_but_the_conv_does_not_chain():
    rng = np.random.default_rng(8)
    model = model_from_text(
        """(float[N, 8, 6, 6] x) => (float[N, 16, 6, 6] y) {
            [dw] d = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 8> (x, D)
            [bn] b = BatchNormalization (d, bn_scale, bn_bias, bn_mean, bn_var)
            [pw] y = Conv <kernel_shape = [1, 1]> (b, P)
        }""", D=rng.standard_normal((8, 1, 3, 3)).astype(np.float32),
        P=rng.standard_normal((16, 8, 1, 1)).astype(np.float32), **_bn(rng, 8))
    optimized, report, records = pass_records(model, NAME, ops="matmul")
    assert op_counts(optimized) == {"Conv": 2}
    assert [r.name for r in records] == ["dw"]
    refused = [r for r in report.layers if r.pass_name == "merge_linear"]
    assert [r.reason for r in refused] == ["grouped convs do not chain into one"]
    assert max(output_errors(model, optimized)) <= FOLD_EXACT
