"""Issue 10, one test per way real third-party models broke trust: parity inputs the model
refuses, shared and fp16 weights that made models grow, a time share read as 1%, a gate that could
not fail, a result slower than the original, duplicate node names, and --error-correction losing
an fp16 weight's storage type."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import EXACT, assert_interface_kept, model_from_text, op_counts, output_errors, run_cli, run_ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from models.synthetic import low_rank_conv_weight, low_rank_matrix
from onnx_lowrank import data_aware, optimize
from onnx_lowrank.graph import weight_bytes
from onnx_lowrank.inputs import InputSpec, generate_inputs, input_hints, resolve_shapes
from onnx_lowrank.time_share import choose_share, without_layers

RNG = np.random.default_rng(10)
W64x96 = low_rank_matrix(RNG, 64, 96, 8, noise=0)
#: factors stored in float16 are rounded to ~5e-4 relative each; a wrong dtype or a lost Cast is O(1)
FP16_STORED = 5e-3


def _model(nodes, inputs, outputs, initializers=(), ir=8, opset=17):
    model = h.make_model(h.make_graph(nodes, "g", inputs, outputs, list(initializers)),
                         opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = ir
    onnx.checker.check_model(model, full_check=True)
    return model


def _initializer_types(model):
    return {t.name: t.data_type for t in model.graph.initializer}


# --- 1. parity inputs a real model accepts --------------------------------------------------------

def _embedding_model(rows: int) -> onnx.ModelProto:
    """token ids -> Gather(table of `rows`) -> MatMul: ids past the table make ORT refuse the run."""
    table = RNG.standard_normal((rows, 64)).astype(np.float32)
    return model_from_text("""(int64[batch, seq] input_ids, int64[batch, seq] token_type_ids) => (float[batch, seq, 96] y) {
        e = Gather(E, input_ids)
        t = Gather(T2, token_type_ids)
        s = Add(e, t)
        [fc] y = MatMul(s, W)
    }""", E=table, T2=RNG.standard_normal((2, 64)).astype(np.float32), W=W64x96)


def test_ids_that_feed_a_gather_stay_inside_its_table():
    model = _embedding_model(rows=10)
    assert {k: v.high for k, v in input_hints(model).items()} == {"input_ids": 10, "token_type_ids": 2}
    optimized, report = optimize(model)
    assert report.decomposed and report.parity.passed
    assert report.parity.outputs[0].rel_l2_error <= EXACT


def _vad_model(state_batch) -> onnx.ModelProto:
    """A voice-activity-style model: audio [batch, n], a state [2, batch, 16] and a sample-rate
    scalar the graph compares with 16000 and divides by it (any other value reshapes to nothing)."""
    nodes = [h.make_node("Equal", ["sr", "k16000"], ["is16k"]),
             h.make_node("Div", ["sr", "k16000"], ["ratio"]),
             h.make_node("Mul", ["ratio", "k96"], ["width"]),
             h.make_node("Concat", ["kneg1", "width"], ["shape"], axis=0),
             h.make_node("MatMul", ["x", "W"], ["y0"], name="fc"),
             h.make_node("Reshape", ["y0", "shape"], ["y1"]),
             h.make_node("ReduceSum", ["state", "axes"], ["s"], keepdims=0),
             h.make_node("Unsqueeze", ["s", "last"], ["s1"]),
             h.make_node("Add", ["y1", "s1"], ["y2"]),
             h.make_node("Cast", ["is16k"], ["flag"], to=T.FLOAT),
             h.make_node("Mul", ["y2", "flag"], ["y"])]
    consts = [nh.from_array(np.array([16000], np.int64), "k16000"), nh.from_array(np.array([96], np.int64), "k96"),
              nh.from_array(np.array([-1], np.int64), "kneg1"), nh.from_array(np.array([0, 2], np.int64), "axes"),
              nh.from_array(np.array([1], np.int64), "last"), nh.from_array(W64x96, "W")]
    inputs = [h.make_tensor_value_info("x", T.FLOAT, ["batch", 64]),
              h.make_tensor_value_info("state", T.FLOAT, [2, state_batch, 16]),
              h.make_tensor_value_info("sr", T.INT64, [1])]
    return _model(nodes, inputs, [h.make_tensor_value_info("y", T.FLOAT, ["batch", 96])], consts)


@pytest.mark.parametrize("state_batch", ["batch", 1])
def test_state_inputs_and_a_sample_rate_scalar_get_inputs_the_model_runs_on(state_batch):
    """A dim name shared by two inputs gets one size (the state's batch at axis 1 is the batch);
    a state whose batch is fixed at 1 is met by the next candidate, batch 1."""
    model = _vad_model(state_batch)
    optimized, report = optimize(model)
    assert report.decomposed and report.parity.passed and report.parity.outputs[0].rel_l2_error <= EXACT
    if state_batch == "batch":
        assert report.parity.input_shapes["state"][1] == report.parity.input_shapes["x"][0] == 4


def test_a_rank_0_input_compared_with_constants_is_a_scalar_at_one_of_them():
    model = model_from_text("""(float[N, 64] x, int64 sr) => (float[N, 96] y) {
        ok = Equal(sr, K)
        f = Cast<to = 1>(ok)
        h = MatMul(x, W)
        y = Mul(h, f)
    }""", K=np.array(8000, np.int64), W=W64x96)
    specs = [InputSpec("x", np.dtype(np.float32), ["N", 64]), InputSpec("sr", np.dtype(np.int64), [])]
    shapes, _ = resolve_shapes(specs, {}, 4)
    feeds = generate_inputs(specs, shapes, hints=input_hints(model))
    assert feeds["sr"].shape == () and int(feeds["sr"]) == 8000


def test_a_model_that_runs_only_at_multiples_of_32_is_checked_there():
    """SpaceToDepth(32) refuses the default 16x16: the next candidate size, 32, runs."""
    w = low_rank_matrix(RNG, 1024, 32, 4, noise=0).T.reshape(32, 1024, 1, 1).copy()
    model = model_from_text("""(float[N, 1, H, W] x) => (float[N, 32, h, w] y) {
        s = SpaceToDepth<blocksize = 32>(x)
        [conv] y = Conv(s, K)
    }""", K=w)
    optimized, report = optimize(model)
    assert report.decomposed and report.parity.passed
    assert report.parity.input_shapes["x"][2:] == [32, 32]
    assert any("refused the first generated sizes" in n for n in report.parity.notes), report.parity.notes


def test_a_model_no_candidate_size_runs_is_one_line_naming_what_was_tried(capsys, tmp_path):
    model = model_from_text("""(float[N, 1, H, W] x) => (float[N, 32, h, w] y) {
        s = SpaceToDepth<blocksize = 48>(x)
        [conv] y = Conv(s, K)
    }""", K=low_rank_matrix(RNG, 2304, 32, 4, noise=0).T.reshape(32, 2304, 1, 1).copy())
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    code, _, err = run_cli(capsys, "optimize", path, tmp_path / "out.onnx", "-q")
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "out.onnx").exists()
    assert "generated inputs tried at x [4, 1, 16, 16] | x [1, 1, 16, 16] | x [4, 1, 32, 32]" in err
    assert "--shape NAME:D1,D2,..." in err


def test_a_model_nothing_changes_is_written_as_it_came_without_any_run(monkeypatch):
    """Parity's inputs cannot break a model the tool does not change: no session is made."""
    from onnx_lowrank import parity
    monkeypatch.setattr(parity, "check_parity", lambda *a, **k: pytest.fail("parity ran on an unchanged model"))
    model = _embedding_model(rows=10)
    optimized, report = optimize(model, tolerance=1e-3, min_flop_reduction=0.95)
    assert optimized.SerializeToString() == model.SerializeToString() and report.parity is None


def test_calibration_samples_are_the_parity_inputs(tmp_path):
    model = _embedding_model(rows=10)
    ids = RNG.integers(0, 10, (32, 5)).astype(np.int64)   # 32 samples of 5 tokens
    np.savez(tmp_path / "c.npz", input_ids=ids, token_type_ids=np.zeros_like(ids))
    _, report = optimize(model, calibration=str(tmp_path / "c.npz"), rank=8)
    # the 16 held-back samples (half of 32: top-1 needs rows), in batches of 8: real inputs, not generated
    assert report.parity.passed and report.parity.input_shapes["input_ids"] == [8, 5]
    assert report.parity.samples == 2 and not report.parity.notes


# --- 2. one factorization per unique weight ---------------------------------------------------------

def _aliased_model(uses: int) -> onnx.ModelProto:
    """One weight behind `uses` Identity aliases, each read by its own MatMul (an exporter that
    deduplicated initializers)."""
    nodes, outputs = [], []
    for i in range(uses):
        nodes += [h.make_node("Identity", ["W"], [f"w{i}"]), h.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"fc{i}")]
        outputs.append(h.make_tensor_value_info(f"y{i}", T.FLOAT, ["n", 96]))
    return _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["n", 64])], outputs,
                  [nh.from_array(low_rank_matrix(RNG, 64, 96, 40, noise=0.3), "W")])


def test_a_weight_aliased_60_times_is_factorized_once_and_the_model_shrinks():
    model = _aliased_model(60)
    optimized, report = optimize(model, rank_ratio=0.5, validate=False, measure=False)
    onnx.checker.check_model(optimized, full_check=True)
    assert len(report.decomposed) == 60 and op_counts(optimized) == {"MatMul": 120}
    assert sorted(_initializer_types(optimized)) == ["w0_lowrank_a", "w0_lowrank_b"]
    assert weight_bytes(optimized) < weight_bytes(model)
    assert {r.reason for r in report.decomposed[1:]} == {"shares the factors of fc0"}
    errors = output_errors(model, optimized)
    assert max(errors) - min(errors) < 1e-6   # one factorization: every alias has the same error


def test_shared_weights_in_both_branches_of_an_if_are_stored_once():
    then = h.make_graph([h.make_node("MatMul", ["x", "W"], ["t"], name="then_fc")], "then", [],
                        [h.make_tensor_value_info("t", T.FLOAT, None)])
    other = h.make_graph([h.make_node("MatMul", ["x", "W"], ["e"], name="else_fc"), h.make_node("Relu", ["e"], ["t"])],
                         "else", [], [h.make_tensor_value_info("t", T.FLOAT, None)])
    model = _model([h.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="if")],
                   [h.make_tensor_value_info("x", T.FLOAT, ["n", 64]), h.make_tensor_value_info("c", T.BOOL, [])],
                   [h.make_tensor_value_info("y", T.FLOAT, ["n", 96])], [nh.from_array(W64x96, "W")])
    optimized, report = optimize(model, rank_ratio=0.5, validate=False, measure=False)
    assert len(report.decomposed) == 2
    assert sorted(_initializer_types(optimized)) == ["W_lowrank_a", "W_lowrank_b"]
    assert weight_bytes(optimized) < weight_bytes(model)
    for flag in (True, False):
        feeds = {"x": RNG.standard_normal((3, 64)).astype(np.float32), "c": np.array(flag)}
        np.testing.assert_allclose(run_ort(optimized, feeds)[0], run_ort(model, feeds)[0], rtol=1e-3, atol=1e-4)


# --- 3. factors keep the weight's storage type --------------------------------------------------------

def _fp16_behind_cast(op: str) -> onnx.ModelProto:
    if op == "Gemm":
        w = low_rank_matrix(RNG, 96, 64, 8, noise=0).astype(np.float16)   # [N, K] for transB
        return model_from_text("""(float[N, 64] x) => (float[N, 96] y) {
            w = Cast<to = 1>(W16)
            [fc] y = Gemm<transB = 1>(x, w, B)
        }""", W16=w, B=np.zeros(96, np.float32))
    w = low_rank_conv_weight(RNG, 32, 32, 3, (8, 8), noise=0).astype(np.float16)
    return model_from_text("""(float[N, 32, 10, 10] x) => (float[N, 32, 10, 10] y) {
        w = Cast<to = 1>(W16)
        [conv] y = Conv<pads = [1, 1, 1, 1]>(x, w)
    }""", W16=w)


@pytest.mark.parametrize("op", ["Gemm", "Conv"])
def test_fp16_weights_behind_a_cast_give_fp16_factors_behind_casts(op):
    model = _fp16_behind_cast(op)
    optimized, report = optimize(model, rank_ratio=0.5, validate=False, measure=False)
    assert report.decomposed
    assert set(_initializer_types(optimized).values()) <= {T.FLOAT16, T.FLOAT} and all(
        t.data_type == T.FLOAT16 for t in optimized.graph.initializer if "_lowrank_" in t.name)
    casts = [n for n in optimized.graph.node if n.op_type == "Cast"]
    assert len(casts) == len([t for t in optimized.graph.initializer if "_lowrank_" in t.name])
    assert weight_bytes(optimized) < weight_bytes(model)
    assert_interface_kept(model, optimized)


@pytest.mark.parametrize("op", ["Gemm", "Conv"])
def test_fp16_weights_used_directly_give_fp16_factors(op):
    if op == "Gemm":
        model = model_from_text("""(float16[N, 64] x) => (float16[N, 96] y) { [fc] y = Gemm(x, W) }""",
                                W=W64x96.astype(np.float16))
    else:
        model = model_from_text("(float16[N, 32, 8, 8] x) => (float16[N, 32, 8, 8] y) { [c] y = Conv<pads=[1,1,1,1]>(x, W) }",
                                W=low_rank_conv_weight(RNG, 32, 32, 3, (8, 8), noise=0).astype(np.float16))
    optimized, report = optimize(model, validate=False, measure=False)
    assert report.decomposed and set(_initializer_types(optimized).values()) == {T.FLOAT16}
    assert "Cast" not in op_counts(optimized) and max(output_errors(model, optimized)) <= 1e-2


def test_error_correction_keeps_a_dense_fp16_weight_behind_its_cast(tmp_path):
    """The fold bookkeeping is read by tensor name and never consumed: the re-runs of error
    correction work on copies of the normalized graph and restore the same chains."""
    full = np.random.default_rng(1).standard_normal((96, 96)).astype(np.float16)
    model = model_from_text("""(float[N, 64] x) => (float[N, 96] y) {
        [low] h = MatMul(x, W)
        r = Relu(h)
        wf = Cast<to=1>(F16)
        [full] y = MatMul(r, wf)
    }""", W=low_rank_matrix(RNG, 64, 96, 8, noise=0.05), F16=full)
    np.savez(tmp_path / "c.npz", x=RNG.standard_normal((16, 64)).astype(np.float32))
    optimized, report = optimize(model, calibration=str(tmp_path / "c.npz"), rank=8, error_correction=True,
                                 skip=("merge_linear", "merge_factors"), max_error="none", exclude="full")
    assert [r.status for r in report.candidates] == ["decomposed", "skipped"]
    kept = _initializer_types(optimized)
    assert kept["F16"] == T.FLOAT16 and "wf" not in kept and op_counts(optimized)["Cast"] == 1


# --- 4. where the time goes, measured right ------------------------------------------------------------

def test_a_profile_that_names_none_of_the_layers_is_overruled_by_the_measured_share():
    assert choose_share(measured=0.55, profiled=0.01).share == 0.55
    assert choose_share(measured=0.55, profiled=0.01).source == "measured"
    assert choose_share(measured=0.52, profiled=0.5).source == "profiled"
    assert choose_share(measured=None, profiled=None) is None


def _nhwc_cnn() -> onnx.ModelProto:
    """NHWC input -> Transpose -> three Conv + Add + Relu blocks, as tf2onnx writes them: ORT's
    CPU provider fuses and renames each (NCHWc layout, FusedConv)."""
    rng = np.random.default_rng(3)
    text, weights = ["t = Transpose<perm = [0, 3, 1, 2]>(x)"], {}
    src = "t"
    for i in range(3):
        text += [f"c{i} = Conv<pads = [1, 1, 1, 1]>({src}, K{i}, B{i})", f"a{i} = Add(c{i}, {src})", f"r{i} = Relu(a{i})"]
        weights[f"K{i}"] = (rng.standard_normal((64, 64, 3, 3)) / 24).astype(np.float32)
        weights[f"B{i}"] = rng.standard_normal(64).astype(np.float32)
        src = f"r{i}"
    text.append(f"y = ReduceMean<axes = [2, 3], keepdims = 0>({src})")
    return model_from_text("(float[N, 28, 28, 64] x) => (float[N, 64] y) {\n" + "\n".join(text) + "\n}", **weights)


def test_time_share_of_a_fused_nhwc_cnn_is_checked_against_the_model_timed_without_its_convs(tmp_path):
    model = _nhwc_cnn()
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(4).standard_normal((16, 28, 28, 64)).astype(np.float32))
    _, report = optimize(model, calibration=str(tmp_path / "c.npz"), target_speedup=1.3, measure=True,
                         cache_dir=None, max_error="none", allow_slower=True)
    note = next(n for n in report.notes if n.startswith("--target-speedup 1.3: the candidate layers take"))
    assert "measured with and without them" in note and "in ORT's profile" in note, note   # both read
    share = float(note.split("take ")[1].split("%")[0]) / 100
    assert share > 0.5, note   # three 64-channel 3x3 convs are nearly all of this model's time


def test_the_model_without_its_layers_keeps_its_outputs_shapes():
    from onnx_lowrank.graph import import_graph
    model = _nhwc_cnn()
    graph = import_graph(model)
    standin, replaced = without_layers(graph, model, {"c0", "c1", "c2"}, set())
    assert replaced == 3 and "Conv" not in op_counts(standin)
    x = np.ones((2, 28, 28, 64), np.float32)
    assert run_ort(standin, {"x": x})[0].shape == run_ort(model, {"x": x})[0].shape


# --- 5. a quality gate that can fail ---------------------------------------------------------------------

def _classifier() -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    return model_from_text("""(float[N, 64] x) => (float[N, 10] logits) {
        [fc1] h = MatMul(x, W1)
        r = Relu(h)
        [fc2] logits = Gemm(r, W2, B2)
    }""", W1=low_rank_matrix(rng, 64, 256, 16, noise=0.05), W2=rng.standard_normal((256, 10)).astype(np.float32),
        B2=np.zeros(10, np.float32))


def test_a_lossy_run_outside_the_default_gate_exits_1_and_writes_nothing(capsys, tmp_path):
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_classifier(), path)
    code, stdout, err = run_cli(capsys, "optimize", path, out, "--rank-ratio", 0.05, "--rank-multiple", 1,
                                "--no-measure")
    assert code == 1 and not out.exists()
    assert "logits:" in err and ("x the bound" in err or "top-1 agreement" in err)
    assert "--max-error" in err and err.count("\n") == 1
    assert "parity FAILED" in stdout and "PASSED" not in stdout


def test_max_error_none_writes_it_ungated_and_says_so(capsys, tmp_path):
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_classifier(), path)
    code, stdout, _ = run_cli(capsys, "optimize", path, out, "--rank-ratio", 0.05, "--rank-multiple", 1,
                              "--no-measure", "--max-error", "none")
    assert code == 0 and out.exists()
    assert "parity UNGATED" in stdout and ", UNGATED: output rel_l2 " in stdout and "PASSED" not in stdout


def test_calibrated_target_is_an_objective_under_the_gate(tmp_path):
    """--target-flops far past what the gate allows: the back-off stops at the gate, and the
    written model is within it on the held-back samples."""
    model = _classifier()
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(6).standard_normal((64, 64)).astype(np.float32))
    _, report = optimize(model, calibration=str(tmp_path / "c.npz"), target_flops=0.05, rank_multiple=1)
    assert report.parity.passed and report.gate.endswith("(default)")
    assert any(n.startswith("quality gate rel_l2 <= 0.25") and "backed off" in n for n in report.notes), report.notes
    logits = report.parity.outputs[0]
    assert logits.rel_l2_error <= 0.25 and logits.top1_agreement >= 0.95


# --- 6. never slower -------------------------------------------------------------------------------------

def test_a_result_that_measures_slower_is_not_written(monkeypatch):
    monkeypatch.setattr(data_aware, "whole_model_speedup", lambda *a, **k: 0.8)
    model = model_from_text("(float[N, 64] x) => (float[N, 96] y) { [fc] y = MatMul(x, W) }", W=W64x96)
    optimized, report = optimize(model, measure=True, cache_dir=None, min_layer_speedup=0.01)
    assert optimized.SerializeToString() == model.SerializeToString()
    assert report.measured_speedup == 0.8 and "0.80x the original's speed" in report.fallback
    assert not report.decomposed and report.layers[0].reason.startswith("undone: ")
    kept, report = optimize(model, measure=True, cache_dir=None, min_layer_speedup=0.01, allow_slower=True)
    assert report.decomposed and op_counts(kept) == {"MatMul": 2}


# --- 7. duplicate node names -------------------------------------------------------------------------------

def test_duplicate_node_names_across_subgraphs_are_accepted_and_kept_on_nodes_left_alone():
    """Exporters name nodes per branch, so both branches of an If hold a 'fc' and an 'act' (ORT
    refuses duplicates within one graph, not across graphs). Each 'fc' is its own layer with its
    own weight; the nodes the tool leaves alone keep their names."""
    v = low_rank_matrix(RNG, 64, 96, 4, noise=0)

    def branch(name, weight):
        return h.make_graph([h.make_node("MatMul", ["x", weight], ["m"], name="fc"),
                             h.make_node("Relu", ["m"], ["t"], name="act")], name, [],
                            [h.make_tensor_value_info("t", T.FLOAT, None)])

    model = _model([h.make_node("If", ["c"], ["y"], then_branch=branch("then", "W"), else_branch=branch("else", "V"),
                                name="if")],
                   [h.make_tensor_value_info("x", T.FLOAT, ["n", 64]), h.make_tensor_value_info("c", T.BOOL, [])],
                   [h.make_tensor_value_info("y", T.FLOAT, ["n", 96])], [nh.from_array(W64x96, "W"), nh.from_array(v, "V")])
    optimized, report = optimize(model, measure=False)
    assert [r.name for r in report.decomposed] == ["fc", "fc_2"]
    assert [r.rank for r in report.decomposed] == [[8], [8]]   # W is rank 8, V rank 4 rounded up to 8
    assert report.parity.passed
    for flag in (True, False):
        feeds = {"x": RNG.standard_normal((3, 64)).astype(np.float32), "c": np.array(flag)}
        np.testing.assert_allclose(run_ort(optimized, feeds)[0], run_ort(model, feeds)[0], rtol=1e-4, atol=1e-5)
    for attr in optimized.graph.node[0].attribute:
        names = [n.name for n in attr.g.node]
        assert "act" in names and len(set(names)) == len(names)


def test_top1_agreement_on_a_handful_of_real_rows_cannot_pass_the_gate():
    """8 of 8 agreeing held-out rows show an agreement of at least 0.83 with 90% confidence, not
    0.95: on real samples the gate asks for the bound; 32 of 32 (0.951) pass."""
    from onnx_lowrank.compare import Tolerance, compare_output, wilson_lower_bound
    assert round(wilson_lower_bound(1.0, 8), 2) == 0.83 and wilson_lower_bound(1.0, 32) > 0.95
    logits = np.eye(10, dtype=np.float32)[np.arange(8) % 10] * 5
    strict = Tolerance(max_error=0.25, min_top1=0.95, top1_confident=True)
    assert not compare_output("y", logits, logits * 1.01, strict).passed
    assert compare_output("y", logits, logits * 1.01, Tolerance(max_error=0.25, min_top1=0.95)).passed
    many = np.eye(10, dtype=np.float32)[np.arange(64) % 10] * 5
    assert compare_output("y", many, many * 1.01, strict).passed
