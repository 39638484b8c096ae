"""Layer micro-benchmarks: the tiny models compute the layer's shape in every form, and the JSON
cache answers a repeated question without timing anything (a fake timer counts the timings)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_lowrank.forms import DENSE, Form, LayerGeometry
from onnx_lowrank.latency import CACHE_FILE, LayerLatency, cache_key, latency_for, layer_model
from onnx_lowrank.options import Options

CONV = LayerGeometry("conv", (2, 16, 9, 9), (8, 16, 3, 3), strides=(2, 2), pads=(1, 0, 1, 1))
MATMUL = LayerGeometry("matmul", (2, 5, 32), (32, 24))


class FakeTimer:
    """Counts timings; the 'latency' is the model's node count, so forms are told apart."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model, feeds):
        self.calls += 1
        return float(len(model.graph.node))


def test_a_cached_latency_costs_no_timing(tmp_path):
    timer = FakeTimer()
    latency = LayerLatency(cache_dir=tmp_path, timer=timer)
    assert latency(CONV, DENSE) == 1.0
    assert latency(CONV, Form("tucker2", (4, 4))) == 3.0
    assert latency(CONV, DENSE) == 1.0
    assert (timer.calls, latency.measured, latency.cache_hits) == (2, 2, 1)

    again = LayerLatency(cache_dir=tmp_path, timer=FakeTimer())     # a second run reads the file
    assert again(CONV, Form("tucker2", (4, 4))) == 3.0 and again(CONV, DENSE) == 1.0
    assert (again.timer.calls, again.cache_hits) == (0, 2)
    assert len(json.loads((tmp_path / CACHE_FILE).read_text())) == 2


def test_cache_key_holds_everything_that_decides_a_timing():
    base = cache_key("cpu", CONV, Form("tucker2", (4, 4)))
    assert base == cache_key("cpu", CONV, Form("tucker2", (4, 4)))
    others = [cache_key("cuda", CONV, Form("tucker2", (4, 4))),
              cache_key("cpu", CONV, Form("tucker2", (4, 8))),
              cache_key("cpu", CONV, Form("branched-tucker", (4, 4), 2)),
              cache_key("cpu", LayerGeometry("conv", (4, 16, 9, 9), (8, 16, 3, 3), (2, 2), (1, 0, 1, 1)), Form("tucker2", (4, 4))),
              cache_key("cpu", LayerGeometry("conv", (2, 16, 9, 9), (8, 16, 3, 3), (1, 1), (1, 0, 1, 1)), Form("tucker2", (4, 4))),
              cache_key("cpu", CONV, Form("tucker2", (4, 4)), threads=1)]
    assert len({base, *others}) == 1 + len(others)
    key = json.loads(base)
    assert key["batch"] == 2 and key["ort"] == ort.__version__ and key["ranks"] == [4, 4]


def test_an_unreadable_cache_is_an_empty_one(tmp_path):
    (tmp_path / CACHE_FILE).write_text("{not json")
    latency = LayerLatency(cache_dir=tmp_path, timer=FakeTimer())
    assert latency(MATMUL) == 1.0 and latency.measured == 1
    assert len(json.loads((tmp_path / CACHE_FILE).read_text())) == 1


@pytest.mark.parametrize("geometry, form", [
    (MATMUL, DENSE), (MATMUL, Form("svd", (6,))),
    (LayerGeometry("matmul", (24, 7), (12, 24), weight_first=True), Form("svd", (5,))),
    (CONV, DENSE), (CONV, Form("tucker2", (4, 6))), (CONV, Form("branched-tucker", (4, 6), 2)),
    (CONV, Form("spatial-svd", (5,))),
    (LayerGeometry("conv", (1, 16, 9, 9), (8, 16, 1, 1), strides=(2, 2)), Form("svd", (4,))),
    (LayerGeometry("conv", (1, 16, 9, 10), (8, 16, 3, 3), strides=(2, 1), auto_pad="SAME_UPPER"), Form("spatial-svd", (4,))),
])
def test_every_form_computes_the_layers_output_shape(geometry, form):
    dense = layer_model(geometry, DENSE)
    model = layer_model(geometry, form)
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(0).standard_normal(geometry.input_shape).astype(np.float32)
    shape = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].shape
    assert shape(model) == shape(dense)


def test_real_timing_returns_a_positive_figure_and_no_measure_means_no_latency(tmp_path):
    assert latency_for(Options(measure=False)) is None
    latency = latency_for(Options(measure=True, cache_dir=str(tmp_path)))
    assert latency(MATMUL) > 0 and latency.measured == 1
