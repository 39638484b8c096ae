"""MatMul with a constant 2-D weight -> two MatMuls through the rank-r bottleneck.

    y = x W   (W [K, N])  ->  y = (x A) B,   A [K, r], B [r, N]
    y = W x   (W [M, K])  ->  y = A (B x),   A [M, r], B [r, K]

x may carry any batch axes: MatMul broadcasts them through both factors alike.
"""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from ._geometry import matmul_geometry
from ._matrix import decompose_ahead, factorize_matrix, screen_weights, shared_constants
from .base import LayerRecord, PassContext, PassResult, apply_to_nodes, new_name, output_positions, walk_graphs
from .candidates import match
from ._weights import read_values

NAME = "decompose_matmul"


def decompose_matmul(graph: gs.Graph, context: PassContext) -> PassResult:
    candidates = [c for g in walk_graphs(graph) for node in g.nodes if node.op == "MatMul"
                  and (c := match(node, context.options)) is not None]
    screen_weights(context, candidates)
    decompose_ahead(context, [(c.name, c.weight, False, int(c.weight_first)) for c in candidates if not c.refusal])
    return apply_to_nodes(graph, context, _rewrite)


def _rewrite(graph: gs.Graph, node: gs.Node, context: PassContext) -> LayerRecord | None:
    candidate = match(node, context.options) if node.op == "MatMul" else None
    if candidate is None:
        return None
    weight, weight_first, name = candidate.weight, candidate.weight_first, candidate.name
    context.on_layer(name)
    record = LayerRecord(name=name, op="MatMul", pass_name=NAME, weight_shape=list(weight.shape), status="skipped",
                         params_before=math.prod(weight.shape),
                         positions=output_positions(context, node, -2 if weight_first else -1))
    if candidate.refusal:
        record.reason = candidate.refusal
        return record
    w = read_values(weight)
    geometry = matmul_geometry(context, candidate.x, *w.shape, weight_first=weight_first)
    factors = factorize_matrix(context, weight, w, record, input_axis=int(weight_first), geometry=geometry)
    if factors is None:
        return record
    rank = record.rank[0]
    consts = shared_constants(graph, context, weight, ("matmul", rank), {"a": factors.first, "b": factors.second},
                              record)
    x, y = candidate.x, node.outputs[0]
    hidden = gs.Variable(new_name(context, f"{name}_lowrank_hidden"), dtype=y.dtype)
    if weight_first:   # y = A (B x)
        first = gs.Node("MatMul", new_name(context, f"{name}_lowrank_b"), inputs=[consts["b"], x], outputs=[hidden])
        second = gs.Node("MatMul", new_name(context, f"{name}_lowrank_a"), inputs=[consts["a"], hidden], outputs=[y])
    else:              # y = (x A) B
        first = gs.Node("MatMul", new_name(context, f"{name}_lowrank_a"), inputs=[x, consts["a"]], outputs=[hidden])
        second = gs.Node("MatMul", new_name(context, f"{name}_lowrank_b"), inputs=[hidden, consts["b"]], outputs=[y])
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.extend([first, second])
    return record
