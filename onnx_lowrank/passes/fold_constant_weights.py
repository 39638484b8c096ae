"""Make weights that exporters hide behind nodes into plain constants the decompose passes can see.

torch.onnx, tf2onnx and hand-edited graphs hand a weight to MatMul / Gemm / Conv as an initializer,
but also as the output of a `Constant` node, or behind `Identity` (deduplicated initializers),
`Cast` (weights stored in fp16 for an fp32 graph) or `Transpose` (tf2onnx's layouts). Each such
chain is evaluated in numpy and its output becomes a constant, but only where it ends in a weight
slot: shape constants and everything else are left exactly as the exporter wrote them.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ._weights import Fold
from .base import PassContext, PassResult, walk_graphs

NAME = "fold_constant_weights"

#: op -> input positions that carry a weight the decompose passes may factorize
WEIGHT_SLOTS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (1,)}
FOLDABLE = ("Constant", "Identity", "Cast", "Transpose")


def fold_constant_weights(graph: gs.Graph, context: PassContext) -> PassResult:
    changed = False
    for g in walk_graphs(graph):
        outputs = {id(t) for t in g.outputs}
        progress = True
        while progress:   # chains fold from the constant end, one link per sweep
            progress = False
            for node in g.nodes:
                value = _evaluate(node)
                if value is None or not node.outputs or id(node.outputs[0]) in outputs:
                    continue
                if not _feeds_weight_slots_only(node.outputs[0]):
                    continue
                tensor = node.outputs[0]
                context.state.folds[tensor.name] = Fold(
                    node.op, node.name, dict(node.attrs), node.domain,
                    tuple((t.name, None if t.name in context.state.folds else t._values) for t in node.inputs),
                    value, tensor.dtype, tensor.shape)
                tensor.to_constant(value)
                node.outputs.clear()
                node.inputs.clear()
                progress = changed = True
    if changed:
        graph.cleanup()
    return PassResult()


def _feeds_weight_slots_only(tensor: gs.Tensor) -> bool:
    for consumer in tensor.outputs:
        if consumer.op in FOLDABLE and consumer.op != "Constant":
            continue
        slots = [i for i, t in enumerate(consumer.inputs) if t is tensor]
        if not slots or any(i not in WEIGHT_SLOTS.get(consumer.op, ()) for i in slots):
            return False
    return bool(tensor.outputs)


def _evaluate(node: gs.Node) -> np.ndarray | None:
    """The node's output if it is a foldable op on constants, else None."""
    if node.op not in FOLDABLE or node.domain not in (None, "", "ai.onnx") or len(node.outputs) != 1:
        return None
    if node.op == "Constant":
        return _constant_value(node)
    if not node.inputs or not isinstance(node.inputs[0], gs.Constant):
        return None
    x = node.inputs[0].values
    if node.op == "Identity":
        return x
    if node.op == "Cast":
        return x.astype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    perm = node.attrs.get("perm")
    return np.transpose(x, perm) if perm is not None else np.transpose(x)


def _constant_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if isinstance(attrs.get("value"), gs.Constant):
        return attrs["value"].values
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], dtype=np.float32)
    return None   # ints, strings and sparse values never carry a float weight
