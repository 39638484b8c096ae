"""Calibration: the Gram matrices captured through ONNX Runtime are exactly X^T X of each layer's
input rows, however the samples are batched or filed, without the padding rows."""

import numpy as np
import pytest
from helpers import model_from_text

from onnx_lowrank.calibration import (CalibrationData, capture_specs, collect_cross_grams, collect_grams,
                                      load_calibration)
from onnx_lowrank.errors import OptionError
from onnx_lowrank.graph import import_graph
from onnx_lowrank.options import Options

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((16, 32)).astype(np.float32)
W2 = RNG.standard_normal((32, 8)).astype(np.float32)
MLP = model_from_text("(float[N, 16] x) => (float[N, 8] y) { [fc1] h = MatMul(x, W1) r = Relu(h) "
                      "[fc2] y = MatMul(r, W2) }", W1=W1, W2=W2)
TOKENS = model_from_text("(float[B, S, 16] x, int64[B, S] attention_mask) => (float[B, S, 8] y) "
                         "{ [proj] h = MatMul(x, W1) [out] y = MatMul(h, W2) }", W1=W1, W2=W2)

#: The captured activations are float32 and the Gram sums them in float64: agreement with a float64
#: numpy reference is limited by the float32 rounding of ReLU(x W1) (~6e-8 relative per entry).
RTOL = 1e-5


def grams_of(model, path, **kwargs):
    graph = import_graph(model)
    data = load_calibration(path, [t.name for t in graph.inputs])
    return collect_grams(model, capture_specs(graph, Options()), data, **kwargs)


def test_gram_from_ort_equals_numpy(tmp_path):
    x = RNG.standard_normal((20, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    calibration = grams_of(MLP, tmp_path / "calib.npz")
    x64 = x.astype(np.float64)
    hidden = np.maximum(x64 @ W1.astype(np.float64), 0)
    np.testing.assert_allclose(calibration.grams["fc1"], x64.T @ x64, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(calibration.grams["fc2"], hidden.T @ hidden, rtol=RTOL, atol=1e-4)
    assert calibration.samples == 20 and calibration.positions == {"fc1": 1.0, "fc2": 1.0}


def test_streaming_over_batches_equals_one_batch(tmp_path):
    x = RNG.standard_normal((23, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    one = grams_of(MLP, tmp_path / "calib.npz", batch_size=100)
    streamed = grams_of(MLP, tmp_path / "calib.npz", batch_size=4)
    for layer in ("fc1", "fc2"):
        # float64 sums of the same float32 rows in another order: ~1e-16 relative per addition
        np.testing.assert_allclose(streamed.grams[layer], one.grams[layer], rtol=1e-12)


def test_a_directory_of_files_equals_one_file(tmp_path):
    x = RNG.standard_normal((12, 16)).astype(np.float32)
    np.savez(tmp_path / "all.npz", x=x)
    (tmp_path / "parts").mkdir()
    np.savez(tmp_path / "parts" / "a.npz", x=x[:5])
    np.savez(tmp_path / "parts" / "b.npz", x=x[5:])
    whole, parts = grams_of(MLP, tmp_path / "all.npz"), grams_of(MLP, tmp_path / "parts")
    np.testing.assert_allclose(parts.grams["fc1"], whole.grams["fc1"], rtol=1e-12)
    assert parts.samples == 12


def test_padding_rows_are_left_out(tmp_path):
    x = RNG.standard_normal((6, 10, 16)).astype(np.float32)
    mask = np.ones((6, 10), dtype=np.int64)
    for i, length in enumerate([10, 3, 7, 1, 10, 5]):
        mask[i, length:] = 0
    x[mask == 0] = 100.0    # padding activations that would dominate the Gram if counted
    np.savez(tmp_path / "calib.npz", x=x, attention_mask=mask)
    calibration = grams_of(TOKENS, tmp_path / "calib.npz", batch_size=4)
    rows = x[mask == 1].astype(np.float64)
    hidden = rows @ W1.astype(np.float64)
    np.testing.assert_allclose(calibration.grams["proj"], rows.T @ rows, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(calibration.grams["out"], hidden.T @ hidden, rtol=RTOL, atol=1e-3)
    assert calibration.positions["proj"] == 10.0    # cost counts every position the model computes


def test_cross_grams_of_a_model_against_itself_are_its_gram(tmp_path):
    x = RNG.standard_normal((9, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    graph = import_graph(MLP)
    data = load_calibration(tmp_path / "calib.npz", ["x"])
    specs = capture_specs(graph, Options())
    pairs = collect_cross_grams(MLP, MLP, specs, data)
    gram, cross = pairs["fc2"]
    np.testing.assert_array_equal(gram, cross)
    np.testing.assert_allclose(gram, collect_grams(MLP, specs, data).grams["fc2"], rtol=1e-12)


def test_weight_first_matmul_captures_the_contracted_axis(tmp_path):
    """y = W x with x [N, 16, cols]: the rows W sees run over N and cols, the features over axis -2."""
    model = model_from_text("(float[N, 16, 5] x) => (float[N, 32, 5] y) { [left] y = MatMul(W, x) }",
                            W=W1.T.copy())
    x = RNG.standard_normal((4, 16, 5)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    rows = np.moveaxis(x, 1, -1).reshape(-1, 16).astype(np.float64)
    np.testing.assert_allclose(grams_of(model, tmp_path / "calib.npz").grams["left"], rows.T @ rows, rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("arrays, message", [
    ({"wrong": np.zeros((2, 16), np.float32)}, "has no array for input 'x'"),
    ({"x": np.zeros((0, 16), np.float32)}, "empty"),
])
def test_bad_calibration_files_are_option_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "calib.npz", **arrays)
    with pytest.raises(OptionError, match=message):
        load_calibration(tmp_path / "calib.npz", ["x"])


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(OptionError, match="does not exist"):
        load_calibration(tmp_path / "nope.npz", ["x"])
    with pytest.raises(OptionError, match="no .npz files"):
        load_calibration(tmp_path, ["x"])


def test_batches_cover_a_range_across_files(tmp_path):
    for name, count in (("a", 3), ("b", 4)):
        np.savez(tmp_path / f"{name}.npz", x=np.arange(count, dtype=np.float32)[:, None] + (0 if name == "a" else 3))
    data = CalibrationData((tmp_path / "a.npz", tmp_path / "b.npz"), (3, 4))
    got = np.concatenate([b["x"][:, 0] for b in data.batches(2, 6, batch_size=2)])
    np.testing.assert_array_equal(got, [2, 3, 4, 5])


def test_capture_model_keeps_only_what_the_captured_tensors_need(tmp_path):
    """A depth's pass runs the model only up to the layers it captures; an If whose branch reads an
    outer tensor keeps that tensor's producer. The pruned model gives the same Gram."""
    from onnx_lowrank.calibration import _capture_model
    model = model_from_text(
        "(float[N, 16] x) => (float[N, 8] y) { c = Constant<value = bool[1] {0}>() "
        "[fc1] h = MatMul(x, W1) r = Relu(h) s = Sigmoid(h) "
        "g = If(c) <then_branch = t () => (float[N, 32] o) { o = Identity(s) }, "
        "else_branch = e () => (float[N, 32] o) { o = Identity(r) }> [fc2] y = MatMul(g, W2) }", W1=W1, W2=W2)
    specs = capture_specs(import_graph(model), Options())
    fc1 = [s for s in specs if s.layer == "fc1"]
    pruned, initializers = _capture_model(model, fc1)
    assert [n.op_type for n in pruned.graph.node] == [] and [o.name for o in pruned.graph.output] == ["x"]
    assert initializers == [] and not pruned.graph.initializer and len(pruned.graph.input) == 1
    fc2, initializers = _capture_model(model, [s for s in specs if s.layer == "fc2"])
    assert [n.op_type for n in fc2.graph.node] == ["Constant", "MatMul", "Relu", "Sigmoid", "If"]
    assert [t.name for t in initializers] == ["W1"] and not fc2.graph.initializer   # the model's own, not copied
    x = RNG.standard_normal((6, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    data = load_calibration(tmp_path / "calib.npz", ["x"])
    hidden = np.maximum(x.astype(np.float64) @ W1.astype(np.float64), 0)
    np.testing.assert_allclose(collect_grams(model, specs, data).grams["fc2"], hidden.T @ hidden, rtol=RTOL, atol=1e-4)


def test_a_tall_layer_is_captured_at_its_outputs(tmp_path):
    """fc2 maps 32 features to 8: with outputs=True its Gram is Y^T Y [8, 8] of its outputs plus
    trace(X^T X), padding rows left out as for the inputs, and the whitened SVD from it is the one
    from the 32 x 32 inputs' Gram; fc1 (16 -> 32, wide) keeps its inputs' Gram."""
    from onnx_lowrank.numerics.whitening import OutputGram, whitened_svd
    x = RNG.standard_normal((6, 10, 16)).astype(np.float32)
    mask = np.ones((6, 10), dtype=np.int64)
    for i, length in enumerate([10, 3, 7, 1, 10, 5]):
        mask[i, length:] = 0
    x[mask == 0] = 100.0
    np.savez(tmp_path / "calib.npz", x=x, attention_mask=mask)
    model = model_from_text("(float[B, S, 16] x, int64[B, S] attention_mask) => (float[B, S, 8] y) "
                            "{ [fc1] h = MatMul(x, W1) r = Relu(h) [fc2] y = MatMul(r, W2) }", W1=W1, W2=W2)
    graph = import_graph(model)
    data = load_calibration(tmp_path / "calib.npz", [t.name for t in graph.inputs])
    inputs = collect_grams(model, capture_specs(graph, Options()), data, batch_size=4).grams
    outputs = collect_grams(model, capture_specs(graph, Options(), outputs=True), data, batch_size=4).grams
    assert isinstance(outputs["fc2"], OutputGram) and not isinstance(outputs["fc1"], OutputGram)
    np.testing.assert_allclose(outputs["fc1"], inputs["fc1"], rtol=1e-12)
    hidden = np.maximum(x[mask == 1].astype(np.float64) @ W1.astype(np.float64), 0)
    y = hidden @ W2.astype(np.float64)
    np.testing.assert_allclose(outputs["fc2"].gram, y.T @ y, rtol=RTOL, atol=1e-2)
    assert outputs["fc2"].input_trace == pytest.approx(np.trace(hidden.T @ hidden), rel=RTOL)
    by_outputs, by_inputs = whitened_svd(W2, outputs["fc2"]), whitened_svd(W2, inputs["fc2"])
    np.testing.assert_allclose(by_outputs.s, by_inputs.s, rtol=1e-5)
    np.testing.assert_allclose(np.matmul(*by_outputs.factors(5)), np.matmul(*by_inputs.factors(5)), atol=1e-4)


def test_planning_the_captures_reads_no_weight():
    """capture_specs needs the weights' types and shapes only: gs keeps whatever .values loads,
    and loading them there held a second copy of a 0.5B decoder's weights (2.3 GB) to the end."""
    import onnx_graphsurgeon as gs
    graph = import_graph(MLP)
    specs = capture_specs(graph, Options(), outputs=True)
    assert [s.layer for s in specs] == ["fc1", "fc2"]
    constants = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    assert constants and all(type(t._values).__name__ == "LazyValues" for t in constants)
