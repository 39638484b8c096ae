"""`analyze`: what decomposition could do to each candidate layer, without writing a model.

Per layer: the spectrum (the relative weight error at every rank), the break-even rank, and at the
ranks that reach a few error levels the speedup the FLOP model predicts and, with measure=True, the
speedup measured in ONNX Runtime. The normalize passes run first (BatchNorm folding, merging), so
the weights analysed are the ones `optimize` would decompose.

Errors by rank are exact, not bounds: for an SVD the discarded tail (Eckart-Young); for a Tucker-2
conv at equal ranks r the truncated HOSVD's ||W||^2 - ||core[:r, :r]||^2 (its factors are
orthonormal, so the kept core's energy is the kept energy).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .shapes import infer_output_shapes
from .graph import import_graph
from .io import load_model
from .forms import DENSE, Form
from .latency import latency_for
from .numerics import ranks as R
from .numerics.conv_attrs import conv_attrs
from .numerics.svd import relative_error_by_rank, svd
from .numerics.tucker import channel_bases
from .options import Options
from .passes import PassContext, pipeline
from .passes._geometry import conv_geometry, matmul_geometry
from .passes.base import RewriteState
from .passes.base import layer_name, walk_graphs
from .passes.candidates import Candidate, match

#: The error levels at which analyze reports a rank and its speedup.
ERROR_LEVELS = (1e-1, 1e-2, 1e-3)
#: The plot's lowest error: a relative weight error below it is float32 rounding, not a choice of rank.
PLOT_FLOOR = 1e-5


@dataclass
class RankPoint:
    error_level: float
    rank: int                          # smallest rank within error_level (Tucker-2: r_out = r_in = rank, each
                                       # capped at its channel count)
    predicted_speedup: float           # dense / factorized multiply-adds
    measured_speedup: float | None = None


@dataclass
class LayerAnalysis:
    name: str
    op: str
    weight_shape: list[int]
    form: str                          # "svd" or "tucker2"
    full_rank: int
    break_even_rank: float
    stable_rank: float                 # ||W||_F^2 / sigma_max^2 of the (mode-0) unfolding: a soft rank
    errors: list[float]                # relative weight error at rank 0..full_rank
    points: list[RankPoint] = field(default_factory=list)
    latency_dense_ms: float | None = None


@dataclass
class Analysis:
    input: str
    layers: list[LayerAnalysis] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def analyze_model(model: onnx.ModelProto | str | os.PathLike, options: Options | None = None) -> Analysis:
    """Options as for optimize: shape/batch place the layers, measure/provider/cache_dir time them,
    ops/include/exclude/skip choose them."""
    options = options or Options(measure=False)
    source = str(model) if not isinstance(model, onnx.ModelProto) else "<ModelProto>"
    original = model if isinstance(model, onnx.ModelProto) else load_model(model)
    shapes, notes = infer_output_shapes(original, options.shape, options.batch)
    graph = import_graph(original)
    context = PassContext(options, shapes,
                          state=RewriteState(names={t for t in graph.tensors()} | {n.name for n in graph.nodes}))
    for entry in pipeline(options):
        if entry.stage == "normalize":
            entry.run(graph, context)
    graph.cleanup().toposort()
    latency = latency_for(options)
    result = Analysis(source, notes=list(notes))
    for g in walk_graphs(graph):
        for node in g.nodes:
            candidate = match(node, options)
            if candidate is None or candidate.refusal:
                continue   # what optimize leaves alone (grouped, excluded, a weight type it refuses)
            analysis, geometry, forms = _layer_analysis(candidate, context)
            if latency is not None and geometry is not None:
                _measure(analysis, geometry, forms, latency)
            result.layers.append(analysis)
    if latency_note := getattr(latency, "describe", lambda: "")():
        result.notes.append(latency_note)
    return result


def _layer_analysis(candidate: Candidate, context: PassContext):
    """(LayerAnalysis, geometry, form per rank) for a layer `optimize` would consider and not refuse."""
    node, weight = candidate.node, candidate.weight
    if node.op == "MatMul":
        w = weight.values
        geometry = matmul_geometry(context, candidate.x, *w.shape, weight_first=candidate.weight_first)
        return _matrix_layer(node, "MatMul", w, w.shape, geometry)
    if node.op == "Gemm":
        w = weight.values.T if node.attrs.get("transB", 0) else weight.values
        geometry = matmul_geometry(context, candidate.x, *w.shape, transposed_input=bool(node.attrs.get("transA", 0)))
        return _matrix_layer(node, "Gemm", w, weight.shape, geometry)
    w = weight.values
    geometry = conv_geometry(context, node, w.shape)
    if all(d == 1 for d in w.shape[2:]):
        return _matrix_layer(node, "Conv", w.reshape(w.shape[:2]), w.shape, geometry)
    return _tucker2_layer(node, w, geometry)


def _matrix_layer(node: gs.Node, op: str, w: np.ndarray, shape, geometry):
    k, n = w.shape
    s = svd(w)[1]
    errors = relative_error_by_rank(s)
    analysis = LayerAnalysis(layer_name(node), op, list(shape), "svd", len(s), R.matrix_break_even_rank(k, n),
                             _stable_rank(s), errors.tolist())
    forms = {}
    for level in ERROR_LEVELS:
        rank = _rank_within(errors, level)
        analysis.points.append(RankPoint(level, rank, R.matrix_macs(k, n) / R.matrix_macs(k, n, rank)))
        forms[rank] = Form("svd", (rank,))
    return analysis, geometry, forms


def _tucker2_layer(node: gs.Node, w: np.ndarray, geometry):
    out_ch, in_ch, *kernel_dims = w.shape
    kernel = math.prod(kernel_dims)
    stride = conv_attrs(node.attrs, kernel_dims).stride
    out_basis, in_basis = channel_bases(w)
    errors = _tucker2_errors_equal_rank(np.asarray(w, dtype=np.float64), out_basis.u, in_basis.u)
    analysis = LayerAnalysis(layer_name(node), "Conv", list(w.shape), "tucker2", max(out_ch, in_ch),
                             R.tucker2_break_even_rank(out_ch, in_ch, kernel, stride), _stable_rank(out_basis.s),
                             errors.tolist())
    dense = R.tucker2_macs(out_ch, in_ch, kernel, stride)
    forms = {}
    for level in ERROR_LEVELS:
        rank = _rank_within(errors, level)
        ranks = (min(rank, out_ch), min(rank, in_ch))
        analysis.points.append(RankPoint(level, rank, dense / R.tucker2_macs(out_ch, in_ch, kernel, stride, *ranks)))
        forms[rank] = Form("tucker2", ranks)
    return analysis, geometry, forms


def _tucker2_errors_equal_rank(w: np.ndarray, u_out: np.ndarray, u_in: np.ndarray) -> np.ndarray:
    """err[r] of the truncated HOSVD at ranks (min(r, O), min(r, I)), r = 0..max(O, I)."""
    core = np.einsum("oi...,or,is->rs...", w, u_out, u_in, optimize=True)
    energy = (core ** 2).reshape(core.shape[0], core.shape[1], -1).sum(axis=2)
    kept_block = energy.cumsum(0).cumsum(1)          # [a, b]: energy of core[:a + 1, :b + 1]
    out_ch, in_ch = energy.shape
    r = np.arange(1, max(out_ch, in_ch) + 1)
    kept = np.concatenate([[0.0], kept_block[np.minimum(r, out_ch) - 1, np.minimum(r, in_ch) - 1]])
    total = float((w ** 2).sum())
    return np.sqrt(np.maximum(total - kept, 0.0) / total) if total else np.zeros(len(kept))


def _measure(analysis: LayerAnalysis, geometry, forms: dict[int, Form], latency) -> None:
    analysis.latency_dense_ms = latency(geometry, DENSE)
    for point in analysis.points:
        factorized = latency(geometry, forms[point.rank])
        point.measured_speedup = analysis.latency_dense_ms / factorized if factorized > 0 else None


def _rank_within(errors: np.ndarray, level: float) -> int:
    ok = np.nonzero(errors <= level)[0]
    return max(1, int(ok[0]) if len(ok) else len(errors) - 1)


def _stable_rank(s: np.ndarray) -> float:
    return float((s ** 2).sum() / s[0] ** 2) if len(s) and s[0] > 0 else 0.0


# --- the plot -------------------------------------------------------------------------------------

def plot_analysis(analysis: Analysis, path: str | os.PathLike, max_layers: int = 24) -> int:
    """One panel per layer (the first max_layers): relative weight error against rank, log scale,
    the break-even rank as a dashed line (the ranks left of it, shaded, cost fewer MACs than the dense
    layer) and the error levels of the table as dotted lines. Returns the panels drawn."""
    import matplotlib
    matplotlib.use("Agg")   # files only: never open a window, work without a display
    import matplotlib.pyplot as plt

    layers = analysis.layers[:max_layers]
    cols = min(4, max(1, len(layers)))
    rows = max(1, math.ceil(len(layers) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.set_visible(False)
    for ax, layer in zip(axes.flat, layers):
        errors = np.maximum(np.asarray(layer.errors), PLOT_FLOOR)   # log axis: an exact fit plots at the floor
        ranks = np.arange(len(errors))
        ax.axvspan(0, layer.break_even_rank, color="tab:green", alpha=0.08, lw=0, label="fewer MACs than dense")
        ax.semilogy(ranks, errors, color="tab:blue", lw=1.6)
        ax.axvline(layer.break_even_rank, color="tab:red", ls="--", lw=1.2,
                   label=f"break-even rank {layer.break_even_rank:.0f}")
        for level in ERROR_LEVELS:
            ax.axhline(level, color="0.6", ls=":", lw=0.8)
        ax.set_xlim(0, len(errors) - 1)
        ax.set_ylim(PLOT_FLOOR * 0.7, 1.5)
        ax.set_title(_short(layer.name) + f"\n{layer.op} {'x'.join(map(str, layer.weight_shape))} ({layer.form})",
                     fontsize=9)
        ax.set_xlabel("rank" + (" (r_out = r_in, capped at channels)" if layer.form == "tucker2" else ""), fontsize=8)
        ax.set_ylabel("relative weight error", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    title = f"{os.path.basename(analysis.input)}: weight error by rank"
    if len(analysis.layers) > len(layers):
        title += f" (first {len(layers)} of {len(analysis.layers)} layers)"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(layers)


def _short(name: str, width: int = 38) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]
