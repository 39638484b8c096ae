"""Loading and saving models: every way a file can be wrong becomes one clear ModelLoadError or
OutputError, and outputs are written atomically so a failure never leaves a half-written file."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import ModelLoadError, OutputError

PROTOBUF_LIMIT = 2**31 - 1


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
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
        raise ModelLoadError(f"input model '{path}' is not an ONNX model ({_first_line(exc) or 'protobuf parse failed'})") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelLoadError(f"input model '{path}' is not an ONNX model (no graph)")
    external = _load_external_data(model, path)
    check_input_model(model, str(path))
    return model, external


def check_input_model(model: onnx.ModelProto, name: str) -> None:
    """onnx.checker's structural check (not full_check: models with custom-domain ops fail strict
    shape inference and are still ours to optimize); a model it rejects is refused up front.
    The checker needs the model serialized, which protobuf refuses past 2 GB: such models are
    checked by ONNX Runtime's load in the parity step instead."""
    if model.ByteSize() >= PROTOBUF_LIMIT:
        return
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ModelLoadError(f"input model '{name}' is not a valid ONNX model: {_first_line(exc)}") from None
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
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            found = len(tensor.raw_data) / itemsize
        else:
            found = len(getattr(tensor, _TYPED_FIELD[tensor.data_type]))
        if found != count:
            return f"tensor '{tensor.name}' has {found:g} values for dims {list(tensor.dims)} ({count} expected)"
    return None


def _load_external_data(model: onnx.ModelProto, path: Path) -> bool:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    base = path.parent
    external = [t for t in _get_all_tensors(model) if uses_external_data(t)]
    if not external:
        return False
    for tensor in external:
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if location is None or not (base / location).is_file():
            raise ModelLoadError(f"external data file '{location}' for tensor '{tensor.name}' "
                                 f"is missing (expected next to '{path}')")
    try:
        onnx.load_external_data_for_model(model, str(base))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelLoadError(f"cannot read external data of '{path}': {_first_line(exc)}") from None
    return True


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

    external_data None chooses: weights go to `<name>.data` beside the model when the model would
    not fit the 2 GB protobuf limit (saving that way moves the tensors' bytes out of `model`).
    Returns the files written. The data file is renamed into place
    before the model, so a reader never sees a model whose data is missing.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if external_data is None:
        external_data = model.ByteSize() >= PROTOBUF_LIMIT
    data_name = f"{path.name}.data"
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
    except OSError as exc:
        raise OutputError(f"cannot write '{path}': {exc.strerror or exc}") from None
    try:
        if external_data:
            _mark_external(model, data_name)
            onnx.save_model(model, str(tmpdir / path.name))
        else:
            try:
                data = model.SerializeToString()
            except ValueError:   # protobuf refuses messages over 2 GB
                raise OutputError(f"the model is {model.ByteSize() / 2**30:.1f} GB, over the 2 GB protobuf "
                                  "limit of a single .onnx file; use --external-data") from None
            (tmpdir / path.name).write_bytes(data)
        written = []
        mode = 0o666 & ~_umask()   # what a plain open() would have given; mkdtemp's files are 0600
        for name in ([data_name] if (tmpdir / data_name).exists() else []) + [path.name]:
            os.chmod(tmpdir / name, mode)
            os.replace(tmpdir / name, parent / name)
            written.append(parent / name)
        return written
    except OSError as exc:
        raise OutputError(f"cannot write '{path}': {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _mark_external(model: onnx.ModelProto, location: str, size_threshold: int = 1024) -> None:
    """onnx.save_model(save_as_external_data=True) refuses when a file named `location` exists in the
    *current directory* (it tests the relative path against the cwd, not the model's folder), so the
    tensors are marked here and onnx.save_model writes them beside the model."""
    from onnx.external_data_helper import _get_initializer_tensors, set_external_data

    for tensor in _get_initializer_tensors(model):
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= size_threshold:
            set_external_data(tensor, location)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
