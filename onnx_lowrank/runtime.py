"""ONNX Runtime, touched in one place: sessions, providers, thread settings, inputs, errors.

validate, bench, optimize's parity check and (later) calibration all come through here, so a
provider choice or a thread setting is written once.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .errors import InferenceError, OptionError, RuntimeUnavailableError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
INSTALL_HINT = ("ONNX Runtime is not installed: pip install 'onnx-lowrank[cpu]' (CPU only) "
                "or 'onnx-lowrank[gpu]' (CUDA, TensorRT and CPU)")
DEFAULT_DYNAMIC_DIM = 16
DEFAULT_INT_RANGE = (0, 25)
_PROTO_LIMIT = 2**31 - 1


def ort():
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeUnavailableError(INSTALL_HINT) from None
    return onnxruntime


@dataclass
class SessionConfig:
    provider: str = "cpu"
    threads: int | None = None           # intra-op threads; None lets ORT choose
    optimize: bool = True                # ORT graph optimizations (off for parity: compare our rewrite,
                                         # not the runtime's fusions)
    spinning: bool = True                # off when two sessions alternate on few cores
    provider_options: dict[str, Any] = field(default_factory=dict)


def provider_chain(config: SessionConfig) -> list:
    """The provider list for InferenceSession, or a one-line error naming what to install."""
    if config.provider not in PROVIDERS:
        raise OptionError(f"--provider: unknown provider {config.provider!r}; choose from {', '.join(PROVIDERS)}")
    name = PROVIDERS[config.provider]
    available = ort().get_available_providers()
    if name not in available:
        hint = ("install onnxruntime-gpu (pip install 'onnx-lowrank[gpu]') with a matching CUDA"
                + (" and TensorRT" if config.provider == "tensorrt" else ""))
        raise RuntimeUnavailableError(f"execution provider {name} is not available in this ONNX Runtime "
                                      f"(available: {', '.join(available)}); {hint}")
    chain: list = [(name, dict(config.provider_options))] if config.provider_options else [name]
    if config.provider != "cpu":
        chain.append("CPUExecutionProvider")   # for the nodes the GPU provider does not take
    return chain


def make_session(model: onnx.ModelProto | str | os.PathLike, config: SessionConfig):
    rt = ort()
    options = rt.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = (rt.GraphOptimizationLevel.ORT_ENABLE_ALL if config.optimize
                                        else rt.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if config.threads:
        options.intra_op_num_threads = config.threads
    if not config.spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    chain = provider_chain(config)
    try:
        with _model_source(model) as source:
            session = rt.InferenceSession(source, sess_options=options, providers=chain)
    except Exception as exc:  # ORT raises its own exception types, not importable portably
        raise InferenceError(f"ONNX Runtime cannot load the model: {_first_line(exc)}") from None
    wanted = PROVIDERS[config.provider]
    if wanted not in session.get_providers():
        # ORT falls back to CPU silently when a GPU provider fails to initialise; we never do.
        raise RuntimeUnavailableError(f"execution provider {wanted} failed to initialise "
                                      f"(ONNX Runtime fell back to {', '.join(session.get_providers())}); "
                                      "check the CUDA/TensorRT installation")
    return session


class _model_source:
    """Bytes for a model under the protobuf limit; a temporary file for a larger one."""

    def __init__(self, model):
        self.model, self.tmpdir = model, None

    def __enter__(self):
        if not isinstance(self.model, onnx.ModelProto):
            return str(self.model)
        if self.model.ByteSize() < _PROTO_LIMIT:
            return self.model.SerializeToString()
        self.tmpdir = tempfile.TemporaryDirectory(prefix="onnx-lowrank-")
        path = Path(self.tmpdir.name) / "model.onnx"
        onnx.save_model(self.model, str(path), save_as_external_data=True, location="model.onnx.data")
        return str(path)

    def __exit__(self, *exc):
        if self.tmpdir is not None:
            self.tmpdir.cleanup()


def run(session, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return session.run(None, feeds)
    except Exception as exc:
        raise InferenceError(f"ONNX Runtime failed to run the model: {_first_line(exc)}") from None


# --- inputs -------------------------------------------------------------------------------------

@dataclass
class InputSpec:
    name: str
    dtype: np.dtype
    shape: list[int | str | None]     # ints, symbolic names, or None for unknown


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint64)": np.uint64, "tensor(uint32)": np.uint32, "tensor(uint16)": np.uint16,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def input_specs(session) -> list[InputSpec]:
    specs = []
    for arg in session.get_inputs():
        if arg.type == "tensor(bfloat16)":
            import ml_dtypes
            dtype = np.dtype(ml_dtypes.bfloat16)
        elif arg.type in _ORT_TYPES:
            dtype = np.dtype(_ORT_TYPES[arg.type])
        else:
            raise InferenceError(f"input '{arg.name}' has type {arg.type}, which generated inputs do not cover; "
                                 "pass --inputs FILE.npz")
        specs.append(InputSpec(arg.name, dtype, [d if isinstance(d, int) and d >= 0 else (d or None) for d in arg.shape]))
    return specs


def resolve_shapes(specs: list[InputSpec], overrides: dict[str, list[int]], batch: int = 1
                   ) -> tuple[dict[str, list[int]], list[str]]:
    """Concrete shapes for every input, and one note per dynamic dim that was filled in.

    Dynamic dims are never pinned silently: the first axis gets `batch`, any other DEFAULT_DYNAMIC_DIM,
    and each substitution is reported so the user can override it with --shape.
    """
    unknown = sorted(set(overrides) - {s.name for s in specs})
    if unknown:
        raise OptionError(f"--shape: the model has no input named {', '.join(map(repr, unknown))} "
                          f"(inputs: {', '.join(s.name for s in specs)})")
    shapes, notes = {}, []
    for spec in specs:
        if spec.name in overrides:
            shape = overrides[spec.name]
            if len(shape) != len(spec.shape) or any(isinstance(d, int) and d != v for d, v in zip(spec.shape, shape)):
                raise OptionError(f"--shape {spec.name}:{','.join(map(str, shape))} does not fit the model's "
                                  f"input shape {_format_shape(spec.shape)}")
            shapes[spec.name] = list(shape)
            continue
        shape = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                shape.append(dim)
                continue
            value = batch if axis == 0 else DEFAULT_DYNAMIC_DIM
            shape.append(value)
            notes.append(f"input '{spec.name}' axis {axis} ({dim or '?'}) set to {value}")
        shapes[spec.name] = shape
    if notes:
        notes.append("override with --shape NAME:D1,D2,...")
    return shapes, notes


def generate_inputs(specs: list[InputSpec], shapes: dict[str, list[int]], seed: int = 0,
                    int_range: tuple[int, int] = DEFAULT_INT_RANGE) -> dict[str, np.ndarray]:
    """Floats ~ N(0, 1); integers uniform in [lo, hi); bools fair coins; inputs named like a mask
    are all ones (a random attention mask is not an input a model is ever served)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = shapes[spec.name]
        kind = spec.dtype.kind
        if kind == "b":
            feeds[spec.name] = rng.random(shape) < 0.5
        elif kind in "iu":
            if "mask" in spec.name.lower():
                feeds[spec.name] = np.ones(shape, dtype=spec.dtype)
            else:
                feeds[spec.name] = rng.integers(int_range[0], int_range[1], size=shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


def _format_shape(shape) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:300]

