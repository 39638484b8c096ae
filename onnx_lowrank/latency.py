"""Micro-benchmarks of one layer in ONNX Runtime: the dense op, or its factorized chain at given ranks.

A layer's latency is a step function of rank on real kernels (tile sizes, vector widths), which no
FLOP count sees; so the rank search measures. Each measurement builds a tiny model holding just the
layer (or just its chain) at the layer's real input shape, times it with intra-op spinning off (a
spinning pool distorts alternating measurements on few cores), and keeps the per-run time of the
fastest of several blocks of runs (see block_ms). Results are cached on disk by everything that
decides them (provider, ORT version, machine, threads, op, shapes, attributes, ranks, batch), so a
second run of `optimize` costs no timing.

Weights are random: a kernel's speed does not depend on the values (dense float32 GEMM/conv
kernels have no data-dependent paths; the values are normal, never denormal).
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import options, runtime
from .forms import DENSE, METHODS, Form, LayerGeometry, conv_chain

DEFAULT_CACHE_DIR = Path(options.DEFAULT_CACHE_DIR)
CACHE_FILE = "latency.json"
_OPSET, _IR_VERSION = 17, 8      # ORT 1.31 refuses the IR 14 that onnx 1.23's make_model writes

#: timer(model, feeds) -> milliseconds per run; replaced by a fake in tests.
Timer = Callable[[onnx.ModelProto, dict[str, np.ndarray]], float]


@dataclass
class TimingSettings:
    """Enough runs to see a kernel's steps (a few %), little enough to time dozens of layers in seconds."""

    warmup: int = 3
    block_ms: float = 5.0       # each block runs the layer until at least this long has passed
    blocks: int = 7
    max_runs_per_block: int = 1000


class LayerLatency:
    """A LatencyFn backed by ORT micro-benchmarks and a JSON cache in `cache_dir` (None: no cache).

    `measured` counts the timings actually run, `cache_hits` the ones answered from the cache.
    """

    def __init__(self, provider: str = "cpu", cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
                 timer: Timer | None = None, settings: TimingSettings | None = None, threads: int | None = None):
        self.provider, self.threads = provider, threads
        self.settings = settings or TimingSettings()
        self.timer = timer or self._time_in_ort
        self.path = Path(cache_dir).expanduser() / CACHE_FILE if cache_dir is not None else None
        self.entries: dict[str, float] = _read_cache(self.path) if self.path else {}
        self.measured = 0
        self.cache_hits = 0

    def describe(self) -> str:
        """One line for the report's notes; empty when nothing was asked."""
        if not self.measured and not self.cache_hits:
            return ""
        where = f" (cache {self.path})" if self.path else ""
        return (f"layer latencies on {self.provider}: {self.measured} measured, {self.cache_hits} from the cache{where}; "
                "--no-measure uses the FLOP model")

    def __call__(self, geometry: LayerGeometry, form: Form = DENSE) -> float:
        key = cache_key(self.provider, geometry, form, self.threads)
        if key in self.entries:
            self.cache_hits += 1
            return self.entries[key]
        model = layer_model(geometry, form)
        feeds = {"x": np.random.default_rng(0).standard_normal(geometry.input_shape).astype(np.float32)}
        ms = float(self.timer(model, feeds))
        self.measured += 1
        self.entries[key] = ms
        if self.path is not None:
            _write_cache(self.path, self.entries)
        return ms

    def _time_in_ort(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
        session = runtime.make_session(model, runtime.SessionConfig(provider=self.provider, threads=self.threads,
                                                                     spinning=False))
        return block_ms(runtime.runner(session, feeds), self.settings)


def latency_for(options) -> LayerLatency | None:
    """The PassContext.latency for these Options: None under --no-measure (the FLOP model decides)."""
    if not options.measure:
        return None
    return LayerLatency(options.provider, options.cache_dir)


def block_ms(run: Callable[[], object], settings: TimingSettings) -> float:
    """The least over blocks of the mean run time in a block. The block mean averages out timer
    resolution; other processes only ever add time, so on a shared machine the fastest block is
    the estimate that drifts least with their load (the median moved 2.3 -> 4.1 ms for one conv
    between three runs at load 5 on 2 cores; layers are measured one after another, not
    interleaved, so a drifting estimate would distort the dense/factorized ratio)."""
    for _ in range(settings.warmup):
        run()
    start = time.perf_counter()
    run()
    once = max(time.perf_counter() - start, 1e-6)
    runs = max(1, min(settings.max_runs_per_block, math.ceil(settings.block_ms / 1e3 / once)))
    means = []
    for _ in range(settings.blocks):
        start = time.perf_counter()
        for _ in range(runs):
            run()
        means.append((time.perf_counter() - start) / runs * 1e3)
    return float(min(means))


def cache_key(provider: str, geometry: LayerGeometry, form: Form, threads: int | None = None) -> str:
    ort_version = runtime.ort_version()
    # the machine too: a home directory, and so the cache, may be shared between different hosts
    machine = f"{platform.machine()} x{os.cpu_count()}"
    return json.dumps({"provider": provider, "ort": ort_version, "machine": machine, "threads": threads,
                       "batch": geometry.batch, **asdict(geometry), **asdict(form)}, sort_keys=True)


# --- the tiny models --------------------------------------------------------------------------

def layer_model(geometry: LayerGeometry, form: Form = DENSE) -> onnx.ModelProto:
    """A model with input x (the layer's input shape) computing just this layer in this form."""
    if form.method not in METHODS:
        raise ValueError(f"unknown method {form.method!r}")
    builder = _matmul_nodes if geometry.op == "matmul" else _conv_nodes
    nodes, weights = builder(geometry, form, np.random.default_rng(0))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(geometry.input_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * len(geometry.input_shape))
    graph = helper.make_graph(nodes, f"{geometry.op}_{form.method}", [x], [y],
                              initializer=[numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", _OPSET)])
    model.ir_version = _IR_VERSION
    return model


def _matmul_nodes(g: LayerGeometry, form: Form, rng) -> tuple[list, dict]:
    k, n = g.weight_shape
    if form.method == "dense":
        weights = {"w": rng.standard_normal((k, n))}
        return [_matmul("w", g.weight_first, "x", "y")], weights
    if form.method != "svd":
        raise ValueError(f"a matmul layer has no {form.method} form")
    (r,) = form.ranks
    if g.weight_first:   # y = A (B x): W [M, K] = A [M, r] B [r, K]
        weights = {"b": rng.standard_normal((r, n)), "a": rng.standard_normal((k, r))}
        return [_matmul("b", True, "x", "h"), _matmul("a", True, "h", "y")], weights
    weights = {"a": rng.standard_normal((k, r)), "b": rng.standard_normal((r, n))}
    return [_matmul("a", False, "x", "h"), _matmul("b", False, "h", "y")], weights


def _matmul(w: str, weight_first: bool, x: str, y: str):
    return helper.make_node("MatMul", [w, x] if weight_first else [x, w], [y])


def _conv_nodes(g: LayerGeometry, form: Form, rng) -> tuple[list, dict]:
    """The chain the decompose pass writes (forms.conv_chain), for a conv of this geometry."""
    nd = len(g.weight_shape) - 2
    ones = [1] * nd
    attrs = {"kernel_shape": list(g.weight_shape[2:]), "strides": list(g.strides) or ones,
             "dilations": list(g.dilations) or ones}
    if g.auto_pad != "NOTSET":
        attrs["auto_pad"] = g.auto_pad
    else:
        attrs["pads"] = list(g.pads) or [0] * 2 * nd
    chain = conv_chain(g.weight_shape, attrs, form)
    nodes, weights, x = [], {}, "x"
    for i, conv in enumerate(chain):
        y = "y" if i == len(chain) - 1 else f"h{i}"
        shape = conv.weight_shape
        weights[f"w{i}"] = rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [y], **conv.attrs))
        x = y
    return nodes, weights


# --- cache file ---------------------------------------------------------------------------------

def _read_cache(path: Path) -> dict[str, float]:
    """A missing or unreadable cache is an empty one: it only ever saves time."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))} if isinstance(data, dict) else {}


def _write_cache(path: Path, entries: dict[str, float]) -> None:
    """Atomically (a temporary file, then a rename), so concurrent runs never read half a file;
    a cache that cannot be written is skipped silently, as it only ever saves time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read_cache(path), **entries}    # keep what a concurrent run added meanwhile
        fd, tmp = tempfile.mkstemp(prefix=".latency.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass
