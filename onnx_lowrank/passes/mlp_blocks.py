"""Which layer -> per-neuron ops -> layer chains are MLP blocks prune_mlp may shrink, and why a
matched one is left alone: the pattern and check of the MLP rule, written once.

    h = x W1 (+ b1)          W1 [d_in, d]: MatMul with a constant 2-D weight on the right
    a = act(h)               per neuron in h alone: unary ops, and binary ones whose other side
                             is h, a tensor of the activation, a scalar constant or a constant of
                             one value per neuron (Gelu as Erf or Tanh, SiLU = x Sigmoid(x),
                             HardSwish, Relu6 = Clip, a folded BatchNorm's scale and shift, ...)
    y = a W2 (+ b2)          W2 [d, d_out]: the only reader of a

The same for convolutions, where the neurons are channels (axis 1, NCHW):

    h = Conv(x, W1, b1)      W1 [d, c_in, k...]: any group-1 conv (a ResNet bottleneck's 1x1 or
                             3x3, a MobileNet block's expansion)
    a = ...                  per channel: the ops above, BatchNormalization, and depthwise convs
                             (group = d: an inverted residual's middle conv keeps the same channels)
    y = Conv(a, W2, b2)      W2 [d_out, d, 1...]: a 1x1, stride-1, unpadded conv, a matrix on the
                             channels, whose input Gram calibration collects

Neuron j of the block is column j of W1 (a conv's output channel j), entry j of b1 and of every
per-neuron constant and depthwise kernel between, column j of a and row j of W2: keeping a
subset of neurons keeps those slices and nothing else changes, because every op between the two
layers acts on each neuron alone. A matched block is refused, with the reason the report gives,
when an intermediate tensor is read outside the block (or is a graph output), when an op between
is not per-neuron or reads a constant that is neither a scalar nor one value per neuron, when a
weight is read by another node, or when --include/--exclude leave one of its layers out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from ..numerics.conv_attrs import ConvAttrs, conv_attrs
from ..options import Options
from .base import constant_weight, layer_name, weight_type_problem

#: Ops that act on each element alone: with one input, or with scalar constants beside it.
UNARY = frozenset({"Relu", "Sigmoid", "Tanh", "Gelu", "Erf", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu",
                   "Selu", "Celu", "Softplus", "Softsign", "Mish", "Exp", "Abs", "Neg", "Sqrt", "Reciprocal",
                   "ThresholdedRelu", "Identity", "Clip", "PRelu"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})
_ONNX = (None, "", "ai.onnx")


@dataclass(frozen=True)
class NeuronSlice:
    """A constant between the layers that holds one value per neuron: node.inputs[index], whose
    `axis` is the neuron axis. Pruning keeps the kept neurons' entries along it."""

    node: gs.Node
    index: int
    axis: int


@dataclass(frozen=True)
class MLPBlock:
    """first (+ first_bias) -> activation nodes -> second (+ second_bias); `hidden` is the
    activation's output, the second layer's input; `activation` names the pattern. A conv block
    (`conv`) has its biases as the convs' third inputs (first_bias / second_bias None)."""

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
    conv: bool = False
    slices: tuple[NeuronSlice, ...] = ()     # per-neuron constants between (BN, scales, depthwise kernels)
    depthwise: tuple[gs.Node, ...] = ()      # depthwise convs between: their group is the neuron count
    stride: int = 1                          # positions of h per position of the hidden activation

    @property
    def name(self) -> str:
        return block_name(self.first, self.second)

    @property
    def neurons(self) -> int:
        return int(self.w1.shape[0 if self.conv else 1])

    @property
    def d_out(self) -> int:
        return int(self.w2.shape[0 if self.conv else 1])

    @property
    def macs_in(self) -> int:
        """MACs per neuron per position of the hidden activation before it: the first layer's
        (a conv's input channels x kernel), the depthwise kernels', at their positions."""
        first = math.prod(self.w1.shape[1:]) if self.conv else int(self.w1.shape[0])
        inner = sum(math.prod(n.inputs[1].shape[1:]) for n in self.depthwise)
        return first * self.stride + inner

    def w2_matrix(self) -> np.ndarray:
        """W2 as the [d, d_out] matrix that multiplies the activation's neurons."""
        values = self.w2.values
        return values.reshape(values.shape[0], values.shape[1]).T if self.conv else values


def block_name(first: gs.Node, second: gs.Node) -> str:
    return f"{layer_name(first)}+{layer_name(second)}"


def match_block(node: gs.Node, graph: gs.Graph, options: Options) -> MLPBlock | None:
    """The block that starts at `node` (its first MatMul or Conv), refused or not; None where the
    node starts no layer -> per-neuron ops -> layer chain."""
    conv = node.op == "Conv"
    w1 = _first_conv_weight(node, options) if conv else _right_weight(node) if "matmul" in options.ops else None
    if w1 is None:
        return None
    d = int(w1.shape[0 if conv else 1])
    if conv:
        h, first_bias = node.outputs[0], None
    else:
        h, first_bias = _after_bias(node.outputs[0], d)
    region, exits, problem = _elementwise_region(h, graph, conv)
    second = _reader_conv(exits) if conv else _reader_matmul(exits)
    if second is None:
        return None
    w2 = second.inputs[1]
    hidden = second.inputs[0]
    nodes = tuple(region)
    slices, depthwise, found = _neuron_slices(region, h, d, len(w1.shape) if conv else None)
    problem = problem or found
    if conv:
        if len(node.inputs) > 2:
            slices = (NeuronSlice(node, 2, 0), *slices)
        second_bias = None
    else:
        second_bias = _after_bias(second.outputs[0], w2.shape[1])[1]
    stride = math.prod(_attrs(n).stride for n in depthwise)
    block = MLPBlock(node, second, w1, w2, hidden, _describe(region), first_bias, second_bias, nodes,
                     conv=conv, slices=slices, depthwise=depthwise, stride=stride)
    refusal = problem or _refusal(block, graph, options, h, exits)
    return block if refusal is None else replace(block, refusal=refusal)


def _conv_weight(node: gs.Node) -> gs.Constant | None:
    """A group-1 ONNX Conv's constant weight [d, c_in, k...], where its bias (if any) is a constant."""
    if node.op != "Conv" or node.domain not in _ONNX or len(node.outputs) != 1:
        return None
    weight = constant_weight(node, 1)
    if weight is None or len(weight.shape) < 3 or _attrs(node).group != 1:
        return None
    if len(node.inputs) > 2 and not isinstance(node.inputs[2], gs.Constant):
        return None
    return weight


def _first_conv_weight(node: gs.Node, options: Options) -> gs.Constant | None:
    """The first layer of a conv block: any group-1 conv on a computed input, where --ops takes convs."""
    if "conv" not in options.ops or isinstance(node.inputs[0], gs.Constant):
        return None
    return _conv_weight(node)


def _reader_conv(exits: list[gs.Tensor]) -> gs.Node | None:
    """The second conv: a pointwise (1x1, stride-1, unpadded) group-1 reader of the region's exits,
    a matrix on the channels."""
    for tensor in exits:
        for reader in tensor.outputs:
            if _conv_weight(reader) is not None and _attrs(reader).pointwise and reader.inputs[0] is tensor:
                return reader
    return None


def _attrs(node: gs.Node) -> ConvAttrs:
    return conv_attrs(node.attrs, node.inputs[1].shape[2:] if len(node.inputs) > 1 and node.inputs[1].shape else None)


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


def _elementwise_region(h: gs.Tensor, graph: gs.Graph, conv: bool = False
                        ) -> tuple[list[gs.Node], list[gs.Tensor], str | None]:
    """The nodes reachable from h through per-neuron ops, the tensors read outside them (the
    exits), and the first reason the region is not a per-neuron function of h, if any."""
    region, inside, exits = [], {h.name}, []
    seen: set[int] = set()
    pending = [h]
    within = _per_channel if conv else _elementwise
    while pending:
        tensor = pending.pop(0)
        if any(not within(n) for n in tensor.outputs) or any(tensor is o for o in graph.outputs):
            exits.append(tensor)
        for reader in tensor.outputs:
            if not within(reader) or id(reader) in seen:
                continue
            seen.add(id(reader))
            region.append(reader)
            for out in reader.outputs:
                inside.add(out.name)
                pending.append(out)
    return region, exits, _foreign_input(region, inside)


def _foreign_input(region: list[gs.Node], inside: set[str]) -> str | None:
    """Why the region is not a function of each neuron's pre-activation alone (a tensor computed
    elsewhere read between the layers), if it is not."""
    for node in region:
        for t in node.inputs:
            if t.name in inside or not t.name or _constant_shape(t) is not None:
                continue
            return (f"{node.op} '{node.name}' between the layers also reads '{t.name}', which is not "
                    "computed from the first layer's output alone")
    return None


SAME = -1


def _neuron_axis(node: gs.Node, shape: list[int], d: int, conv_rank: int | None) -> int | None:
    """The axis of a constant of `shape` that runs over the neurons; SAME where it broadcasts the
    same values to every neuron; None where it does not act on each neuron alone."""
    if node.op in ("BatchNormalization", "Conv"):
        return 0 if shape[0] == d else None
    if conv_rank is None:
        axis = len(shape) - 1
    elif len(shape) > conv_rank:
        return None
    else:
        axis = len(shape) - (conv_rank - 1)
        if axis < 0:
            return SAME
    return SAME if shape[axis] == 1 else axis if shape[axis] == d else None


def _neuron_slices(region: list[gs.Node], h: gs.Tensor, d: int, conv_rank: int | None
                   ) -> tuple[tuple[NeuronSlice, ...], tuple[gs.Node, ...], str | None]:
    """The constants between the layers that hold one value per neuron (and must be sliced), the
    depthwise convs, and why a constant does not act on each neuron alone, if one does not.

    The neuron axis is the last (MatMul) or axis 1 of a rank-`conv_rank` activation (Conv). A
    constant acts per neuron when, aligned to the activation from the right as broadcasting does,
    its size on the neuron axis is 1 (the same for every neuron) or d (its own value each); a
    conv's must not add axes on the left, which would move the channel axis."""
    slices, depthwise = [], []
    for node in region:
        if node.op == "Conv":
            depthwise.append(node)
        for index, t in enumerate(node.inputs):
            if t is h or not t.name:
                continue
            shape = _constant_shape(t)
            if shape is None or math.prod(shape) == 1:
                continue
            axis = _neuron_axis(node, shape, d, conv_rank)
            if axis == SAME:
                continue        # size 1 on the neuron axis: the same for every neuron
            if axis is None:
                return (), (), (f"{node.op} '{node.name}' between the layers reads constant '{t.name}' of shape "
                                f"{shape}: only scalars and constants of one value per neuron act on each "
                                "neuron alone")
            if not isinstance(t, gs.Constant) and reshaped_constant(t) is None:
                return (), (), (f"{node.op} '{node.name}' between the layers reads the per-neuron constant "
                                f"'{t.name}' from a Constant node, which pruning cannot slice")
            if len(t.outputs) != 1:
                return (), (), (f"constant '{t.name}' between the layers is read by {len(t.outputs)} nodes: "
                                "slicing it would change the others")
            slices.append(NeuronSlice(node, index, axis))
    return tuple(slices), tuple(depthwise), None


def reshaped_constant(t: gs.Tensor) -> np.ndarray | None:
    """The values of Reshape(constant, constant shape), as Paddle writes a conv's bias
    ([C] -> [1, C, 1, 1]); None for anything else."""
    producer = t.inputs[0] if len(t.inputs) == 1 else None
    if producer is None or producer.op != "Reshape" or producer.domain not in _ONNX or len(producer.inputs) != 2:
        return None
    values, shape = (_values(t) for t in producer.inputs)
    if values is None or shape is None:
        return None
    dims = [int(v) for v in shape.reshape(-1)]
    if not producer.attrs.get("allowzero", 0):
        dims = [values.shape[i] if v == 0 and i < values.ndim else v for i, v in enumerate(dims)]
    try:
        return values.reshape(dims)
    except ValueError:
        return None


def _values(t: gs.Tensor) -> np.ndarray | None:
    """An initializer's values, or a Constant node's `value`; None for anything else."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    producer = t.inputs[0] if len(t.inputs) == 1 else None
    if producer is None or producer.op != "Constant" or producer.domain not in _ONNX:
        return None
    value = producer.attrs.get("value")
    return None if value is None else np.asarray(value.values if isinstance(value, gs.Constant) else value)


def _constant_shape(t: gs.Tensor) -> list[int] | None:
    """The shape of a constant: an initializer, a Constant node's output (as exporters write
    the scalars of a decomposed Gelu), or a reshaped constant; None for a computed tensor."""
    values = _values(t)
    if values is None:
        values = reshaped_constant(t)
    if values is not None:
        return list(values.shape)
    producer = t.inputs[0] if len(t.inputs) == 1 else None
    if producer is not None and producer.op == "Constant" and producer.domain in _ONNX and any(
            key in producer.attrs for key in ("value_float", "value_int")):
        return []
    return None


def _elementwise(node: gs.Node) -> bool:
    if node.domain not in _ONNX or len(node.outputs) != 1:
        return False
    if node.op in BINARY:
        return len(node.inputs) == 2
    return node.op in UNARY


def _per_channel(node: gs.Node) -> bool:
    """Between two convs: elementwise ops, inference BatchNormalization, and depthwise convs (one
    kernel per channel, multiplier 1), whose parameters are constants."""
    if _elementwise(node):
        return True
    if node.domain not in _ONNX or len(node.outputs) != 1:
        return False
    if node.op == "BatchNormalization":
        return len(node.inputs) == 5 and all(isinstance(t, gs.Constant) for t in node.inputs[1:])
    if node.op == "Conv":
        weight = constant_weight(node, 1)
        bias_ok = len(node.inputs) < 3 or isinstance(node.inputs[2], gs.Constant)
        return (weight is not None and len(weight.shape) >= 3 and weight.shape[1] == 1 and bias_ok
                and _attrs(node).group == weight.shape[0] > 1)
    return False


def _reader_matmul(exits: list[gs.Tensor]) -> gs.Node | None:
    """The second MatMul: a reader, with a constant weight on the right, of the region's exits."""
    for tensor in exits:
        for reader in tensor.outputs:
            if _right_weight(reader) is not None and reader.inputs[0] is tensor:
                return reader
    return None


def _refusal(block: MLPBlock, graph: gs.Graph, options: Options, h: gs.Tensor, exits: list[gs.Tensor]) -> str | None:
    d = block.neurons
    rows = block.w2.shape[1 if block.conv else 0]
    if rows != d:
        return f"W2 has {rows} rows for the {d} neurons of W1"
    if not block.nodes:
        return "no activation between the layers: a linear chain (merge_linear folds those)"
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
