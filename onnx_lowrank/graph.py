"""ModelProto <-> onnx-graphsurgeon Graph, keeping everything of the model that is not the graph.

onnx-graphsurgeon rebuilds the ModelProto with onnx.helper defaults on export (a newer IR version
than the runtime may load, its own producer, no metadata). Users need the model they gave us back
with only the graph changed, so the exported graph is put into a copy of the original model.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def export_graph(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """The exported graph inside every other field of the original model (IR version, opset
    imports, producer, metadata, functions, ...). The graph is not copied a second time: a model of
    size S peaks at about 2 S here (the original and the export), not 3 S."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    for descriptor in model.DESCRIPTOR.fields:
        if descriptor.name != "graph":
            model.ClearField(descriptor.name)
    for descriptor, value in original.ListFields():
        if descriptor.name == "graph":
            continue
        if _is_repeated(descriptor):
            getattr(model, descriptor.name).extend(value)
        elif descriptor.message_type is not None:
            getattr(model, descriptor.name).CopyFrom(value)
        else:
            setattr(model, descriptor.name, value)
    return model


def _is_repeated(descriptor) -> bool:
    # protobuf >= 5 deprecates FieldDescriptor.label in favour of is_repeated
    if hasattr(descriptor, "is_repeated"):
        return descriptor.is_repeated
    return descriptor.label == descriptor.LABEL_REPEATED


def count_parameters(model: onnx.ModelProto) -> int:
    """Elements of all constant tensors: initializers and Constant nodes, subgraphs included."""
    from onnx.external_data_helper import _get_all_tensors

    total = 0
    for tensor in _get_all_tensors(model):
        n = 1
        for d in tensor.dims:
            n *= d
        total += n
    return total
