"""Conv (group 1) with a constant weight -> a chain of smaller convs.

    1x1 (any spatial rank), W [O, I, 1..] ~= A [O, r] B [r, I]:
        Conv 1x1 I -> r (B; the original strides and pads)  ->  Conv 1x1 r -> O (A, bias)
    k x k, W [O, I, k..] ~= core x_0 U_out x_1 U_in (Tucker-2 on the channel modes):
        Conv 1x1 I -> r_in (U_in^T)  ->  Conv k x k r_in -> r_out (core; original strides, pads,
        dilations, auto_pad)  ->  Conv 1x1 r_out -> O (U_out, bias)
        with a calibration Gram of the input channels, the whitened Tucker-2 (numerics/tucker.py)
    or, by --conv-method (passes/_conv_forms.py), a branched Tucker chain whose core is a grouped
    conv, or a spatial SVD: Conv kh x 1 I -> r  ->  Conv 1 x kw r -> O (bias)

Padding a 1x1 conv pads with zeros that a bias-free 1x1 keeps at zero, so moving the pads to the
first factor and the bias to the last is exact. Grouped and depthwise convs are left alone.
"""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from ..forms import Form, conv_chain
from ..numerics import ranks as R
from ..numerics.conv_attrs import conv_attrs
from ._conv_forms import plan_conv
from ._geometry import conv_geometry
from ._matrix import factorize_matrix, record_measurement, shared_constants
from ._weights import prior_choice, read_values, record_choice
from .base import LayerRecord, PassContext, PassResult, apply_to_nodes, layer_name, new_name, output_positions
from .candidates import match

NAME = "decompose_conv"


def decompose_conv(graph: gs.Graph, context: PassContext) -> PassResult:
    return apply_to_nodes(graph, context, _rewrite)


def _rewrite(graph: gs.Graph, node: gs.Node, context: PassContext) -> LayerRecord | None:
    candidate = match(node, context.options) if node.op == "Conv" else None
    if candidate is None:
        return None
    weight, name = candidate.weight, candidate.name
    context.on_layer(name)
    record = LayerRecord(name=name, op="Conv", pass_name=NAME, weight_shape=list(weight.shape), status="skipped",
                         params_before=math.prod(weight.shape),
                         positions=output_positions(context, node, 1))
    if candidate.refusal:
        record.reason = candidate.refusal
        return record
    if all(d == 1 for d in weight.shape[2:]):
        _rewrite_1x1(graph, node, weight, record, context)
    else:
        _rewrite_kxk(graph, node, weight, record, context)
    return record


def _rewrite_1x1(graph: gs.Graph, node: gs.Node, weight: gs.Constant, record: LayerRecord,
                 context: PassContext) -> None:
    w = read_values(weight)
    out_ch, in_ch = w.shape[:2]
    factors = factorize_matrix(context, weight, w.reshape(out_ch, in_ch), record, input_axis=1,
                               geometry=conv_geometry(context, node, w.shape))
    if factors is None:
        return
    rank = record.rank[0]
    chain = conv_chain(w.shape, node.attrs, Form("svd", (rank,)))
    consts = shared_constants(graph, context, weight, ("conv1x1", rank), {
        conv.suffix: factor.reshape(conv.weight_shape) for conv, factor in zip(chain, (factors.second, factors.first))},
        record)
    _replace_with_chain(graph, node, context, [(conv.suffix, consts[conv.suffix], conv.attrs) for conv in chain])


def _rewrite_kxk(graph: gs.Graph, node: gs.Node, weight: gs.Constant, record: LayerRecord,
                 context: PassContext) -> None:
    w = read_values(weight)
    out_ch, in_ch, *kernel_dims = w.shape
    stride = conv_attrs(node.attrs, kernel_dims).stride
    record.params_before = w.size
    record.macs_before = R.tucker2_macs(out_ch, in_ch, math.prod(kernel_dims), stride)
    prior = prior_choice(context, weight)
    if record.name in context.layers.dense or prior is not None:
        # a conv weight read by several convs is rare: it stays dense after the first reader's
        # choice, and optimize's byte check keeps the first reader dense too when that grows it
        record.reason = context.layers.dense.get(record.name) or f"reads the weight of {prior.layer}: factorized once"
        if prior is not None and prior.ranks is None:
            record.reason = f"reads the weight of {prior.layer}, which stays dense"
        return
    plan, refusals, tucker2 = plan_conv(context, node, w, conv_geometry(context, node, w.shape))
    if context.state.survey is None:
        record_choice(context, weight, record.name, None if plan is None else tuple(plan.ranks),
                      None if plan is None else plan.method)
    record.break_even_rank, record.max_rank = tucker2.break_even_rank, tucker2.max_rank
    if plan is None:
        measured = next((r.measured for r in refusals if r.measured is not None), None)
        if measured is not None:
            record_measurement(record, measured)
        record.reason = (refusals[0].reason if len(refusals) == 1
                         else "; ".join(f"{r.method}: {r.reason}" for r in refusals))
        return
    record.status, record.method, record.rank = "decomposed", plan.method, list(plan.ranks)
    record.weight_error = plan.weight_error
    if plan.activation_error is not None:
        record.method, record.activation_error = f"whitened-{plan.method}", plan.activation_error
    record.params_after, record.macs_after = plan.params, plan.macs
    if plan.measured is not None:
        record_measurement(record, plan.measured)
    if plan.alternatives:
        record.reason = "chosen over " + "; ".join(plan.alternatives)
    dtype = w.dtype
    chain = conv_chain(w.shape, node.attrs, Form(plan.method, plan.ranks, plan.branches))
    consts = shared_constants(graph, context, weight, (plan.method, plan.branches, *plan.ranks),
                              {conv.suffix: factor.astype(dtype) for conv, factor in zip(chain, plan.weights())},
                              record)
    _replace_with_chain(graph, node, context, [(conv.suffix, consts[conv.suffix], conv.attrs) for conv in chain])


def _replace_with_chain(graph: gs.Graph, node: gs.Node, context: PassContext,
                        stages: list[tuple[str, gs.Constant, dict]]) -> None:
    """Conv stages in order; the original input feeds the first, the bias and output go to the last."""
    name = layer_name(node)
    x, y, bias = node.inputs[0], node.outputs[0], node.inputs[2:]
    for i, (suffix, w, attrs) in enumerate(stages):
        last = i == len(stages) - 1
        out = y if last else gs.Variable(new_name(context, f"{name}_lowrank_{suffix}_out"), dtype=y.dtype)
        graph.nodes.append(gs.Node("Conv", new_name(context, f"{name}_lowrank_{suffix}"), attrs=attrs,
                                   inputs=[x, w, *(bias if last else [])], outputs=[out]))
        x = out
    node.inputs.clear()
    node.outputs.clear()
