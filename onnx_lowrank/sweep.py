"""`sweep`: one model optimized at a range of targets, each validated and benchmarked, so the user
sees the trade-off (measured speedup against output error, and a task metric when given) and picks
a point, instead of guessing one target.

Each point is `optimize(model, options with target_<kind> = t)`: the parity check gives its output
error, and an interleaved bench against the original its measured speedup. `max_error` only picks
the point (the fastest whose output error is within it); it is not handed to `optimize`, where with
calibration it would back ranks off and move every point towards the same model.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import onnx

from .bench import TimingPlan, bench
from .errors import OptionError
from .io import load_model, save_model
from .optimize import optimize
from .passes import PIPELINE
from .options import Options
from .runtime import SessionConfig

TARGET_KINDS = ("flops", "params", "speedup")
DEFAULT_TARGETS = {"flops": (0.9, 0.8, 0.7, 0.6), "params": (0.9, 0.8, 0.7, 0.6), "speedup": (1.1, 1.2, 1.3, 1.5)}

#: A sweep times several models: shorter than `bench`'s default plan, still interleaved and with a
#: confidence interval, so a 4-point sweep of a small model takes well under a minute.
SWEEP_PLAN = TimingPlan(warmup_s=0.1, block_s=0.02, blocks=10, max_blocks=30)


@dataclass
class SweepPoint:
    target: float
    model: str | None                 # where the point's model was saved; None without out_dir
    decomposed: int                   # layers decomposed, of `candidates`
    candidates: int
    macs_ratio: float | None          # MACs of the candidate layers after / before
    params: int                       # all initializer elements of the point's model
    output_error: float | None        # max over outputs of ||y - y0|| / ||y0|| (parity check)
    parity_passed: bool | None        # against optimize's own criterion (implied by the ranks)
    speedup: float | None             # measured, latency(original) / latency(point)
    speedup_ci_low: float | None = None
    speedup_ci_high: float | None = None
    metric: float | None = None       # the caller's task metric on the point's model
    notes: list[str] = field(default_factory=list)
    label: str = ""                   # a baseline's name ("int8 alone"); "" for a target's point


@dataclass
class SweepResult:
    input: str
    target_kind: str
    params_before: int
    points: list[SweepPoint]
    max_error: float | None = None
    best: int | None = None           # index in points: the fastest within max_error
    metric_before: float | None = None
    bench_settings: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def best_point(self) -> SweepPoint | None:
        return None if self.best is None else self.points[self.best]


def sweep(model: onnx.ModelProto | str | os.PathLike, targets: Sequence[float] | None = None,
          options: Options | None = None, *, target_kind: str = "flops", out_dir: str | os.PathLike | None = None,
          max_error: float | None = None, metric: Callable[[onnx.ModelProto], float] | None = None,
          plan: TimingPlan = SWEEP_PLAN, config: SessionConfig | None = None,
          bench_inputs: dict[str, Any] | None = None,
          on_point: Callable[[SweepPoint], None] | None = None) -> SweepResult:
    """Optimize `model` at each target (`options` with target_<target_kind> replaced), validate and
    time each result against the original, and return the points.

    out_dir: save each point's model there as `<stem>.<kind><t>.onnx` (benchmarked from the file).
    metric(model) -> float: a task metric (e.g. accuracy) computed on the original and every point.
    bench_inputs: the input keywords of bench.bench (inputs, shapes, batch, seed, int_range); by
    default the shapes, batch and seed of `options`.
    """
    if target_kind not in TARGET_KINDS:
        raise OptionError(f"--target-kind must be one of {', '.join(TARGET_KINDS)}, got {target_kind!r}")
    targets = list(DEFAULT_TARGETS[target_kind] if targets is None else targets)
    if not targets:
        raise OptionError("--targets: give at least one target")
    if max_error is not None and not max_error > 0:
        raise OptionError(f"--max-error must be positive, got {max_error:g}")
    options = options or Options()
    if options.target is not None:
        raise OptionError("sweep sets the target itself: leave target_flops / target_params / target_speedup unset")
    # each Options validates its own target (flops/params in (0, 1), speedup > 1) before any work
    # validate on: the output error is half of each point; bench off: the sweep times each point itself
    # ungated and kept however fast: each point is measured, and max_error picks among them
    per_target = [dataclasses.replace(options, validate=True, bench=False, max_error="none", allow_slower=True,
                                      **{f"target_{target_kind}": t})
                  for t in targets]
    runs = [(t, "", o) for t, o in zip(targets, per_target)]
    if options.quantize:
        # what a user would do instead: ONNX Runtime's int8 alone, no layer decomposed
        decompose = tuple(e.name for e in PIPELINE if e.stage == "decompose")
        alone = dataclasses.replace(options, validate=True, bench=False, max_error="none", allow_slower=True,
                                    skip=tuple(dict.fromkeys((*options.skip, *decompose))))
        runs.insert(0, (0.0, f"{options.quantize} alone", alone))
    source = str(model) if not isinstance(model, onnx.ModelProto) else "<ModelProto>"
    if out_dir is not None and not Path(out_dir).is_dir():
        raise OptionError(f"--out-dir '{out_dir}' is not a directory")
    stem = Path(source).name.removesuffix(".onnx") if source != "<ModelProto>" else "model"
    config = config or SessionConfig(provider=options.provider)
    inputs = bench_inputs if bench_inputs is not None else dict(shapes=options.shape, batch=options.batch,
                                                                 seed=options.seed)

    result = SweepResult(input=source, target_kind=target_kind, params_before=0, points=[], max_error=max_error,
                         options=options.to_dict())
    if metric is not None:
        result.metric_before = float(metric(model if isinstance(model, onnx.ModelProto) else load_model(model)))
    for target, label, point_options in runs:
        optimized, report = optimize(model, point_options)
        result.params_before = report.params_before
        path = None
        if out_dir is not None:
            name = label.replace(" ", "_") if label else f"{target_kind}{target:g}"
            path = str(Path(out_dir) / f"{stem}.{name}.onnx")
            save_model(optimized, path)
        timing = bench([model, path or optimized], config=config, labels=["original", label or f"{target_kind} {target:g}"],
                       plan=plan, **inputs)
        result.bench_settings = timing.settings
        totals = report.totals()
        before, after = totals["layer_macs_before"], totals["layer_macs_after"]
        errors = [o.rel_l2_error for o in report.parity.outputs] if report.parity is not None else []
        point = SweepPoint(
            target=target, model=path, decomposed=totals["decomposed"], candidates=totals["candidates"],
            macs_ratio=after / before if before else None, params=report.params_after,
            output_error=max(errors) if errors else None,
            parity_passed=None if report.parity is None else report.parity.passed,
            speedup=timing.speedup, speedup_ci_low=timing.speedup_ci_low, speedup_ci_high=timing.speedup_ci_high,
            metric=None if metric is None else float(metric(optimized)), notes=report.notes + timing.notes,
            label=label)
        result.points.append(point)
        if on_point is not None:
            on_point(point)
        del optimized
    result.best = best_point(result.points, max_error)
    return result


def best_point(points: Sequence[SweepPoint], max_error: float | None) -> int | None:
    """The fastest point whose output error is within max_error (any error when None); a point
    whose error or speedup is unknown (no parity check, no timing) cannot be chosen."""
    eligible = [i for i, p in enumerate(points)
                if p.speedup is not None and p.output_error is not None and math.isfinite(p.output_error)
                and (max_error is None or p.output_error <= max_error)]
    return max(eligible, key=lambda i: points[i].speedup, default=None)


def plot_sweep(result: SweepResult, path: str | os.PathLike) -> None:
    """Measured speedup against output error, one labelled marker per target, the Pareto front
    (no other point is both faster and more accurate) as a line, --max-error as a dashed line and the
    chosen point as a star; with a task metric, a second panel of the metric against speedup."""
    import matplotlib
    matplotlib.use("Agg")   # files only: never open a window, work without a display
    import matplotlib.pyplot as plt

    points = [p for p in result.points if p.speedup is not None and p.output_error is not None]
    with_metric = result.metric_before is not None
    fig, axes = plt.subplots(1, 2 if with_metric else 1, figsize=(11 if with_metric else 6.2, 4.6), squeeze=False)
    ax = axes[0][0]
    floor = 1e-7   # log axis: an exact rewrite plots at the floor
    errors = [max(p.output_error, floor) for p in points]
    ax.scatter(errors, [p.speedup for p in points], color="tab:blue", zorder=3, label="sweep point")
    front = pareto_front(points)
    ax.plot([max(points[i].output_error, floor) for i in front], [points[i].speedup for i in front],
            color="tab:blue", lw=1.2, alpha=0.6, label="Pareto front")
    for p, e in zip(points, errors):
        ax.annotate(p.label or f"{p.target:g}", (e, p.speedup), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
    if result.max_error is not None:
        ax.axvline(result.max_error, color="tab:red", ls="--", lw=1.2, label=f"--max-error {result.max_error:g}")
    best = result.best_point
    if best is not None:
        ax.scatter([max(best.output_error, floor)], [best.speedup], marker="*", s=260, color="tab:orange",
                   edgecolor="black", zorder=4,
                   label=f"chosen: {best.label or f'{result.target_kind} {best.target:g}'}, {best.speedup:.2f}x")
    ax.set_xscale("log")
    ax.margins(x=0.12, y=0.1)   # room for the target labels at the edges
    ax.set_xlabel("output error (max over outputs of ||y - y0|| / ||y0||)")
    ax.set_ylabel("measured speedup (original / optimized)")
    ax.set_title(f"measured speedup vs output error (point labels: target {result.target_kind})", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if with_metric:
        mx = axes[0][1]
        scored = [p for p in points if p.metric is not None]
        mx.scatter([p.speedup for p in scored], [p.metric for p in scored], color="tab:green", zorder=3)
        for p in scored:
            mx.annotate(p.label or f"{p.target:g}", (p.speedup, p.metric), textcoords="offset points", xytext=(6, 4), fontsize=8)
        mx.axhline(result.metric_before, color="0.4", ls="--", lw=1.0, label=f"original {result.metric_before:.4g}")
        if best is not None and best.metric is not None:
            mx.scatter([best.speedup], [best.metric], marker="*", s=260, color="tab:orange", edgecolor="black",
                       zorder=4, label="chosen")
        mx.margins(x=0.1, y=0.1)
        mx.set_xlabel("measured speedup (original / optimized)")
        mx.set_ylabel("task metric")
        mx.set_title("task metric vs speedup", fontsize=10)
        mx.grid(True, alpha=0.3)
        mx.legend(fontsize=8, loc="best")
    fig.suptitle(f"{os.path.basename(result.input)}: sweep of target {result.target_kind}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_front(points: Sequence[SweepPoint]) -> list[int]:
    """Indices of the points no other point beats on both error (lower) and speedup (higher),
    ordered by error."""
    order = sorted(range(len(points)), key=lambda i: (points[i].output_error, -points[i].speedup))
    front, fastest = [], -math.inf
    for i in order:
        if points[i].speedup > fastest:
            front.append(i)
            fastest = points[i].speedup
    return front
