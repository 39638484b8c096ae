"""Conv (group 1) with a constant weight -> a chain of smaller convs.

    1x1 (any spatial rank), W [O, I, 1..] ~= A [O, r] B [r, I]:
        Conv 1x1 I -> r (B; the original strides and pads)  ->  Conv 1x1 r -> O (A, bias)
    k x k, W [O, I, k..] ~= core x_0 U_out x_1 U_in (Tucker-2 on the channel modes):
        Conv 1x1 I -> r_in (U_in^T)  ->  Conv k x k r_in -> r_out (core; original strides, pads,
        dilations, auto_pad)  ->  Conv 1x1 r_out -> O (U_out, bias)

Padding a 1x1 conv pads with zeros that a bias-free 1x1 keeps at zero, so moving the pads to the
first factor and the bias to the last is exact. Grouped and depthwise convs are left alone.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from ..numerics import ranks as R
from ..numerics.tucker import channel_bases, relative_error, tucker2, tucker2_reconstruct
from ..rank_choice import choose_tucker2_ranks
from ._matrix import factorize_matrix, shared_constants
from .base import LayerRecord, PassContext, PassResult, constant_weight, layer_name, new_name, output_positions, walk_graphs

NAME = "decompose_conv"


def decompose_conv(graph: gs.Graph, context: PassContext) -> PassResult:
    records = []
    for g in walk_graphs(graph):
        for node in list(g.nodes):
            record = _rewrite(g, node, context)
            if record is not None:
                records.append(record)
    return PassResult(any(r.decomposed for r in records), records)


def _rewrite(graph: gs.Graph, node: gs.Node, context: PassContext) -> LayerRecord | None:
    if node.op != "Conv" or len(node.inputs) < 2:
        return None
    weight = constant_weight(node, 1)
    if weight is None or len(weight.shape) < 3:
        return None
    name = layer_name(node)
    context.on_layer(name)
    record = LayerRecord(name=name, op="Conv", pass_name=NAME, weight_shape=list(weight.shape), status="skipped",
                         params_before=math.prod(weight.shape),
                         positions=output_positions(context, node, 1))
    group = int(node.attrs.get("group", 1))
    if group != 1:
        record.reason = f"group={group}: grouped and depthwise convs are left alone"
        return record
    if not context.options.selects(name):
        record.reason = "excluded by --include/--exclude"
        return record
    if all(d == 1 for d in weight.shape[2:]):
        _rewrite_1x1(graph, node, weight, record, context)
    else:
        _rewrite_tucker2(graph, node, weight, record, context)
    return record


def _rewrite_1x1(graph: gs.Graph, node: gs.Node, weight: gs.Constant, record: LayerRecord,
                 context: PassContext) -> None:
    w = weight.values
    out_ch, in_ch = w.shape[:2]
    factors = factorize_matrix(context, weight, w.reshape(out_ch, in_ch), record)
    if factors is None:
        return
    rank = record.rank[0]
    ones = (1,) * (w.ndim - 2)
    consts = shared_constants(context, weight, ("conv1x1", rank), {
        "b": factors.second.reshape(rank, in_ch, *ones),
        "a": factors.first.reshape(out_ch, rank, *ones)})
    first_attrs = {k: v for k, v in node.attrs.items() if k not in ("group", "dilations")}
    _replace_with_chain(graph, node, context, [
        ("b", consts["b"], first_attrs),
        ("a", consts["a"], {}),
    ])


def _rewrite_tucker2(graph: gs.Graph, node: gs.Node, weight: gs.Constant, record: LayerRecord,
                     context: PassContext) -> None:
    w = weight.values
    out_ch, in_ch, *kernel_dims = w.shape
    kernel = math.prod(kernel_dims)
    stride = math.prod(node.attrs.get("strides", [1] * len(kernel_dims)))
    bases = channel_bases(w)
    decision = choose_tucker2_ranks(bases[0].s, bases[1].s, out_ch, in_ch, kernel, stride, context.options)
    record.break_even_rank = decision.break_even_rank
    record.max_rank = decision.max_rank
    record.params_before = w.size
    record.macs_before = R.tucker2_macs(out_ch, in_ch, kernel, stride)
    if decision.ranks is None:
        record.reason = decision.reason
        return
    r_out, r_in = decision.ranks
    u_out, core, u_in = tucker2(w, r_out, r_in, bases)
    record.status, record.method, record.rank = "decomposed", "tucker2", [r_out, r_in]
    record.weight_error = relative_error(w, tucker2_reconstruct(u_out, core, u_in))
    record.params_after = u_out.size + core.size + u_in.size
    record.macs_after = R.tucker2_macs(out_ch, in_ch, kernel, stride, r_out, r_in)
    ones = (1,) * len(kernel_dims)
    dtype = w.dtype
    consts = shared_constants(context, weight, ("tucker2", r_out, r_in), {
        "in": np.ascontiguousarray(u_in.T).reshape(r_in, in_ch, *ones).astype(dtype),
        "core": core.astype(dtype),
        "out": u_out.reshape(out_ch, r_out, *ones).astype(dtype)})
    core_attrs = {k: v for k, v in node.attrs.items() if k != "group"}
    _replace_with_chain(graph, node, context, [
        ("in", consts["in"], {}),
        ("core", consts["core"], core_attrs),
        ("out", consts["out"], {}),
    ])


def _replace_with_chain(graph: gs.Graph, node: gs.Node, context: PassContext,
                        stages: list[tuple[str, gs.Constant, dict]]) -> None:
    """Conv stages in order; the original input feeds the first, the bias and output go to the last."""
    name = layer_name(node)
    x, y, bias = node.inputs[0], node.outputs[0], node.inputs[2:]
    for i, (suffix, w, attrs) in enumerate(stages):
        last = i == len(stages) - 1
        if "kernel_shape" in attrs:
            attrs = {**attrs, "kernel_shape": list(w.shape[2:])}
        out = y if last else gs.Variable(new_name(context, f"{name}_lowrank_{suffix}_out"), dtype=y.dtype)
        graph.nodes.append(gs.Node("Conv", new_name(context, f"{name}_lowrank_{suffix}"), attrs=attrs,
                                   inputs=[x, w, *(bias if last else [])], outputs=[out]))
        x = out
    node.inputs.clear()
    node.outputs.clear()
