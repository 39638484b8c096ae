"""Gemm with a constant B -> a first factor then a Gemm that keeps alpha, beta and C.

    Y = alpha A' B' + beta C,  B' = B^T if transB else B  [K, N],  B' ~= U V,  U [K, r], V [r, N]
    T = A' U                   MatMul(A, U), or Gemm(A, U, transA=1) when A is transposed
    Y = alpha T V + beta C     Gemm(T, V, C) with the original alpha, beta

Each factor is stored in the layout the original used (transB=1 stays transB=1), so exporters'
conventions and the runtime's preferred layouts survive.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from ._geometry import matmul_geometry
from ._matrix import decompose_ahead, factorize_matrix, screen_weights, shared_constants
from .base import LayerRecord, PassContext, PassResult, apply_to_nodes, new_name, output_positions, walk_graphs
from .candidates import match
from ._weights import read_values

NAME = "decompose_gemm"
DEFAULT_OPSET = 11   # a model without a default-domain opset import


def decompose_gemm(graph: gs.Graph, context: PassContext) -> PassResult:
    candidates = [c for g in walk_graphs(graph) for node in g.nodes if node.op == "Gemm"
                  and (c := match(node, context.options)) is not None]
    screen_weights(context, candidates)
    decompose_ahead(context, [(c.name, c.weight, bool(c.node.attrs.get("transB", 0)), 0)
                              for c in candidates if not c.refusal])
    return apply_to_nodes(graph, context, _rewrite)


def _rewrite(graph: gs.Graph, node: gs.Node, context: PassContext) -> LayerRecord | None:
    candidate = match(node, context.options) if node.op == "Gemm" else None
    if candidate is None:
        return None
    weight, name = candidate.weight, candidate.name
    context.on_layer(name)
    trans_a = int(node.attrs.get("transA", 0))
    trans_b = int(node.attrs.get("transB", 0))
    record = LayerRecord(name=name, op="Gemm", pass_name=NAME, weight_shape=list(weight.shape), status="skipped",
                         params_before=math.prod(weight.shape),
                         positions=output_positions(context, node, -1))
    if candidate.refusal:
        record.reason = candidate.refusal
        return record
    w = read_values(weight)
    w = w.T if trans_b else w   # [K, N] as applied
    geometry = matmul_geometry(context, node.inputs[0], *w.shape, transposed_input=bool(trans_a))
    factors = factorize_matrix(context, weight, w, record, geometry=geometry, transposed=bool(trans_b))
    if factors is None:
        return record
    u, v = factors.first, factors.second
    rank = record.rank[0]
    # before opset 11 Gemm requires C: the first factor is then a MatMul, or a Gemm with a zero C
    c_optional = (graph.opset or DEFAULT_OPSET) >= 11
    u_trans = trans_b and c_optional
    consts = shared_constants(graph, context, weight, ("gemm", u_trans, trans_b, rank),
                              {"u": u.T if u_trans else u, "v": v.T if trans_b else v}, record)
    a, y = node.inputs[0], node.outputs[0]
    hidden = gs.Variable(new_name(context, f"{name}_lowrank_hidden"), dtype=y.dtype)
    first_name = new_name(context, f"{name}_lowrank_u")
    if trans_a:
        zero = [] if c_optional else [gs.Constant(new_name(context, f"{name}_lowrank_zero"), np.zeros((), u.dtype))]
        first = gs.Node("Gemm", first_name, attrs={"transA": 1, "transB": int(u_trans)},
                        inputs=[a, consts["u"], *zero], outputs=[hidden])
    elif u_trans:
        first = gs.Node("Gemm", first_name, attrs={"transB": 1}, inputs=[a, consts["u"]], outputs=[hidden])
    else:
        first = gs.Node("MatMul", first_name, inputs=[a, consts["u"]], outputs=[hidden])
    attrs = {key: value for key, value in node.attrs.items() if key in ("alpha", "beta")}
    attrs["transB"] = trans_b
    second = gs.Node("Gemm", new_name(context, f"{name}_lowrank_v"), attrs=attrs,
                     inputs=[hidden, consts["v"], *node.inputs[2:]], outputs=[y])
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.extend([first, second])
    return record
