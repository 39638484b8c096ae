"""Errors a user can cause. The CLI catches these once and prints one line; anything else is a bug."""


class LowRankError(Exception):
    """Base class: a problem with the user's input, options or environment (exit code 2)."""

    exit_code = 2


class ModelLoadError(LowRankError):
    """The input is not a readable, valid ONNX model."""


class OptionError(LowRankError):
    """An option value is out of range or malformed."""


class OutputError(LowRankError):
    """The output cannot be written where asked."""


class RuntimeUnavailableError(LowRankError):
    """ONNX Runtime, or the requested execution provider, is not installed."""


class MissingDependencyError(LowRankError):
    """An optional extra the requested feature needs is not installed (--refine: torch)."""


class InferenceError(LowRankError):
    """ONNX Runtime refused to load or run a model."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (ORT's and protobuf's run to many), for our one line."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
