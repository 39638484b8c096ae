"""Fuse MatMuls that read the same input into one MatMul and a Split (horizontal fusion):

    h_q = x A_q,  h_k = x A_k,  h_v = x A_v   ->   [h_q, h_k, h_v] = Split(x [A_q | A_k | A_v], axis=-1)

After decomposition the query, key and value projections of an attention block each start with a
thin first factor on the same hidden state; one wider MatMul reads x once and keeps the GEMM
kernel busy instead of launching three narrow ones. Exact: each column block of the product is
the product with that block.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import LayerRecord, PassContext, PassResult, layer_name, new_name, walk_graphs

NAME = "fuse_horizontal"
#: opset 13 moved Split's sizes from an attribute to an input
SPLIT_INPUT_OPSET = 13


def fuse_horizontal(graph: gs.Graph, context: PassContext) -> PassResult:
    records = []
    for g in walk_graphs(graph):
        for x in _inputs_in_order(g):
            group = _matmuls_reading(x, context)
            if len(group) >= 2:
                records.append(_fuse(g, x, group, context, graph.opset))
        if records:
            g.toposort()
    return PassResult(records)


def _inputs_in_order(graph: gs.Graph) -> list[gs.Tensor]:
    seen, order = set(), []
    for node in graph.nodes:
        if node.op == "MatMul" and node.inputs and id(node.inputs[0]) not in seen:
            seen.add(id(node.inputs[0]))
            order.append(node.inputs[0])
    return order


def _matmuls_reading(x: gs.Tensor, context: PassContext) -> list[gs.Node]:
    """The MatMuls x @ W with a constant 2-D W, all of one dtype (the first one's)."""
    if isinstance(x, gs.Constant):
        return []
    group = []
    for node in x.outputs:
        if node.op != "MatMul" or node.domain not in (None, "", "ai.onnx") or len(node.inputs) != 2:
            continue
        w = node.inputs[1]
        if node.inputs[0] is not x or not isinstance(w, gs.Constant) or len(w.shape) != 2:
            continue
        if group and (w.dtype != group[0].inputs[1].dtype or w.shape[0] != group[0].inputs[1].shape[0]):
            continue
        if context.options.selects(layer_name(node)):
            group.append(node)
    return group


def _fuse(graph: gs.Graph, x: gs.Tensor, group: list[gs.Node], context: PassContext, opset: int) -> LayerRecord:
    weights = [node.inputs[1].values for node in group]
    widths = [w.shape[1] for w in weights]
    outputs = [node.outputs[0] for node in group]
    base = f"{x.name}_fused"
    fused_w = gs.Constant(new_name(context, f"{base}_weight"), np.ascontiguousarray(np.concatenate(weights, axis=1)))
    hidden = gs.Variable(new_name(context, f"{base}_output"), dtype=outputs[0].dtype)
    matmul_name = new_name(context, f"{base}_matmul")
    split_attrs: dict = {"axis": -1}
    split_inputs: list[gs.Tensor] = [hidden]
    if opset >= SPLIT_INPUT_OPSET:
        split_inputs.append(gs.Constant(new_name(context, f"{base}_split_sizes"), np.array(widths, dtype=np.int64)))
    else:
        split_attrs["split"] = widths
    names = [node.name for node in group]
    for node in group:
        node.inputs.clear()
        node.outputs.clear()
    graph.nodes.append(gs.Node("MatMul", matmul_name, inputs=[x, fused_w], outputs=[hidden]))
    graph.nodes.append(gs.Node("Split", new_name(context, f"{base}_split"), attrs=split_attrs,
                               inputs=split_inputs, outputs=outputs))
    k = weights[0].shape[0]
    return LayerRecord(name=matmul_name, op="MatMul", pass_name=NAME, weight_shape=[k, sum(widths)], status="fused",
                       reason=f"{len(group)} MatMuls on {x.name} ({', '.join(names)}) as one MatMul + Split, "
                              f"widths {'+'.join(map(str, widths))}",
                       params_before=k * sum(widths), params_after=k * sum(widths),
                       macs_before=k * sum(widths), macs_after=k * sum(widths))
