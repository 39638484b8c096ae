"""The measured rank search (the paper's Algorithm 1) on synthetic latency tables: the rank just
below the largest latency drop within the error budget; dense kept unless measurably faster.
Latencies here are tables, never timings, so every assertion is exact."""

import sys

import numpy as np
import pytest

from helpers import EXACT, assert_rewrite, model_from_text
from models.synthetic import low_rank_conv_weight, low_rank_matrix
from onnx_lowrank import optimize
from onnx_lowrank.options import Options
from onnx_lowrank.rank_choice import error_budget, search_ranks

TINY = 1e-9


def steps(*edges, dense=2.0):
    """latency(r) for a single rank: 1.0 above all edges, dropping by `drop` below each edge."""
    def latency(ranks):
        if ranks is None:
            return dense
        return 1.0 - sum(drop for edge, drop in edges if ranks[0] <= edge)
    return latency


def search(latency, chosen=128, error=lambda r: TINY, **options):
    return search_ranks((chosen,), error, latency, Options(**options))


def test_takes_the_rank_just_below_the_largest_drop():
    decision = search(steps((112, 0.3)))
    assert decision.ranks == (112,)
    assert "rank search rank 128 -> rank 112" in decision.decision
    assert decision.latency_factorized_ms == pytest.approx(0.7) and decision.latency_dense_ms == 2.0


def test_the_largest_of_several_drops_wins():
    assert search(steps((120, 0.05), (104, 0.3))).ranks == (104,)


def test_a_drop_that_a_rise_further_down_undoes_is_not_taken():
    # 128 -> 120 rises, 120 -> 112 is the largest drop: 112 is taken only if it beats 128 itself
    rise = lambda r: 2.0 if r is None else (1.0 if r[0] > 120 else 1.2 if r[0] > 112 else 0.9)
    assert search(rise).ranks == (112,)
    no_gain = lambda r: 2.0 if r is None else (1.0 if r[0] > 120 else 1.3 if r[0] > 112 else 0.99)
    assert search(no_gain).ranks == (128,)


def test_a_drop_within_timing_noise_is_no_step():
    decision = search(steps((112, 0.02)))           # 2% < STEP_THRESHOLD
    assert decision.ranks == (128,) and "no latency step down to rank 96" in decision.decision


def test_ranks_whose_error_passes_the_budget_are_not_searched():
    error = lambda r: 1e-4 if r[0] >= 120 else 1e-2     # only 128 and 120 within tolerance 1e-3
    assert search(steps((112, 0.3)), error=error).ranks == (128,)
    assert search(steps((120, 0.3)), error=error).ranks == (120,)


def test_the_floor_bounds_the_search():
    assert search(steps((104, 0.3)), rank_search_floor=0.9).ranks == (128,)      # grid 128, 120 only
    assert search(steps((104, 0.3)), rank_search_floor=0.8).ranks == (104,)      # ceil(0.8 x 128) = 103


def test_the_step_is_the_rank_multiple():
    measured = dict(search(steps((112, 0.3)), rank_multiple=16).measured)
    assert set(measured) == {(128,), (112,), (96,)}


def test_auto_multiple_finds_the_step_edge_between_grid_points():
    decision = search(steps((117, 0.3)), rank_multiple="auto")
    assert decision.ranks == (117,)
    measured = {r for (r,), _ in decision.measured}
    assert {128, 120, 112, 104, 96} <= measured and set(range(112, 121)) <= measured


def test_keeps_dense_when_not_measurably_faster():
    decision = search(steps((112, 0.3), dense=0.72))          # 0.72 / 0.7 = 1.03x < 1.05
    assert decision.ranks is None
    assert decision.decision.startswith("kept dense: measured 1.03x < --min-layer-speedup 1.05")
    assert search(steps((112, 0.3), dense=0.72), min_layer_speedup=1.02).ranks == (112,)


def test_error_budget_follows_the_rule():
    assert error_budget(Options(tolerance=1e-2)) == 1e-2
    assert error_budget(Options(energy=0.99)) == pytest.approx(0.1)
    assert error_budget(Options(rank=8)) is None


def test_ranks_move_together_and_stay_multiples_of_the_granularity():
    latency = lambda r: 2.0 if r is None else (1.0 if r[0] > 110 else 0.5)
    decision = search_ranks((128, 96), lambda r: TINY, latency, Options(), granularity=12)
    assert decision.ranks == (104, 72)                        # steps of lcm(8, 12) = 24: 128, 104


# --- through optimize, with a table in place of ONNX Runtime -------------------------------------

W = low_rank_matrix(np.random.default_rng(0), 64, 48, rank=4, noise=0)
MATMUL = "(float[N, 64] x) => (float[N, 48] y) { [fc] y = MatMul(x, W) }"


def table_latency(monkeypatch, dense: float, factorized: float, by_method: dict | None = None):
    calls = []

    def latency(geometry, form):
        calls.append((geometry, form))
        if form.method == "dense":
            return dense
        return (by_method or {}).get(form.method, factorized)

    # onnx_lowrank.optimize the attribute is the function; the module is in sys.modules
    monkeypatch.setattr(sys.modules["onnx_lowrank.optimize"], "latency_for",
                        lambda options: latency if options.measure else None)
    return calls


def test_optimize_keeps_a_layer_dense_that_is_not_faster(monkeypatch):
    calls = table_latency(monkeypatch, dense=1.0, factorized=1.2)
    model = model_from_text(MATMUL, W=W)
    optimized, report = optimize(model, measure=True, validate=False, shape={"x": [3, 64]})
    (record,) = report.layers
    assert record.status == "skipped" and record.reason.startswith("kept dense: measured 0.83x")
    assert (record.latency_dense_ms, record.latency_factorized_ms) == (1.0, 1.2)
    assert calls[0][0].input_shape == (3, 64) and calls[0][0].weight_shape == (64, 48)
    assert optimized is model


def test_optimize_records_both_latencies_of_a_decomposed_layer(monkeypatch):
    table_latency(monkeypatch, dense=1.0, factorized=0.4)
    # allow_slower: the layer latencies are faked, the whole-model check would time the real thing
    _, report = assert_rewrite(model_from_text(MATMUL, W=W), ops={"MatMul": 2}, max_error=EXACT, measure=True,
                               allow_slower=True)
    (record,) = report.layers
    assert record.decomposed and record.decision == "measured 2.50x vs dense"
    assert (record.latency_dense_ms, record.latency_factorized_ms) == (1.0, 0.4)


def test_no_measure_asks_for_no_latency(monkeypatch):
    calls = table_latency(monkeypatch, dense=1.0, factorized=1.2)
    _, report = optimize(model_from_text(MATMUL, W=W), measure=False, validate=False)
    assert report.layers[0].decomposed and not calls and report.layers[0].latency_dense_ms is None


CONV = "(float[N, 16, 10, 10] x) => (float[N, 16, 10, 10] y) { [conv] y = Conv <pads = [1, 1, 1, 1]> (x, W, B) }"


@pytest.mark.parametrize("fastest", ["tucker2", "branched-tucker", "spatial-svd"])
def test_conv_method_auto_keeps_the_fastest_form(monkeypatch, fastest):
    rng = np.random.default_rng(1)
    w = low_rank_conv_weight(rng, 16, 16, 3, (4, 4), noise=0)
    times = {"tucker2": 0.5, "branched-tucker": 0.5, "spatial-svd": 0.5, fastest: 0.3}
    table_latency(monkeypatch, dense=1.0, factorized=0.5, by_method=times)
    model = model_from_text(CONV, W=w, B=rng.standard_normal(16).astype(np.float32))
    _, report = optimize(model, conv_method="auto", branches=2, tolerance=0.5, rank_multiple=2,
                         min_flop_reduction=0.0, measure=True, max_error=0.6, min_top1=0, allow_slower=True)
    (record,) = report.layers
    assert record.decomposed and record.method == fastest, record.reason
    assert record.reason.startswith("chosen over ") and record.latency_factorized_ms == 0.3
    assert report.parity.passed


def test_conv_method_auto_under_a_rank_rule_keeps_the_least_error_no_slower_than_tucker2(monkeypatch):
    rng = np.random.default_rng(1)
    model = model_from_text(CONV, W=rng.standard_normal((16, 16, 3, 3)).astype(np.float32),
                            B=rng.standard_normal(16).astype(np.float32))
    options = dict(branches=2, rank=4, rank_multiple=2, min_flop_reduction=0.0, measure=True, validate=False,
                   allow_slower=True)

    def chosen(method, times):
        table_latency(monkeypatch, dense=1.0, factorized=0.5, by_method=times)
        (record,) = optimize(model, conv_method=method, **options)[1].layers
        return record.method, record.weight_error

    forms = ("tucker2", "branched-tucker", "spatial-svd")
    error = {method: chosen(method, {})[1] for method in forms}
    assert len(set(error.values())) == 3
    # all no slower than Tucker-2: the least error; the others slower: Tucker-2
    assert chosen("auto", {"tucker2": 0.5, "branched-tucker": 0.4, "spatial-svd": 0.5})[0] == min(error, key=error.get)
    assert chosen("auto", {"tucker2": 0.5, "branched-tucker": 0.6, "spatial-svd": 0.6})[0] == "tucker2"


# --- options and flags -----------------------------------------------------------------------------

def test_flags_reach_the_options(tmp_path, capsys):
    import json

    import onnx

    from onnx_lowrank.cli import main

    src, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model_from_text(MATMUL, W=W), str(src))
    assert main(["optimize", str(src), str(out), "-q", "--measure", "--cache-dir", str(tmp_path / "cache"),
                 "--rank-multiple", "auto", "--rank-search-floor", "0.5", "--min-layer-speedup", "0.01",
                 "--conv-method", "spatial-svd", "--branches", "2", "--report", str(report)]) == 0
    options = json.loads(report.read_text())["options"]
    assert {k: options[k] for k in ("measure", "rank_multiple", "rank_search_floor", "min_layer_speedup",
                                    "conv_method", "branches")} == {
        "measure": True, "rank_multiple": "auto", "rank_search_floor": 0.5, "min_layer_speedup": 0.01,
        "conv_method": "spatial-svd", "branches": 2}
    assert json.loads(report.read_text())["layers"][0]["latency_dense_ms"] > 0     # really measured in ORT
    assert (tmp_path / "cache" / "latency.json").is_file()


@pytest.mark.parametrize("flags, message", [
    (["--rank-multiple", "x"], "--rank-multiple must be a positive integer or auto, got x"),
    (["--rank-search-floor", "0"], "--rank-search-floor must be in (0, 1], got 0.0"),
    (["--branches", "0"], "--branches must be a positive integer, got 0"),
    (["--conv-method", "cp"], "argument --conv-method: invalid choice: 'cp'"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    from onnx_lowrank.cli import main

    assert main(["optimize", "in.onnx", str(tmp_path / "out.onnx"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
