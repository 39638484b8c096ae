"""`sweep`: one optimize + parity + bench per target, the table, JSON, PNG, the chosen point, exit codes.

The model is one MatMul 128x512 of rank 16 (+1e-4 noise): a FLOP target of 0.5 keeps rank >= 16
(output error ~1e-4, the noise), 0.1 cuts below it (output error ~0.5), so a --max-error of 1e-3
admits exactly the first point whatever the timings say. Timing is a tiny plan: the figures are
noise, only their presence is tested.
"""

import json

import numpy as np
import onnx
import pytest

from models.synthetic import mlp_model
from onnx_lowrank.bench import TimingPlan
from onnx_lowrank.cli import main
from onnx_lowrank.errors import OptionError
from onnx_lowrank.options import Options
from onnx_lowrank.sweep import SweepPoint, best_point, pareto_front, sweep

TINY = ["--blocks", "3", "--block-ms", "2", "--warmup-ms", "0"]
TINY_PLAN = TimingPlan(warmup_s=0.0, block_s=0.002, blocks=3, max_blocks=3)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "mlp.onnx"
    onnx.save(mlp_model(k=128, n=512, rank=16), str(path))
    return str(path)


def test_cli_table_json_models_and_png(model_path, tmp_path, capsys):
    out_dir, report, png = tmp_path / "points", tmp_path / "sweep.json", tmp_path / "sweep.png"
    code = main(["sweep", model_path, "--out-dir", str(out_dir), "--targets", "0.5,0.1", "--max-error", "1e-3",
                 "--plot", str(png), "--json", str(report), *TINY])
    out = capsys.readouterr().out
    assert code == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["mlp.flops0.1.onnx", "mlp.flops0.5.onnx"]
    for name in ("target flops", "decomposed", "layer MACs", "output error", "speedup"):
        assert name in out
    assert "fastest within --max-error 0.001: target flops 0.5" in out
    marked = [line for line in out.splitlines() if line.startswith("*")]
    assert len(marked) == 1 and "mlp.flops0.5.onnx" in marked[0]

    data = json.loads(report.read_text())
    assert data["target_kind"] == "flops" and data["max_error"] == 1e-3 and data["best"] == 0
    first, second = data["points"]
    assert [first["target"], second["target"]] == [0.5, 0.1]
    assert first["decomposed"] == first["candidates"] == 1
    assert first["output_error"] < 1e-3 < 0.1 < second["output_error"]   # within the noise / rank cut
    assert second["macs_ratio"] <= 0.1 < first["macs_ratio"] <= 0.5
    assert second["params"] < first["params"] < data["params_before"]
    assert all(p["speedup"] > 0 and p["metric"] is None for p in data["points"])
    assert first["model"].endswith("mlp.flops0.5.onnx")
    onnx.checker.check_model(onnx.load(first["model"]))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_exits_1_when_no_point_meets_max_error(model_path, tmp_path, capsys):
    code = main(["sweep", model_path, "--out-dir", str(tmp_path), "--targets", "0.5,0.1", "--max-error", "1e-9", *TINY])
    out = capsys.readouterr().out
    assert code == 1
    assert "no point is within --max-error 1e-09" in out
    assert not any(line.startswith("*") for line in out.splitlines())


@pytest.mark.parametrize("args, message", [
    (["--targets", "0.5,abc"], "--targets: expected comma-separated numbers"),
    (["--targets", "1.5"], "--target-flops must be in (0, 1)"),
    (["--target-kind", "speedup", "--targets", "0.5"], "--target-speedup must be > 1"),
    (["--error-correction"], "--error-correction refits layers on calibration samples: it needs --calibration"),
])
def test_cli_bad_input_exits_2_with_one_line(model_path, tmp_path, capsys, args, message):
    assert main(["sweep", model_path, "--out-dir", str(tmp_path), *args, *TINY]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_api_records_the_metric_on_the_original_and_every_point(model_path, tmp_path):
    seen = []

    def metric(model: onnx.ModelProto) -> float:   # a stand-in task metric: parameters kept
        seen.append(model)
        return float(sum(np.prod(t.dims) for t in model.graph.initializer))

    result = sweep(model_path, [0.5, 0.1], Options(), metric=metric, plan=TINY_PLAN)
    assert len(seen) == 3   # the original, then each point
    assert result.metric_before == result.params_before
    assert [p.metric for p in result.points] == [p.params for p in result.points]
    assert all(p.model is None for p in result.points)   # no out_dir: nothing saved
    assert result.best is not None   # no max_error: the fastest of all points

    from onnx_lowrank.sweep import plot_sweep
    png = tmp_path / "with_metric.png"
    plot_sweep(result, png)
    assert png.stat().st_size > 0


def test_api_refuses_a_target_in_the_options(model_path):
    with pytest.raises(OptionError, match="sweep sets the target itself"):
        sweep(model_path, [0.5], Options(target_flops=0.5), plan=TINY_PLAN)


def _point(error, speedup):
    return SweepPoint(target=0.5, model=None, decomposed=1, candidates=1, macs_ratio=0.5, params=1,
                      output_error=error, parity_passed=True, speedup=speedup)


def test_best_point_is_the_fastest_within_max_error_and_the_front_drops_dominated_points():
    points = [_point(1e-4, 1.2), _point(1e-3, 1.1), _point(1e-2, 1.8), _point(None, 3.0)]
    assert best_point(points, 5e-3) == 0
    assert best_point(points, None) == 2        # an unknown error is never chosen
    assert best_point(points, 1e-5) is None
    assert pareto_front(points[:3]) == [0, 2]   # 1e-3 at 1.1x is beaten by 1e-4 at 1.2x
