"""Loading and saving models: every way a file can be wrong becomes one clear ModelLoadError or
OutputError, and outputs are written atomically so a failure never leaves a half-written file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import ModelLoadError, OutputError

PROTOBUF_LIMIT = 2**31 - 1


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
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
    _load_external_data(model, path)
    return model


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    base = path.parent
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if location is None or not (base / location).is_file():
            raise ModelLoadError(f"external data file '{location}' for tensor '{tensor.name}' "
                                 f"is missing (expected next to '{path}')")
    try:
        onnx.load_external_data_for_model(model, str(base))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelLoadError(f"cannot read external data of '{path}': {_first_line(exc)}") from None


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


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write atomically: serialize into a temporary file beside the target, then rename over it."""
    path = Path(path)
    data = model.SerializeToString()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write '{path}': {exc.strerror}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
