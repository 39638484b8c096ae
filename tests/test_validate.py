"""`onnx-lowrank validate` and the comparison behind it (compare.py, parity.py): exit 0 when every
output is within tolerance, 1 naming the output and by how much when one is not, 2 on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models.synthetic import mlp_model
from onnx_lowrank import optimize, save_model
from onnx_lowrank.cli import main
from onnx_lowrank.compare import Tolerance, compare_output, tolerances
from onnx_lowrank.errors import OptionError
from onnx_lowrank.parity import TRT_FP16_NOTE
from test_runtime import fake_gpu

ROOT_MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An exactly low-rank MLP, its optimization, and the optimization with one factor x 1.5."""
    folder = tmp_path_factory.mktemp("validate")
    original = mlp_model(k=64, n=96, rank=8)
    optimized, report = optimize(original, validate=False, measure=False)
    assert report.decomposed
    broken = onnx.ModelProto()
    broken.CopyFrom(optimized)
    factor = next(t for t in broken.graph.initializer if "_lowrank_" in t.name)
    factor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(factor) * np.float32(1.5), factor.name))
    paths = {}
    for name, model in (("original", original), ("optimized", optimized), ("broken", broken)):
        paths[name] = str(folder / f"{name}.onnx")
        save_model(model, paths[name])
    return paths


def test_correct_optimization_passes(models, capsys):
    assert main(["validate", models["original"], models["optimized"]]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "FAILED" not in out
    assert "pass if rel_l2 <= 1.0e-03" in out


def test_weight_scaled_by_1_5_fails_naming_the_output_and_the_error(models, capsys):
    assert main(["validate", models["original"], models["broken"]]) == 1
    captured = capsys.readouterr()
    # Relu(1.5 z + b) against Relu(z + b): the error is about half the output
    line = next(line for line in captured.out.splitlines() if line.startswith("FAILED y:"))
    error = float(line.split("rel_l2 ")[1].split()[0])
    assert 0.3 < error < 0.6
    assert "> 1.0e-03" in line
    assert "Traceback" not in captured.out + captured.err


def test_quiet_prints_only_failures_and_verdict(models, capsys):
    assert main(["validate", models["original"], models["broken"], "-q"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("FAILED y: rel_l2") and lines[1] == "parity FAILED"


def test_atol_rtol_count_elements_outside(models, capsys):
    assert main(["validate", models["original"], models["broken"], "--atol", "1e-4", "--rtol", "1e-3"]) == 1
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("FAILED y:"))
    assert "elements" in line and "outside |y - y0| <= 1.0e-04 + 1.0e-03 |y0|" in line


def test_per_output_tolerance_and_json(models, tmp_path, capsys):
    report = tmp_path / "parity.json"
    assert main(["validate", models["original"], models["broken"], "--max-error", "y:0.9", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    (output,) = data["outputs"]
    assert output["criterion"] == "rel_l2 <= 9.0e-01" and output["passed"]
    assert {"max_abs_error", "max_rel_error", "rel_l2_error", "cosine", "top1_agreement"} <= set(output)


def test_inputs_file_with_a_batch_per_key(capsys):
    model = str(ROOT_MODELS / "cnn_digits.onnx")
    assert main(["validate", model, model, "--inputs", str(ROOT_MODELS / "digits_test.npz")]) == 0
    out = capsys.readouterr().out
    assert "inputs input:450,1,8,8" in out and "used as one sample" in out and "ignored arrays" in out
    assert "100.0%" in out       # top-1 agreement of a model with itself


@pytest.mark.parametrize("extra, message", [
    (["--max-error", "nope:1e-3"], "which the model does not have"),
    (["--max-error", "1e-3", "--atol", "1e-3"], "alternatives"),
    (["--int-range", "3"], "--int-range"),
    (["--inputs", "missing.npz"], "--inputs"),
    (["--shape", "x:2,64", "--inputs", "x.npz"], "give one"),
    (["--batch", "0"], "--batch"),
])
def test_bad_options_exit_2_with_one_line(models, capsys, extra, message):
    assert main(["validate", models["original"], models["optimized"], *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_missing_model_and_mismatched_models_exit_2(models, capsys):
    assert main(["validate", models["original"], "no-such.onnx"]) == 2
    assert "does not exist" in capsys.readouterr().err
    other = str(ROOT_MODELS / "mlp.onnx")
    assert main(["validate", models["original"], other]) == 2
    assert "different inputs" in capsys.readouterr().err


def test_tensorrt_fp16_says_the_tolerance_was_not_loosened(models, monkeypatch, capsys):
    fake = fake_gpu(monkeypatch)
    assert main(["validate", models["original"], models["optimized"], "--provider", "tensorrt", "--trt-fp16"]) == 0
    assert TRT_FP16_NOTE in capsys.readouterr().out
    trt_options = fake.requests[0][0][1]
    assert trt_options["trt_fp16_enable"] is True


# --- compare.py on arrays -----------------------------------------------------------------------

def test_compare_figures():
    y0 = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
    y = y0.copy()
    y[1, 2] = 7.0
    out = compare_output("y", y0, y, Tolerance(max_error=0.11))   # rel_l2 = 1 / 9.54 = 0.105
    assert out.max_abs_error == pytest.approx(1.0) and out.max_rel_error == pytest.approx(1 / 6)
    assert out.rel_l2_error == pytest.approx(1 / np.linalg.norm(y0))
    assert out.top1_agreement == 1.0 and out.passed
    elementwise = compare_output("y", y0, y, Tolerance(None, atol=0.5, rtol=0.0))
    assert elementwise.mismatched == 1 and not elementwise.passed


def test_compare_holds_no_output_sized_float64_temporary(monkeypatch):
    """A decoder's logits over the held-back samples ([32, 128, 32000], 0.5 GB in float32) made
    ~5 GB of whole-array float64 temporaries here; the figures are now gathered piece by piece."""
    import tracemalloc

    import onnx_lowrank.compare as compare

    monkeypatch.setattr(compare, "CHUNK_ELEMENTS", 1 << 16)
    rng = np.random.default_rng(0)
    y0 = rng.standard_normal((16, 64, 1000)).astype(np.float32)   # 1M values: 8 MB in float64
    y = y0 + np.float32(1e-3) * rng.standard_normal(y0.shape).astype(np.float32)
    y[3, 5, :] = y0[3, 5, ::-1]   # one row whose argmax moves
    tracemalloc.start()
    out = compare_output("logits", y0, y, Tolerance(None, atol=3e-3, rtol=0.0))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < y0.size * 8 / 2, peak   # under half of one float64 copy (it was ~6 copies)
    d = y.astype(np.float64) - y0
    # sums in another order than one np.linalg.norm: equal to float64 rounding
    assert out.rel_l2_error == pytest.approx(np.linalg.norm(d) / np.linalg.norm(y0.astype(np.float64)), rel=1e-12)
    assert out.max_abs_error == np.abs(d).max()
    assert out.mismatched == np.count_nonzero(np.abs(d) > 3e-3)
    assert out.top1_agreement == pytest.approx(np.mean(y0.argmax(-1) == y.argmax(-1)))


def test_compare_shape_mismatch_and_nan_fail():
    y0 = np.ones((2, 3), np.float32)
    assert not compare_output("y", y0, np.ones((3, 2), np.float32), Tolerance()).shape_ok
    nan = y0.copy()
    nan[0, 0] = np.nan
    assert not compare_output("y", y0, nan, Tolerance(max_error=10.0)).passed


def test_tolerances_defaults_and_overrides():
    default, per_output = tolerances({None: 1e-2, "logits": 5e-2}, {"probs": 1e-3})
    assert default == Tolerance(1e-2)
    assert per_output == {"logits": Tolerance(5e-2), "probs": Tolerance(None, 1e-3, 0.0)}
    default, per_output = tolerances(atol={None: 1e-3}, rtol={"y": 1e-2})
    assert default == Tolerance(None, 1e-3, 0.0) and per_output == {"y": Tolerance(None, 1e-3, 1e-2)}
    assert tolerances() == (Tolerance(1e-3), {})
    with pytest.raises(OptionError):
        tolerances({None: -1.0})
