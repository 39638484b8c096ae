"""Loading and saving models: every way a file can be wrong becomes one clear ModelLoadError or
OutputError, and outputs are written atomically so a failure never leaves a half-written file."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import ModelLoadError, OutputError, first_line
from .graph import (BASEPATH, copy_field, copy_fields, external_base, model_size, structure_only, tensor_nbytes,
                    tensor_stub)

PROTOBUF_LIMIT = 2**31 - 1


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """A model file, checked. Weights stored as external data stay on disk until a pass reads
    them; save such a model with onnx_lowrank.save_model, which copies them file to file."""
    return load_model_with_info(path)[0]


def load_model_with_info(path: str | os.PathLike) -> tuple[onnx.ModelProto, bool]:
    """The model, and whether its weights were stored as external data (so the output can be too)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"input model '{path}' does not exist")
    if path.is_dir():
        raise ModelLoadError(f"input model '{path}' is a directory, not an .onnx file")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ModelLoadError(f"cannot read input model '{path}': {exc.strerror}") from None
    if size == 0:
        raise ModelLoadError(f"input model '{path}' is empty")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"input model '{path}' is not an ONNX model ({first_line(exc) or 'protobuf parse failed'})") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelLoadError(f"input model '{path}' is not an ONNX model (no graph)")
    external = _load_external_data(model, path)
    check_input_model(model, str(path))
    return model, external


def check_input_model(model: onnx.ModelProto, name: str) -> None:
    """onnx.checker's structural check (not full_check: models with custom-domain ops fail strict
    shape inference and are still ours to optimize); a model it rejects is refused up front.
    The checker serializes what it checks (twice the model in memory, and refused past 2 GB), so it
    checks the model's structure without its large weights."""
    try:
        onnx.checker.check_model(structure_only(model))
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ModelLoadError(f"input model '{name}' is not a valid ONNX model: {first_line(exc)}") from None
    problem = _tensor_size_problem(model)
    if problem:
        raise ModelLoadError(f"input model '{name}' is not a valid ONNX model: {problem}")


_T = onnx.TensorProto
#: where each element type keeps its values when not in raw_data
_TYPED_FIELD = {_T.FLOAT: "float_data", _T.DOUBLE: "double_data", _T.INT64: "int64_data",
                _T.UINT32: "uint64_data", _T.UINT64: "uint64_data",
                **{t: "int32_data" for t in (_T.INT32, _T.INT16, _T.INT8, _T.UINT16, _T.UINT8, _T.BOOL,
                                             _T.FLOAT16, _T.BFLOAT16)}}


def _tensor_size_problem(model: onnx.ModelProto) -> str | None:
    """A tensor whose data does not match its dims, which onnx.checker lets through and which would
    otherwise fail deep inside numpy."""
    from onnx.external_data_helper import _get_all_tensors

    for tensor in _get_all_tensors(model):
        if tensor.data_type not in _TYPED_FIELD or tensor.data_location == _T.EXTERNAL:
            continue
        count = 1
        for d in tensor.dims:
            count *= d
        if tensor.HasField("raw_data"):
            if tensor_nbytes(tensor) > 2**26:
                continue   # large weights come from exporters, not hand edits; reading them copies them
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            found = len(tensor.raw_data) / itemsize
        else:
            found = len(getattr(tensor, _TYPED_FIELD[tensor.data_type]))
        if found != count:
            return f"tensor '{tensor.name}' has {found:g} values for dims {list(tensor.dims)} ({count} expected)"
    return None


def _load_external_data(model: onnx.ModelProto, path: Path) -> bool:
    """Check that every external tensor's bytes are there, and leave them there: each is read when
    a pass needs it (graph.ExternalValues) and copied file to file on save, so a model of size S is
    never held whole in memory twice. The tensors get a basepath entry naming their folder."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    base = path.parent.resolve()
    external = [t for t in _get_all_tensors(model) if uses_external_data(t)]
    for tensor in external:
        info = ExternalDataInfo(tensor)
        file = base / info.location if info.location else None
        if file is None or os.path.isabs(info.location) or ".." in Path(info.location).parts:
            raise ModelLoadError(f"tensor '{tensor.name}' of '{path}' names external data outside its folder: "
                                 f"{info.location!r}")
        if not file.is_file():
            raise ModelLoadError(f"external data file '{info.location}' for tensor '{tensor.name}' "
                                 f"is missing (expected next to '{path}')")
        length = info.length or (file.stat().st_size - (info.offset or 0))
        if (info.offset or 0) + length > file.stat().st_size:
            raise ModelLoadError(f"external data file '{info.location}' is shorter than tensor "
                                 f"'{tensor.name}' needs (truncated?)")
        _set_entry(tensor, "length", str(length))
        _set_entry(tensor, BASEPATH, str(base))
    return bool(external)


def _set_entry(tensor: onnx.TensorProto, key: str, value: str) -> None:
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
            return
    entry = tensor.external_data.add()
    entry.key, entry.value = key, value


def check_output_path(output: str | os.PathLike, input_path: str | os.PathLike | None, force: bool) -> Path:
    """Refuse, before any work is done, an output that cannot or should not be written."""
    output = Path(output)
    if output.is_dir():
        raise OutputError(f"output path '{output}' is a directory")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory '{parent}' does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output directory '{parent}' is not writable")
    if input_path is not None and output.exists() and os.path.samefile(output, input_path) and not force:
        raise OutputError(f"output path '{output}' is the input model; pass --force to overwrite it")
    return output


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> list[Path]:
    """Write atomically: into a temporary folder beside the target, then rename over it.

    external_data None chooses: weights go to `<name>.data` beside the model when the model still
    reads weights lazily from its input's data file, or would not fit the 2 GB protobuf limit.
    Weights are streamed file to file or memory to file, one at a time, and `model` is not changed.
    Returns the files written. The data file is renamed into place before the model, so a reader
    never sees a model whose data is missing.
    """
    with staged_output(path) as staged:
        write_model(model, staged.path, external_data)
    return staged.written


def write_model(model: onnx.ModelProto, path: Path, external_data: bool | None = None,
                initializers: list[onnx.TensorProto] | None = None,
                sources: dict[str, onnx.TensorProto] | None = None) -> None:
    """Write the model to `path` as it stands (save_model's writer, not atomic by itself).
    `initializers`: the main graph's, instead of model.graph.initializer: tensors of another
    model, written from where they are rather than copied into this one first. `sources`: for
    main-graph initializers that are stubs (graph.export_graph_lazily), the tensors holding their
    bytes."""
    sources = sources or {}
    tensors = list(model.graph.initializer) if initializers is None else initializers
    size = (model_size(model) + (0 if initializers is None else sum(map(tensor_nbytes, initializers)))
            + sum(tensor_nbytes(sources[t.name]) for t in tensors if t.name in sources))
    if external_data is None:
        external_data = size >= PROTOBUF_LIMIT or any(external_base(sources.get(t.name, t)) is not None
                                                      for t in tensors)
    if not external_data and size >= PROTOBUF_LIMIT:
        raise OutputError(f"the model is {size / 2**30:.1f} GB, over the 2 GB protobuf "
                          "limit of a single .onnx file; use --external-data")
    data_file = path.with_name(f"{path.name}.data")
    data_file.unlink(missing_ok=True)   # a rewrite of the staged model may go inline
    try:
        with open(path, "wb") as out:
            _write_model(model, out, data_file if external_data else None, tensors, sources=sources)
    except OSError as exc:
        raise OutputError(f"cannot write '{path.name}': {exc.strerror or exc}") from None


class staged_output:
    """`with staged_output(path) as staged:` write `staged.path` (and its `.data` file); when the
    block ends without an error and `staged.keep` is still true, they replace `path` (the data
    file first, so a reader never sees a model whose data is missing); otherwise nothing of them
    is left behind. `staged.written` lists the files put in place."""

    def __init__(self, path: str | os.PathLike):
        self.target = Path(path)
        self.keep, self.written = True, []

    def __enter__(self) -> "staged_output":
        parent = self.target.parent if str(self.target.parent) else Path(".")
        try:
            self.tmpdir = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", dir=parent))
        except OSError as exc:
            raise OutputError(f"cannot write '{self.target}': {exc.strerror or exc}") from None
        self.path = self.tmpdir / self.target.name
        return self

    def __exit__(self, kind, *_) -> None:
        try:
            if kind is None and self.keep:
                parent = self.tmpdir.parent
                data = f"{self.target.name}.data"
                mode = 0o666 & ~_umask()   # what a plain open() would have given; mkdtemp's files are 0600
                for name in ([data] if (self.tmpdir / data).exists() else []) + [self.target.name]:
                    os.chmod(self.tmpdir / name, mode)
                    os.replace(self.tmpdir / name, parent / name)
                    self.written.append(parent / name)
        except OSError as exc:
            raise OutputError(f"cannot write '{self.target}': {exc.strerror or exc}") from None
        finally:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def _write_model(model: onnx.ModelProto, out, data_file: Path | None, initializers: list[onnx.TensorProto],
                 threshold: int = 1024, sources: dict[str, onnx.TensorProto] | None = None) -> None:
    """Serialize `model` into `out`, its large initializers into `data_file` (or, when None, inline)
    from wherever they are now, memory or the input's data file.

    Protobuf serializes a message whole: a model of S bytes would be S more in memory while it is
    written, and a copy of it (to move the weights out) S more again. So the main graph's
    initializers are written one by one after the rest of the model, each as its own field: a
    message's fields may come in any order on the wire, and a repeated field's elements keep theirs.

    onnx.save_model(save_as_external_data=True) cannot serve here: it needs every tensor's bytes in
    memory, moves them out of the caller's model, and refuses when a file named like the data file
    exists in the current directory (it tests the relative path against the cwd).
    """
    from onnx.external_data_helper import _get_all_tensors

    shell = onnx.ModelProto()
    copy_fields(model, shell, but="graph")
    copy_fields(model.graph, shell.graph, but="initializer")
    # lazily external tensors elsewhere (subgraph initializers, attributes) are small enough to copy
    inline = [t for t in _get_all_tensors(shell) if external_base(t) is not None]
    entries = []   # (the tensor as written: the caller's own or a stub, where its bytes come from)
    for tensor in initializers:
        if sources and tensor.name in sources:   # a stub: its bytes are another tensor's
            entries.append((tensor_stub(tensor), sources[tensor.name]))
            continue
        lazy = external_base(tensor) is not None
        if lazy or (data_file is not None and tensor.HasField("raw_data") and tensor_nbytes(tensor) >= threshold):
            entries.append((tensor_stub(tensor), tensor))
        else:
            entries.append((tensor, None))
    data = open(data_file, "wb") if data_file is not None else None
    try:
        for target in inline:
            _place(target, target, data)
        sizes = []
        for target, source in entries:
            if source is not None and data is not None:
                _place(target, source, data)   # a stub that points at the data file: small
            sizes.append(_serialized_size(target) if source is None or data is not None
                         else target.ByteSize() + _field_size(_RAW_DATA, tensor_nbytes(source)))
    finally:
        if data is not None:
            data.close()
    graph_head, graph_tail = _around(shell.graph, _INITIALIZER)
    model_head, model_tail = _around(shell, _GRAPH)
    out.write(model_head)
    out.write(_key(_GRAPH) + _varint(len(graph_head) + len(graph_tail)
                                     + sum(_field_size(_INITIALIZER, n) for n in sizes)))
    out.write(graph_head)
    for (target, source), size in zip(entries, sizes):
        out.write(_key(_INITIALIZER) + _varint(size))
        if source is None and target.HasField("raw_data"):
            raw = target.raw_data   # one copy of the bytes; serializing the tensor would make two
        elif source is not None and data is None:
            raw = _tensor_bytes(source)   # read in from its file now, one tensor at a time
        else:
            out.write(target.SerializeToString())
            continue
        before, after = _around(target, _RAW_DATA)
        out.write(before + _key(_RAW_DATA) + _varint(len(raw)))
        out.write(raw)
        del raw
        out.write(after)
    out.write(graph_tail)
    out.write(model_tail)


#: Field numbers on the wire: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data.
_GRAPH, _INITIALIZER, _RAW_DATA = 7, 5, 9


def _key(field: int) -> bytes:
    return _varint(field << 3 | 2)   # wire type 2: length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_size(field: int, length: int) -> int:
    return len(_key(field)) + len(_varint(length)) + length


def _serialized_size(tensor: onnx.TensorProto) -> int:
    """tensor.ByteSize() without serializing the tensor to measure it, which protobuf does."""
    if not tensor.HasField("raw_data"):
        return tensor.ByteSize()
    rest = onnx.TensorProto()
    copy_fields(tensor, rest, but="raw_data")
    return rest.ByteSize() + _field_size(_RAW_DATA, tensor_nbytes(tensor))


def _around(message, number: int) -> tuple[bytes, bytes]:
    """The fields of `message` numbered below and above `number`, each part serialized. With that
    field written between them this is protobuf's own order (ascending field numbers), so a file
    is byte for byte what SerializeToString would have written."""
    before, after = type(message)(), type(message)()
    for descriptor, value in message.ListFields():
        if descriptor.number != number:
            copy_field(before if descriptor.number < number else after, descriptor, value)
    return before.SerializeToString(), after.SerializeToString()


def _place(target: onnx.TensorProto, source: onnx.TensorProto, data) -> None:
    """`target` holds `source`'s bytes: inline (data None) or as a reference into the data file."""
    if data is None:
        raw = _tensor_bytes(source)
        _reset(target)
        target.raw_data = raw
        return
    offset = data.tell()
    if external_base(source) is not None:
        _copy_external(source, data)
    else:
        data.write(source.raw_data)
    length = data.tell() - offset
    _reset(target)
    target.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", Path(data.name).name), ("offset", str(offset)), ("length", str(length))):
        entry = target.external_data.add()
        entry.key, entry.value = key, value


def _reset(tensor: onnx.TensorProto) -> None:
    tensor.ClearField("raw_data")
    tensor.ClearField("data_location")
    del tensor.external_data[:]


def _external_slice(tensor: onnx.TensorProto) -> tuple[Path, int, int]:
    from onnx.external_data_helper import ExternalDataInfo

    info = ExternalDataInfo(tensor)
    return Path(external_base(tensor)) / info.location, info.offset or 0, info.length


def _tensor_bytes(tensor: onnx.TensorProto) -> bytes:
    if external_base(tensor) is None:
        return tensor.raw_data
    file, offset, length = _external_slice(tensor)
    with open(file, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _copy_external(tensor: onnx.TensorProto, out, chunk: int = 1 << 24) -> None:
    """File to file in 16 MB pieces: a multi-GB weight never passes through memory whole."""
    file, offset, length = _external_slice(tensor)
    with open(file, "rb") as f:
        f.seek(offset)
        while length > 0:
            piece = f.read(min(chunk, length))
            if not piece:
                raise OutputError(f"external data of tensor '{tensor.name}' ended early in '{file}'")
            out.write(piece)
            length -= len(piece)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
