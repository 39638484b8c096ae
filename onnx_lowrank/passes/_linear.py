"""The graph plumbing around the affine maps of numerics/affine.py, which fold_batchnorm,
merge_linear and fuse_parallel share: reading a linear node and its channelwise neighbours as one
map, and writing a map back as one node.

A *unit* is a linear node plus the per-channel constant nodes right after it (BatchNormalization,
Mul / Add / Sub / Div by a constant) whose inputs nothing else reads: y = (x M + b) s + t is still
affine, so a unit is one affine map however many nodes spell it. Every rewrite here composes or
adds such maps and writes the result back as one node (plus an Add for a MatMul's bias), which is
exact up to float rounding; the checks name the cases where it would not be (a bias in front of a
padded conv, an intermediate someone else reads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import onnx_graphsurgeon as gs

from ..numerics.affine import CONV, GEOMETRY, MATRIX, Affine, conv_group, padded
from ..numerics.conv_attrs import conv_attrs
from .base import PassContext, factor_constant, layer_name, new_name
from ._weights import read_values

LINEAR = ("MatMul", "Gemm", "Conv")
CHANNELWISE = ("BatchNormalization", "Mul", "Add", "Sub", "Div")


# --- reading the graph --------------------------------------------------------------------------

@dataclass
class Unit:
    """A linear node and the channelwise nodes it absorbed: x -> nodes -> y is `affine`.

    Shapes and structure are read from the graph; the float64 map (`affine`) is only computed when
    a rewrite asks for it, so scanning a large model stays cheap."""

    kind: str                        # MATRIX or CONV
    shape: tuple[int, ...]           # the weight as applied: [I, O] (matrix) or [O, I, *k] (conv)
    nodes: list[gs.Node]
    x: gs.Tensor
    y: gs.Tensor
    dtype: np.dtype
    gemm: bool = False               # a Gemm is among the nodes: x is 2-D, so the result may be a Gemm
    trans_b: int = 0
    geometry: dict = field(default_factory=dict)
    steps: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)   # channelwise (scale, shift)

    @property
    def head(self) -> gs.Node:
        return self.nodes[0]

    @property
    def absorbed(self) -> list[gs.Node]:
        return self.nodes[1:]

    @property
    def in_channels(self) -> int:
        return self.shape[0 if self.kind == MATRIX else 1]

    @property
    def out_channels(self) -> int:
        return self.shape[1 if self.kind == MATRIX else 0]

    @property
    def kernel(self) -> int:
        return math.prod(self.shape[2:])

    @property
    def stride(self) -> int:
        return conv_attrs(self.geometry).stride

    @property
    def pointwise(self) -> bool:
        return (self.kind == CONV and self.kernel == 1 and self.stride == 1 and not padded(self.geometry)
                and conv_group(self.geometry) == 1)

    def macs(self) -> int:
        """Multiply-adds per output position (a row, or an output pixel)."""
        return math.prod(self.shape)

    @property
    def has_bias(self) -> bool:
        return _bias_input(self.head) is not None or any(np.any(shift) for _, shift in self.steps)

    @cached_property
    def affine(self) -> Affine:
        affine = _head_affine(self.head, self.kind, self.geometry)
        for scale, shift in self.steps:
            affine = affine.then_channelwise(scale, shift)
        return affine


def private(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    """Read by exactly one node and not a graph output: a rewrite may make it disappear."""
    return len(tensor.outputs) == 1 and not any(tensor is out for out in graph.outputs)


def linear_unit(node: gs.Node, graph: gs.Graph, context: PassContext) -> Unit | None:
    """The unit that starts at `node`, or None if node is not a linear op with constant weights.
    The channelwise nodes after it are taken in while their input is private."""
    unit = _linear_node(node)
    if unit is None:
        return None
    while private(unit.y, graph):
        consumer = unit.y.outputs[0]
        if consumer.op not in CHANNELWISE:
            break
        found = channelwise(consumer, unit.y, unit.kind, unit.out_channels,
                            tensor_rank(unit.y, context) or (2 if unit.gemm else None))
        if found is None or None not in (consumer.outputs[0].dtype, unit.y.dtype) \
                and consumer.outputs[0].dtype != unit.y.dtype:
            break
        unit.steps.append(found)
        unit.nodes.append(consumer)
        unit.y = consumer.outputs[0]
    return unit


def _linear_node(node: gs.Node) -> Unit | None:
    if node.op not in LINEAR or node.domain not in (None, "", "ai.onnx") or len(node.outputs) != 1 \
            or len(node.inputs) < 2:
        return None
    x, w = node.inputs[0], node.inputs[1]
    if isinstance(x, gs.Constant) or not isinstance(w, gs.Constant) or _float_dtype(w) is None:
        return None
    shape, y, dtype = tuple(w.shape), node.outputs[0], _float_dtype(w)
    bias = _bias_input(node)
    if bias is not None and not isinstance(bias, gs.Constant):
        return None
    if node.op == "MatMul" and len(shape) == 2:
        return Unit(MATRIX, shape, [node], x, y, dtype)
    if node.op == "Gemm" and len(shape) == 2 and not node.attrs.get("transA", 0):
        trans_b = int(node.attrs.get("transB", 0))
        shape = shape[::-1] if trans_b else shape
        if bias is not None and (bias.values.size not in (1, shape[1]) or bias.values.ndim > 2
                                 or (bias.values.ndim == 2 and bias.values.shape[0] != 1)):
            return None   # a per-row C is not a bias
        return Unit(MATRIX, shape, [node], x, y, dtype, gemm=True, trans_b=trans_b)
    if node.op == "Conv" and len(shape) >= 3:
        geometry = {k: v for k, v in node.attrs.items() if k in GEOMETRY}
        return Unit(CONV, shape, [node], x, y, dtype, geometry=geometry)
    return None


def _float_dtype(w: gs.Constant) -> np.dtype | None:
    """The weight's numpy dtype if it is a float numpy can compute in, read without loading the
    values (onnx-graphsurgeon loads initializers lazily; a large model's scan should not)."""
    try:
        dtype = np.dtype(w.dtype)
    except TypeError:
        return None
    return dtype if dtype.kind == "f" else None


def _bias_input(node: gs.Node) -> gs.Tensor | None:
    if node.op in ("Gemm", "Conv") and len(node.inputs) > 2 and node.inputs[2].name:
        return node.inputs[2]
    return None


def _head_affine(node: gs.Node, kind: str, geometry: dict) -> Affine:
    values = np.asarray(read_values(node.inputs[1]), dtype=np.float64)
    bias = _bias_input(node)
    if kind == CONV:
        return Affine(CONV, values, None if bias is None else np.asarray(bias.values, np.float64), geometry)
    if node.op == "MatMul":
        return Affine(MATRIX, values, None)
    weight = float(node.attrs.get("alpha", 1.0)) * (values.T if node.attrs.get("transB", 0) else values)
    if bias is not None:
        bias = float(node.attrs.get("beta", 1.0)) * np.broadcast_to(
            np.asarray(bias.values, np.float64).reshape(-1), (weight.shape[1],))
    return Affine(MATRIX, weight, bias)


def tensor_rank(tensor: gs.Tensor, context: PassContext) -> int | None:
    if tensor.shape is not None:
        return len(tensor.shape)
    shape = context.output_shapes.get(tensor.name)
    return len(shape) if shape is not None else None


def channelwise(node: gs.Node, data: gs.Tensor, kind: str, channels: int, rank: int | None
                ) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) [channels] if node computes data * scale + shift per channel, else None.

    kind says where the channels are (last axis for MATRIX, axis 1 for CONV); rank is the data's
    rank if known. A constant that would broadcast the data to a larger shape is refused."""
    if node.domain not in (None, "", "ai.onnx") or not node.outputs:
        return None
    if node.op == "BatchNormalization":
        return _batchnorm(node, data, kind, channels, rank)
    if node.op not in CHANNELWISE or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    at = [i for i, t in enumerate(node.inputs) if t is data]
    other = node.inputs[1 - at[0]] if len(at) == 1 else None
    if not isinstance(other, gs.Constant) or (data.dtype is not None and other.values.dtype != data.dtype):
        return None
    c = _per_channel(np.asarray(other.values, np.float64), kind, channels, rank)
    if c is None:
        return None
    ones, zeros = np.ones(channels), np.zeros(channels)
    if node.op == "Mul":
        return c, zeros
    if node.op == "Add":
        return ones, c
    if node.op == "Sub":
        return (ones, -c) if at[0] == 0 else (-ones, c)
    if at[0] == 0 and np.all(c != 0):
        return 1.0 / c, zeros
    return None


def _batchnorm(node, data, kind, channels, rank):
    if node.inputs[0] is not data or len(node.inputs) != 5 or node.attrs.get("training_mode", 0):
        return None
    if any(out.outputs for out in node.outputs[1:]):
        return None
    if kind == MATRIX and rank != 2:
        return None   # BatchNormalization normalizes axis 1, the channel axis of a matrix op only in 2-D
    stats = node.inputs[1:]
    if not all(isinstance(t, gs.Constant) and t.values.shape == (channels,) for t in stats):
        return None
    gamma, beta, mean, var = (np.asarray(t.values, np.float64) for t in stats)
    scale = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
    return scale, beta - mean * scale


def _per_channel(c: np.ndarray, kind: str, channels: int, rank: int | None) -> np.ndarray | None:
    if c.size == 1:
        if c.ndim > (rank if rank is not None else 1):
            return None
        return np.full(channels, float(c.reshape(-1)[0]))
    axis_from_end = 1 if kind == MATRIX else (rank - 1 if rank is not None else None)
    if axis_from_end is None or c.ndim < axis_from_end or c.ndim > (rank if rank is not None else 1):
        return None
    leading, shape = c.shape[:c.ndim - axis_from_end], c.shape[c.ndim - axis_from_end:]
    if shape[0] != channels or any(d != 1 for d in shape[1:] + leading):
        return None
    return c.reshape(-1)


# --- writing the graph --------------------------------------------------------------------------

def emitted_nodes(kind: str, gemm: bool, has_bias: bool) -> int:
    """How many nodes write_affine will use for a map."""
    return 2 if kind == MATRIX and not gemm and has_bias else 1


def write_affine(graph: gs.Graph, context: PassContext, affine: Affine, x: gs.Tensor, y: gs.Tensor,
                 template: gs.Node, dtype: np.dtype, gemm: bool = False, trans_b: int = 0,
                 weight: gs.Constant | None = None) -> list[gs.Node]:
    """Compute y from x as `affine` with `template` (reused, so its name stays) as the linear node.
    `weight`: the constant that already holds affine.weight as stored (a fold that only moved a
    bias), reused rather than written again.

    The caller has detached every node the map replaces, template included. Returns the nodes."""
    name = layer_name(template)
    if weight is None:
        stored = affine.weight.T if gemm and trans_b else affine.weight
        weight = factor_constant(context, f"{name}_weight", stored, dtype)
    template.attrs = {}
    template.domain = None
    nodes = [template]
    if affine.kind == CONV:
        template.op = "Conv"
        template.attrs = {**affine.geometry, "kernel_shape": list(affine.weight.shape[2:])}
        bias = [] if affine.bias is None else [factor_constant(context, f"{name}_bias", affine.bias, dtype)]
        template.inputs = [x, weight, *bias]
        template.outputs = [y]
    elif gemm:
        template.op = "Gemm"
        template.attrs = {"transB": 1} if trans_b else {}
        bias = [] if affine.bias is None else [factor_constant(context, f"{name}_bias", affine.bias, dtype)]
        template.inputs = [x, weight, *bias]
        template.outputs = [y]
    else:
        template.op = "MatMul"
        template.inputs = [x, weight]
        if affine.bias is None:
            template.outputs = [y]
        else:
            hidden = gs.Variable(new_name(context, f"{name}_output"), dtype=y.dtype)
            template.outputs = [hidden]
            add_node = gs.Node("Add", new_name(context, f"{name}_bias_add"),
                               inputs=[hidden, factor_constant(context, f"{name}_bias", affine.bias, dtype)], outputs=[y])
            graph.nodes.append(add_node)
            nodes.append(add_node)
    return nodes


def detach(nodes: list[gs.Node]) -> None:
    """Disconnect nodes that a rewrite replaced; graph cleanup removes them."""
    for node in nodes:
        node.inputs.clear()
        node.outputs.clear()
