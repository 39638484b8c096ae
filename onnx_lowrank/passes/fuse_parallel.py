"""Fuse parallel linear branches on one input whose outputs are added, as LoRA adapters are:

    y = (x W + b) + s (x A) B      ->   y = x (W + s A B) + b
    y = conv_1(x) + conv_2(x)       ->   y = conv(x; W_1 + W_2)   (same strides; a 1x1 branch is
                                         embedded in a 3x3 one's centre tap, as RepVGG does)

Each branch is a chain of linear layers with channelwise constants (the LoRA scale as a Mul, a
bias Add, a folded-in alpha) and nothing else; it is composed into one affine map, and the two
maps are added. Fused only where the single layer is cheaper than the branches together: a dense
base plus an adapter always is, two rank-r adapters without a base usually are not.
"""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from ..numerics.affine import Affine, add, compose, representable
from ._linear import CHANNELWISE, Unit, detach, linear_unit, private, write_affine
from .base import LayerRecord, PassContext, PassResult, layer_name, walk_graphs

NAME = "fuse_parallel"


def fuse_parallel(graph: gs.Graph, context: PassContext) -> PassResult:
    records: list[LayerRecord] = []
    for g in walk_graphs(graph):
        progress = True
        while progress:   # y = a + b + c fuses one Add at a time
            progress = False
            for node in list(g.nodes):
                record = _fuse(g, node, context)
                if record is None:
                    continue
                records = [r for r in records if r.name != record.name or r.status != "skipped"]
                records.append(record)
                progress = progress or record.status == "fused"
        if any(r.status == "fused" for r in records):
            g.toposort()
    return PassResult(records)


def _fuse(graph: gs.Graph, node: gs.Node, context: PassContext) -> LayerRecord | None:
    if node.op != "Add" or node.domain not in (None, "", "ai.onnx") or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    a, b = node.inputs
    if a is b or isinstance(a, gs.Constant) or isinstance(b, gs.Constant):
        return None
    if not (private(a, graph) and private(b, graph)):
        return None
    sources_a = _sources(a, graph, context)
    sources_b = {id(x): units for x, units in _sources(b, graph, context)}
    common = next(((x, units, sources_b[id(x)]) for x, units in sources_a if id(x) in sources_b), None)
    if common is None:
        return None
    x, units_a, units_b = common
    units = units_a + units_b
    if len({u.dtype for u in units}) != 1:
        return None
    base = max(units, key=lambda u: u.macs())
    if not all(context.options.selects(layer_name(u.head)) for u in units):
        return None
    record = LayerRecord(name=layer_name(base.head), op=base.head.op, pass_name=NAME,
                         weight_shape=list(base.shape), status="skipped",
                         params_before=sum(u.macs() for u in units))
    cost = _cost(units_a) + _cost(units_b)
    fused_macs = units_a[0].in_channels * units_a[-1].out_channels * max(u.kernel for u in units)
    record.macs_before, record.macs_after = cost, fused_macs
    if fused_macs >= cost:
        record.reason = f"the branches are cheaper: {cost:,} MACs per position against {fused_macs:,} fused"
        return record
    branch_a, branch_b = _chain(units_a), _chain(units_b)
    fused = next((b for b in (branch_a, branch_b) if isinstance(b, str)), None) or add(branch_a, branch_b)
    if isinstance(fused, str) or not representable(fused, base.dtype):
        record.reason = fused if isinstance(fused, str) else f"the fused weight overflows {base.dtype}"
        return record
    record.weight_shape = list(fused.weight.shape)
    spelled = " + ".join("(" + " -> ".join(n.op for n in branch) + ")" for branch in
                         ([n for u in units_a for n in u.nodes], [n for u in units_b for n in u.nodes]))
    gemm = any(u.gemm for u in units)
    trans_b = next((u.trans_b for u in sorted(units, key=lambda u: -u.macs()) if u.gemm), 0)
    y = node.outputs[0]
    detach([n for u in units for n in u.nodes] + [node])
    write_affine(graph, context, fused, x, y, base.head, base.dtype, gemm, trans_b)
    record.status, record.op = "fused", base.head.op
    record.params_after = math.prod(fused.weight.shape)
    record.reason = f"{spelled} as one {base.head.op}: {cost:,} -> {fused_macs:,} MACs per position"
    return record


def _sources(t: gs.Tensor, graph: gs.Graph, context: PassContext) -> list[tuple[gs.Tensor, list[Unit]]]:
    """(x, units) for each tensor x that t is computed from by a chain of one or more linear units
    alone, nearest first; every tensor after x on the chain is private to it."""
    found, units = [], []
    while True:
        unit = _unit_ending_at(t, graph, context)
        if unit is None:
            return found
        units = [unit, *units]
        found.append((unit.x, units))
        if not private(unit.x, graph):
            return found
        t = unit.x


def _unit_ending_at(t: gs.Tensor, graph: gs.Graph, context: PassContext) -> Unit | None:
    node = t.inputs[0] if len(t.inputs) == 1 else None
    while node is not None and node.op in CHANNELWISE and node.inputs:
        data = next((i for i in node.inputs if not isinstance(i, gs.Constant)), None)
        if data is None or not private(data, graph) or len(data.inputs) != 1:
            return None
        node = data.inputs[0]
    if node is None:
        return None
    unit = linear_unit(node, graph, context)
    return unit if unit is not None and unit.y is t else None


def _chain(units: list[Unit]) -> Affine | str:
    affine = units[0].affine
    for unit in units[1:]:
        affine = compose(affine, unit.affine)
        if isinstance(affine, str):
            return affine
    return affine


def _cost(units: list[Unit]) -> int:
    """Multiply-adds per output position of the last unit: a strided layer sees earlier ones'
    work at `stride` times its own positions."""
    cost = 0
    for unit in units:
        cost = cost * unit.stride + unit.macs()
    return cost
