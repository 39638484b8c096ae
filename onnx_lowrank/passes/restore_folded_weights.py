"""Give a weight folded out of a Constant / Identity / Cast / Transpose chain (fold_constant_weights)
its chain back when its layer stayed dense, so the model changes only where it was decomposed."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import PassContext, PassResult, walk_graphs

NAME = "restore_folded_weights"


def restore_folded_weights(graph: gs.Graph, context: PassContext) -> PassResult:
    """Put back the chains whose folded weight no pass rewrote: a layer left dense keeps its weight
    exactly as the exporter stored it (a float16 weight stays float16 behind its Cast), so only the
    layers that were decomposed change. The folds are read, never consumed, and found by tensor
    name: every rewrite of a copy of the normalized graph restores them the same way."""
    for g in walk_graphs(graph):
        tensors = g.tensors()
        folded = [t for t in tensors.values() if _still_folded(t, context)]
        for tensor in folded:
            if isinstance(tensor, gs.Constant):   # not restored already as another chain's source
                _restore(g, tensor, tensors, context)
        if folded:
            g.toposort()
    return PassResult()


def _still_folded(tensor: gs.Tensor, context: PassContext) -> bool:
    """Read by a node, and still the folded value (a pass that changed it keeps it)."""
    fold = context.state.folds.get(tensor.name)
    return (fold is not None and isinstance(tensor, gs.Constant) and bool(tensor.outputs)
            and tensor._values is fold.value)


def _restore(g: gs.Graph, tensor: gs.Tensor, tensors: dict[str, gs.Tensor], context: PassContext) -> None:
    fold = context.state.folds[tensor.name]
    inputs = [_source(g, name, values, tensors, context) for name, values in fold.inputs]
    if isinstance(tensor, gs.Constant):
        tensor.to_variable(dtype=fold.dtype, shape=fold.shape)
        # a Constant born in a graph copy never had the `type` gs's Variables carry, which its
        # exporter reads; to_variable does not set it
        tensor.type = getattr(tensor, "type", "tensor_type")
    g.nodes.append(gs.Node(fold.op, fold.node_name, fold.attrs, inputs=inputs, outputs=[tensor], domain=fold.domain))


def _source(g: gs.Graph, name: str, values, tensors: dict[str, gs.Tensor], context: PassContext) -> gs.Tensor:
    """A restored node's input: the tensor of that name if the graph still has it, else the model's
    constant made again, or an earlier link of the chain restored first."""
    tensor = tensors.get(name)
    if name in context.state.folds:
        if tensor is None:   # this copy of the graph never had the link: make it, then its node
            fold = context.state.folds[name]
            tensor = tensors[name] = gs.Variable(name, dtype=fold.dtype, shape=fold.shape)
            _restore(g, tensor, tensors, context)
        elif isinstance(tensor, gs.Constant):
            _restore(g, tensor, tensors, context)
        return tensor
    if tensor is None:
        tensor = tensors[name] = gs.Constant(name, values)
    return tensor
