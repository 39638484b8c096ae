"""benchmarks/llama_decoder.py at a tiny size: the graph computes a Llama decoder (against a numpy
reference with HF's repeat_kv grouped-query attention), its weights are in one external data
file, and default `onnx-lowrank optimize` rewrites it end to end: exit 0, an output with external
data that ONNX Runtime loads, the same logits.

The tiny model's MatMul weights have rank 8, so the default tolerance decomposes them (break-even
of a 64 x 64 weight is 32) and the rewrite, its save with external data and the parity check all
run; a rank-8 weight's truncation at rank 8 is exact, so outputs match to float32 rounding."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from benchmarks.llama_decoder import LlamaConfig, build, write_calibration
from helpers import run_cli

TINY = LlamaConfig(hidden=64, layers=2, ffn=192, heads=4, kv_heads=2, vocab=256, max_positions=64, weight_rank=8)


def reference_logits(path: Path, c: LlamaConfig, ids: np.ndarray) -> np.ndarray:
    """HF Llama's forward in float64 numpy, from the model's own initializers."""
    w = {t.name: numpy_helper.to_array(t, base_dir=str(path.parent)).astype(np.float64)
         for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    hd, group = c.head_dim, c.heads // c.kv_heads
    batch, seq = ids.shape
    cos, sin = w["cos_table"][:seq], w["sin_table"][:seq]

    def rms(x, name):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + c.eps) * w[f"{name}.weight"]

    def rope(x):
        return x * cos + np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin

    def heads(x, n):
        return x.reshape(batch, seq, n, hd).transpose(0, 2, 1, 3)

    x = w["embed_tokens.weight"][ids]
    for i in range(c.layers):
        p = f"layers.{i}"
        n = rms(x, f"{p}.input_layernorm")
        q = rope(heads(n @ w[f"{p}.self_attn.q_proj.weight"], c.heads))
        k = rope(np.repeat(heads(n @ w[f"{p}.self_attn.k_proj.weight"], c.kv_heads), group, axis=1))
        v = np.repeat(heads(n @ w[f"{p}.self_attn.v_proj.weight"], c.kv_heads), group, axis=1)
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + np.triu(np.full((seq, seq), -np.inf), 1)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, c.hidden) @ w[f"{p}.self_attn.o_proj.weight"]
        n = rms(x, f"{p}.post_attention_layernorm")
        gate = n @ w[f"{p}.mlp.gate_proj.weight"]
        x = x + (gate / (1 + np.exp(-gate)) * (n @ w[f"{p}.mlp.up_proj.weight"])) @ w[f"{p}.mlp.down_proj.weight"]
    return rms(x, "norm") @ w["lm_head.weight"]


def logits(path: Path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids})[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("llama"), TINY)


def test_tiny_decoder_is_a_llama_with_external_data(tiny):
    model = onnx.load(str(tiny), load_external_data=False)
    assert (model.ir_version, model.opset_import[0].version) == (8, 17)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"model.onnx.data"}
    # 1 KiB and more: the cos / sin tables, embed_tokens, lm_head and 7 MatMuls a layer (a 256 B norm stays inline)
    assert len(external) == 2 + 2 + 7 * TINY.layers
    ids = np.random.default_rng(0).integers(0, TINY.vocab, size=(2, 12))
    # float32 ORT against float64 numpy through 2 layers: logits of size ~1 agree to ~1e-6
    np.testing.assert_allclose(logits(tiny, ids), reference_logits(tiny, TINY, ids), atol=1e-4)
    # dynamic batch and sequence; causal: later tokens never move earlier logits
    changed = ids.copy()
    changed[:, 8:] = (changed[:, 8:] + 1) % TINY.vocab
    np.testing.assert_allclose(logits(tiny, changed)[:, :8], logits(tiny, ids)[:, :8], atol=1e-5)
    assert logits(tiny, ids[:1, :5]).shape == (1, 5, TINY.vocab)


def test_default_optimize_rewrites_the_tiny_decoder_end_to_end(tiny, tmp_path, capsys):
    out = tmp_path / "optimized.onnx"
    code, stdout, stderr = run_cli(capsys, "optimize", tiny, out)
    assert code == 0, stdout + stderr
    assert "decomposed 15 of 15 candidate layers" in stdout
    assert (tmp_path / "optimized.onnx.data").is_file()   # external in, external out
    ids = np.random.default_rng(1).integers(0, TINY.vocab, size=(1, 16))
    # rank-8 weights kept at rank 8: the factors reproduce them to float32 rounding
    np.testing.assert_allclose(logits(out, ids), logits(tiny, ids), atol=1e-4)


def test_calibration_file_holds_token_ids_for_the_input(tmp_path):
    path = write_calibration(tmp_path / "calib.npz", vocab=256, samples=4, tokens=8)
    with np.load(path) as data:
        assert list(data) == ["input_ids"]
        ids = data["input_ids"]
    assert ids.shape == (4, 8) and ids.dtype == np.int64 and 0 <= ids.min() and ids.max() < 256
