"""The data-aware path end to end (optimize with --calibration and the --target-* flags), through
the Python API and the CLI, on a small MLP whose inputs use few directions strongly."""

import numpy as np
import onnx
import pytest
from helpers import model_from_text, relative_error, run_cli, run_ort

from onnx_lowrank import optimize

RNG = np.random.default_rng(0)
K, H, N = 64, 96, 32
W1 = (RNG.standard_normal((K, H)) / np.sqrt(K)).astype(np.float32)
W2 = (RNG.standard_normal((H, N)) / np.sqrt(H)).astype(np.float32)
MLP = model_from_text(f"(float[B, {K}] x) => (float[B, {N}] y) {{ [fc1] h = MatMul(x, W1) r = Relu(h) "
                      "[fc2] y = MatMul(r, W2) }", W1=W1, W2=W2)
BASIS, _ = np.linalg.qr(RNG.standard_normal((K, K)))


def inputs(rows, seed):
    """Feature scales over three decades in a random basis: what trained models' activations look like
    to a weight, and where the weight's own spectrum is the wrong guide."""
    rng = np.random.default_rng(seed)
    return ((rng.standard_normal((rows, K)) * np.logspace(0, -3, K)) @ BASIS).astype(np.float32)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, x=inputs(512, seed=1))
    return str(path)


def held_out_error(model):
    x = inputs(256, seed=2)
    return relative_error(run_ort(model, {"x": x})[0], run_ort(MLP, {"x": x})[0])


def test_calibration_beats_weight_only_at_the_same_flops(calib):
    plain, plain_report = optimize(MLP, target_flops=0.5, validate=False)
    white, white_report = optimize(MLP, calibration=calib, target_flops=0.5, validate=False)
    for report in (plain_report, white_report):
        totals = report.totals()
        assert totals["layer_macs_after"] <= 0.5 * totals["layer_macs_before"]
    assert {r.method for r in white_report.decomposed} == {"whitened-svd"}
    assert all(r.activation_error is not None for r in white_report.decomposed)
    assert any("weight-only" in note for note in plain_report.notes)
    # measured on samples calibration never saw
    assert held_out_error(white) < 0.5 * held_out_error(plain)   # measured: 0.30 against 0.78


def test_error_correction_reduces_the_output_error(calib):
    """fc2 is refitted to fc1's truncation error (fc1 itself sees unchanged inputs, so it stays as it
    was). The gain is small on two layers (measured 0.484 against 0.488); a wrong sign, transpose or
    cross-Gram orientation in the refit costs far more than that."""
    uncorrected, _ = optimize(MLP, calibration=calib, target_flops=0.3, validate=False)
    corrected, report = optimize(MLP, calibration=calib, target_flops=0.3, validate=False, error_correction=True)
    assert any("error correction" in note for note in report.notes)
    assert held_out_error(corrected) < held_out_error(uncorrected)


def test_max_error_backs_off_until_within_the_bound(calib):
    greedy, greedy_report = optimize(MLP, calibration=calib, target_flops=0.3, validate=False)
    too_much = held_out_error(greedy)
    bound = too_much / 3
    # min_top1 0: y is no classifier's scores, the rel_l2 bound alone is under test
    model, report = optimize(MLP, calibration=calib, target_flops=0.3, max_error=bound, min_top1=0)
    assert any("backed off" in note for note in report.notes), report.notes
    assert report.parity.passed   # checked on the held-back calibration samples
    assert held_out_error(model) <= 1.5 * bound   # and on unseen ones, within sampling noise
    assert report.totals()["layer_macs_after"] > greedy_report.totals()["layer_macs_after"]


def test_cli_with_a_calibration_file(tmp_path, capsys, calib):
    source, out = tmp_path / "mlp.onnx", tmp_path / "out.onnx"
    onnx.save(MLP, source)
    code, stdout, stderr = run_cli(capsys, "optimize", source, out, "--calibration", calib, "--target-params", 0.5,
                                   "--error-correction", "--max-error", 0.5, "--min-top1", 0)
    assert code == 0, stderr
    assert "whitened-svd" in stdout and "calibration: Gram matrices of 2 layers" in stdout
    assert "rank allocation:" in stdout and "error correction: 2 layers refitted" in stdout
    assert held_out_error(onnx.load(out)) < 0.5


def test_cli_calibration_errors_are_one_line(tmp_path, capsys):
    source, bad = tmp_path / "mlp.onnx", tmp_path / "bad.npz"
    onnx.save(MLP, source)
    np.savez(bad, y=np.zeros((2, K), np.float32))
    code, _, stderr = run_cli(capsys, "optimize", source, tmp_path / "o.onnx", "--calibration", bad)
    assert code == 2
    assert stderr.strip().count("\n") == 0 and "has no array for input 'x'" in stderr
    code, _, stderr = run_cli(capsys, "optimize", source, tmp_path / "o.onnx", "--target-flops", 0.5,
                              "--target-params", 0.5)
    assert code == 2


def test_target_speedup_is_measured_and_reallocated_until_met(calib, monkeypatch):
    """The MAC ratio Amdahl asks for assumes the layers' time scales with their MACs. Here the fake
    timing makes time scale with MACs^0.35 (small layers do: fixed costs stay), in a model whose
    layers take 90% of the time while the profile says 60%: the first allocation falls short, and
    the measured shortfall re-allocates until the target is met."""
    from onnx_lowrank.data_aware import allocate, speed

    def weights(model):
        return sum(np.prod(t.dims) for t in model.graph.initializer)

    timings = []

    def fake_speedup(original, candidate, plan, options):
        timings.append(1 / (0.1 + 0.9 * (weights(candidate) / weights(original)) ** 0.35))
        return timings[-1]

    monkeypatch.setattr(speed, "_measured_speedup", fake_speedup)
    monkeypatch.setattr(allocate, "layer_time_fraction", lambda *args, **kwargs: 0.6)
    monkeypatch.setattr(allocate, "_measured_share", lambda *args, **kwargs: 0.65)   # agrees: profile used
    model, report = optimize(MLP, calibration=calib, target_speedup=1.5, validate=False, measure=True, cache_dir=None,
                             allow_slower=True)
    note = next(n for n in report.notes if n.startswith("--target-speedup 1.5 measured"))
    assert "(met)" in note and " -> " in note and len(timings) >= 2, note
    assert timings[0] < 1.5 <= timings[-1] == fake_speedup(MLP, model, None, None)
    _, unmeasured = optimize(MLP, calibration=calib, target_speedup=1.5, validate=False, measure=False)
    assert not any(n.startswith("--target-speedup 1.5 measured") for n in unmeasured.notes)


def test_held_back_samples_in_batches_of_unequal_size_are_compared_as_one(tmp_path):
    """60 samples hold back 30 (half), which calibration reads in batches of 8, 8, 8 and 6: the gate
    and the parity check compare them as one batch of 30 (stacking them raised a ValueError)."""
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((60, 256)).astype(np.float32))
    model, report = optimize("models/lowrank_mlp_small.onnx", calibration=str(path), target_flops=0.6,
                             measure=False)
    assert report.parity is not None and report.parity.samples == 4
    assert report.data_aware.gate is not None and report.data_aware.gate.samples == 30
    assert report.parity.outputs[0].passed == report.parity.passed


def test_sensitivities_are_the_output_deviation_of_one_truncated_layer(calib, monkeypatch):
    """The probe model (one run per layer, an If per layer switched by the selector) measures, per
    layer, the model's relative output deviation with that layer alone truncated, over its layer
    error: the same as truncating the layer in a copy of the model and running both."""
    from onnx_lowrank.data_aware import allocate
    from onnx_lowrank.rank_allocation import rank_grid
    seen = {}
    measure = allocate.sensitivities

    def recording(plan, original, context):
        seen.update(spectra=list(plan.spectra), plan=plan, context=context)   # before they are weighed
        seen["weights"] = measure(plan, original, context)
        return seen["weights"]

    monkeypatch.setattr(allocate, "sensitivities", recording)
    optimize(MLP, calibration=calib, target_flops=0.5, validate=False)
    plan, context = seen["plan"], seen["context"]
    x = np.load(calib)["x"][:min(plan.fit_stop, allocate.sensitivity_samples(1.0))]
    reference = run_ort(MLP, {"x": x})[0].astype(np.float64)
    assert set(seen["weights"]) == {"fc1", "fc2"} and allocate.sensitivity_samples(1.0) == 8
    assert [allocate.sensitivity_samples(rows) for rows in (32, 64, 128, 512)] == [8, 4, 2, 1]
    for spectrum in seen["spectra"]:
        grid = rank_grid(spectrum, context.options.rounding_multiple)
        rank = grid[len(grid) // 2]
        a, b = context.cache[spectrum.name].factors(rank)
        truncated = onnx.ModelProto()
        truncated.CopyFrom(MLP)
        weight = {"fc1": "W1", "fc2": "W2"}[spectrum.name]
        for tensor in truncated.graph.initializer:
            if tensor.name == weight:
                tensor.CopyFrom(onnx.numpy_helper.from_array((a @ b).astype(np.float32), weight))
        deviation = relative_error(run_ort(truncated, {"x": x})[0], reference)
        assert seen["weights"][spectrum.name] == pytest.approx(deviation / spectrum.errors[rank], rel=1e-3)


def test_a_square_transposed_gemm_is_truncated_in_its_own_orientation(calib):
    """Gemm transB=1 stores W^T: the cached whitened SVD reads the weight again when the rewrite
    asks for factors, and must read it transposed (a square weight would not show the mistake in
    its shape, only in its error)."""
    w = (RNG.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32)
    gemm = model_from_text(f"(float[B, {K}] x) => (float[B, {K}] y) {{ [fc] y = Gemm<transB = 1>(x, Wt) }}",
                           Wt=np.ascontiguousarray(w.T))
    optimized, report = optimize(gemm, calibration=calib, target_flops=0.5, validate=False)
    (record,) = report.decomposed
    x = inputs(256, seed=1)
    measured = relative_error(run_ort(optimized, {"x": x})[0], run_ort(gemm, {"x": x})[0])
    assert record.method == "whitened-svd"
    assert measured == pytest.approx(record.activation_error, rel=0.1)   # a transposed read: error ~1


def gated_runs_with_stand_in_refinement(calib, monkeypatch, refined_model):
    """The closed form under a gate a third of the ungated error, and the same with --refine, where
    refinement is a stand-in (no torch): call i (1-based) returns refined_model(i, model given) and
    an outcome that halved the error. Returns (closed form, its report, refined run, its report, calls)."""
    from onnx_lowrank.data_aware import refine as _refine
    from onnx_lowrank.report import RefineOutcome

    calls = []

    def fake_refine(plan, original, optimized, context, report, on_batch=None):
        if not context.options.refine:
            return optimized, None
        calls.append(optimized)
        model, seconds = refined_model(len(calls), optimized)
        return model, RefineOutcome(kept=True, closed_form_error=1.0, refined_error=0.5, seconds=seconds)

    monkeypatch.setattr(_refine, "refine", fake_refine)
    monkeypatch.setattr(_refine, "require_torch", lambda: None)
    greedy, _ = optimize(MLP, calibration=calib, target_flops=0.3, validate=False)
    bound = held_out_error(greedy) / 3
    plain, plain_report = optimize(MLP, calibration=calib, target_flops=0.3, max_error=bound, min_top1=0)
    model, report = optimize(MLP, calibration=calib, target_flops=0.3, max_error=bound, min_top1=0, refine=True)
    return plain, plain_report, model, report, calls


@pytest.mark.parametrize("within_from", [2, 3, None])
def test_a_refined_model_outside_the_gate_is_backed_off_by_its_gain_and_refined_again(calib, monkeypatch, within_from):
    """Refinement halved the error (ratio 0.5), yet the refined model is outside the gate: the
    back-off refines again the longest prefix whose closed form is within 2 x max_error (call 2);
    if that is outside too, up to two refined prefixes between it and the closed form within the
    gate (calls 3, 4); if none is within, the closed form within the gate is kept. From call
    `within_from` on the stand-in returns the original model, within any gate, before that the
    model it was given, unrefined."""
    def refined_model(call, given):
        return (MLP if within_from is not None and call >= within_from else given), 0.0

    plain, plain_report, model, report, calls = gated_runs_with_stand_in_refinement(calib, monkeypatch, refined_model)
    gate, strict = report.data_aware.gate, plain_report.data_aware.gate
    # the planned model, the loosened prefix, then at most two bisection rounds
    assert not gate.within and (len(calls) == within_from if within_from else 3 <= len(calls) <= 4)
    if within_from is not None:
        assert gate.refined_again and gate.steps_kept > strict.steps_kept   # further than the closed form may go
        assert any("refined again: within the gate" in n for n in report.notes)
        assert model.SerializeToString() == MLP.SerializeToString()
    else:
        assert not gate.refined_again and gate.steps_kept == strict.steps_kept
        assert model.SerializeToString() == plain.SerializeToString()
        assert any("the backed-off models refined again were outside it too" in n for n in report.notes)


def test_refinements_of_backed_off_models_stay_within_their_time_budget(calib, monkeypatch):
    """A refinement that took longer than the budget is not run again after the back-off: the
    closed form within the gate is kept, and the note says why."""
    from onnx_lowrank.data_aware import REFIT_BUDGET_S

    plain, _, model, report, calls = gated_runs_with_stand_in_refinement(
        calib, monkeypatch, lambda call, given: (given, REFIT_BUDGET_S + 1))
    assert len(calls) == 1 and not report.data_aware.gate.refined_again
    assert model.SerializeToString() == plain.SerializeToString()
    assert any(f"over the {REFIT_BUDGET_S:.0f} s allowed" in n for n in report.notes)
