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
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    exported = gs.export_onnx(graph, do_type_check=False)
    model = onnx.ModelProto()
    model.CopyFrom(original)
    model.graph.CopyFrom(exported.graph)
    return model


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
