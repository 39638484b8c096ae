"""Which nodes the decompose passes factorize, and why a matched one is left alone: the pattern and
the check of the decompose rules, written once for the passes, calibration and analyze.

    MatMul  one input a constant 2-D weight, the other the activations: y = x W, or y = W x
    Gemm    B a constant 2-D weight, A the activations (not a constant)
    Conv    a constant weight [O, I, *k] of rank >= 3

of an op that --ops selects. A matched node is a candidate; it is refused, with the reason the
report gives, when it is a grouped conv, when --include/--exclude leave it out, or when its weight's
type is not decomposed (base.weight_type_problem).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import onnx_graphsurgeon as gs

from ..numerics.conv_attrs import ConvAttrs, conv_attrs
from ..options import Options
from .base import constant_weight, layer_name, weight_type_problem

#: node op -> its --ops name
OPS = {"MatMul": "matmul", "Gemm": "gemm", "Conv": "conv"}


@dataclass(frozen=True)
class Candidate:
    """A node a decompose pass considers. `x` is its activation input and `axis` the axis of x its
    weight contracts: -1 for x W, -2 for a MatMul's W x (weight_first), 0 for a Gemm's transposed A,
    1 (the channels) for a conv. `conv` is a conv's attributes. `refusal`: why it is left alone,
    or None."""

    node: gs.Node
    weight: gs.Constant
    x: gs.Tensor
    axis: int
    weight_first: bool = False
    conv: ConvAttrs | None = None
    refusal: str | None = None

    @property
    def name(self) -> str:
        return layer_name(self.node)

    @property
    def op(self) -> str:
        return self.node.op


def match(node: gs.Node, options: Options) -> Candidate | None:
    """The node as a candidate, refused or not; None where it is not one (no constant weight of the
    right rank, a constant on both sides, or an op --ops leaves out)."""
    if OPS.get(node.op) not in options.ops:
        return None
    candidate = _pattern(node)
    if candidate is None:
        return None
    refusal = _refusal(candidate, options)
    return candidate if refusal is None else replace(candidate, refusal=refusal)


def _pattern(node: gs.Node) -> Candidate | None:
    inputs = node.inputs
    if node.op == "MatMul" and len(inputs) == 2:
        left, right = constant_weight(node, 0, 2), constant_weight(node, 1, 2)
        if (left is None) == (right is None):
            return None   # activations on both sides (attention), or constants on both (constant folding's job)
        if left is not None:
            return Candidate(node, left, inputs[1], -2, weight_first=True)   # y = W x: x's rows are axis -2
        return Candidate(node, right, inputs[0], -1)
    if node.op == "Gemm" and len(inputs) >= 2:
        weight = constant_weight(node, 1, 2)
        if weight is None or constant_weight(node, 0) is not None:
            return None
        return Candidate(node, weight, inputs[0], 0 if node.attrs.get("transA", 0) else -1)
    if node.op == "Conv" and len(inputs) >= 2:
        weight = constant_weight(node, 1)
        if weight is None or len(weight.shape) < 3:
            return None
        return Candidate(node, weight, inputs[0], 1, conv=conv_attrs(node.attrs, weight.shape[2:]))
    return None


def _refusal(candidate: Candidate, options: Options) -> str | None:
    if candidate.conv is not None and candidate.conv.group != 1:
        return f"group={candidate.conv.group}: grouped and depthwise convs are left alone"
    if not options.selects(candidate.name):
        return "excluded by --include/--exclude"
    return weight_type_problem(candidate.weight)
