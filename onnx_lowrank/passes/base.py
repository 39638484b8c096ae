"""What every pass shares: its context in, its PassResult out, and small graph helpers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..options import Options
from ..report import LayerRecord, PassResult

__all__ = ["PassContext", "PassResult", "LayerRecord", "constant_weight", "layer_name", "new_name",
           "output_positions", "walk_graphs"]


@dataclass
class PassContext:
    options: Options
    # concrete output shapes of nodes at the report's input shapes (best effort; may be empty)
    output_shapes: dict[str, list[int]] = field(default_factory=dict)
    # called once per candidate layer, for a progress bar; passes never print
    on_layer: Callable[[str], None] = lambda name: None
    # names in use across the model, so that new tensors and nodes never collide
    names: set[str] = field(default_factory=set)
    # (weight tensor name, method, ranks) -> factor constants, so a shared weight is factorized once
    factors: dict[tuple, tuple[gs.Constant, ...]] = field(default_factory=dict)


def walk_graphs(graph: gs.Graph) -> list[gs.Graph]:
    """The graph and every subgraph (If / Loop / Scan bodies), outer first."""
    return [graph, *graph.subgraphs(recursive=True)]


def constant_weight(node: gs.Node, index: int, ndim: int | None = None) -> gs.Constant | None:
    if index >= len(node.inputs):
        return None
    tensor = node.inputs[index]
    if not isinstance(tensor, gs.Constant):
        return None
    if ndim is not None and len(tensor.shape) != ndim:
        return None
    return tensor


def layer_name(node: gs.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else node.op)


def new_name(context: PassContext, base: str) -> str:
    """A tensor/node name derived from `base` that nothing in the model uses yet (stable: no counters
    shared across runs, so the same model gives the same names)."""
    name, i = base, 1
    while name in context.names:
        i += 1
        name = f"{base}_{i}"
    context.names.add(name)
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
