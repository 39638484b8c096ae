"""The timing engine of `bench` and `optimize --bench`: one model, or several interleaved.

How the figures are made, and why:

- Warm-up first (at least `warmup_runs` runs and `warmup_s` seconds per model): the first runs
  pay for allocations, and a GPU provider's first run builds its kernels or TensorRT engines.
- A single run of a small model lasts microseconds, below what a clock read and the scheduler's
  noise let us measure, so runs are timed in blocks lasting about `block_s` (tens of ms); a
  block's mean is one latency sample.
- With two models, blocks alternate A B, B A, A B, ... in one process, so drift (frequency
  scaling, a neighbour process) hits each model alike, and A/B is taken per block pair: the ratio
  of adjacent blocks cancels drift slower than a block pair. The reported speedup is the median
  of those per-block ratios, with p10/p90 as its spread and a distribution-free 95% confidence
  interval of the median; while that interval is wider than +-precision, more block pairs are
  timed (up to max_blocks), so a busy machine costs time rather than accuracy.
- Two sessions alternating on few cores disturb each other when ORT's intra-op threads spin
  waiting for work (a model timed against itself read 0.77x-1.46x here with spinning on,
  0.99x-1.02x with it off), so spinning is turned off whenever more than one model is timed.
- ORT graph optimizations are on: a benchmark measures the model as it will be served.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from . import profiling, runtime
from .inputs import DEFAULT_INT_RANGE, InputHint, graph_input_specs, load_samples
from .report import BaselineSpeed, BenchResult, LatencyStats

Runner = Callable[[], Any]


@dataclass(frozen=True)
class TimingPlan:
    warmup_runs: int = 3
    warmup_s: float = 0.2      # per model
    block_s: float = 0.05      # each block of runs lasts about this long
    blocks: int = 30           # per model, at least
    max_blocks: int = 120      # two models: more blocks, up to this, until the speedup is known to +-precision
    precision: float = 0.02    # relative half-width of the speedup's 95% confidence interval
    profile_runs: int = 30     # runs traced by --profile, after one untraced

    def __post_init__(self) -> None:
        from .errors import OptionError
        if self.blocks < 3:
            raise OptionError(f"--blocks must be at least 3 (p10/p90 need a spread), got {self.blocks}")
        if self.max_blocks < self.blocks:
            raise OptionError(f"--max-blocks ({self.max_blocks}) must be at least --blocks ({self.blocks})")
        if not self.block_s > 0:
            raise OptionError(f"--block-ms must be positive, got {self.block_s * 1e3:g}")
        if self.warmup_runs < 1 or self.warmup_s < 0:
            raise OptionError("warm-up needs at least one run and a non-negative time")


def time_interleaved(runners: Sequence[Runner], plan: TimingPlan = TimingPlan(),
                     clock: Callable[[], float] = time.perf_counter,
                     settled: Callable[[list[np.ndarray]], bool] | None = None) -> tuple[list[np.ndarray], list[int]]:
    """Per model, the mean seconds per run of each block; and the runs per block of each model.

    Block b runs the models in order when b is even and in reverse when b is odd (A B, B A, ...), so
    no model always runs right after another one. After `plan.blocks` blocks, timing goes on (in
    pairs of blocks, up to `plan.max_blocks`) until `settled(latencies)` says the figures are
    precise enough; without `settled`, it stops at `plan.blocks`."""
    estimates = [_warm_up(run, plan, clock) for run in runners]
    counts = [max(1, round(plan.block_s / max(estimate, 1e-9))) for estimate in estimates]
    latencies: list[list[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    block = 0
    while not (block >= plan.blocks and (settled is None or block >= plan.max_blocks
                                         or (block % 2 == 0 and settled([np.array(t) for t in latencies])))):
        for i in (order if block % 2 == 0 else order[::-1]):
            run, count = runners[i], counts[i]
            start = clock()
            for _ in range(count):
                run()
            latencies[i].append((clock() - start) / count)
        block += 1
    return [np.array(t) for t in latencies], counts


def _warm_up(run: Runner, plan: TimingPlan, clock: Callable[[], float]) -> float:
    """Run until warm; return the typical single-run time (the median after the first run)."""
    times: list[float] = []
    start = clock()
    while len(times) < plan.warmup_runs or clock() - start < plan.warmup_s:
        t0 = clock()
        run()
        times.append(clock() - t0)
    return float(np.median(times[1:] if len(times) > 1 else times))


def latency_stats(label: str, seconds: np.ndarray, runs_per_block: int, samples: int) -> LatencyStats:
    median = float(np.median(seconds))
    return LatencyStats(model=label, median_ms=median * 1e3, p10_ms=float(np.percentile(seconds, 10)) * 1e3,
                        p90_ms=float(np.percentile(seconds, 90)) * 1e3, min_ms=float(seconds.min()) * 1e3,
                        runs_per_block=runs_per_block, blocks=len(seconds),
                        throughput=samples / median if median > 0 else math.inf)


def speedup(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float, float, float]:
    """Over blocks, latency(A) / latency(B) (> 1: B is faster): median, p10, p90, and the 95%
    confidence interval of the median."""
    ratios = a / b
    low, high = median_ci(ratios)
    return (float(np.median(ratios)), float(np.percentile(ratios, 10)), float(np.percentile(ratios, 90)),
            low, high)


def median_ci(values: np.ndarray) -> tuple[float, float]:
    """Distribution-free 95% confidence interval of the median: the order statistics of ranks
    n/2 -+ 1.96 sqrt(n) / 2 (the normal approximation of the binomial count below the median)."""
    x = np.sort(np.asarray(values, dtype=float))
    half = 0.98 * math.sqrt(len(x))
    return float(x[max(math.floor(len(x) / 2 - half), 0)]), float(x[min(math.ceil(len(x) / 2 + half), len(x) - 1)])


def _precise(plan: TimingPlan, pairs: Sequence[tuple[int, int]] = ((0, 1),)) -> Callable[[list[np.ndarray]], bool]:
    """Timing is settled when each pair's ratio is known to +-precision."""
    def settled(latencies: list[np.ndarray]) -> bool:
        for a, b in pairs:
            median, _, _, low, high = speedup(latencies[a], latencies[b])
            if (high - low) / 2 > plan.precision * median:
                return False
        return True
    return settled


def bench(models: Sequence[onnx.ModelProto | str], *, config: runtime.SessionConfig | None = None,
          labels: Sequence[str] | None = None, inputs: str | None = None,
          shapes: dict[str, list[int]] | None = None, batch: int = 1, seed: int = 0,
          int_range: tuple[int, int] = DEFAULT_INT_RANGE, plan: TimingPlan = TimingPlan(),
          profile: bool = False, feeds: dict[str, np.ndarray] | None = None,
          hints: dict[str, InputHint] | None = None,
          baseline: tuple[str, str, onnx.ModelProto] | None = None) -> BenchResult:
    """Time one model, or two interleaved on the same inputs: speedup = latency(A) / latency(B).

    Inputs: `feeds` if given, else the first sample of the .npz file `inputs`, else generated from
    A's input signature (dynamic dims: first axis `batch`, others 16, overridden by `shapes`).
    `baseline` (label, how it was made, model): a third model timed in the same interleaved blocks,
    what a user would deploy instead; the result gives A's and B's speed against it.
    """
    if len(models) not in (1, 2):
        raise ValueError(f"bench times one model or two against each other, got {len(models)}")
    config = config or runtime.SessionConfig()
    compared = list(models)           # A (and B); the baseline, if any, is timed after them
    labels = list(labels or [_label(m, i) for i, m in enumerate(compared)])
    if baseline is not None:
        labels.append(baseline[0])
        models = [*compared, baseline[2]]
    if len(models) > 1:
        config = replace(config, spinning=False)
    sessions = [runtime.make_session(model, config) for model in models]
    if feeds is None:
        samples, notes = runtime.model_inputs(sessions[0], inputs=inputs, shapes=shapes, batch=batch, seed=seed,
                                              int_range=int_range, hints=hints)
        feeds = samples[0]
        if len(samples) > 1:
            notes.append(f"--inputs holds {len(samples)} samples: timed on the first")
    else:
        notes = []
    runners = [runtime.runner(session, feeds) for session in sessions]

    # A/B settles the timing; with a baseline, B (or A alone) against it too
    pairs = [(0, 1)] + ([(2, 1)] if baseline is not None and len(compared) == 2 else [])
    latencies, counts = time_interleaved(runners, plan, settled=_precise(plan, pairs) if len(runners) > 1 else None)
    items = _leading_dim(feeds)
    result = BenchResult(
        provider=config.describe(), input_shapes={k: list(np.shape(v)) for k, v in feeds.items()},
        models=[latency_stats(label, seconds, count, items) for label, seconds, count in zip(labels, latencies, counts)],
        settings={"provider": config.provider, "threads": config.threads, "device_id": config.device_id,
                  "trt_fp16": config.trt_fp16, "graph_optimizations": "all" if config.optimize else "off",
                  "intra_op_spinning": config.spinning, "interleaved": len(models) > 1,
                  "blocks": len(latencies[0]), "block_ms": plan.block_s * 1e3, "warmup_runs": plan.warmup_runs,
                  "warmup_ms": plan.warmup_s * 1e3, "profile_runs": plan.profile_runs if profile else None,
                  "throughput_unit": f"samples/s (leading dim {items})"},
        notes=notes)
    if len(compared) == 2:
        (result.speedup, result.speedup_p10, result.speedup_p90,
         result.speedup_ci_low, result.speedup_ci_high) = speedup(latencies[0], latencies[1])
        if not _precise(plan)(latencies):
            notes.append(f"the A/B ratio varied between blocks: after {len(latencies[0])} blocks the speedup is "
                         f"known only to {result.speedup_ci_low:.3f}x-{result.speedup_ci_high:.3f}x (95%), not "
                         f"+-{plan.precision:.0%}{_busy()}")
    if baseline is not None:
        result.baseline = BaselineSpeed(label=baseline[0], how=baseline[1],
                                        over_a=speedup(latencies[0], latencies[-1])[0])
        if len(compared) == 2:
            b_over, _, _, low, high = speedup(latencies[-1], latencies[1])
            result.baseline.b_over, result.baseline.b_over_ci_low, result.baseline.b_over_ci_high = b_over, low, high
    if config.provider != "cpu":
        notes.append("latency includes copying inputs to the device and outputs back")
    if profile:
        result.profile = profiling.join(_profile(compared, config, feeds, plan.profile_runs))
        if config.provider == "tensorrt":
            notes.append("profile: TensorRT runs each subgraph it takes as one engine node, which cannot be "
                         "split into layers")
        elif config.provider == "cuda":
            notes.append("profile: CUDA kernels run asynchronously; per-layer times are ORT's host-side figures")
    return result


def int8_baseline(path: str, inputs: str | None) -> tuple[str, str, onnx.ModelProto]:
    """("int8 alone", how, model): A quantized as `optimize --quantize int8` would quantize it, its
    activations calibrated on the --inputs samples where it takes static QDQ."""
    from .io import load_model
    from .quantize import quantize_int8

    model = load_model(path)
    samples = load_samples(inputs, graph_input_specs(model))[0] if inputs else None
    model, how = quantize_int8(model, samples)
    return "int8 alone", how, model


def _profile(models: Sequence[onnx.ModelProto | str], config: runtime.SessionConfig, feeds: dict[str, Any],
             runs: int) -> list[dict[str, profiling.LayerProfile]]:
    """Kernel times per layer, from separate profiled sessions (the profiler's own overhead stays out
    of the timed figures). Each model's runs are back to back, as in a timed block: alternating
    single runs would leave every run with the other model's weights in cache."""
    graphs = [(m if isinstance(m, onnx.ModelProto) else onnx.load(str(m), load_external_data=False)).graph
              for m in models]
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-profile-") as tmp:
        sessions = [runtime.make_session(model, replace(config, profile_prefix=str(Path(tmp) / f"trace{i}")))
                    for i, model in enumerate(models)]
        for session in sessions:
            for _ in range(runs + 1):
                runtime.run(session, feeds)
        traces = [json.loads(runtime.end_profiling(session).read_text()) for session in sessions]
    return [profiling.layer_profile(events, graph, skip_runs=1) for events, graph in zip(traces, graphs)]


def _busy() -> str:
    """Why figures may be noisy: other work on the machine, when the load average shows it."""
    try:
        load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    except (AttributeError, OSError):   # no load average on Windows
        return ""
    return f"; the machine is busy (load average {load:.1f} on {cpus} CPUs)" if load > cpus / 2 else ""


def _label(model: onnx.ModelProto | str, index: int) -> str:
    return str(model) if not isinstance(model, onnx.ModelProto) else f"model {'AB'[index] if index < 2 else index}"


def _leading_dim(feeds: dict[str, np.ndarray]) -> int:
    shape = np.shape(next(iter(feeds.values()), ()))
    return int(shape[0]) if len(shape) else 1
