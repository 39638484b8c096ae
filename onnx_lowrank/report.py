"""The report is data first: dataclasses that serialize to JSON. Tables and plots are views of it."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerRecord:
    """What a pass did, or declined to do, to one weight-carrying node."""

    name: str
    op: str
    pass_name: str
    weight_shape: list[int]
    status: str                      # "skipped", or what the pass did: "decomposed", "folded", "merged", ...
    reason: str = ""                 # why it was skipped, or a note on what was done
    method: str | None = None        # "svd", "tucker2"
    rank: list[int] | None = None    # [r] for SVD, [r_out, r_in] for Tucker-2
    break_even_rank: float | None = None
    max_rank: int | None = None      # largest rank that still meets --min-flop-reduction
    weight_error: float | None = None  # relative Frobenius error of the weight
    activation_error: float | None = None  # ||XW - XW_r|| / ||XW|| on the calibration inputs
    params_before: int = 0
    params_after: int | None = None  # None (like macs_after) while the layer is left as it was: 0 would read "removed"
    macs_before: int | None = None   # per output position (row of a MatMul, pixel of a Conv)
    macs_after: int | None = None
    positions: int | None = None     # output positions per inference at the report's shapes
    # measured in ONNX Runtime (--measure): one layer alone at its input shape, ms per run
    latency_dense_ms: float | None = None
    latency_factorized_ms: float | None = None
    decision: str = ""               # what the measurements decided (rank search, kept dense), and why
    # the model's tensor the weight is read from (behind any Identity / Cast / Transpose), its bytes
    # as stored, and the bytes of the factors this layer added (0 when it shares another's)
    weight: str | None = None
    weight_bytes: int | None = None
    factor_bytes: int | None = None

    @property
    def decomposed(self) -> bool:
        return self.status == "decomposed"

    def total_macs(self, after: bool) -> int | None:
        per = self.macs_after if after and self.decomposed else self.macs_before
        if per is None or self.positions is None:
            return None
        return per * self.positions


@dataclass
class PassResult:
    """A pass's records, one per layer it considered; Report.passes counts those it changed."""

    records: list[LayerRecord] = field(default_factory=list)


@dataclass
class OutputComparison:
    name: str
    shape: list[int]
    max_abs_error: float
    max_rel_error: float
    rel_l2_error: float       # ||y - y0|| / ||y0||
    cosine: float
    passed: bool
    top1_agreement: float | None = None
    shape_ok: bool = True
    criterion: str = ""                    # the tolerance this output was judged by
    bound: float | None = None             # its max_error, when judged by rel_l2
    mismatched: int | None = None          # elements outside atol + rtol |y0|, when judged elementwise
    reference_shape: list[int] | None = None   # set when the shapes differ
    min_top1: float | None = None          # the top-1 agreement it had to reach, if any
    top1_lower: float | None = None        # the agreement shown with 90% confidence, when that was the test

    @property
    def top1_judged(self) -> float | None:
        """The agreement min_top1 was held against: the confident lower bound where that was the
        test, else the measured share."""
        return self.top1_lower if self.top1_lower is not None else self.top1_agreement

    @property
    def top1_missed(self) -> bool:
        return self.min_top1 is not None and self.top1_judged is not None and self.top1_judged < self.min_top1


@dataclass
class ParityResult:
    provider: str
    criterion: str            # e.g. "rel_l2 <= 2.0e-03 (2 x sum of layer weight errors)"
    passed: bool
    outputs: list[OutputComparison]
    samples: int
    input_shapes: dict[str, list[int]]
    notes: list[str] = field(default_factory=list)
    ungated: bool = False     # measured only (--max-error none): passed says nothing


@dataclass
class LatencyStats:
    """One model's latency per run, from the mean run time of each block of runs."""

    model: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    runs_per_block: int
    blocks: int
    throughput: float          # samples per second at the median (leading dim of the first input / latency)


@dataclass
class LayerTime:
    """Kernel time per run of one original layer, its factorized nodes summed (ORT's profiler)."""

    layer: str
    ops: list[str]
    ms: list[float | None]     # one per benchmarked model; None where that model has no such layer
    decomposed: bool           # the last model computes this layer with factorized (_lowrank_) nodes


@dataclass
class BaselineSpeed:
    """A third model timed in the same interleaved run as A and B: what a user would deploy instead
    (`bench --int8-baseline`: ONNX Runtime's int8 of A). Ratios are medians over blocks."""

    label: str                     # e.g. "int8 alone"
    how: str                       # how it was made ("dynamic int8 (MatMul, Gemm weights; ...)")
    over_a: float                  # latency(A) / latency(baseline)
    b_over: float | None = None    # latency(baseline) / latency(B): > 1, B beats the baseline
    b_over_ci_low: float | None = None
    b_over_ci_high: float | None = None


@dataclass
class BenchResult:
    provider: str              # e.g. "cpu, ORT default threads"
    input_shapes: dict[str, list[int]]
    models: list[LatencyStats]
    speedup: float | None = None        # median over blocks of latency(A) / latency(B)
    speedup_p10: float | None = None
    speedup_p90: float | None = None
    speedup_ci_low: float | None = None    # 95% confidence interval of the median ratio
    speedup_ci_high: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    profile: list[LayerTime] | None = None
    baseline: BaselineSpeed | None = None   # models[-1] when set
    notes: list[str] = field(default_factory=list)

    @property
    def compared(self) -> list[LatencyStats]:
        """A (and B): the timed models less the baseline."""
        return self.models[:-1] if self.baseline is not None else self.models


@dataclass
class CalibrationOutcome:
    """The calibrate stage: Gram matrices of `layers` from `samples` (and `synthetic` token sequences,
    --synthetic-tokens), `held_back` kept for the gate."""

    layers: int
    samples: int
    held_back: int
    synthetic: int = 0
    synthetic_inputs: dict[str, int] = field(default_factory=dict)   # token input -> rows of its table


@dataclass
class AllocationOutcome:
    """The allocate stage: one global allocation of ranks for --target-* (rank_allocation.py)."""

    kind: str                      # "flops" or "params" (a speedup target is turned into flops)
    target: float                  # the ratio asked for
    achieved: float                # the ratio the ranks reach
    met: bool
    factorized: int
    layers: int
    predicted_error: float
    sensitivity_range: list[float] | None = None   # min, max output error per unit of layer error
    time_share: float | None = None                 # --target-speedup: the layers' share of the run time
    time_share_source: str | None = None            # "measured" or "profiled"
    measured_share: float | None = None
    profiled_share: float | None = None


@dataclass
class SpeedOutcome:
    """The meet-speedup stage: whole-model timings, each [speedup, MAC ratio of the layers]."""

    target: float
    met: bool
    rounds: list[list[float]] = field(default_factory=list)


@dataclass
class CorrectionOutcome:
    """The error-correction stage: layers refitted, one pass over the samples per depth."""

    layers: int
    depths: int


@dataclass
class GateOutcome:
    """The back-off stage: the gate on held-back samples, and how far compression backed off."""

    gate: str
    measured: str                  # what the planned model measured
    samples: int
    within: bool                   # the planned model was within the gate
    steps_kept: int | None = None  # when backed off: compression steps kept of `steps`
    steps: int | None = None
    refined_again: bool = False    # a refined model backed off: the prefix kept was refined again


@dataclass
class RefinedBlock:
    """One block of --refine: the alignment point its loss compares, what it trained and the
    relative squared error ||y - y0||^2 / ||y0||^2 there before (closed form) and after."""

    output: str
    factors: int                   # initializers trained
    parameters: int
    steps: int                     # Adam steps taken (early stopping may end them sooner)
    best_step: int                 # the held-out best that was kept; 0: the closed form
    train_before: float
    train_after: float
    held_before: float
    held_after: float


@dataclass
class RefineOutcome:
    """The refinement stage (--refine): per block, and the whole model on the held-out samples."""

    blocks: list[RefinedBlock] = field(default_factory=list)
    train_samples: int = 0
    held_samples: int = 0
    synthetic_samples: int = 0     # synthetic token sequences trained on beside the train samples
    seconds: float = 0.0           # wall time of the stage
    cpu_seconds: float = 0.0       # its process CPU time (on a shared machine, wall overstates the cost)
    closed_form_error: float | None = None   # worst output rel_l2 on the held-out samples, in ORT
    refined_error: float | None = None
    kept: bool = False             # the refined model was written (no worse than the closed form)
    reason: str = ""               # why nothing was refined


@dataclass
class DataAwareOutcome:
    calibration: CalibrationOutcome | None = None
    allocation: AllocationOutcome | None = None
    speed: SpeedOutcome | None = None
    correction: CorrectionOutcome | None = None
    refinement: RefineOutcome | None = None
    gate: GateOutcome | None = None


@dataclass
class Report:
    input: str
    input_external_data: bool = False
    layers: list[LayerRecord] = field(default_factory=list)
    passes: dict[str, int] = field(default_factory=dict)   # pass name -> layers it changed
    params_before: int = 0         # all initializer elements of the model
    params_after: int = 0
    size_before: int = 0           # serialized bytes
    size_after: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    parity: ParityResult | None = None
    bench: BenchResult | None = None
    gate: str = ""                  # what a lossy run's output error was held to (gate.Gate.describe)
    measured_speedup: float | None = None   # whole model, original vs written, timed interleaved
    fallback: str = ""              # why the written model is the input, when it is
    quantized: str = ""             # --quantize int8: how ONNX Runtime's quantizer was run
    wall_seconds: float | None = None   # the whole run, as the CLI timed it
    peak_memory: int | None = None      # the process's peak resident set, bytes (CLI, where the OS says)
    data_aware: DataAwareOutcome | None = None   # what each data-aware stage did, as data

    @property
    def decomposed(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.decomposed]

    @property
    def candidates(self) -> list[LayerRecord]:
        """The layers a decompose pass considered. The normalize and merge passes' records (folded,
        fused, merged) describe rewrites around those layers and are not counted as candidates.
        A layer prune_mlp shrank is counted once, by prune_mlp's record (the decompose pass after
        it sees the shrunk weight and leaves it dense)."""
        pruned = {r.name for r in self.layers if r.pass_name == "prune_mlp" and r.decomposed}
        return [r for r in self.layers if r.pass_name.startswith("decompose_") and r.name not in pruned
                or r.pass_name == "prune_mlp" and r.decomposed]

    @property
    def changed(self) -> bool:
        return any(self.passes.values())

    def totals(self) -> dict[str, Any]:
        done, candidates = self.decomposed, self.candidates
        macs = [(r.total_macs(False), r.total_macs(True)) for r in candidates]
        known = bool(macs) and all(b is not None for b, _ in macs)
        return {
            "candidates": len(candidates),
            "decomposed": len(done),
            "skipped": len(candidates) - len(done),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "size_before": self.size_before,
            "size_after": self.size_after,
            "layer_macs_before": sum(b for b, _ in macs) if known else None,
            "layer_macs_after": sum(a for _, a in macs) if known else None,
        }

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["totals"] = self.totals()
        return data

    def to_json(self) -> str:
        return json.dumps(_finite(self.to_dict()), indent=2, sort_keys=False, default=_json_default, allow_nan=False)


def to_json(data: Any) -> str:
    """Any report dataclass (Report, ParityResult, BenchResult) as indented JSON."""
    return json.dumps(_finite(dataclasses.asdict(data)), indent=2, default=_json_default, allow_nan=False)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _finite(value: Any) -> Any:
    """Infinity and NaN (a relative error against a zero reference) are not JSON: strict parsers
    refuse Python's extension. They become null; the text views print them as they are."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):   # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
