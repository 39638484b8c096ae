"""Merge consecutive linear layers with no nonlinearity between them into one, where one is cheaper.

    x -> [MatMul|Gemm W1 (+ b1)] -> [* s + t] -> [MatMul|Gemm W2 (+ b2)] -> y
      =  x (W1 s W2) + ((b1 s + t) W2 + b2)
    Conv kxk -> Conv 1x1: the 1x1 mixes the kxk's output channels; Conv 1x1 -> Conv kxk likewise

Channelwise constants in between (Mul / Add / Sub / Div, BatchNormalization) fold into the pair;
a Reshape that keeps the channel axis last and whole ([B*S, N] -> [B, S, N]) moves in front of it.
A chain I -> N -> O costs N (I + O) multiply-adds per row against I O merged, so 1024 -> 768 -> 1024
merges (1.5x fewer) and 1024 -> 64 -> 1024 stays (a rank-64 factorization is 8x cheaper than its
product). Runs before the decompose passes, so a merged weight that is itself low-rank is then
factorized at the rank that suits it: factors trained or decomposed at a rank that no longer pays
are merged and decomposed afresh. A chain of three merges pairwise, each pair only where it pays.
merge_factors (passes/merge_factors.py) runs the same merge again after decomposition, where new
factors meet their neighbours.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from ..numerics.affine import CONV, MATRIX, compose, composed_macs, representable
from ._linear import LINEAR, Unit, detach, linear_unit, private, write_affine
from .base import LayerRecord, PassContext, PassResult, layer_name, new_name, walk_graphs

NAME = "merge_linear"
#: elementwise activations with one input, which --merge-across-activations may move past a layer
ACTIVATIONS = ("Relu", "LeakyRelu", "Elu", "Selu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Softplus")


def merge_linear(graph: gs.Graph, context: PassContext) -> PassResult:
    return merge_all(graph, context, NAME, report_refusals=True)


def merge_all(graph: gs.Graph, context: PassContext, name: str, report_refusals: bool,
              origin: dict[int, str] | None = None, across: bool = False) -> PassResult:
    """Merge every pair that pays, in the graph and its subgraphs; the records carry pass `name`
    (merge_linear, or merge_factors after decomposition)."""
    merged: list[LayerRecord] = []
    refused: dict[str, LayerRecord] = {}
    for g in walk_graphs(graph):
        progress = True
        while progress:   # a merged pair may merge again with its next neighbour
            progress = False
            for node in list(g.nodes):
                record = _merge(g, node, context, origin or {})
                if record is None and across:
                    record = _merge_across(g, node, context, origin or {})
                if record is None:
                    continue
                record.pass_name = name
                if record.status == "merged":
                    merged.append(record)
                    refused.pop(record.name, None)
                    progress = True
                elif report_refusals:
                    refused[record.name] = record
        if merged:
            g.toposort()
    return PassResult(merged + list(refused.values()))


def _merge(graph: gs.Graph, node: gs.Node, context: PassContext, origin: dict[int, str]) -> LayerRecord | None:
    """origin: factor constant id -> the weight it was factorized from; two factors of one weight
    are not merged."""
    if node.op not in LINEAR:
        return None
    first = linear_unit(node, graph, context)
    if first is None or len(first.y.outputs) != 1:
        return None
    reshape = _channel_reshape(first)
    link = first.y if reshape is None else reshape.outputs[0]
    if len(link.outputs) != 1:
        return None
    second = linear_unit(link.outputs[0], graph, context)
    if second is None or second.x is not link or first.dtype != second.dtype:
        return None
    sources = [origin.get(id(unit.head.inputs[1])) for unit in (first, second)]
    if sources[0] is not None and sources[0] == sources[1]:
        return None
    if not (context.options.selects(layer_name(first.head)) and context.options.selects(layer_name(second.head))):
        return None
    names = f"{layer_name(first.head)} + {layer_name(second.head)}"
    record = LayerRecord(name=names, op=second.head.op, pass_name=NAME, weight_shape=[], status="skipped",
                         params_before=first.macs() + second.macs())
    exposed = [t.name for t in (first.y, link) if not private(t, graph)]
    if exposed:
        record.reason = f"{exposed[0]} is a graph output"
        return record
    chain, merged = first.macs() * second.stride + second.macs(), composed_macs(first, second)
    record.macs_before, record.macs_after = chain, merged
    if first.kind == CONV and not (first.pointwise or second.pointwise):
        record.reason = "neither conv is a 1x1 without stride or padding"
        return record
    if merged >= chain:
        record.reason = f"the chain is cheaper: {chain:,} MACs per position against {merged:,} merged"
        return record
    affine = compose(first.affine, second.affine)
    if isinstance(affine, str) or not representable(affine, first.dtype):
        record.reason = affine if isinstance(affine, str) else f"the merged weight overflows {first.dtype}"
        return record
    record.weight_shape = list(affine.weight.shape)
    # behind a Reshape, the merged layer reads x reshaped as the second layer read its input: a Gemm
    # only where that input is the second's
    gemm = second.gemm or (first.gemm and reshape is None)
    trans_b = second.trans_b if second.gemm else first.trans_b
    spelled = " -> ".join(n.op for n in first.nodes + ([reshape] if reshape else []) + second.nodes)
    detach(first.nodes + second.nodes)
    x = first.x if reshape is None else _reshape_first(reshape, first.x, first.in_channels, context)
    write_affine(graph, context, affine, x, second.y, second.head, first.dtype, gemm, trans_b)
    record.status, record.op = "merged", second.head.op
    record.params_after = math.prod(affine.weight.shape)
    record.reason = f"{spelled} as one {second.head.op}: {chain:,} -> {merged:,} MACs per position"
    return record


def _channel_reshape(first: Unit) -> gs.Node | None:
    """The Reshape after a matrix layer that keeps its channel axis last and whole ([B*S, N] <->
    [B, S, N]): a map on the last axis commutes with it."""
    node = first.y.outputs[0]
    if node.op != "Reshape" or first.kind != MATRIX or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    shape = node.inputs[1]
    if not isinstance(shape, gs.Constant) or shape.values.ndim != 1 or not shape.values.size:
        return None
    if int(shape.values[-1]) != first.out_channels or node.attrs.get("allowzero", 0):
        return None
    return node


def _reshape_first(reshape: gs.Node, x: gs.Tensor, channels: int, context: PassContext) -> gs.Tensor:
    """Move the Reshape in front of the merged layer: x [..., I] reshaped with the last dim I. Its
    0 (copy) and -1 (infer) entries resolve as before, as only the last axis changed size."""
    shape = np.array(reshape.inputs[1].values, dtype=np.int64)
    shape[-1] = channels
    out = gs.Variable(new_name(context, f"{layer_name(reshape)}_output"), dtype=x.dtype)
    reshape.inputs = [x, gs.Constant(new_name(context, f"{layer_name(reshape)}_shape"), shape)]
    reshape.outputs = [out]
    return out


def _merge_across(graph: gs.Graph, node: gs.Node, context: PassContext, origin: dict[int, str]
                  ) -> LayerRecord | None:
    """first -> activation -> second, where one of the two is a factor of a decomposed layer and the
    other is not: merged into one layer with the activation moved to its narrower (rank) side,

        conv1x1 a -> Relu -> U_in    ->   (U_in a) -> Relu       (then the Tucker core)
        U_out -> Relu -> conv1x1 c   ->   Relu -> (c U_out)      (after the Tucker core)

    which restores the depth the decomposition added (the paper: +40% throughput on ResNet-50,
    after fine-tuning). Not exact: sigma(W2 W1 x) is not W2 sigma(W1 x). The parity check measures
    what it costs; without fine-tuning expect an error of the order of the activations themselves."""
    if node.op not in LINEAR:
        return None
    first = linear_unit(node, graph, context)
    if first is None or not private(first.y, graph):
        return None
    act = first.y.outputs[0]
    if act.op not in ACTIVATIONS or len(act.inputs) != 1 or len(act.outputs) != 1 or not private(act.outputs[0], graph):
        return None
    second = linear_unit(act.outputs[0].outputs[0], graph, context)
    if second is None or second.x is not act.outputs[0] or first.dtype != second.dtype:
        return None
    factors = [origin.get(id(unit.head.inputs[1])) is not None for unit in (first, second)]
    if factors[0] == factors[1]:
        return None   # a dense pair is a real two-layer block; two factors are one layer's own
    if not (context.options.selects(layer_name(first.head)) and context.options.selects(layer_name(second.head))):
        return None
    chain, merged = first.macs() * second.stride + second.macs(), composed_macs(first, second)
    if merged >= chain or (first.kind == CONV and not (first.pointwise or second.pointwise)):
        return None
    affine = compose(first.affine, second.affine)
    if isinstance(affine, str) or not representable(affine, first.dtype):
        return None
    after = second.out_channels <= first.in_channels
    spelled = " -> ".join(n.op for n in first.nodes + [act] + second.nodes)
    detach(first.nodes + second.nodes)
    hidden = gs.Variable(new_name(context, f"{layer_name(act)}_output"), dtype=first.y.dtype)
    if after:
        write_affine(graph, context, affine, first.x, hidden, second.head, first.dtype, first.gemm or second.gemm,
                     second.trans_b if second.gemm else first.trans_b)
        act.inputs, act.outputs = [hidden], [second.y]
    else:
        act.inputs, act.outputs = [first.x], [hidden]
        write_affine(graph, context, affine, hidden, second.y, second.head, first.dtype, first.gemm or second.gemm,
                     second.trans_b if second.gemm else first.trans_b)
    side = f"{'output' if after else 'input'} ({min(first.in_channels, second.out_channels)} channels)"
    return LayerRecord(
        name=f"{layer_name(first.head)} + {layer_name(second.head)}", op=second.head.op, pass_name=NAME,
        weight_shape=list(affine.weight.shape), status="merged", params_before=first.macs() + second.macs(),
        params_after=math.prod(affine.weight.shape), macs_before=chain, macs_after=merged,
        reason=f"{spelled} as one {second.head.op} with the {act.op} moved to its {side}: NOT exact "
               "(--merge-across-activations; the parity check measures the output error)")

