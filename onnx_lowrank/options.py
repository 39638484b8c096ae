"""Options of `optimize`, validated once. Field names are the CLI flags with '-' -> '_'."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import OptionError
from .numerics.ranks import RankRule

OPS = ("matmul", "gemm", "conv")
DEFAULT_CACHE_DIR = "~/.cache/onnx-lowrank"
CONV_METHODS = ("tucker2", "branched-tucker", "spatial-svd", "auto")
MLP_FORMS = ("svd", "nystrom", "auto")
MLP_SELECTIONS = ("greedy", "energy", "leverage")


def measure_default() -> bool:
    """--measure is on unless ONNX_LOWRANK_MEASURE=0: test suites set that, as measured decisions
    on tiny test layers depend on the machine's timings."""
    return os.environ.get("ONNX_LOWRANK_MEASURE", "1").strip() not in ("0", "false", "no", "off")


@dataclass
class Options:
    # rank rule: at most one of rank / rank_ratio / energy; otherwise tolerance
    tolerance: float = 1e-3
    rank: int | None = None
    rank_ratio: float | None = None
    energy: float | None = None
    rank_multiple: int | str = 8       # or "auto": the step found by measuring (8 under --no-measure)
    min_flop_reduction: float = 0.1
    # which nodes
    ops: tuple[str, ...] = OPS
    include: str | None = None
    exclude: str | None = None
    skip: tuple[str, ...] = ()           # pass names (onnx_lowrank.passes.PIPELINE) not to run
    fuse_horizontal: bool = False        # off: no measurable gain on CPU ORT (benchmarks/bench_merge.py)
    merge_across_activations: bool = False   # the paper's inexact bottleneck merge (passes/merge_linear.py)
    # how convs are decomposed
    conv_method: str = "tucker2"
    branches: int = 4                    # groups of the branched-tucker core
    # MatMul -> activation -> MatMul blocks (passes/prune_mlp.py, needs --calibration): "svd" leaves
    # their layers to the per-layer SVD; "nystrom" keeps k of the neurons and refits W2; "auto"
    # gives the global allocation both forms of each block on one grid (rank_allocation.BlockForms)
    mlp_form: str = "svd"
    mlp_selection: str = "greedy"        # which neurons: greedy LS forward selection, energy, leverage
    # hardware-aware ranks: measure each candidate layer in ONNX Runtime (off: the FLOP model)
    measure: bool = field(default_factory=measure_default)
    cache_dir: str | None = DEFAULT_CACHE_DIR   # measured latencies; None: no cache
    rank_search_floor: float = 0.75      # the rank search goes down to this fraction of the rule's rank
    min_layer_speedup: float = 1.05      # measured dense / factorized latency a layer must reach
    # data-aware path: calibration samples (.npz or a directory of them), and one global target
    calibration: str | None = None
    # with calibration, a model whose integer inputs index an embedding table (token ids): per
    # calibration sample, this many synthetic sequences of ids drawn uniformly from the table join
    # the Gram matrices (synthetic.py), so the truncation keeps what texts of other domains use
    synthetic_tokens: int = 1
    target_flops: float | None = None    # MACs of the candidate layers, as a fraction of their dense MACs
    target_params: float | None = None   # parameters of the candidate layers, likewise
    target_speedup: float | None = None  # whole-model speedup: Amdahl on the profiled layer share, then timed
    # with calibration: refit the factorized layers, depth by depth, on the compressed model's
    # activations. Off by default: it costs one pass over the samples per depth (MiniLM: 19 passes,
    # 14 s -> 190 s) and gained MiniLM little (cosine 0.940 -> 0.946), while on the digits CNN it is
    # what keeps accuracy (88.4% -> 99.8% at 2.64x fewer conv MACs): optimize says so where it applies
    error_correction: bool = False
    # with calibration: train the factors by gradient descent (torch, the [refine] extra) to the
    # original's tensors at alignment points, block by block (data_aware/refine/)
    refine: bool = False
    refine_steps: int = 200              # Adam steps per block at most (early stopping may end sooner)
    # proof
    validate: bool = True
    # the quality gate of a lossy run (gate.py): relative L2 output error per output (None: the
    # default gate; "none": ungated, measured only) and top-1 agreement of class outputs
    max_error: float | str | None = None
    min_top1: float | None = None
    allow_slower: bool = False           # keep a result that measures slower than the original
    quantize: str | None = None          # "int8": ONNX Runtime's quantization as the last stage (quantize.py)
    shape: dict[str, list[int]] = field(default_factory=dict)
    # dynamic batch dims in the parity check: one row's error swings ~2x around the weight error
    # (x W concentrates on r directions); a few rows average that out
    batch: int = 4
    seed: int = 0
    provider: str = "cpu"
    bench: bool = False                  # time original vs optimized (bench.py) and put it in Report.bench

    def __post_init__(self) -> None:
        self.ops = normalize_ops(self.ops)
        self.skip = tuple(self.skip.split(",")) if isinstance(self.skip, str) else tuple(self.skip)
        chosen = [n for n in ("rank", "rank_ratio", "energy") if getattr(self, n) is not None]
        if len(chosen) > 1:
            raise OptionError(f"choose one rank rule, got {' and '.join('--' + n.replace('_', '-') for n in chosen)}")
        _check(0 < self.tolerance < 1, f"--tolerance must be in (0, 1), got {self.tolerance}")
        if self.rank is not None:
            _check(int(self.rank) == self.rank and self.rank >= 1, f"--rank must be a positive integer, got {self.rank}")
        if self.rank_ratio is not None:
            _check(0 < self.rank_ratio <= 1, f"--rank-ratio must be in (0, 1], got {self.rank_ratio}")
        if self.energy is not None:
            _check(0 < self.energy <= 1, f"--energy must be in (0, 1], got {self.energy}")
        targets = [n for n in ("target_flops", "target_params", "target_speedup") if getattr(self, n) is not None]
        if len(targets) > 1:
            raise OptionError(f"choose one target, got {' and '.join('--' + n.replace('_', '-') for n in targets)}")
        for name in ("target_flops", "target_params"):
            value = getattr(self, name)
            if value is not None:
                _check(0 < value < 1, f"--{name.replace('_', '-')} must be in (0, 1), got {value}")
        if self.target_speedup is not None:
            _check(self.target_speedup > 1, f"--target-speedup must be > 1, got {self.target_speedup}")
        if isinstance(self.rank_multiple, str) and self.rank_multiple.strip().lower() == "auto":
            self.rank_multiple = "auto"
        else:
            try:
                multiple = float(self.rank_multiple)
            except (TypeError, ValueError):
                multiple = 0
            _check(multiple == int(multiple) and multiple >= 1,
                   f"--rank-multiple must be a positive integer or auto, got {self.rank_multiple}")
            self.rank_multiple = int(multiple)
        _check(self.conv_method in CONV_METHODS,
               f"--conv-method: unknown method {self.conv_method!r}; choose from {', '.join(CONV_METHODS)}")
        _check(self.mlp_form in MLP_FORMS,
               f"--mlp-form: unknown form {self.mlp_form!r}; choose from {', '.join(MLP_FORMS)}")
        _check(self.mlp_selection in MLP_SELECTIONS,
               f"--mlp-selection: unknown rule {self.mlp_selection!r}; choose from {', '.join(MLP_SELECTIONS)}")
        _check(self.mlp_form == "svd" or self.calibration is not None,
               f"--mlp-form {self.mlp_form} refits each block's second matrix on calibration samples: "
               "it needs --calibration")
        _check(int(self.synthetic_tokens) == self.synthetic_tokens and self.synthetic_tokens >= 0,
               f"--synthetic-tokens must be a whole number >= 0, got {self.synthetic_tokens}")
        _check(int(self.branches) == self.branches and self.branches >= 1,
               f"--branches must be a positive integer, got {self.branches}")
        _check(0 < self.rank_search_floor <= 1, f"--rank-search-floor must be in (0, 1], got {self.rank_search_floor}")
        _check(self.min_layer_speedup > 0, f"--min-layer-speedup must be positive, got {self.min_layer_speedup}")
        _check(0 <= self.min_flop_reduction < 1,
               f"--min-flop-reduction must be in [0, 1), got {self.min_flop_reduction}")
        if isinstance(self.max_error, str):
            _check(self.max_error.strip().lower() == "none",
                   f"--max-error must be a positive number or none, got {self.max_error!r}")
            self.max_error = "none"
        elif self.max_error is not None:
            _check(self.max_error > 0, f"--max-error must be positive, got {self.max_error}")
        _check(self.quantize in (None, "int8"), f"--quantize: unknown mode {self.quantize!r}; choose int8")
        if self.min_top1 is not None:
            _check(0 <= self.min_top1 <= 1, f"--min-top1 must be in [0, 1], got {self.min_top1}")
        _check(int(self.batch) == self.batch and self.batch >= 1, f"--batch must be a positive integer, got {self.batch}")
        _check(int(self.seed) == self.seed and self.seed >= 0, f"--seed must be a non-negative integer, got {self.seed}")
        _check(not self.error_correction or self.calibration is not None,
               "--error-correction refits layers on calibration samples: it needs --calibration")
        _check(not self.refine or self.calibration is not None,
               "--refine trains the factors on calibration samples: it needs --calibration")
        _check(int(self.refine_steps) == self.refine_steps and self.refine_steps >= 1,
               f"--refine-steps must be a positive integer, got {self.refine_steps}")
        for pattern, flag in ((self.include, "--include"), (self.exclude, "--exclude")):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise OptionError(f"{flag}: invalid regular expression {pattern!r}: {exc}") from None

    @property
    def rank_rule(self) -> RankRule:
        if self.rank is not None:
            return RankRule("rank", int(self.rank))
        if self.rank_ratio is not None:
            return RankRule("ratio", self.rank_ratio)
        if self.energy is not None:
            return RankRule("energy", self.energy)
        return RankRule("tolerance", self.tolerance)

    @property
    def rounding_multiple(self) -> int:
        """The multiple ranks are rounded up to before any measuring; auto starts from 8."""
        return 8 if self.rank_multiple == "auto" else int(self.rank_multiple)

    @property
    def target(self) -> tuple[str, float] | None:
        """("flops" | "params" | "speedup", value) of the global rank allocation, or None."""
        for kind in ("flops", "params", "speedup"):
            value = getattr(self, f"target_{kind}")
            if value is not None:
                return kind, value
        return None

    def selects(self, node_name: str) -> bool:
        if self.include is not None and not re.search(self.include, node_name):
            return False
        return self.exclude is None or not re.search(self.exclude, node_name)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["ops"] = list(self.ops)
        data["skip"] = list(self.skip)
        return data


def normalize_ops(ops: Any) -> tuple[str, ...]:
    if isinstance(ops, str):
        ops = ops.split(",")
    names = tuple(dict.fromkeys(o.strip().lower() for o in ops if o.strip()))
    unknown = [o for o in names if o not in OPS]
    if unknown or not names:
        raise OptionError(f"--ops: unknown op {', '.join(map(repr, unknown)) or '(none given)'}; choose from {','.join(OPS)}")
    return names


def parse_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """'name:1,3,224,224' -> {'name': [1, 3, 224, 224]}. The name may itself contain ':'."""
    shapes: dict[str, list[int]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        try:
            values = [int(d) for d in dims.split(",")] if dims.strip() else []
        except ValueError:
            values = None
        if not sep or not name or values is None or any(v < 1 for v in values):
            # a zero dim makes empty outputs, which pass any comparison without testing anything
            raise OptionError(f"--shape {spec!r}: expected NAME:D1,D2,... with positive integers, e.g. input:1,3,224,224")
        shapes[name] = values
    return shapes


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise OptionError(message)
