"""Issue 12's front on the digits CNN: accuracy against measured whole-model speed, int8 alone
against our rows, with and without int8.

    .venv/bin/python benchmarks/cnn_digits_front.py [--target-speedup 2] [--blocks 30] [--plot F.png]

Rows, each `optimize(models/cnn_digits.onnx, ...)` (refine needs torch; a row that cannot be built
says why and is left out):
- int8 alone: ORT's static QDQ int8 of the original, calibrated on models/digits_calib.npz, as
  `--quantize int8` does it for a model with Conv;
- weight Tucker-2 + allocation: `target_flops` at the MACs the calibrated row reached, no calibration;
- whitened Tucker-2 + allocation: `--calibration --target-speedup S`;
- + error correction, + conv block form (`--mlp-form auto`), + `--refine`, and the last with
  `--quantize int8`;
- the product's own command with its quality gate on: `--calibration --target-speedup S
  --error-correction` (the gate backs ranks off until 32 held-back samples agree).
All but the last run ungated (`max_error="none"`), so each row shows what its method reaches.

Accuracy: the 450 held-out digits (models/digits_test.npz), in ONNX Runtime. Speed: every model
timed in one interleaved run against the original (spinning off, graph optimizations on), at
batch 64 (the batch of benchmarks/cnn_digits.py) and at batch 8 (the calibration batch that
`--target-speedup` times on); a row's speedup is the median over blocks of the per-block ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

from onnx_lowrank import optimize, runtime  # noqa: E402
from onnx_lowrank.bench import TimingPlan, time_interleaved  # noqa: E402
from onnx_lowrank.errors import LowRankError  # noqa: E402
from onnx_lowrank.quantize import quantize_int8  # noqa: E402

MODEL = ROOT / "models" / "cnn_digits.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
TEST = ROOT / "models" / "digits_test.npz"


def rows(target: float) -> list[tuple[str, dict | None]]:
    common = dict(calibration=str(CALIB), target_speedup=target, max_error="none")
    return [
        ("int8 alone (static QDQ)", None),
        ("weight Tucker-2 + allocation", dict(max_error="none")),   # target_flops set from the next row
        ("whitened Tucker-2 + allocation", dict(common)),
        ("+ error correction", dict(common, error_correction=True)),
        ("+ conv block form (auto)", dict(common, error_correction=True, mlp_form="auto")),
        ("+ --refine", dict(common, error_correction=True, mlp_form="auto", refine=True)),
        ("+ --refine + int8", dict(common, error_correction=True, mlp_form="auto", refine=True, quantize="int8")),
        ("gated: --target-speedup --error-correction", dict(calibration=str(CALIB), target_speedup=target,
                                                             error_correction=True)),
    ]


def accuracy(model: onnx.ModelProto, data: dict[str, np.ndarray]) -> float:
    session = runtime.make_session(model, runtime.SessionConfig())
    return float((session.run(None, {"input": data["input"]})[0].argmax(1) == data["label"]).mean())


def macs_ratio(report) -> float:
    totals = report.totals()
    return totals["layer_macs_after"] / totals["layer_macs_before"]


def build(target: float) -> list[tuple[str, onnx.ModelProto, str]]:
    original = onnx.load(str(MODEL))
    calib = dict(np.load(CALIB))
    built, reached = [], None
    todo = rows(target)
    todo.append(todo.pop(1))   # the weight-only row takes the MACs the whitened row reached
    for label, how in todo:
        began, cpu = time.perf_counter(), time.process_time()
        try:
            if how is None:
                samples = [{"input": calib["input"][i:i + 8]} for i in range(0, len(calib["input"]), 8)]
                model, note = quantize_int8(original, samples)
            else:
                if label.startswith("weight"):
                    how = dict(how, target_flops=reached)
                model, report = optimize(original, **how)
                note = f"conv MACs {macs_ratio(report):.2f} of dense"
                if label.startswith("whitened"):
                    reached = round(macs_ratio(report), 3)
        except LowRankError as exc:
            print(f"{label}: not built: {exc}", flush=True)
            continue
        built.append((label, model, note))
        print(f"built {label} in {time.perf_counter() - began:.0f} s wall, {time.process_time() - cpu:.0f} s CPU "
              f"(load {os.getloadavg()[0]:.1f}): {note}", flush=True)
    order = [label for label, _ in rows(target)]
    return sorted(built, key=lambda row: order.index(row[0]))


def measure(built, blocks: int, plot: str | None) -> None:
    original = onnx.load(str(MODEL))
    test = dict(np.load(TEST))
    base_accuracy = accuracy(original, test)
    accuracies = [accuracy(model, test) for _, model, _ in built]
    config = runtime.SessionConfig(spinning=False)
    speeds = {}
    for batch in (64, 8):
        feeds = {"input": test["input"][:batch]}
        runners = [runtime.runner(runtime.make_session(m, config), feeds) for m in [original] + [m for _, m, _ in built]]
        latencies, _ = time_interleaved(runners, TimingPlan(blocks=blocks, block_s=0.1))
        speeds[batch] = [float(np.median(latencies[0] / t)) for t in latencies[1:]]
        print(f"batch {batch}: load average {os.getloadavg()[0]:.2f}, {len(latencies[0])} blocks per model, "
              f"original {np.median(latencies[0]) * 1e3:.3f} ms a batch", flush=True)
    print(f"\n| row | accuracy (original {base_accuracy:.2%}) | loss, points | speedup batch 64 | speedup batch 8 | how |")
    print("|---|---:|---:|---:|---:|---|")
    table = []
    for i, ((label, _, note), acc) in enumerate(zip(built, accuracies)):
        loss = (base_accuracy - acc) * 100
        table.append((label, speeds[64][i], acc))
        print(f"| {label} | {acc:.2%} | {loss:+.2f} | {speeds[64][i]:.2f}x | {speeds[8][i]:.2f}x | {note} |")
    if plot:
        pareto(table, base_accuracy, plot)


def pareto(table, base_accuracy: float, path: str) -> None:
    """The whole front, and beside it the rows within 2 points of the original (the ones a user
    would ship), labels staggered so that close points stay readable."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, zoom in zip(axes, (False, True)):
        ax.scatter([1.0], [base_accuracy * 100], color="black")
        ax.annotate("original (fp32)", (1.0, base_accuracy * 100), textcoords="offset points", xytext=(6, -12),
                    fontsize=8)
        shown = [(label, speed, acc) for label, speed, acc in table if not zoom or acc * 100 >= base_accuracy * 100 - 2]
        for i, (label, speed, acc) in enumerate(sorted(shown, key=lambda row: row[1])):
            ax.scatter([speed], [acc * 100], marker="s" if "int8" in label else "o", color="tab:blue")
            ax.annotate(label, (speed, acc * 100), textcoords="offset points", xytext=(6, 4 + (i % 3) * 9 if zoom else 4),
                        fontsize=7)
        ax.axhline(base_accuracy * 100 - 0.5, color="grey", lw=0.6, ls="--")
        ax.axvline(2.0, color="grey", lw=0.6, ls="--")
        ax.set_xlabel("measured whole-model speedup vs the original (batch 64, CPU ORT, interleaved)", fontsize=8)
        ax.set_ylabel("accuracy on 450 held-out digits, %")
        if zoom:
            ax.set_ylim(base_accuracy * 100 - 2, 100.5)
    axes[0].set_title("digits CNN: the front against int8 (squares: int8)", fontsize=10)
    axes[1].set_title("within 2 points of the original (dashed: -0.5 point, 2x)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-speedup", type=float, default=2.0)
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    measure(build(args.target_speedup), args.blocks, args.plot)


if __name__ == "__main__":
    main()
