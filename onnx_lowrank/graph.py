"""ModelProto <-> onnx-graphsurgeon Graph, keeping everything of the model that is not the graph.

onnx-graphsurgeon rebuilds the ModelProto with onnx.helper defaults on export (a newer IR version
than the runtime may load, its own producer, no metadata). Users need the model they gave us back
with only the graph changed, so the exported graph is put into a copy of the original model.
"""

from __future__ import annotations

from collections import Counter

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx.external_data_helper import _get_all_tensors, load_external_data_for_tensor


#: external_data key naming the folder that holds a lazily read tensor's file. onnx's
#: ExternalDataInfo knows it; ONNX Runtime does not, so for_runtime() removes it.
BASEPATH = "basepath"


class ExternalValues(gs.ir.tensor.LazyValues):
    """gs's lazy values for a tensor whose bytes are still in its external file: read (and kept in
    the tensor) only when a pass asks for them, from the folder its basepath entry names."""

    def load(self):
        base = external_base(self.tensor)
        return np.array(numpy_helper.to_array(self.tensor, base_dir=base or ""))


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """The model's graph for the passes. A node that shares its name with an earlier node gets a
    unique one inside the tool (per-layer choices are keyed by layer name); export_graph gives it
    its own name back."""
    graph = gs.import_onnx(model)
    renamed = {key: name for key, (_, name) in duplicate_node_names(model).items()}
    for g in [graph, *graph.subgraphs(recursive=True)]:
        for tensor in g.tensors().values():
            values = getattr(tensor, "_values", None)
            if type(values) is gs.ir.tensor.LazyValues and external_base(values.tensor) is not None:
                values.__class__ = ExternalValues
        for i, node in enumerate(g.nodes if renamed else ()):
            node.name = renamed.get((g.name, i, tuple(t.name for t in node.outputs)), node.name)
    return graph


def duplicate_node_names(model: onnx.ModelProto) -> dict[tuple, tuple[str, str]]:
    """{(graph name, node index, node outputs): (its name, the unique name it goes by in the
    tool)} for every node whose name an earlier node already has. ONNX Runtime refuses two nodes
    of one name in one graph, not across graphs (the branches of an If, as exporters name them);
    the passes key layers by name, so those nodes are renamed `NAME_2`, `NAME_3`, ... (a name
    nothing else uses)."""
    graphs = _all_graphs(model)
    taken = {t for g in graphs for n in g.node for t in [n.name, *n.output]}
    seen: Counter[str] = Counter()
    renamed = {}
    for g in graphs:
        for index, node in enumerate(g.node):
            seen[node.name] += 1
            if node.name and seen[node.name] > 1:
                i = seen[node.name]
                while f"{node.name}_{i}" in taken:
                    i += 1
                taken.add(f"{node.name}_{i}")
                renamed[(g.name, index, tuple(node.output))] = (node.name, f"{node.name}_{i}")
    return renamed


def _all_graphs(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    graphs, pending = [], [model.graph]
    while pending:
        g = pending.pop(0)
        graphs.append(g)
        pending.extend(sub for node in g.node for attr in node.attribute
                       for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs))
    return graphs


def export_graph(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """The exported graph inside every other field of the original model (IR version, opset
    imports, producer, metadata, functions, ...). The graph is not copied a second time: a model of
    size S peaks at about 2 S here (the original and the export), not 3 S."""
    model, sources = export_graph_lazily(graph, original)
    _fill_stubs(model.graph, sources)
    return model


def export_graph_lazily(graph: gs.Graph, original: onnx.ModelProto
                        ) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """export_graph, with the main graph's unchanged weights left as stubs without their bytes, and
    {name: the input's tensor} that holds them: io.write_model(model, path, sources=) streams them
    from there, so a model that is only written (a probe, a capture model) is never a second copy
    of the weights in memory."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    _restore_lazy(graph, original)
    originals = {name: base for base, name in duplicate_node_names(original).values()}
    with _stubbed_weights(graph) as sources:
        model = gs.export_onnx(graph, do_type_check=False)
    for g in _all_graphs(model)[1:]:   # a subgraph's weights are filled now: the writer streams the main graph's
        _fill_stubs(g, sources)
    _hoist_shared_initializers(model)
    sources = {t.name: sources[t.name] for t in model.graph.initializer if t.name in sources}
    if originals:
        for g in _all_graphs(model):
            for node in g.node:
                node.name = originals.get(node.name, node.name)
    for descriptor in model.DESCRIPTOR.fields:
        if descriptor.name != "graph":
            model.ClearField(descriptor.name)
    copy_fields(original, model, but="graph")
    return model, sources


def _fill_stubs(graph: onnx.GraphProto, sources: dict[str, onnx.TensorProto]) -> None:
    """Each unchanged weight's bytes copied once, into their place."""
    for tensor in graph.initializer:
        source = sources.get(tensor.name)
        if source is not None:
            name = tensor.name
            tensor.CopyFrom(source)
            tensor.name = name


class _stubbed_weights:
    """While gs exports, each weight a pass did not change (still the input's own TensorProto)
    stands in as a stub without its bytes: gs's exporter, onnx.helper.make_graph and make_model
    each copy what they are given, and on the weights that would be three copies of the model at
    once. Yields {name: the input's tensor}; the graph gets its lazy values back afterwards."""

    def __init__(self, graph: gs.Graph, threshold: int = 1024):
        self.graph, self.threshold, self.lazy = graph, threshold, []

    def __enter__(self) -> dict[str, onnx.TensorProto]:
        sources = {}
        for g in [self.graph, *self.graph.subgraphs(recursive=True)]:
            for tensor in g.tensors().values():
                values = getattr(tensor, "_values", None)
                if (type(values) is not gs.ir.tensor.LazyValues or not values.tensor.HasField("raw_data")
                        or tensor_nbytes(values.tensor) < self.threshold):
                    continue
                self.lazy.append((tensor, values))
                tensor._values = gs.ir.tensor.LazyValues(tensor_stub(values.tensor))
                sources[tensor.name] = values.tensor
        return sources

    def __exit__(self, *_) -> None:
        for tensor, values in self.lazy:
            tensor._values = values


def _hoist_shared_initializers(model: onnx.ModelProto) -> None:
    """gs exports a constant that nodes of several subgraphs read (one weight's factors used in
    both branches of an If) as an initializer of each subgraph: stored once per branch. A name
    that several subgraphs hold goes to the main graph, which every subgraph sees."""
    graphs = _all_graphs(model)
    held: dict[str, list[onnx.GraphProto]] = {}
    for g in graphs[1:]:
        for tensor in g.initializer:
            held.setdefault(tensor.name, []).append(g)
    main = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    shared = {name for name, holders in held.items() if len(holders) > 1 and name not in main}
    if not shared:
        return
    for g in graphs[1:]:
        kept = []
        for tensor in g.initializer:
            if tensor.name not in shared:
                kept.append(tensor)
            elif tensor.name not in main:
                model.graph.initializer.append(tensor)
                main.add(tensor.name)
        if len(kept) != len(g.initializer):
            del g.initializer[:]
            g.initializer.extend(kept)


def copy_fields(source, target, but: str) -> None:
    """Every set field of protobuf message `source` into `target`, except the field named `but`."""
    for descriptor, value in source.ListFields():
        if descriptor.name != but:
            copy_field(target, descriptor, value)


def copy_field(target, descriptor, value) -> None:
    """Set the field `descriptor` of protobuf message `target` to `value` (ListFields' pair)."""
    if _is_repeated(descriptor):
        getattr(target, descriptor.name).extend(value)
    elif descriptor.message_type is not None:
        getattr(target, descriptor.name).CopyFrom(value)
    else:
        setattr(target, descriptor.name, value)


def _restore_lazy(graph: gs.Graph, original: onnx.ModelProto) -> None:
    """gs keeps the values a pass read (to factorize, or to decide not to) in memory, and would
    export them inline, marked external with no file. A weight still equal to its bytes on disk
    goes back to being read from there; one a pass changed is exported inline."""
    lazy = {t.name: t for t in _get_all_tensors(original) if external_base(t) is not None}
    for g in [graph, *graph.subgraphs(recursive=True)]:
        for tensor in g.tensors().values():
            if not isinstance(tensor, gs.Constant) or not isinstance(tensor._values, np.ndarray):
                continue
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            source = lazy.get(tensor.name)
            if source is not None and np.array_equal(tensor._values, ExternalValues(source).load()):
                tensor._values = ExternalValues(source)
            else:
                tensor.data_location = None


def _is_repeated(descriptor) -> bool:
    # protobuf >= 5 deprecates FieldDescriptor.label in favour of is_repeated
    if hasattr(descriptor, "is_repeated"):
        return descriptor.is_repeated
    return descriptor.label == descriptor.LABEL_REPEATED


def count_parameters(model: onnx.ModelProto) -> int:
    """Elements of all constant tensors: initializers and Constant nodes, subgraphs included."""
    total = 0
    for tensor in _get_all_tensors(model):
        n = 1
        for d in tensor.dims:
            n *= d
        total += n
    return total


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every constant tensor's values (initializers and Constant nodes, subgraphs
    included) as stored, from their dims and element type: what a rewrite may never grow."""
    total = 0
    for tensor in _get_all_tensors(model):
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize \
            if tensor.data_type not in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED) else 0
        total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return total


def tensor_names(model: onnx.ModelProto) -> set[str]:
    """Names of every constant tensor of the model (initializers, Constant nodes' outputs),
    subgraphs included."""
    return {name for g in _all_graphs(model)
            for name in [*(t.name for t in g.initializer), *(n.output[0] for n in g.node if n.op_type == "Constant")]}


def structure_only(model: onnx.ModelProto, threshold: int = 1024) -> onnx.ModelProto:
    """A copy of the model whose large initializers are graph inputs of the same type and shape:
    onnx.checker and shape inference see every name, type and shape, small constants (shape
    tensors) keep their values for data propagation, and a multi-GB model costs kilobytes to check.
    (Stubs pointing at external data would not do: the checker opens external files.)
    """
    light = onnx.ModelProto()
    copy_fields(model, light, but="graph")
    copy_fields(model.graph, light.graph, but="initializer")
    inputs = {value.name for value in model.graph.input}   # IR < 4 lists initializers as inputs too
    for tensor in model.graph.initializer:
        if tensor_nbytes(tensor) < threshold and tensor.data_location != onnx.TensorProto.EXTERNAL:
            light.graph.initializer.append(tensor)
        elif tensor.name not in inputs:
            light.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return light


def model_size(model: onnx.ModelProto) -> int:
    """Serialized size in bytes, without serializing: protobuf refuses even to measure a message
    past 2 GB (ByteSize raises), which is exactly when the size matters."""
    big = sum(n for n in map(tensor_nbytes, model.graph.initializer) if n >= 1024)
    return structure_only(model).ByteSize() + big


def tensor_stub(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """The tensor's name, type, shape and doc string, without its data."""
    stub = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type)
    if tensor.HasField("doc_string"):
        stub.doc_string = tensor.doc_string   # an empty one set is still a field on the wire
    stub.dims.extend(tensor.dims)
    return stub


def resident_size(model: onnx.ModelProto) -> int:
    """model_size less the weights still in the input's data file: what the model holds in memory."""
    lazy = sum(tensor_nbytes(t) for t in _get_all_tensors(model) if external_base(t) is not None)
    return model_size(model) - lazy


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, from its dims and type alone: reading `raw_data` from Python
    copies it, and protobuf's ByteSize serializes the message to measure it (a 1 GB weight is
    1 GB more, at the worst moment). An external tensor's is its recorded length; a string
    tensor's, its serialized size."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        entries = {e.key: e.value for e in tensor.external_data}
        return int(entries.get("length", 0))
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return tensor.ByteSize()
    count = math.prod(tensor.dims)
    if tensor.data_type in _PACKED_4BIT:
        return (count + 1) // 2
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


#: Element types stored two to a byte.
_PACKED_4BIT = {getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1")
                if hasattr(onnx.TensorProto, name)}


def external_base(tensor: onnx.TensorProto) -> str | None:
    """The folder of a tensor still in its external file (see io.load_model), else None."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return next((e.value for e in tensor.external_data if e.key == BASEPATH), None)


def external_folder(model: onnx.ModelProto) -> str | None:
    """The folder of the model's lazily read external data, if any of it is still unread."""
    return next((b for b in map(external_base, _get_all_tensors(model)) if b is not None), None)


def for_runtime(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as ONNX Runtime accepts it: the same, less our basepath entries (ORT refuses
    unknown external-data keys); the folder goes to ORT as a session option instead."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in _get_all_tensors(copy):
        kept = [(e.key, e.value) for e in tensor.external_data if e.key != BASEPATH]
        if len(kept) != len(tensor.external_data):
            del tensor.external_data[:]
            for key, value in kept:
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    return copy


def materialize(model: onnx.ModelProto) -> None:
    """Read every lazily external tensor into the model (for code that needs all the bytes)."""
    for tensor in _get_all_tensors(model):
        base = external_base(tensor)
        if base is not None:
            load_external_data_for_tensor(tensor, base)


#: Ops of quantized graphs. Their weights are integers with scales: SVD of those is not what the
#: graph computes, so such nodes are never candidates, and the report says they were seen.
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                           "ConvInteger", "QLinearMatMul", "QLinearConv", "MatMulNBits", "QGemm",
                           "DynamicQuantizeMatMul", "QAttention"})


def quantized_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts = Counter(node.op_type for g in _all_graphs(model) for node in g.node if node.op_type in QUANTIZED_OPS)
    return dict(sorted(counts.items()))
