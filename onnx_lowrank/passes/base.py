"""What every pass shares: its context in, its PassResult out, and small graph helpers."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..forms import LatencyFn
from ..options import Options
from ..rank_allocation import BlockState, layer_ranks
from ..report import LayerRecord, PassResult

__all__ = ["PassContext", "PassResult", "LayerRecord", "apply_to_nodes", "constant_weight", "layer_name", "new_name",
           "output_positions", "walk_graphs"]


@dataclass(frozen=True)
class LayerPlan:
    """Per-layer decisions the passes follow, made before they run (the data-aware stages,
    optimize's checks of a result). Read-only to the passes; a stage that decides again makes a
    new plan (`with_`)."""

    # data-aware path (onnx_lowrank.calibration): layer -> Gram X^T X of its input rows [k, k]
    grams: Mapping[str, np.ndarray] = field(default_factory=dict)
    # layer -> (column sums [k], rows) of the same inputs: the intercept of prune_mlp's refit
    sums: Mapping[str, tuple[np.ndarray, int]] = field(default_factory=dict)
    # layer -> rank chosen by global allocation (rank_allocation.py), or fixed by error correction
    # ((r_out, r_in) for a k x k conv's Tucker-2); None keeps the layer dense. Layers not in it
    # follow the rank rule.
    ranks: Mapping[str, int | tuple[int, ...] | None] = field(default_factory=dict)
    # layer -> X~^T X, its inputs in the compressed model against those in the original: the matrix
    # passes then truncate the error-correcting weight (numerics.whitening.corrected_weight)
    cross_grams: Mapping[str, np.ndarray] = field(default_factory=dict)
    # k x k conv -> (P~^T P~, P~^T P) of its patch rows, compressed model against original: its
    # Tucker-2 is then refitted to the original output (numerics.tucker.corrected_tucker2)
    patch_grams: Mapping[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    # layer -> why it is kept dense whatever the rule says (e.g. factors that would add bytes)
    dense: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # an allocated MLP block's form (rank_allocation.BlockState) is read as its layers' ranks
        if any(isinstance(rank, BlockState) for rank in self.ranks.values()):
            object.__setattr__(self, "ranks", layer_ranks(self.ranks))

    def with_(self, **changes) -> "LayerPlan":
        return dataclasses.replace(self, **changes)


@dataclass
class RewriteState:
    """What one run of the passes accumulates, and nothing else: the names it has used, the
    factors it made, the first choice on each weight, and (written by fold_constant_weights in the
    normalize run, read by every rewrite after it) the chains it folded. Every rewrite of the
    snapshot starts a fresh one (`fresh`)."""

    # names in use across the model, so that new tensors and nodes never collide
    names: set[str] = field(default_factory=set)
    # (weight key, layout, ranks) -> factor tensors, so a shared weight is factorized once
    factors: dict[tuple, tuple[gs.Tensor, ...]] = field(default_factory=dict)
    # weight_key -> what the first layer that reads the weight decided, which every other layer
    # reading it follows: one factorization per unique weight
    choices: dict[str, "WeightChoice"] = field(default_factory=dict)
    # tensor name -> how fold_constant_weights made it a constant (_weights.Fold), so a layer left
    # dense gets its chain back, and aliases of one weight are known as one (weight_key)
    folds: dict[str, object] = field(default_factory=dict)
    # a survey run (data_aware.allocate.survey): the decompose passes record each layer's spectrum
    # here and rewrite nothing; None in a rewrite
    survey: dict[str, object] | None = None
    # weight name -> its Gram eigenvalues and their error bound (numerics.svd.gram_energies),
    # computed for a whole pass at once on every core (_matrix.screen_weights)
    energies: dict[str, tuple] = field(default_factory=dict)

    def fresh(self, names: set[str] | None = None, survey: dict | None = None) -> "RewriteState":
        """A new run's state: these names (default: the ones in use now), the same folds."""
        return RewriteState(names=set(self.names if names is None else names), folds=self.folds, survey=survey)


@dataclass(frozen=True)
class PassContext:
    """What the passes read: the options, shapes and measurer of the run, the per-layer plan, the
    cache of decompositions the data-aware stages share, and the run's own state."""

    options: Options
    # concrete output shapes of nodes at the report's input shapes (best effort; may be empty)
    output_shapes: Mapping[str, list[int]] = field(default_factory=dict)
    # called once per candidate layer, for a progress bar; passes never print
    on_layer: Callable[[str], None] = lambda name: None
    # latency(geometry, form) -> ms of one layer, what the rank search measures with: handed in by the
    # pipeline when --measure is on (onnx_lowrank.latency times it in ONNX Runtime; the passes never
    # import that); None: ranks and dense-vs-factorized come from the FLOP model
    latency: LatencyFn | None = None
    layers: LayerPlan = field(default_factory=LayerPlan)
    # layer name -> its (whitened) SVD, owned by the data-aware plan so that a survey, the rewrite
    # and the back-off factorize each layer once (None: not kept, so a plain run holds one layer's
    # SVD at a time)
    cache: dict[str, object] | None = None
    state: RewriteState = field(default_factory=RewriteState)

    def rewriting(self, layers: LayerPlan | None = None, names: set[str] | None = None, **changes) -> "PassContext":
        """This context for another run of the passes: a fresh state (these names), the same folds."""
        return dataclasses.replace(self, layers=layers or self.layers, state=self.state.fresh(names), **changes)


@dataclass(frozen=True)
class WeightChoice:
    """The first decision on a weight: factorized at `ranks` by `layer`, or kept dense (None)."""

    layer: str
    ranks: tuple[int, ...] | None
    method: str | None = None


def walk_graphs(graph: gs.Graph) -> list[gs.Graph]:
    """The graph and every subgraph (If / Loop / Scan bodies), outer first."""
    return [graph, *graph.subgraphs(recursive=True)]


def apply_to_nodes(graph: gs.Graph, context: PassContext,
                   rule: Callable[[gs.Graph, gs.Node, PassContext], LayerRecord | None]) -> PassResult:
    """A pass made of one node rule: `rule(graph, node, context)` on every node of the graph and its
    subgraphs, in order, returning a record for each node it considered (None: not a candidate)."""
    records = [record for g in walk_graphs(graph) for node in list(g.nodes)
               if (record := rule(g, node, context)) is not None]
    return PassResult(records)


def constant_weight(node: gs.Node, index: int, ndim: int | None = None) -> gs.Constant | None:
    if index >= len(node.inputs):
        return None
    tensor = node.inputs[index]
    if not isinstance(tensor, gs.Constant):
        return None
    if ndim is not None and len(tensor.shape) != ndim:
        return None
    return tensor


#: Weight types decomposed (in float64, written back in the same type). bfloat16 is not among them:
#: onnx-graphsurgeon reads it as float32 and would export it so, changing the model's types.
DECOMPOSABLE_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def weight_type_problem(weight: gs.Constant) -> str | None:
    """Why this weight's element type cannot be decomposed, or None. Reads the type from the
    TensorProto when the values are still lazy, so a refused weight is never loaded or converted."""
    values = weight._values
    if isinstance(values, gs.ir.tensor.LazyValues):
        elem_type = values.tensor.data_type
    else:
        elem_type = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(values).dtype)
    if elem_type in DECOMPOSABLE_TYPES:
        return None
    return f"{onnx.TensorProto.DataType.Name(elem_type).lower()} weight: only float32, float16 and float64 are decomposed"


def layer_name(node: gs.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else node.op)


def new_name(context: PassContext, base: str) -> str:
    """A tensor/node name derived from `base` that nothing in the model uses yet (stable: no counters
    shared across runs, so the same model gives the same names)."""
    return unique_name(context.state.names, base)


def unique_name(names: set[str], base: str) -> str:
    """`base`, or `base_2`, `base_3`, ...: the first not in `names`, which it is then added to."""
    name, i = base, 1
    while name in names:
        i += 1
        name = f"{base}_{i}"
    names.add(name)
    return name


def factor_constant(context: PassContext, base: str, values: np.ndarray, dtype: np.dtype) -> gs.Constant:
    return gs.Constant(new_name(context, base), np.ascontiguousarray(values.astype(dtype)))


def output_positions(context: PassContext, node: gs.Node, channel_axis: int | None) -> int | None:
    """Output positions (rows, or pixels per sample x batch) at the report's shapes, if known.

    channel_axis -1 for MatMul/Gemm (the feature axis is last), 1 for Conv (NCHW)."""
    shape = context.output_shapes.get(node.outputs[0].name) if node.outputs else None
    if not shape or any(not isinstance(d, int) or d < 0 for d in shape):
        return None
    dims = list(shape)
    del dims[channel_axis]
    return math.prod(dims)
