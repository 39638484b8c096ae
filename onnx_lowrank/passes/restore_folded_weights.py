"""Give a weight folded out of a Constant / Identity / Cast / Transpose chain (fold_constant_weights)
its chain back when its layer stayed dense, so the model changes only where it was decomposed."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import PassContext, PassResult, walk_graphs

NAME = "restore_folded_weights"


def restore_folded_weights(graph: gs.Graph, context: PassContext) -> PassResult:
    """Put back the chains whose folded weight no pass rewrote: a layer left dense keeps its weight
    exactly as the exporter stored it (a float16 weight stays float16 behind its Cast), so only the
    layers that were decomposed change."""
    restored = False
    for g in walk_graphs(graph):
        for tensor in list(g.tensors().values()):
            fold = context.folds.get(id(tensor))
            # still read by a node, and still the folded value (a pass that changed it keeps it)
            if fold is not None and tensor.outputs and getattr(tensor, "_values", None) is fold.value:
                _restore(tensor, context)
                restored = True
        if restored:
            g.toposort()
    return PassResult()


def _restore(tensor: gs.Tensor, context: PassContext) -> None:
    fold = context.folds.pop(id(tensor))
    for source in fold.inputs:
        if id(source) in context.folds:
            _restore(source, context)
    tensor.to_variable(dtype=fold.dtype, shape=fold.shape)
    fold.graph.nodes.append(gs.Node(fold.op, fold.name, fold.attrs, inputs=fold.inputs, outputs=[tensor],
                                    domain=fold.domain))
