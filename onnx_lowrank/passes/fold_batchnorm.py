"""Fold BatchNormalization, and constant per-channel Mul / Add / Sub / Div, into the Conv / Gemm /
MatMul next to it, so the decomposition sees the weight that is actually applied.

    after:   y = BN(x W + b)        = x (W s) + (b s + t),   s = gamma / sqrt(var + eps), t = beta - mean s
    before:  y = (x s + t) W + b    = x (s W) + (t W + b)

A MatMul has no bias input, so what it gains stays an Add (the exporters' own MatMul + Add idiom).
A shift in front of a padded conv is left alone: the padding zeros are not shifted, so the folded
bias would be wrong at the borders. Nothing is folded through a tensor another node also reads.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from ..numerics.affine import CONV, representable
from ._linear import (CHANNELWISE, LINEAR, channelwise, detach, emitted_nodes, linear_unit, private, tensor_rank,
                      write_affine)
from .base import LayerRecord, PassContext, PassResult, layer_name, walk_graphs

NAME = "fold_batchnorm"


def fold_batchnorm(graph: gs.Graph, context: PassContext) -> PassResult:
    records = []
    for g in walk_graphs(graph):
        for node in list(g.nodes):
            record = _fold(g, node, context)
            if record is not None:
                records.append(record)
        if records:
            g.toposort()
    return PassResult(records)


def _fold(graph: gs.Graph, node: gs.Node, context: PassContext) -> LayerRecord | None:
    if node.op not in LINEAR or not _next_to_channelwise(node):
        return None
    unit = linear_unit(node, graph, context)
    if unit is None:
        return None
    name = layer_name(node)
    folded = [n.op for n in unit.absorbed]
    has_bias = unit.has_bias
    before = _channelwise_before(graph, unit, context)
    if before is not None:
        producer, data, scale, shift = before
        affine = unit.affine.after_channelwise(scale, shift)
        if not isinstance(affine, str):
            unit.affine, unit.x = affine, data
            unit.nodes.insert(0, producer)
            folded.insert(0, producer.op)
            has_bias = affine.bias is not None
    if len(unit.nodes) <= emitted_nodes(unit.kind, unit.gemm, has_bias):
        return None   # already one node (or MatMul + its bias Add): nothing to fold
    weight_shape, linear, affine = list(node.inputs[1].shape), node.op, unit.affine
    if not representable(affine, unit.dtype):
        return LayerRecord(name=name, op=linear, pass_name=NAME, weight_shape=weight_shape, status="skipped",
                           reason=f"the folded weight overflows {unit.dtype}")
    # a fold that only moves a bias (an Add, a zero shift dropped) leaves the weight as stored
    same_weight = (before is None and all(np.all(scale == 1) for scale, _ in unit.steps)
                   and float(node.attrs.get("alpha", 1.0)) == 1.0 and isinstance(node.inputs[1], gs.Constant)
                   and node.inputs[1].dtype == unit.dtype)
    weight = node.inputs[1] if same_weight else None
    detach(unit.nodes)
    write_affine(graph, context, affine, unit.x, unit.y, node, unit.dtype, unit.gemm, unit.trans_b, weight)
    params = math.prod(weight_shape)
    return LayerRecord(name=name, op=linear, pass_name=NAME, weight_shape=weight_shape, status="folded",
                       reason=f"folded {', '.join(folded)} into {linear}", params_before=params, params_after=params)


def _next_to_channelwise(node: gs.Node) -> bool:
    """A cheap structural test before any weight is read."""
    after = any(c.op in CHANNELWISE for c in node.outputs[0].outputs) if node.outputs else False
    before = bool(node.inputs) and any(p.op in CHANNELWISE for p in node.inputs[0].inputs)
    return after or before


def _channelwise_before(graph: gs.Graph, unit, context: PassContext):
    """(node, its data input, scale, shift) for a channelwise op on a constant that feeds only this
    unit, else None."""
    producer = unit.x.inputs[0] if len(unit.x.inputs) == 1 else None
    if producer is None or not private(unit.x, graph) or not producer.inputs:
        return None
    data = producer.inputs[0]
    if producer.op != "BatchNormalization":
        data = next((t for t in producer.inputs if not isinstance(t, gs.Constant)), None)
    if data is None or isinstance(data, gs.Constant):
        return None
    if any(p.op in LINEAR + CHANNELWISE for p in data.inputs):
        return None   # the tail of an earlier layer: folded into that one, the output side
    rank = len(unit.shape) if unit.kind == CONV else (2 if unit.gemm else tensor_rank(data, context))
    found = channelwise(producer, data, unit.kind, unit.in_channels, rank)
    if found is None:
        return None
    return (producer, data, *found)
