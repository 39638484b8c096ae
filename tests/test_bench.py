"""bench.py (the timing engine), profiling.py (the profiler summed per layer), `onnx-lowrank bench`
and `optimize --bench`. No assertion here depends on how fast anything runs: the engine's
arithmetic is tested against a fake clock, and the real runs check structure only. The speed
acceptance (a model against itself reads 1.00 +- 0.05, ...) is in benchmarks/bench_check.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from models.synthetic import conv_model, mlp_model
from onnx_lowrank import optimize, save_model
from onnx_lowrank.bench import TimingPlan, bench, int8_baseline, latency_stats, median_ci, speedup, time_interleaved
from onnx_lowrank.cli import main
from onnx_lowrank.errors import OptionError
from onnx_lowrank.profiling import LayerNames, join, kernel_times, layer_profile
from onnx_lowrank.runtime import SessionConfig
from test_runtime import fake_gpu

QUICK = TimingPlan(warmup_runs=2, warmup_s=0.0, block_s=0.002, blocks=4, max_blocks=4, profile_runs=3)
QUICK_FLAGS = ["--blocks", "4", "--max-blocks", "4", "--block-ms", "2", "--warmup-ms", "0"]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_runner(clock: FakeClock, seconds: float, log: list, name: str):
    def run():
        clock.now += seconds
        log.append(name)
    return run


# --- the engine, on a fake clock ----------------------------------------------------------------

def test_interleaved_blocks_alternate_order_and_give_the_exact_ratio():
    clock, log = FakeClock(), []
    plan = TimingPlan(warmup_runs=3, warmup_s=0.0, block_s=0.010, blocks=4)
    runners = [fake_runner(clock, 0.002, log, "A"), fake_runner(clock, 0.001, log, "B")]
    latencies, counts = time_interleaved(runners, plan, clock)
    assert counts == [5, 10]                        # blocks of ~10 ms
    timed = log[6:]                                 # after 3 warm-up runs each
    assert timed == ["A"] * 5 + ["B"] * 10 + ["B"] * 10 + ["A"] * 5 + ["A"] * 5 + ["B"] * 10 + ["B"] * 10 + ["A"] * 5
    np.testing.assert_allclose(latencies[0], 0.002)
    np.testing.assert_allclose(latencies[1], 0.001)
    assert speedup(*latencies) == pytest.approx((2.0,) * 5)


def test_timing_goes_on_in_block_pairs_until_settled_or_max_blocks():
    clock, log = FakeClock(), []
    plan = TimingPlan(warmup_runs=1, warmup_s=0.0, block_s=0.001, blocks=3, max_blocks=9)
    runners = [fake_runner(clock, 0.001, log, "A"), fake_runner(clock, 0.001, log, "B")]
    asked = []

    def settled(latencies):
        asked.append(len(latencies[0]))
        return len(latencies[0]) >= 6

    latencies, _ = time_interleaved(runners, plan, clock, settled)
    assert asked == [4, 6] and len(latencies[0]) == len(latencies[1]) == 6   # asked only after whole A B / B A pairs
    latencies, _ = time_interleaved(runners, plan, clock, lambda latencies: False)
    assert len(latencies[0]) == 9                                               # never past max_blocks


def test_warm_up_runs_until_both_count_and_time_are_met():
    clock, log = FakeClock(), []
    time_interleaved([fake_runner(clock, 0.01, log, "A")], TimingPlan(warmup_runs=2, warmup_s=0.095, block_s=0.01,
                                                                       blocks=3), clock)
    assert len(log) == 10 + 3                       # 0.095 s of warm-up at 10 ms a run, then 3 blocks of 1


def test_speedup_is_the_median_of_per_block_ratios_not_a_ratio_of_medians():
    a = np.array([1.0, 1.0, 10.0, 10.0, 10.0])
    b = np.array([0.5, 0.5, 5.0, 5.0, 5.0])        # drift hit both alike: every pair reads 2.0
    assert speedup(a, b)[0] == pytest.approx(2.0)


def test_median_confidence_interval_is_the_binomial_order_statistics():
    values = np.arange(1.0, 31.0)                  # n = 30: ranks 15 -+ 5.4, so the 10th and 22nd values
    assert median_ci(values) == (10.0, 22.0)
    assert median_ci(np.full(50, 3.0)) == (3.0, 3.0)
    stats = latency_stats("m", np.array([0.001, 0.002, 0.003, 0.004, 0.005]), runs_per_block=7, samples=32)
    assert stats.median_ms == pytest.approx(3.0) and stats.min_ms == pytest.approx(1.0)
    assert stats.p10_ms == pytest.approx(1.4) and stats.p90_ms == pytest.approx(4.6)
    assert stats.throughput == pytest.approx(32 / 0.003)


@pytest.mark.parametrize("settings", [dict(blocks=2), dict(block_s=0.0), dict(warmup_runs=0), dict(max_blocks=10)])
def test_timing_plan_refuses_plans_that_measure_nothing(settings):
    with pytest.raises(OptionError):
        TimingPlan(**settings)


# --- real runs: structure, not speed ------------------------------------------------------------

@pytest.fixture(scope="module")
def mlp_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    original = mlp_model(k=64, n=256, rank=8)
    optimized, _ = optimize(original, validate=False, measure=False)
    paths = (str(folder / "a.onnx"), str(folder / "b.onnx"))
    save_model(original, paths[0])
    save_model(optimized, paths[1])
    return paths


def test_one_model_has_latency_but_no_speedup(mlp_pair):
    result = bench([mlp_pair[0]], batch=8, plan=QUICK)
    (stats,) = result.models
    assert result.speedup is None and stats.blocks == 4 and 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert result.input_shapes == {"x": [8, 64]} and result.settings["intra_op_spinning"] is True


def test_pair_turns_spinning_off_and_reports_speedup(mlp_pair):
    result = bench(list(mlp_pair), batch=8, plan=QUICK)
    assert result.settings["intra_op_spinning"] is False and result.settings["interleaved"] is True
    assert result.speedup_p10 <= result.speedup <= result.speedup_p90
    assert result.speedup_ci_low <= result.speedup <= result.speedup_ci_high
    assert [m.model for m in result.models] == list(mlp_pair)


def test_cli_json_has_every_figure_and_speedup(mlp_pair, tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", *mlp_pair, "--batch", "8", "--json", str(path), *QUICK_FLAGS]) == 0
    data = json.loads(path.read_text())
    assert {"speedup", "speedup_p10", "speedup_p90", "models", "settings", "input_shapes"} <= set(data)
    assert {"median_ms", "p10_ms", "p90_ms", "throughput", "runs_per_block"} <= set(data["models"][0])
    assert "speedup A/B" in capsys.readouterr().out


def test_int8_baseline_ratios_come_from_the_same_blocks(mlp_pair, monkeypatch):
    """A 2 ms, B 1 ms, int8 of A 1.5 ms in every block: B is 2x A and 1.5x the int8 baseline."""
    import onnx_lowrank.bench as engine
    times = [np.full(4, 2e-3), np.full(4, 1e-3), np.full(4, 1.5e-3)]
    monkeypatch.setattr(engine, "time_interleaved", lambda runners, plan, settled=None: (times[:len(runners)],
                                                                                         [1] * len(runners)))
    result = bench(list(mlp_pair), batch=8, plan=QUICK, baseline=int8_baseline(mlp_pair[0], None))
    assert [m.model for m in result.models] == [*mlp_pair, "int8 alone"]
    assert result.speedup == pytest.approx(2.0)
    assert result.baseline.over_a == pytest.approx(2 / 1.5) and result.baseline.b_over == pytest.approx(1.5)
    assert result.baseline.how.startswith("dynamic int8") and result.settings["intra_op_spinning"] is False
    alone = bench([mlp_pair[0]], batch=8, plan=QUICK, baseline=int8_baseline(mlp_pair[0], None))
    assert alone.speedup is None and alone.baseline.over_a == pytest.approx(2 / 1.0) and alone.baseline.b_over is None


def test_cli_int8_baseline_row_and_json(mlp_pair, tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", *mlp_pair, "--batch", "8", "--int8-baseline", "--json", str(path), *QUICK_FLAGS]) == 0
    out = capsys.readouterr().out
    assert "-  int8 alone" in out and "B over int8 alone" in out and "speedup A/B" in out
    data = json.loads(path.read_text())
    assert data["baseline"]["label"] == "int8 alone" and data["baseline"]["b_over"] > 0
    assert [m["model"] for m in data["models"]] == [*mlp_pair, "int8 alone"]


def test_int8_baseline_of_a_cnn_is_static_qdq_on_the_inputs():
    models = Path(__file__).resolve().parents[1] / "models"
    label, how, quantized = int8_baseline(str(models / "cnn_digits.onnx"), str(models / "digits_calib.npz"))
    assert how.startswith("static QDQ") and "QuantizeLinear" in {n.op_type for n in quantized.graph.node}


def test_inputs_file_gives_the_shapes_and_the_throughput_unit(capsys):
    models = Path(__file__).resolve().parents[1] / "models"
    result = bench([str(models / "cnn_digits.onnx")], inputs=str(models / "digits_test.npz"), plan=QUICK)
    assert result.input_shapes == {"input": [450, 1, 8, 8]}
    assert result.models[0].throughput == pytest.approx(450 / (result.models[0].median_ms / 1e3))
    assert any("ignored arrays" in note and "label" in note for note in result.notes)


def test_min_speedup_gate(mlp_pair, capsys):
    assert main(["bench", mlp_pair[0], mlp_pair[0], "--min-speedup", "1000", *QUICK_FLAGS]) == 1
    assert "below --min-speedup 1000" in capsys.readouterr().err
    assert main(["bench", mlp_pair[0], "--min-speedup", "1.1"]) == 2


def test_missing_provider_is_one_line_exit_2(mlp_pair, monkeypatch, capsys):
    fake_gpu(monkeypatch, available=("CPUExecutionProvider",))
    assert main(["bench", mlp_pair[0], "--provider", "cuda", *QUICK_FLAGS]) == 2
    err = capsys.readouterr().err.strip()
    assert "CUDAExecutionProvider is not available" in err and "pip install" in err and "\n" not in err


def test_cuda_options_reach_every_session(mlp_pair, monkeypatch, capsys):
    fake = fake_gpu(monkeypatch)
    assert main(["bench", *mlp_pair, "--provider", "cuda", "--device-id", "1", "--threads", "1", *QUICK_FLAGS]) == 0
    assert fake.requests == [[("CUDAExecutionProvider", {"device_id": 1}), ("CPUExecutionProvider", {})]] * 2
    assert "cuda, device 1, 1 threads" in capsys.readouterr().out


def test_tensorrt_profile_says_engines_are_not_split(mlp_pair, monkeypatch, tmp_path):
    fake = fake_gpu(monkeypatch)
    config = SessionConfig(provider="tensorrt", trt_fp16=True, trt_engine_cache=str(tmp_path))
    result = bench([mlp_pair[1]], config=config, plan=QUICK, profile=True)
    assert all(request[0][1]["trt_fp16_enable"] is True for request in fake.requests)
    assert any("TensorRT" in note for note in result.notes)


def test_optimize_bench_puts_the_result_in_the_report():
    model = mlp_model(k=64, n=256, rank=8)
    _, report = optimize(model, bench=True, validate=False, measure=False)
    assert report.bench is not None and report.bench.speedup > 0
    assert json.loads(report.to_json())["bench"]["speedup"] == report.bench.speedup


# --- the profile, per original layer ------------------------------------------------------------

def _events(*nodes: tuple[str, str, float], runs: int = 2) -> list[dict]:
    """A trace as ORT writes it: per run, a model_run span and one kernel event per node."""
    events, t = [], 0
    for _ in range(runs):
        start = t
        for name, op, dur in nodes:
            events.append({"cat": "Node", "name": f"{name}_kernel_time", "ts": t, "dur": dur, "args": {"op_name": op}})
            t += dur
        events.append({"cat": "Session", "name": "model_run", "ts": start, "dur": t - start})
        t += 1
    return events


def test_kernel_times_leave_out_the_first_run():
    events = _events(("a", "MatMul", 10.0), runs=3)
    events[0]["dur"] = 1000.0                       # a slow first run
    assert kernel_times(events, skip_runs=1) == {"a": ("MatMul", 20.0)}


def _graph(*nodes: tuple[str, str, list[str], list[str]]) -> onnx.GraphProto:
    """Just the nodes (name, op, inputs, outputs): all that the name mapping reads."""
    return onnx.helper.make_graph([onnx.helper.make_node(op, inputs, outputs, name=name)
                                   for name, op, inputs, outputs in nodes], "g", [], [])


def test_layer_names_undo_lowrank_suffixes_and_ort_fusions():
    names = LayerNames(_graph(("fc/MatMul_lowrank_a", "MatMul", ["x", "A"], ["h"]),
                              ("fc/MatMul_lowrank_b_2", "MatMul", ["h", "B"], ["z"]),
                              ("/layers.0/MatMul", "MatMul", ["q", "k"], ["s"])))
    assert names.layer("fc/MatMul_lowrank_a") == "fc/MatMul"
    assert names.layer("fused fc/MatMul_lowrank_b_2/MatMulAddFusion") == "fc/MatMul"
    assert names.layer("/layers.0/MatMul/MatMulScaleFusion/") == "/layers.0/MatMul"
    assert names.layer("ReorderOutput_token_7") == "ReorderOutput"


def test_nchwc_convs_are_walked_back_from_their_output_tensor():
    graph = _graph(("conv1_lowrank_out", "Conv", ["x", "W"], ["c"]), ("bn", "BatchNormalization", ["c", "s"], ["b"]),
                   ("res", "Add", ["skip", "b"], ["r"]), ("act", "Relu", ["r"], ["y"]))
    profile = layer_profile(_events(("y_nchwc", "Conv", 30.0), ("ReorderOutput", "ReorderOutput", 2.0), runs=3),
                            graph, skip_runs=1)
    assert set(profile) == {"conv1", "ReorderOutput"}
    assert profile["conv1"].us == pytest.approx(30.0) and profile["conv1"].factorized


def test_join_lines_layers_up_across_models_slowest_first():
    a = layer_profile(_events(("fc", "MatMul", 40.0), ("other", "Add", 50.0)), _graph(("fc", "MatMul", ["x"], ["y"])))
    b = layer_profile(_events(("fc_lowrank_a", "MatMul", 5.0), ("fc_lowrank_b", "MatMul", 6.0)),
                      _graph(("fc_lowrank_a", "MatMul", ["x"], ["h"]), ("fc_lowrank_b", "MatMul", ["h"], ["y"])))
    rows = join([a, b])
    assert [r.layer for r in rows] == ["other", "fc"]
    assert rows[1].ms == [pytest.approx(0.040), pytest.approx(0.011)] and rows[1].decomposed
    assert rows[0].ms == [pytest.approx(0.050), None] and not rows[0].decomposed


def test_real_profile_of_a_factorized_conv_model_sums_factors_per_layer(tmp_path, capsys):
    original = conv_model(ch=32, ranks=(8, 8), rank_1x1=8)
    optimized, report = optimize(original, validate=False, measure=False)
    decomposed = {r.name for r in report.decomposed}
    assert decomposed
    a, b = str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")
    onnx.save(original, a)
    onnx.save(optimized, b)
    assert main(["bench", a, b, "--profile", "--batch", "2", *QUICK_FLAGS]) == 0
    out = capsys.readouterr().out
    for layer in decomposed:     # one row per decomposed layer, not one per factor
        rows = [line for line in out.splitlines() if line.startswith(layer + " ")]
        assert len(rows) == 1 and rows[0].rstrip().endswith("decomposed"), out
    assert "_lowrank_" not in out and "_nchwc" not in out
