"""Calibration: run the model on the user's samples and keep, per candidate layer, the Gram matrix
X^T X of the rows its weight multiplies.

    samples (.npz, keys = input names, leading axis = samples)
      -> the model, with each candidate's input activation added as a graph output
      -> per batch: flatten the activation to rows [m, k] (padding rows dropped), C += X^T X (float64)

Memory is bounded by the Gram matrices (k^2 float64 per distinct input tensor; Q, K and V share
one), never by the number of samples. A tall layer (k inputs -> n < k outputs) whose Gram serves
only its whitened SVD is captured at its outputs instead: Y^T Y, n^2 (numerics.whitening.OutputGram). Graph optimizations are off in the capture session, so
every tensor the graph names still exists (ORT's fusions would remove MatMul inputs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import profiling, runtime
from .errors import OptionError
from .graph import copy_fields
from .inputs import check_every_input, read_npz
from .io import write_model
from .numerics.patches import ConvWindow, conv_patches
from .numerics.whitening import OutputGram
from .options import Options
from .passes.candidates import match

#: Samples per ORT run. Activations of one batch are all held at once: BERT-base at sequence 128
#: captures 48 distinct tensors (36 of width 768, 12 of 3072) of 8 x 128 rows, 0.26 GB.
BATCH_SIZE = 8
#: Samples per capture run: the captured tensors, ORT's buffers for them and their float64 rows
#: are the calibration's peak. BERT-base at 128 tokens: 4 samples a run peaked at 2.35 GB against
#: 2.73 GB for 8, in the same time (33 s for 112 samples).
CAPTURE_BATCH = 4


# --- data ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CalibrationData:
    """The .npz files of --calibration and how many samples each holds, read lazily."""

    files: tuple[Path, ...]
    counts: tuple[int, ...]

    @property
    def samples(self) -> int:
        return sum(self.counts)

    def batches(self, start: int = 0, stop: int | None = None, batch_size: int = BATCH_SIZE
                ) -> Iterator[dict[str, np.ndarray]]:
        """Samples [start, stop) in batches, never crossing a file boundary."""
        stop = self.samples if stop is None else stop
        offset = 0
        for path, count in zip(self.files, self.counts):
            lo, hi = max(start - offset, 0), min(stop - offset, count)
            offset += count
            if lo >= hi:
                continue
            arrays = read_npz(path, "--calibration")
            for i in range(lo, hi, batch_size):
                yield {key: value[i:min(i + batch_size, hi)] for key, value in arrays.items()}


def load_calibration(path: str | os.PathLike, input_names: list[str]) -> CalibrationData:
    """--calibration FILE.npz or a directory of .npz; every file must hold every model input."""
    path = Path(path)
    if path.is_dir():
        files = tuple(sorted(path.glob("*.npz")))
        if not files:
            raise OptionError(f"--calibration: directory '{path}' holds no .npz files")
    elif path.is_file():
        files = (path,)
    else:
        raise OptionError(f"--calibration: '{path}' does not exist")
    counts = []
    for file in files:
        arrays = read_npz(file, "--calibration")
        check_every_input(arrays, input_names, file, "--calibration")
        shapes = {name: arrays[name].shape for name in input_names}
        leading = {shapes[name][0] if shapes[name] else 0 for name in input_names}
        if len(leading) != 1 or 0 in leading:
            raise OptionError(f"--calibration: in '{file}' the inputs' leading (sample) axes differ or are empty: "
                              + ", ".join(f"{n} {list(shapes[n])}" for n in input_names))
        counts.append(leading.pop())
    return CalibrationData(files, tuple(counts))


# --- what to capture ----------------------------------------------------------------------------

@dataclass(frozen=True)
class CaptureSpec:
    """A candidate layer's input activation, and the axis its weight contracts; for a conv whose
    rows are its patches (a strided or padded 1x1, or a k x k under error correction), its window."""

    layer: str
    tensor: str
    axis: int
    dtype: np.dtype
    weight: str
    window: ConvWindow | None = None
    output: str | None = None    # the layer's output Y = X W: its Gram stands in for the inputs' (OutputGram)

    @property
    def key(self) -> tuple:
        """Specs with one key see the same rows: one capture, one Gram."""
        return self.tensor, self.axis, self.window, self.output


def capture_specs(graph: gs.Graph, options: Options, patches: bool = False, outputs: bool = False
                  ) -> list[CaptureSpec]:
    """The layers the decompose passes would factorize (passes/candidates.py: MatMul and Gemm with
    one constant 2-D side, group-1 Conv: 1x1 for whitened SVD, k x k for whitened Tucker-2; none the
    passes refuse), main graph only: a subgraph's tensors cannot be graph outputs. A k x k conv's
    Tucker-2 needs the channel Gram sum x x^T over all input pixels, which describes the
    input-channel mode whatever the pads and strides; a strided or padded 1x1's rows are its (1x1)
    patches. With `patches`, a 2-D k x k conv's rows are its patches (error correction fits the
    whole kernel) rather than its input pixels (Tucker-2's channel Gram). With `outputs`, a tall
    float32 MatMul weight (x W, W [k, n], n < k) is captured at its output instead
    (numerics.whitening.OutputGram): for callers that need nothing of the inputs but the whitened
    SVD. Only float32 outputs: a float16 product's rounding (1e-3) would be most of a tail's error."""
    specs = []
    for node in graph.nodes:
        candidate = match(node, options)
        if candidate is None or candidate.refusal or not isinstance(candidate.x, gs.Variable):
            continue   # not factorized, or activations that are a constant: nothing to capture
        weight, window = candidate.weight, None
        if candidate.conv is not None:
            kernel = candidate.conv.kernel
            if all(d == 1 for d in kernel) and not candidate.conv.pointwise or patches and any(d > 1 for d in kernel):
                window = ConvWindow.from_attrs(kernel, node.attrs)
                if window is None and all(d == 1 for d in kernel):
                    continue   # a strided 1x1 whose rows cannot be unfolded: weight-only
        # the layer name is the key the passes look the Gram up by
        dtype = np.dtype(weight.dtype)
        output = node.outputs[0].name if outputs and _tall_product(node, candidate, dtype) else None
        specs.append(CaptureSpec(candidate.name, candidate.x.name, candidate.axis, dtype, weight.name, window, output))
    # a weight factorized once for all its readers takes one kind of Gram: its inputs' if any reader needs that
    inputs_side = {s.weight for s in specs if s.output is None}
    return [dataclasses.replace(s, output=None) if s.weight in inputs_side else s for s in specs]


def _tall_product(node: gs.Node, candidate, dtype: np.dtype) -> bool:
    """y = x W with W [k, n], n < k, in float32 or float64: y itself is the product, with no bias or
    scale folded in."""
    shape = candidate.weight.shape
    return (node.op == "MatMul" and not candidate.weight_first and len(shape) == 2 and shape[1] < shape[0]
            and dtype in (np.float32, np.float64) and node.outputs[0].dtype in (None, np.float32, np.float64))


# --- the run ------------------------------------------------------------------------------------

@dataclass
class Calibration:
    """layer -> Gram [k, k] (float64; layers reading the same tensor share one array), and
    layer -> rows per sample before padding was dropped (the layer's output positions); layer ->
    (column sums [k], rows) of the rows its Gram sums, which an intercept's refit needs
    (numerics.nystrom)."""

    grams: dict[str, np.ndarray] = field(default_factory=dict)
    positions: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    sums: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict)


def collect_grams(model: onnx.ModelProto, specs: list[CaptureSpec], data: CalibrationData, *,
                  start: int = 0, stop: int | None = None, provider: str = "cpu",
                  batch_size: int = CAPTURE_BATCH, on_batch: Callable[[int], None] | None = None,
                  sources: dict[str, onnx.TensorProto] | None = None) -> Calibration:
    """Run `model` on samples [start, stop) of `data` and accumulate every spec's Gram matrix.

    on_batch(samples in the batch) is called after each batch, for a progress bar. `sources`: the
    tensors holding the bytes of `model`'s stub initializers (graph.export_graph_lazily)."""
    keys = list(dict.fromkeys(s.key for s in specs))
    grams: dict[tuple, np.ndarray] = {}
    traces: dict[tuple, float] = {}
    rows: dict[tuple, int] = {key: 0 for key in keys}
    sums: dict[tuple, tuple[np.ndarray, int]] = {}
    samples = 0
    captures = _captures([model], specs, data, start, stop, provider, batch_size, sources)
    del model, sources   # the session holds the weights from here on: a model only this call holds is freed
    for count, (values,), mask in captures:
        for key in keys:
            computed, x = _layer_rows(values[key[0]], key, mask)
            rows[key] += computed
            output = key[3]
            if output is not None:
                traces[key] = traces.get(key, 0.0) + float(np.einsum("ij,ij->", x, x))
                _, y = _layer_rows(values[output], key, mask)
            else:
                y = x
            grams[key] = y.T @ y if key not in grams else grams[key] + y.T @ y
            total, fitted = sums.get(key, (0.0, 0))
            sums[key] = (total + x.sum(axis=0), fitted + x.shape[0])
        samples += count
        if on_batch is not None:
            on_batch(count)
    if not samples:
        raise OptionError("--calibration: no samples to calibrate on")
    for key, trace in traces.items():
        grams[key] = OutputGram(grams[key], trace, len(sums[key][0]))
    return Calibration(grams=_per_layer(specs, grams),
                       positions={s.layer: rows[s.key] / samples for s in specs},
                       samples=samples, sums={s.layer: sums[s.key] for s in specs})


def collect_cross_grams(original: onnx.ModelProto, compressed: onnx.ModelProto, specs: list[CaptureSpec],
                        data: CalibrationData, *, start: int = 0, stop: int | None = None, provider: str = "cpu",
                        batch_size: int = CAPTURE_BATCH, on_batch: Callable[[int], None] | None = None
                        ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """layer -> (X~^T X~, X~^T X): X~ the rows the layer sees in `compressed` (every layer before
    it already truncated), X the rows it sees in `original`, on the same samples. A layer's input
    tensor keeps its name through the rewrite (the first factor reads it), so one spec names both."""
    keys = list(dict.fromkeys(s.key for s in specs))
    sums: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    for count, (reference, actual), mask in _captures([original, compressed], specs, data, start, stop,
                                                        provider, batch_size):
        for key in keys:
            _, x = _layer_rows(reference[key[0]], key, mask)
            _, xt = _layer_rows(actual[key[0]], key, mask)
            gram, cross = xt.T @ xt, xt.T @ x
            sums[key] = (gram, cross) if key not in sums else (sums[key][0] + gram, sums[key][1] + cross)
        if on_batch is not None:
            on_batch(count)
    return {s.layer: sums[s.key] for s in specs if s.key in sums}


def _captures(models: list[onnx.ModelProto], specs: list[CaptureSpec], data: CalibrationData, start: int,
              stop: int | None, provider: str, batch_size: int, sources: dict[str, onnx.TensorProto] | None = None
              ) -> Iterator[tuple[int, list[dict[str, np.ndarray]], np.ndarray | None]]:
    """Per batch: its sample count, each model's captured tensors by name, and the padding mask.
    `sources` holds the bytes of the first model's stub initializers."""
    config = runtime.SessionConfig(provider=provider, optimize=False, prepack=False, arena=False)
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-capture-") as folder:
        sessions = []
        for i, model in enumerate(models):
            # written from the model's own tensors: a probe holding copies would be the weights again
            shell, initializers = _capture_model(model, specs)
            path = Path(folder) / f"capture{i}.onnx"
            write_model(shell, path, initializers=initializers, sources=sources if i == 0 else None)
            sessions.append(runtime.make_session(path, config))
    models.clear()   # nothing here needs them again (collect_grams lets its model go)
    input_names = [i.name for i in sessions[0].get_inputs()]
    mask_name = _mask_input(sessions[0])
    for batch in data.batches(start, stop, batch_size):
        feeds = {name: batch[name] for name in input_names}
        values = [dict(zip([o.name for o in s.get_outputs()], runtime.run(s, feeds))) for s in sessions]
        yield len(feeds[input_names[0]]), values, (feeds[mask_name] if mask_name else None)


def _per_layer(specs: list[CaptureSpec], grams: dict[tuple[str, int], np.ndarray]) -> dict[str, np.ndarray]:
    """A weight shared by several layers gets one factorization (the passes share its factors), so
    its Gram is the sum over the layers: the truncation then minimises their summed output error."""
    by_weight: dict[str, list[CaptureSpec]] = {}
    for spec in specs:
        by_weight.setdefault(spec.weight, []).append(spec)
    result = {}
    for users in by_weight.values():
        keys = list(dict.fromkeys(s.key for s in users))
        if len({_side(s.axis) for s in users}) > 1:
            continue   # used as x W and as W x: no one Gram describes both; weight-only path
        total = grams[keys[0]] if len(keys) == 1 else sum(grams[key] for key in keys)
        result.update({s.layer: total for s in users})
    return result


def _side(axis: int) -> str:
    return "left" if axis == -2 or axis == 1 else "right"


def _capture_model(model: onnx.ModelProto, specs: list[CaptureSpec]
                   ) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """The model with the captured tensors as its only outputs and only the nodes they need: ORT
    runs every node of a graph whatever outputs a run asks for, and error correction makes one pass
    per depth, which would otherwise each pay for the whole model. The graph inputs all stay (an
    unused one is allowed), so every pass takes the same feeds. Returned as the model without its
    main graph's initializers, and those it needs (`model`'s own tensors, not copies)."""
    wanted: dict[str, np.dtype] = {}
    for spec in specs:
        for tensor in filter(None, (spec.tensor, spec.output)):
            wanted.setdefault(tensor, spec.dtype)
    needed = set(wanted)
    kept = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
            needed.update(_subgraph_inputs(node))
    probe = onnx.ModelProto()
    copy_fields(model, probe, but="graph")
    copy_fields(model.graph, probe.graph, but="initializer")
    graph = probe.graph
    del graph.node[:]
    graph.node.extend(reversed(kept))
    # an initializer also listed as a graph input (IR < 4) stays: without it ORT would ask for a feed
    declared = {i.name for i in graph.input}
    initializers = [t for t in model.graph.initializer if t.name in needed or t.name in declared]
    del graph.output[:]
    graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(dtype), None)
                        for name, dtype in wanted.items())
    return probe, initializers


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Every tensor name the node's subgraphs (If / Loop / Scan bodies) read: a superset of the
    outer-scope names they use, which is all the pruning needs."""
    names: set[str] = set()
    for attr in node.attribute:
        for body in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in body.node:
                names.update(inner.input)
                names.update(_subgraph_inputs(inner))
    return names


def _mask_input(session) -> str | None:
    """An integer or bool input named like a mask, [batch, seq]: 0 marks a padding position."""
    for arg in session.get_inputs():
        if "mask" in arg.name.lower() and len(arg.shape) == 2 and arg.type in (
                "tensor(int64)", "tensor(int32)", "tensor(bool)", "tensor(float)", "tensor(uint8)", "tensor(int8)"):
            return arg.name
    return None


def _layer_rows(value: np.ndarray, key: tuple, mask: np.ndarray | None) -> tuple[int, np.ndarray]:
    """(rows the layer computes, the rows that steer the fit) [m, k] in float64: a conv's patches
    under its window, else the activation over its feature axis with padding rows dropped."""
    _, axis, window, _ = key
    if window is not None:
        patches = conv_patches(np.asarray(value, dtype=np.float64), window)
        return patches.shape[0], patches
    rows = _rows(value, axis)
    return rows.shape[0], _drop_padding(rows, value, axis, mask)


def _rows(value: np.ndarray, axis: int) -> np.ndarray:
    """The activation as rows [m, k] over its feature axis, in float64 for the accumulation."""
    moved = np.moveaxis(value, axis, -1)
    return moved.reshape(-1, moved.shape[-1]).astype(np.float64)


def _drop_padding(rows: np.ndarray, value: np.ndarray, axis: int, mask: np.ndarray | None) -> np.ndarray:
    """Rows of padding positions carry activations the model's output never uses (the attention
    mask hides them), so they must not steer the truncation. Only the unambiguous layouts are
    matched: [batch, seq, k] and [batch * seq, k] token rows."""
    if mask is None or axis not in (-1, value.ndim - 1):
        return rows
    keep = np.asarray(mask) != 0
    if value.ndim == 3 and value.shape[:2] == keep.shape:
        return rows[keep.reshape(-1)]
    if value.ndim == 2 and value.shape[0] == keep.size:
        return rows[keep.reshape(-1)]
    return rows


def layer_time_fraction(model: onnx.ModelProto, layers: set[str], data: CalibrationData, *, provider: str = "cpu",
                        runs: int = 4, batch_size: int = BATCH_SIZE) -> float | None:
    """The share of the model's kernel time spent in `layers`, from ORT's profiler on the first
    calibration batch, with graph optimizations on as the model is served (fused nodes are mapped
    back to their layers); the first run warms up and is not counted."""
    batch = next(data.batches(0, None, batch_size))
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-profile-") as tmp:
        session = runtime.make_session(model, runtime.SessionConfig(provider=provider,
                                                                    profile_prefix=str(Path(tmp) / "trace")))
        feeds = {i.name: batch[i.name] for i in session.get_inputs()}
        for _ in range(runs + 1):
            runtime.run(session, feeds)
        events = json.loads(runtime.end_profiling(session).read_text())
    times = {layer: p.us for layer, p in profiling.layer_profile(events, model.graph, skip_runs=1).items()}
    total = sum(times.values())
    found = sum(t for layer, t in times.items() if layer in layers)
    return found / total if total and found else None   # a profile that names none of them says nothing


def probe_deviations(model: onnx.ModelProto | str, selector: str, count: int, data: CalibrationData, *, start: int = 0,
                     stop: int | None = None, provider: str = "cpu", batch_size: int = BATCH_SIZE) -> np.ndarray:
    """For a model with an extra input `selector` [count] that switches on one perturbation each:
    the relative deviation ||y_i - y|| / ||y|| of all outputs together, for each i, over the samples."""
    session = runtime.make_session(model, runtime.SessionConfig(provider=provider))
    names = [i.name for i in session.get_inputs() if i.name != selector]
    squared, total = np.zeros(count), 0.0
    for batch in data.batches(start, stop, batch_size):
        feeds = {name: batch[name] for name in names}
        off = np.zeros(count, dtype=np.float32)
        reference = [o.astype(np.float64) for o in runtime.run(session, {**feeds, selector: off})]
        total += sum(float(np.sum(o ** 2)) for o in reference)
        for i in range(count):
            on = off.copy()
            on[i] = 1.0
            outputs = runtime.run(session, {**feeds, selector: on})
            squared[i] += sum(float(np.sum((o - r) ** 2)) for o, r in zip(outputs, reference))
    return np.sqrt(squared / total) if total else np.zeros(count)
