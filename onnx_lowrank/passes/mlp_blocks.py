"""Which MatMul -> activation -> MatMul chains are MLP blocks prune_mlp may shrink, and why a
matched one is left alone: the pattern and check of the MLP rule, written once.

    h = x W1 (+ b1)          W1 [d_in, d]: MatMul with a constant 2-D weight on the right
    a = act(h)               elementwise in h alone: unary ops, and binary ones whose other side
                             is h, a tensor of the activation, or a scalar constant (Gelu as Erf
                             or Tanh, SiLU = x Sigmoid(x), HardSwish, Relu6 = Clip, ...)
    y = a W2 (+ b2)          W2 [d, d_out]: the only reader of a

Neuron j of the block is column j of W1, entry j of b1, column j of a and row j of W2: keeping a
subset of neurons keeps those slices and nothing else changes, because every op between the two
MatMuls acts on each column alone. A matched block is refused, with the reason the report gives,
when an intermediate tensor is read outside the block (or is a graph output), when an op between
is not elementwise or reads a constant that is not a scalar, when a weight is read by another
node, or when --include/--exclude leave one of its MatMuls out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from ..options import Options
from .base import constant_weight, layer_name, weight_type_problem

#: Ops that act on each element alone: with one input, or with scalar constants beside it.
UNARY = frozenset({"Relu", "Sigmoid", "Tanh", "Gelu", "Erf", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu",
                   "Selu", "Celu", "Softplus", "Softsign", "Mish", "Exp", "Abs", "Neg", "Sqrt", "Reciprocal",
                   "ThresholdedRelu", "Identity", "Clip", "PRelu"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})


@dataclass(frozen=True)
class MLPBlock:
    """first (+ first_bias) -> activation nodes -> second (+ second_bias); `hidden` is the
    activation's output, the second MatMul's input; `activation` names the pattern."""

    first: gs.Node
    second: gs.Node
    w1: gs.Constant
    w2: gs.Constant
    hidden: gs.Tensor
    activation: str
    first_bias: gs.Node | None = None
    second_bias: gs.Node | None = None
    nodes: tuple[gs.Node, ...] = ()
    refusal: str | None = None

    @property
    def name(self) -> str:
        return block_name(self.first, self.second)

    @property
    def neurons(self) -> int:
        return int(self.w1.shape[1])


def block_name(first: gs.Node, second: gs.Node) -> str:
    return f"{layer_name(first)}+{layer_name(second)}"


def match_block(node: gs.Node, graph: gs.Graph, options: Options) -> MLPBlock | None:
    """The block that starts at `node` (its first MatMul), refused or not; None where the node
    starts no MatMul -> elementwise -> MatMul chain."""
    first = _right_weight(node)
    if first is None or "matmul" not in options.ops:
        return None
    w1, d = first, first.shape[1]
    h, first_bias = _after_bias(node.outputs[0], d)
    region, exits, problem = _elementwise_region(h, graph)
    second = _reader_matmul(exits)
    if second is None:
        return None
    w2 = _right_weight(second)
    hidden = second.inputs[0]
    nodes = tuple(region)
    block = MLPBlock(node, second, w1, w2, hidden, _describe(region), first_bias,
                     _after_bias(second.outputs[0], w2.shape[1])[1], nodes)
    refusal = problem or _refusal(block, graph, options, h, exits)
    return block if refusal is None else replace(block, refusal=refusal)


def _right_weight(node: gs.Node) -> gs.Constant | None:
    if node.op != "MatMul" or len(node.inputs) != 2 or isinstance(node.inputs[0], gs.Constant):
        return None
    return constant_weight(node, 1, 2)


def _after_bias(y: gs.Tensor, width: int) -> tuple[gs.Tensor, gs.Node | None]:
    """The tensor after a bias Add on y (a constant of `width` entries on the last axis), if y's
    only reader is one; else y."""
    if len(y.outputs) != 1:
        return y, None
    add = y.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2 or len(add.outputs) != 1:
        return y, None
    other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    if not isinstance(other, gs.Constant) or other.values.size != width or other.values.shape[-1] != width:
        return y, None
    return add.outputs[0], add


def _elementwise_region(h: gs.Tensor, graph: gs.Graph) -> tuple[list[gs.Node], list[gs.Tensor], str | None]:
    """The nodes reachable from h through elementwise ops, the tensors read outside them (the
    exits), and the first reason the region is not a per-neuron function of h, if any."""
    region, inside, exits = [], {h.name}, []
    seen: set[int] = set()
    pending = [h]
    while pending:
        tensor = pending.pop(0)
        if any(not _elementwise(n) for n in tensor.outputs) or any(tensor is o for o in graph.outputs):
            exits.append(tensor)
        for reader in tensor.outputs:
            if not _elementwise(reader) or id(reader) in seen:
                continue
            seen.add(id(reader))
            region.append(reader)
            for out in reader.outputs:
                inside.add(out.name)
                pending.append(out)
    return region, exits, _foreign_input(region, inside)


def _foreign_input(region: list[gs.Node], inside: set[str]) -> str | None:
    """Why the region is not a function of each neuron's pre-activation alone, if it is not."""
    for node in region:
        for t in node.inputs:
            if t.name in inside or not t.name:
                continue
            shape = _constant_shape(t)
            if shape is not None:
                if math.prod(shape) != 1:
                    return (f"{node.op} '{node.name}' between the MatMuls reads constant '{t.name}' of shape "
                            f"{shape}: only scalar constants act on each neuron alone")
            else:
                return (f"{node.op} '{node.name}' between the MatMuls also reads '{t.name}', which is not "
                        "computed from the first MatMul's output alone")
    return None


def _constant_shape(t: gs.Tensor) -> list[int] | None:
    """The shape of a constant: an initializer, or a Constant node's output (as exporters write
    the scalars of a decomposed Gelu); None for a computed tensor."""
    if isinstance(t, gs.Constant):
        return list(t.values.shape)
    producer = t.inputs[0] if len(t.inputs) == 1 else None
    if producer is None or producer.op != "Constant" or producer.domain not in (None, "", "ai.onnx"):
        return None
    value = producer.attrs.get("value")
    if value is not None:
        return list(np.asarray(value.values if isinstance(value, gs.Constant) else value).shape)
    if any(key in producer.attrs for key in ("value_float", "value_int")):
        return []
    return None


def _elementwise(node: gs.Node) -> bool:
    if node.domain not in (None, "", "ai.onnx") or len(node.outputs) != 1:
        return False
    if node.op in BINARY:
        return len(node.inputs) == 2
    return node.op in UNARY


def _reader_matmul(exits: list[gs.Tensor]) -> gs.Node | None:
    """The second MatMul: a reader, with a constant weight on the right, of the region's exits."""
    for tensor in exits:
        for reader in tensor.outputs:
            if _right_weight(reader) is not None and reader.inputs[0] is tensor:
                return reader
    return None


def _refusal(block: MLPBlock, graph: gs.Graph, options: Options, h: gs.Tensor, exits: list[gs.Tensor]) -> str | None:
    d = block.neurons
    if block.w2.shape[0] != d:
        return f"W2 has {block.w2.shape[0]} rows for the {d} neurons of W1"
    if not block.nodes:
        return "no activation between the MatMuls: a linear chain (merge_linear folds those)"
    if len(exits) != 1 or exits[0] is not block.hidden:
        names = ", ".join(f"'{t.name}'" for t in exits)
        return f"intermediate tensors {names} are read outside the block: the neurons cannot be sliced"
    if any(block.hidden is o for o in graph.outputs) or len(block.hidden.outputs) != 1:
        return f"the activation '{block.hidden.name}' is read by {len(block.hidden.outputs)} nodes or is a graph output"
    for y in [block.first.outputs[0], h] + [t for n in block.nodes for t in n.outputs if t is not block.hidden]:
        if any(y is o for o in graph.outputs):
            return f"intermediate tensor '{y.name}' is a graph output"
    for weight in (block.w1, block.w2):
        readers = len(weight.outputs)
        if readers != 1:
            return f"weight '{weight.name}' is read by {readers} nodes: slicing it would keep both copies"
        problem = weight_type_problem(weight)
        if problem:
            return problem
    for bias in (block.first_bias, block.second_bias):
        if bias is not None:
            constant = next(t for t in bias.inputs if isinstance(t, gs.Constant))
            if np.dtype(constant.values.dtype) != np.dtype(block.w1.dtype):
                return f"bias '{constant.name}' is {constant.values.dtype}, the weights {block.w1.dtype}"
    if not (options.selects(layer_name(block.first)) and options.selects(layer_name(block.second))):
        return "excluded by --include/--exclude"
    return None


def _describe(region: list[gs.Node]) -> str:
    """The activation's name: the op itself, or the decomposition it spells."""
    ops = sorted(n.op for n in region)
    if len(ops) == 1:
        return ops[0]
    patterns = {("Add", "Div", "Erf", "Mul", "Mul"): "Gelu (Erf)", ("Add", "Erf", "Mul", "Mul", "Mul"): "Gelu (Erf)",
                ("Mul", "Sigmoid"): "SiLU", ("HardSigmoid", "Mul"): "HardSwish"}
    if tuple(ops) in patterns:
        return patterns[tuple(ops)]
    if "Tanh" in ops and "Pow" in ops or ops.count("Mul") >= 4 and "Tanh" in ops:
        return "Gelu (Tanh)"
    return "elementwise (" + ", ".join(n.op for n in region) + ")"
