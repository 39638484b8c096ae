"""Mutated models (issue 4): a few hundred seeded mutations of valid models, each of which must end
as a correct model or a clean one-line error — never a traceback, a hang or a corrupted output."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import model_from_text

from models.synthetic import low_rank_conv_weight, low_rank_matrix
from onnx_lowrank.cli import main

CASES_PER_MODEL = 100
SECONDS_PER_CASE = 60


def _base_models() -> dict[str, onnx.ModelProto]:
    rng = np.random.default_rng(0)
    return {
        "mlp": model_from_text("""(float[N, 32] x) => (float[N, 16] y) {
            [fc1] h = MatMul(x, W1)
            a = Add(h, B1)
            r = Relu(a)
            [fc2] y = Gemm<transB=1, alpha=0.5>(r, W2, B2)
        }""", W1=low_rank_matrix(rng, 32, 48, 4, noise=0), B1=rng.standard_normal(48).astype(np.float32),
            W2=low_rank_matrix(rng, 16, 48, 4, noise=0), B2=rng.standard_normal(16).astype(np.float32)),
        "cnn": model_from_text("""(float[N, 16, 6, 6] x) => (float[N, 16, 6, 6] y) {
            [c1] h = Conv<pads=[1,1,1,1]>(x, K1, B)
            r = Relu(h)
            [c2] y = Conv(r, K2)
        }""", K1=low_rank_conv_weight(rng, 16, 16, 3, (4, 4), noise=0), B=rng.standard_normal(16).astype(np.float32),
            K2=low_rank_matrix(rng, 16, 16, 2, noise=0).reshape(16, 16, 1, 1)),
    }


def _mutate(model: onnx.ModelProto, rng: np.random.Generator) -> bytes:
    kind = rng.integers(0, 7)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    if kind == 0:        # flip bytes
        data = bytearray(m.SerializeToString())
        for i in rng.integers(0, len(data), size=rng.integers(1, 8)):
            data[i] ^= 1 << int(rng.integers(0, 8))
        return bytes(data)
    if kind == 1:        # truncate
        data = m.SerializeToString()
        return data[: int(rng.integers(1, len(data)))]
    if kind == 2 and len(g.node):        # drop a node
        del g.node[int(rng.integers(0, len(g.node)))]
    elif kind == 3 and len(g.initializer):   # cut an initializer
        del g.initializer[int(rng.integers(0, len(g.initializer)))]
    elif kind == 4 and len(g.initializer):   # change a weight's dims, data unchanged
        t = g.initializer[int(rng.integers(0, len(g.initializer)))]
        if t.dims:
            t.dims[int(rng.integers(0, len(t.dims)))] = int(rng.integers(0, 70))
    elif kind == 5:      # change an input dim
        dims = g.input[0].type.tensor_type.shape.dim
        d = dims[int(rng.integers(0, len(dims)))]
        d.Clear()
        if rng.random() < 0.5:
            d.dim_value = int(rng.integers(0, 70))
        else:
            d.dim_param = "free"
    else:                # rewire a node input
        node = g.node[int(rng.integers(0, len(g.node)))]
        names = [i.name for i in g.input] + [t.name for t in g.initializer] + [o for n in g.node for o in n.output]
        if node.input:
            node.input[int(rng.integers(0, len(node.input)))] = names[int(rng.integers(0, len(names)))]
    return m.SerializeToString()


@contextmanager
def _deadline(seconds: int):
    def fail(*_):
        raise TimeoutError(f"hung for more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_mutated_models_end_cleanly(tmp_path, capsys, name):
    base = _base_models()[name]
    rng = np.random.default_rng(1234)
    outcomes = {"optimized": 0, "refused": 0, "parity failed": 0}
    for case in range(CASES_PER_MODEL):
        src, out = tmp_path / f"in{case}.onnx", tmp_path / f"out{case}.onnx"
        data = _mutate(base, rng)
        src.write_bytes(data)
        with _deadline(SECONDS_PER_CASE):
            code = main(["optimize", "-q", str(src), str(out)])
        err = capsys.readouterr().err
        context = f"case {case}: exit {code}, stderr {err!r}"
        assert src.read_bytes() == data, context
        assert "Traceback" not in err, context
        if code == 0:
            onnx.checker.check_model(str(out))
            ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            outcomes["optimized"] += 1
        else:
            assert code in (1, 2), context
            assert len(err.strip().splitlines()) == 1 and err.startswith("onnx-lowrank:"), context
            assert not out.exists(), context
            outcomes["refused" if code == 2 else "parity failed"] += 1
        assert not [p for p in Path(tmp_path).iterdir() if p.name.startswith(".")], context
    # the mutations must exercise both ends, or the test proves nothing
    assert outcomes["optimized"] >= 5 and outcomes["refused"] >= 20, outcomes
