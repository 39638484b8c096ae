"""Shapes before rewriting: the model's inputs and the concrete output shape of every node at the
report's input shapes (for MAC totals). Best effort: a model shape inference cannot follow still
gets optimized, its layers just report MACs per output position only."""

from __future__ import annotations

import onnx
from onnx import shape_inference

from .graph import structure_only
from .inputs import graph_input_specs, resolve_shapes


def infer_output_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]], batch: int
                        ) -> tuple[dict[str, list[int]], list[str]]:
    """Tensor name -> concrete shape (node outputs, and the graph inputs, so every node's input
    shape is known too), and the notes on dynamic dims that were filled in."""
    try:
        concrete, notes = resolve_shapes(graph_input_specs(model), shapes, batch)
    except (ValueError, KeyError):
        return {}, []
    probe = structure_only(model)
    for value in probe.graph.input:
        if value.name in concrete:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, concrete[value.name]):
                dim.Clear()
                dim.dim_value = size
    try:
        inferred = shape_inference.infer_shapes(probe, strict_mode=False, data_prop=True)
    except Exception:   # unknown custom ops and malformed shapes: shape inference is best effort
        return {}, notes
    result = {name: list(shape) for name, shape in concrete.items()}
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            result[value.name] = [d.dim_value for d in dims]
    return result, notes

