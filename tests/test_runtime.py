"""runtime.py: provider chains and their options, never a silent CPU fall-back, generated and loaded
inputs. GPU providers are mocked at the boundary (the provider list ORT reports, the providers and
options a session is created with); the models themselves still run on ORT's CPU provider."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import onnxruntime
import pytest

from helpers import model_from_text
from onnx_lowrank import runtime
from onnx_lowrank.errors import InferenceError, OptionError, RuntimeUnavailableError
from onnx_lowrank import inputs
from onnx_lowrank.inputs import InputSpec
from onnx_lowrank.runtime import SessionConfig

ALL_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class FakeGpuOrt:
    """onnxruntime as seen on a GPU machine: the GPU providers are listed and (if `starts`) start.
    Sessions really run on the CPU provider; each session's requested providers are recorded."""

    def __init__(self, available=ALL_PROVIDERS, starts=True, failure_log: str = ""):
        self.available, self.starts, self.failure_log = list(available), starts, failure_log
        self.requests: list[list] = []
        self.SessionOptions = onnxruntime.SessionOptions
        self.GraphOptimizationLevel = onnxruntime.GraphOptimizationLevel
        self.OrtValue = onnxruntime.OrtValue

    def get_available_providers(self):
        return self.available

    def InferenceSession(self, source, sess_options=None, providers=None):
        self.requests.append(providers)
        session = onnxruntime.InferenceSession(source, sess_options=sess_options, providers=["CPUExecutionProvider"])
        if not self.starts:
            # what ORT does when a provider library does not load: native log, a Python print, fall back
            os.write(2, self.failure_log.encode())
            print("EP Error ... Falling back to ['CPUExecutionProvider'] and retrying.")
            return _ReportsProviders(session, ["CPUExecutionProvider"])
        return _ReportsProviders(session, [p[0] if isinstance(p, tuple) else p for p in providers])


class _ReportsProviders:
    def __init__(self, session, providers):
        self._session, self._providers = session, providers

    def get_providers(self):
        return self._providers

    def __getattr__(self, name):
        return getattr(self._session, name)


def fake_gpu(monkeypatch, **kwargs) -> FakeGpuOrt:
    fake = FakeGpuOrt(**kwargs)
    monkeypatch.setattr(runtime, "ort", lambda: fake)
    return fake


def tiny_model():
    return model_from_text("(float[N, 4] x) => (float[N, 3] y) { [fc] y = MatMul(x, W) }",
                           W=np.arange(12, dtype=np.float32).reshape(4, 3))


# --- provider chains ----------------------------------------------------------------------------

def test_cpu_chain_is_cpu_only(monkeypatch):
    fake_gpu(monkeypatch)
    assert runtime.provider_chain(SessionConfig()) == [("CPUExecutionProvider", {})]


def test_cuda_chain_passes_device_id_and_keeps_cpu_for_unsupported_nodes(monkeypatch):
    fake_gpu(monkeypatch)
    chain = runtime.provider_chain(SessionConfig(provider="cuda", device_id=1))
    assert chain == [("CUDAExecutionProvider", {"device_id": 1}), ("CPUExecutionProvider", {})]


def test_tensorrt_chain_carries_fp16_and_engine_cache_then_cuda_then_cpu(monkeypatch, tmp_path):
    fake_gpu(monkeypatch)
    cache = tmp_path / "engines"
    chain = runtime.provider_chain(SessionConfig(provider="tensorrt", device_id=2, trt_fp16=True,
                                                 trt_engine_cache=str(cache)))
    assert [name for name, _ in chain] == list(ALL_PROVIDERS)
    assert chain[0][1] == {"device_id": 2, "trt_fp16_enable": True, "trt_engine_cache_enable": True,
                           "trt_engine_cache_path": str(cache)}
    assert chain[1][1] == {"device_id": 2}


def test_unavailable_provider_names_what_to_install(monkeypatch):
    fake_gpu(monkeypatch, available=("CPUExecutionProvider",))
    with pytest.raises(RuntimeUnavailableError, match=r"TensorrtExecutionProvider is not available.*pip install"):
        runtime.provider_chain(SessionConfig(provider="tensorrt"))


def test_session_is_created_with_the_chain_and_engine_cache_dir(monkeypatch, tmp_path):
    fake = fake_gpu(monkeypatch)
    cache = tmp_path / "trt"
    session = runtime.make_session(tiny_model(), SessionConfig(provider="tensorrt", trt_engine_cache=str(cache)))
    assert fake.requests[0][0][0] == "TensorrtExecutionProvider"
    assert cache.is_dir()
    y = runtime.run(session, {"x": np.ones((2, 4), np.float32)})[0]
    np.testing.assert_array_equal(y, np.ones((2, 4), np.float32) @ np.arange(12, dtype=np.float32).reshape(4, 3))


def test_provider_that_fails_to_start_is_one_error_naming_the_missing_library(monkeypatch, capfd):
    log = ("\x1b[1;31m[E:onnxruntime:Default, provider_bridge_ort.cc:2458] Failed to load library "
           "libonnxruntime_providers_cuda.so with error: libcudnn.so.9: cannot open shared object file\x1b[m\n"
           "Failed to create CUDAExecutionProvider. Require cuDNN 9.* and CUDA 12.*. Please install ...\n")
    fake_gpu(monkeypatch, starts=False, failure_log=log)
    with pytest.raises(RuntimeUnavailableError) as info:
        runtime.make_session(tiny_model(), SessionConfig(provider="cuda"))
    message = str(info.value)
    assert "\n" not in message
    assert "libcudnn.so.9: cannot open shared object file" in message and "Require cuDNN 9.* and CUDA 12.*" in message
    assert "not replaced by CPU" in message
    captured = capfd.readouterr()
    assert "Failed to load library" not in captured.err + captured.out    # ORT's multi-line report is folded in


def test_real_gpu_request_never_yields_a_cpu_session():
    """On this machine ORT lists CUDA but cannot load it, so this raises; on a GPU machine the session
    runs on CUDA. Either way a session that silently runs on CPU is never returned."""
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("this ONNX Runtime has no CUDA provider")
    try:
        session = runtime.make_session(tiny_model(), SessionConfig(provider="cuda"))
    except RuntimeUnavailableError as exc:
        assert "CUDAExecutionProvider" in str(exc)
    else:
        assert session.get_providers()[0] == "CUDAExecutionProvider"


@pytest.mark.parametrize("settings, flag", [
    (dict(provider="cpu", trt_fp16=True), "--trt-fp16"),
    (dict(provider="cuda", trt_engine_cache="x"), "--trt-engine-cache"),
    (dict(provider="cpu", device_id=1), "--device-id"),
    (dict(provider="gpu"), "--provider"),
    (dict(threads=0), "--threads"),
])
def test_session_config_refuses_options_that_do_not_apply(settings, flag):
    with pytest.raises(OptionError, match=flag):
        SessionConfig(**settings)


def test_spinning_off_and_threads_reach_the_session_options():
    options = runtime.session_options(SessionConfig(threads=1, spinning=False, optimize=False))
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL


# --- generated inputs ---------------------------------------------------------------------------

def test_generated_inputs_cover_every_dtype():
    bf16 = np.dtype(ml_dtypes.bfloat16)
    specs = [InputSpec("f16", np.dtype(np.float16), [2, 3]), InputSpec("bf16", bf16, [2, 3]),
             InputSpec("flag", np.dtype(np.bool_), [50]), InputSpec("ids", np.dtype(np.int64), [1000]),
             InputSpec("attention_mask", np.dtype(np.int64), [4])]
    feeds = inputs.generate_inputs(specs, {s.name: s.shape for s in specs}, seed=0, int_range=(5, 9))
    assert feeds["f16"].dtype == np.float16 and feeds["bf16"].dtype == bf16
    assert feeds["flag"].dtype == np.bool_ and 0 < feeds["flag"].sum() < 50
    assert feeds["ids"].min() == 5 and feeds["ids"].max() == 8          # half-open [5, 9)
    np.testing.assert_array_equal(feeds["attention_mask"], np.ones(4, np.int64))


def test_int_range_that_does_not_fit_the_dtype_is_refused():
    with pytest.raises(OptionError, match="does not fit input 'ids'"):
        inputs.generate_inputs([InputSpec("ids", np.dtype(np.uint8), [3])], {"ids": [3]}, int_range=(0, 1000))


@pytest.mark.parametrize("text, expected", [("0:25", (0, 25)), ("-3:7", (-3, 7))])
def test_parse_int_range(text, expected):
    assert inputs.parse_int_range(text) == expected


@pytest.mark.parametrize("text", ["5", "9:9", "a:b", "10:2"])
def test_parse_int_range_refuses(text):
    with pytest.raises(OptionError, match="--int-range"):
        inputs.parse_int_range(text)


def test_bfloat16_inputs_run_through_ort_values():
    model = model_from_text("(bfloat16[2, 3] x) => (float[2, 3] y) { y = Cast<to = 1>(x) }")
    session = runtime.make_session(model, SessionConfig())
    x = np.array([[1.5, -2.0, 3.25], [0.0, 8.0, -0.5]], np.float32)
    (y,) = runtime.run(session, {"x": x.astype(ml_dtypes.bfloat16)})
    np.testing.assert_array_equal(y, x)     # all exactly representable in bfloat16
    assert runtime.input_specs(session)[0].dtype == np.dtype(ml_dtypes.bfloat16)


# --- inputs from a file -------------------------------------------------------------------------

SPECS = [InputSpec("x", np.dtype(np.float32), ["batch", 4]), InputSpec("ids", np.dtype(np.int64), ["batch"])]


def test_npz_leading_axis_is_samples_and_dtypes_are_cast_within_kind(tmp_path):
    path = tmp_path / "in.npz"
    np.savez(path, x=np.ones((3, 2, 4)), ids=np.zeros((3, 2), np.int32), label=np.arange(3))
    samples, notes = inputs.load_samples(path, SPECS)
    assert len(samples) == 3
    assert samples[0]["x"].shape == (2, 4) and samples[0]["x"].dtype == np.float32
    assert samples[2]["ids"].dtype == np.int64
    assert any("label" in note for note in notes)        # extra arrays are named, not silently dropped


def test_npz_array_of_the_inputs_own_rank_is_one_sample(tmp_path):
    path = tmp_path / "batch.npz"
    np.savez(path, x=np.ones((5, 4), np.float32), ids=np.zeros(5, np.int64))
    samples, notes = inputs.load_samples(path, SPECS)
    assert len(samples) == 1 and samples[0]["x"].shape == (5, 4)
    assert any("one sample" in note for note in notes)


@pytest.mark.parametrize("arrays, message", [
    (dict(x=np.ones((3, 2, 4), np.float32)), "no array for input 'ids'"),
    (dict(x=np.ones((3, 2, 4), np.float32), ids=np.zeros((3, 2), np.float32)), "'ids' is float32"),
    (dict(x=np.ones((3, 2, 5), np.float32), ids=np.zeros((3, 2), np.int64)), "does not fit"),
    (dict(x=np.ones((3, 2, 4), np.float32), ids=np.zeros((4, 2), np.int64)), "different sample counts"),
    (dict(x=np.ones((3, 2, 4, 1), np.float32), ids=np.zeros((3, 2), np.int64)), "expected \\[samples"),
])
def test_npz_that_does_not_fit_the_model_is_one_clear_error(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(OptionError, match=message):
        inputs.load_samples(path, SPECS)


def test_inputs_file_that_is_not_an_npz(tmp_path):
    (tmp_path / "x.npz").write_text("not a zip")
    np.save(tmp_path / "a.npy", np.ones(3))
    for path in (tmp_path / "x.npz", tmp_path / "a.npy", tmp_path / "missing.npz"):
        with pytest.raises(OptionError, match="--inputs"):
            inputs.load_samples(path, SPECS)


def test_run_failure_is_one_line():
    session = runtime.make_session(tiny_model(), SessionConfig())
    with pytest.raises(InferenceError, match="failed to run"):
        runtime.run(session, {"x": np.ones((2, 5), np.float32)})
