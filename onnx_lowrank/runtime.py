"""ONNX Runtime, touched in one place: sessions, providers, thread settings, inputs, errors.

validate, bench, optimize's parity check and (later) calibration all come through here, so a
provider choice or a thread setting is written once.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from .errors import InferenceError, OptionError, RuntimeUnavailableError, first_line
from .inputs import (DEFAULT_INT_RANGE, InputHint, InputSpec, candidate_shapes, describe_shapes, generate_inputs,
                     load_samples)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
INSTALL_HINT = ("ONNX Runtime is not installed: pip install 'onnx-lowrank[cpu]' (CPU only) "
                "or 'onnx-lowrank[gpu]' (CUDA, TensorRT and CPU)")
GPU_INSTALL_HINT = {
    "cuda": "pip install 'onnx-lowrank[gpu]' (onnxruntime-gpu) and the CUDA and cuDNN versions it was built for",
    "tensorrt": "pip install 'onnx-lowrank[gpu]' (onnxruntime-gpu) and the CUDA, cuDNN and TensorRT versions "
                "it was built for",
}


def ort_version() -> str:
    try:
        return ort().__version__
    except RuntimeUnavailableError:
        return "none"


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
    prepack: bool = True                 # off for sessions that run a few batches (calibration,
                                         # parity): packed weight copies would hold them twice
    arena: bool = True                   # off for those too: ORT's CPU arena keeps the peak of
                                         # every run's tensors (a capture's run them all) for good
    device_id: int = 0                   # GPU ordinal for cuda / tensorrt
    trt_fp16: bool = False               # let TensorRT pick fp16 kernels
    trt_engine_cache: str | None = None  # directory where TensorRT keeps built engines between runs
    profile_prefix: str | None = None    # ORT profiling on, trace written to PREFIX_<timestamp>.json
    provider_options: dict[str, Any] = field(default_factory=dict)   # raw extras for the chosen provider

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise OptionError(f"--provider: unknown provider {self.provider!r}; choose from {', '.join(PROVIDERS)}")
        if self.threads is not None and (int(self.threads) != self.threads or self.threads < 1):
            raise OptionError(f"--threads must be a positive integer, got {self.threads}")
        if self.provider == "cpu" and self.device_id:
            raise OptionError("--device-id applies to --provider cuda or tensorrt, not cpu")
        if self.device_id < 0:
            raise OptionError(f"--device-id must be >= 0, got {self.device_id}")
        if self.provider != "tensorrt" and (self.trt_fp16 or self.trt_engine_cache):
            raise OptionError("--trt-fp16 and --trt-engine-cache apply to --provider tensorrt only")

    def describe(self) -> str:
        parts = [self.provider]
        if self.provider != "cpu":
            parts.append(f"device {self.device_id}")
        if self.trt_fp16:
            parts.append("fp16")
        parts.append(f"{self.threads} threads" if self.threads else "ORT default threads")
        return ", ".join(parts)


def provider_chain(config: SessionConfig) -> list[tuple[str, dict[str, Any]]]:
    """The (provider, options) list for InferenceSession, or a one-line error naming what to install.

    A GPU provider is followed by the CPU provider for the nodes it has no kernel for (ORT would
    add it anyway); TensorRT is followed by CUDA too, for the subgraphs TensorRT does not take,
    which is how ORT's TensorRT documentation sets it up.
    """
    name = PROVIDERS[config.provider]
    available = ort().get_available_providers()
    if name not in available:
        raise RuntimeUnavailableError(f"execution provider {name} is not available in this ONNX Runtime "
                                      f"(available: {', '.join(available)}); {GPU_INSTALL_HINT[config.provider]}")
    if config.provider == "cpu":
        return [("CPUExecutionProvider", dict(config.provider_options))]
    cpu = ("CPUExecutionProvider", {})
    cuda = ("CUDAExecutionProvider", {"device_id": config.device_id})
    if config.provider == "cuda":
        return [("CUDAExecutionProvider", {**cuda[1], **config.provider_options}), cpu]
    trt: dict[str, Any] = {"device_id": config.device_id, "trt_fp16_enable": config.trt_fp16}
    if config.trt_engine_cache:
        trt.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(config.trt_engine_cache))
    trt.update(config.provider_options)
    chain = [("TensorrtExecutionProvider", trt)]
    if "CUDAExecutionProvider" in available:
        chain.append(cuda)
    return chain + [cpu]


def session_options(config: SessionConfig):
    rt = ort()
    options = rt.SessionOptions()
    options.log_severity_level = 4   # fatal only: errors reach the user as our one line, not ORT's log
    options.graph_optimization_level = (rt.GraphOptimizationLevel.ORT_ENABLE_ALL if config.optimize
                                         else rt.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if config.threads:
        options.intra_op_num_threads = config.threads
    if not config.spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if not config.prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if not config.arena:
        options.enable_cpu_mem_arena = False
    if config.profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = config.profile_prefix
    return options


def make_session(model: onnx.ModelProto | str | os.PathLike, config: SessionConfig):
    rt = ort()
    options = session_options(config)
    chain = provider_chain(config)
    if config.trt_engine_cache:
        Path(config.trt_engine_cache).mkdir(parents=True, exist_ok=True)
    gpu = config.provider != "cpu"
    log: list[str] = []
    try:
        with _model_source(model) as (source, folder), (_captured_output(log) if gpu else contextlib.nullcontext()):
            if folder:   # weights still in the input's data file: ORT reads them from there
                options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
            session = rt.InferenceSession(source, sess_options=options, providers=chain)
    except Exception as exc:  # ORT raises its own exception types, not importable portably
        reason = _provider_failure(log[0]) if gpu and log else None
        raise InferenceError(f"ONNX Runtime cannot load the model on {config.provider}: "
                             f"{reason or first_line(exc)}") from None
    wanted = PROVIDERS[config.provider]
    if wanted not in session.get_providers():
        # ORT falls back to CPU when a GPU provider fails to initialise; we never do, so a figure
        # is never reported for a provider it was not measured on.
        reason = _provider_failure(log[0]) if log else None
        raise RuntimeUnavailableError(
            f"execution provider {wanted} failed to initialise ({reason or 'ONNX Runtime gave no reason'}) "
            f"and is not replaced by CPU: {GPU_INSTALL_HINT[config.provider]}, or use --provider cpu")
    if log and log[0].strip():
        sys.stderr.write(log[0])   # a provider that did start may still have warned
    return session


@contextlib.contextmanager
def _captured_output(sink: list[str]):
    """Capture what ORT writes while a GPU provider starts: a provider that fails to load is
    reported over several lines of native log (stderr) and a Python print (stdout), and then ORT
    falls back to CPU. We turn that into one line naming the reason."""
    python_out = io.StringIO()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as native:
        os.dup2(native.fileno(), 1)
        os.dup2(native.fileno(), 2)
        try:
            with contextlib.redirect_stdout(python_out):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            native.seek(0)
            sink.append(native.read().decode(errors="replace") + python_out.getvalue())


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _provider_failure(log: str) -> str | None:
    """The informative part of ORT's provider-failure log: the library that did not load, and the
    versions ORT says it needs."""
    log = _ANSI.sub("", log)
    parts = []
    missing = re.search(r"with error: ([^\n]+)", log)
    if missing:
        parts.append(missing.group(1).strip())
    needs = re.search(r"(Require [^.\n]+(?:\.\*[^.\n]*)*)", log)
    if needs:
        parts.append(needs.group(1).strip().rstrip("."))
    if not parts:
        lines = [line.strip() for line in log.splitlines() if line.strip() and not set(line.strip()) <= {"*"}]
        parts = lines[:1]
    return "; ".join(parts)[:400] or None


def end_profiling(session) -> Path:
    """Stop ORT's profiler and return the trace it wrote (Chrome trace-event JSON)."""
    return Path(session.end_profiling())


#: Above this size a model reaches ONNX Runtime as a file (streamed, io.save_model) rather than
#: as bytes: the bytes would be one more copy of the weights beside the model and the session.
_BYTES_LIMIT = 64 * 2**20


class _model_source:
    """(bytes, folder of external data still to read) for a small model; (a temporary file, None)
    for a larger one."""

    def __init__(self, model):
        self.model, self.tmpdir = model, None

    def __enter__(self):
        from .graph import external_folder, for_runtime, resident_size
        from .io import save_model

        if not isinstance(self.model, onnx.ModelProto):
            return str(self.model), None
        if resident_size(self.model) < _BYTES_LIMIT:
            # weights still in the input's data file stay there, and ORT is told the folder
            folder = external_folder(self.model)
            return (for_runtime(self.model) if folder else self.model).SerializeToString(), folder
        self.tmpdir = tempfile.TemporaryDirectory(prefix="onnx-lowrank-")
        path = Path(self.tmpdir.name) / "model.onnx"
        save_model(self.model, path, external_data=True)   # keeps self.model whole
        return str(path), None

    def __exit__(self, *exc):
        if self.tmpdir is not None:
            self.tmpdir.cleanup()


def prepare_feeds(feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Feeds as ORT takes them: numpy has no bfloat16, so ORT's numpy path refuses ml_dtypes'
    bfloat16 arrays; those go in as OrtValues typed from their raw 16-bit words."""
    prepared: dict[str, Any] = {}
    for name, value in feeds.items():
        if value.dtype.name == "bfloat16":
            prepared[name] = ort().OrtValue.ortvalue_from_numpy_with_onnx_type(
                np.ascontiguousarray(value).view(np.uint16), onnx.TensorProto.BFLOAT16)
        else:
            prepared[name] = value
    return prepared


def run(session, feeds: dict[str, Any]) -> list[np.ndarray]:
    try:
        return session.run(None, prepare_feeds(feeds))
    except Exception as exc:
        raise InferenceError(f"ONNX Runtime failed to run the model: {first_line(exc)}") from None


def runner(session, feeds: dict[str, np.ndarray]) -> Callable[[], list]:
    """One inference as a zero-argument call, for timing: the feeds are converted once and no Python
    work wraps ORT's call. A first, checked run turns a model that cannot run on these inputs into
    one InferenceError before any timing starts."""
    run(session, feeds)
    return functools.partial(session.run, None, prepare_feeds(feeds))


# --- inputs (what to feed is inputs.py's; here, what a session takes and what it runs on) --------

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
            import ml_dtypes   # installed with onnx
            dtype = np.dtype(ml_dtypes.bfloat16)
        elif arg.type in _ORT_TYPES:
            dtype = np.dtype(_ORT_TYPES[arg.type])
        else:
            raise InferenceError(f"input '{arg.name}' has type {arg.type}, which generated inputs do not cover; "
                                 "pass --inputs FILE.npz")
        specs.append(InputSpec(arg.name, dtype, [d if isinstance(d, int) and d >= 0 else (d or None) for d in arg.shape]))
    return specs




def model_inputs(session, *, inputs: str | os.PathLike | None = None, shapes: dict[str, list[int]] | None = None,
                 batch: int = 1, seed: int = 0, int_range: tuple[int, int] = DEFAULT_INT_RANGE,
                 hints: dict[str, InputHint] | None = None) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """The samples to run a session's model on, and notes on how they were made: the arrays of the
    .npz file `inputs`, or one generated sample that the model runs on (runnable_inputs)."""
    specs = input_specs(session)
    if inputs is not None:
        if shapes:
            raise OptionError("--shape and --inputs: the arrays in the file fix the input shapes; give one")
        return load_samples(inputs, specs)
    feeds, _, notes = runnable_inputs(session, shapes=shapes, batch=batch, seed=seed, int_range=int_range,
                                      hints=hints)
    return [feeds], notes


def runnable_inputs(session, *, shapes: dict[str, list[int]] | None = None, batch: int = 1, seed: int = 0,
                    int_range: tuple[int, int] = DEFAULT_INT_RANGE, hints: dict[str, InputHint] | None = None
                    ) -> tuple[dict[str, np.ndarray], list[np.ndarray], list[str]]:
    """Generated inputs the session's model runs on, its outputs on them, and notes on the dims
    filled in: the default sizes first, then inputs.candidate_shapes' next candidates, one run
    each. None runs: one InferenceError naming the first failure, the sizes tried and --shape."""
    specs = input_specs(session)
    tried, first_error = [], None
    for concrete, notes in candidate_shapes(specs, shapes or {}, batch):
        feeds = generate_inputs(specs, concrete, seed, int_range, hints)
        try:
            outputs = run(session, feeds)
        except InferenceError as exc:
            first_error = first_error or str(exc)
            tried.append(describe_shapes({n: s for n, s in concrete.items() if n in _filled(notes)}))
            if not any(n.startswith("input '") for n in notes):
                break   # nothing was filled in: no other size to try
            continue
        if tried:
            notes = [*notes, f"the model refused the first generated sizes ({'; '.join(tried)}); ran at "
                             f"{describe_shapes(concrete)}"]
        return feeds, outputs, notes
    sizes = f"; generated inputs tried at {' | '.join(tried)}" if any(tried) else ""
    raise InferenceError(f"{first_error}{sizes}; give the input sizes with --shape NAME:D1,D2,... "
                         "(or real samples: --inputs / --calibration FILE.npz)")


def _filled(notes: list[str]) -> set[str]:
    """The inputs whose dims resolve_shapes filled in, from its notes."""
    return {n.split("'")[1] for n in notes if n.startswith("input '")}
