"""A Llama-style decoder with random weights, built with onnx helpers and numpy (no torch), written
with external data as it is built: the builder holds one weight at a time, never the model.

Per layer: RMSNorm (Pow / ReduceMean / Add / Sqrt / Div / Mul) -> Q, K, V MatMuls (grouped-query
when kv_heads < heads) -> rotary embedding (cos / sin tables sliced to the sequence) -> causal
softmax attention (Trilu mask) -> O MatMul -> residual; RMSNorm -> SiLU-gated FFN (gate, up,
down MatMuls) -> residual. A vocab x hidden embedding (Gather) in front, a final RMSNorm and an
untied hidden x vocab lm_head MatMul at the end. No biases, fp32, opset 17, IR 8, inputs
`input_ids` [batch, seq], output `logits` [batch, seq, vocab].

The default shape, hidden 1280 / 24 layers / FFN 3584 (Llama's 8/3 x hidden rounded up to 256) /
20 heads of 64 / vocab 32000, has 570M parameters, a 2.28 GB file: past protobuf's 2 GB limit,
so only external data can hold it. Sizes, not weights, decide the tool's own cost, so random
weights measure it (and, near full rank, no layer pays at the default tolerance).

    python benchmarks/llama_decoder.py                      # benchmarks/.cache/llama_0p5b/{model.onnx,.data,calib.npz}
    python benchmarks/llama_decoder.py --out DIR --hidden 64 --layers 2 --ffn 192 --heads 4 --vocab 256

The file layout is what onnx.save(model, save_as_external_data=True, all_tensors_to_one_file=True,
size_threshold=1024) writes: tensors of 1 KiB or more back to back in one `model.onnx.data`, the
smaller ones inline. onnx.save cannot be used to write it here: it needs every tensor's bytes in
the ModelProto first, 2.3 GB in protobuf plus the serialization's copies.
"""

from __future__ import annotations

import argparse
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "benchmarks" / ".cache" / "llama_0p5b"
#: onnx.save's size_threshold: smaller tensors stay inline in the .onnx file
THRESHOLD = 1024


@dataclass(frozen=True)
class LlamaConfig:
    hidden: int = 1280
    layers: int = 24
    ffn: int = 3584
    heads: int = 20
    kv_heads: int = 20
    vocab: int = 32000
    max_positions: int = 2048
    rope_theta: float = 10000.0
    eps: float = 1e-5
    #: MatMul weights of this rank (a product of two random factors) instead of full rank: a model
    #: the tool decomposes at its default tolerance, for tests of the rewrite end to end
    weight_rank: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def parameters(self) -> int:
        kv = self.kv_heads * self.head_dim
        per_layer = 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.ffn + 2 * self.hidden
        return self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden

    def matrices(self) -> list[tuple[int, int]]:
        """The (k, n) shapes of every MatMul weight, the tool's candidates."""
        kv = self.kv_heads * self.head_dim
        layer = [(self.hidden, self.hidden), (self.hidden, kv), (self.hidden, kv), (self.hidden, self.hidden),
                 (self.hidden, self.ffn), (self.hidden, self.ffn), (self.ffn, self.hidden)]
        return layer * self.layers + [(self.hidden, self.vocab)]


class ExternalWriter:
    """Initializers whose bytes go to one data file as they are made; the TensorProto kept in the
    graph is a stub that names its offset and length (inline below THRESHOLD bytes)."""

    def __init__(self, data_file: Path):
        self.location = data_file.name
        self.file = open(data_file, "wb")

    def tensor(self, name: str, array: np.ndarray) -> T:
        array = np.ascontiguousarray(array)
        if array.nbytes < THRESHOLD:
            return nh.from_array(array, name)
        stub = T(name=name, data_type=h.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape,
                 data_location=T.EXTERNAL)
        offset = self.file.tell()
        self.file.write(memoryview(array).cast("B"))
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = stub.external_data.add()
            entry.key, entry.value = key, value
        return stub

    def close(self) -> None:
        self.file.close()


def build(out_dir: Path, config: LlamaConfig = LlamaConfig(), seed: int = 0, name: str = "model.onnx") -> Path:
    """Write OUT_DIR/model.onnx and OUT_DIR/model.onnx.data; return the model's path."""
    if config.hidden % config.heads or config.heads % config.kv_heads or config.head_dim % 2:
        raise ValueError(f"heads {config.heads} / kv_heads {config.kv_heads} do not divide hidden {config.hidden} "
                         "into even head dims")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    writer = ExternalWriter(out_dir / f"{name}.data")
    rng = np.random.default_rng(seed)
    c = config
    hd, kv, group = c.head_dim, c.kv_heads, c.heads // c.kv_heads
    inits: list[T] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, values) -> str:
        inits.append(writer.tensor(name, np.asarray(values)))
        return name

    def node(op: str, inputs: list[str], name: str, outputs: int = 1, **attrs) -> str | list[str]:
        outs = [name] if outputs == 1 else [f"{name}.{i}" for i in range(outputs)]
        nodes.append(h.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if outputs == 1 else outs

    def weight(name: str, k: int, n: int, low_rank: bool = True) -> str:
        if low_rank and c.weight_rank is not None:
            r = c.weight_rank
            w = rng.standard_normal((k, r), dtype=np.float32) @ rng.standard_normal((r, n), dtype=np.float32)
            w *= np.float32(1 / np.sqrt(k * r))
        else:
            w = rng.standard_normal((k, n), dtype=np.float32)
            w *= np.float32(1 / np.sqrt(k))
        return const(name, w)

    def linear(x: str, name: str, k: int, n: int) -> str:
        return node("MatMul", [x, weight(f"{name}.weight", k, n)], name)

    def rms_norm(x: str, name: str) -> str:
        squared = node("Pow", [x, "two"], f"{name}.pow")
        mean = node("ReduceMean", [squared], f"{name}.mean", axes=[-1], keepdims=1)
        root = node("Sqrt", [node("Add", [mean, "eps"], f"{name}.add_eps")], f"{name}.sqrt")
        normed = node("Div", [x, root], f"{name}.div")
        return node("Mul", [normed, const(f"{name}.weight", np.ones(c.hidden, np.float32))], name)

    def rotary(x: str, name: str) -> str:
        """x * cos + rotate_half(x) * sin on the last (head) axis, HF Llama's form."""
        first, second = node("Split", [x], f"{name}.split", outputs=2, axis=-1)
        rotated = node("Concat", [node("Neg", [second], f"{name}.neg"), first], f"{name}.rotate_half", axis=-1)
        return node("Add", [node("Mul", [x, "cos"], f"{name}.mul_cos"),
                            node("Mul", [rotated, "sin"], f"{name}.mul_sin")], name)

    const("two", np.array(2.0, np.float32))
    const("eps", np.array(c.eps, np.float32))
    const("scale", np.array(1 / np.sqrt(hd), np.float32))
    const("zero", np.array([0], np.int64))
    const("one", np.array(1, np.int64))
    const("seq_axis", np.array([0], np.int64))
    # q and k as [batch, kv_heads, group, seq, head_dim], k and v with group 1: MatMul broadcasts the
    # kv heads over their query group (grouped-query attention without an Expand)
    const("q_shape", np.array([0, 0, kv, group, hd], np.int64))
    const("kv_shape", np.array([0, 0, kv, 1, hd], np.int64))
    const("merge_shape", np.array([0, 0, c.hidden], np.int64))
    inv_freq = 1.0 / c.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    angles = np.outer(np.arange(c.max_positions, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    const("cos_table", np.cos(angles).astype(np.float32))
    const("sin_table", np.sin(angles).astype(np.float32))

    seq = node("Shape", ["input_ids"], "seq_len", start=1, end=2)
    node("Slice", ["cos_table", "zero", seq, "seq_axis"], "cos")
    node("Slice", ["sin_table", "zero", seq, "seq_axis"], "sin")
    square = node("Concat", [seq, seq], "mask_shape", axis=0)
    filled = node("ConstantOfShape", [square], "mask_filled", value=h.make_tensor("value", T.FLOAT, [1], [-1e9]))
    mask = node("Trilu", [filled, "one"], "causal_mask", upper=1)   # -1e9 above the diagonal, 0 on and below

    x = node("Gather", [weight("embed_tokens.weight", c.vocab, c.hidden, low_rank=False), "input_ids"], "embed_tokens")
    for i in range(c.layers):
        p = f"layers.{i}"
        normed = rms_norm(x, f"{p}.input_layernorm")
        q = linear(normed, f"{p}.self_attn.q_proj", c.hidden, c.hidden)
        k = linear(normed, f"{p}.self_attn.k_proj", c.hidden, kv * hd)
        v = linear(normed, f"{p}.self_attn.v_proj", c.hidden, kv * hd)
        # [b, s, kv, g, hd] -> [b, kv, g, s, hd]
        q = node("Transpose", [node("Reshape", [q, "q_shape"], f"{p}.q_heads")], f"{p}.q_t", perm=[0, 2, 3, 1, 4])
        k = node("Transpose", [node("Reshape", [k, "kv_shape"], f"{p}.k_heads")], f"{p}.k_t", perm=[0, 2, 3, 1, 4])
        v = node("Transpose", [node("Reshape", [v, "kv_shape"], f"{p}.v_heads")], f"{p}.v_t", perm=[0, 2, 3, 1, 4])
        q, k = rotary(q, f"{p}.q_rope"), rotary(k, f"{p}.k_rope")
        k_t = node("Transpose", [k], f"{p}.k_tt", perm=[0, 1, 2, 4, 3])
        scores = node("Mul", [node("MatMul", [q, k_t], f"{p}.scores"), "scale"], f"{p}.scaled")
        probs = node("Softmax", [node("Add", [scores, mask], f"{p}.masked")], f"{p}.probs", axis=-1)
        context = node("MatMul", [probs, v], f"{p}.context")
        merged = node("Reshape", [node("Transpose", [context], f"{p}.context_t", perm=[0, 3, 1, 2, 4]),
                                  "merge_shape"], f"{p}.merged")
        attn = linear(merged, f"{p}.self_attn.o_proj", c.hidden, c.hidden)
        x = node("Add", [x, attn], f"{p}.residual_attn")
        normed = rms_norm(x, f"{p}.post_attention_layernorm")
        gate = linear(normed, f"{p}.mlp.gate_proj", c.hidden, c.ffn)
        up = linear(normed, f"{p}.mlp.up_proj", c.hidden, c.ffn)
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}.mlp.sigmoid")], f"{p}.mlp.silu")
        down = linear(node("Mul", [silu, up], f"{p}.mlp.gated"), f"{p}.mlp.down_proj", c.ffn, c.hidden)
        x = node("Add", [x, down], f"{p}.residual_mlp")
    x = rms_norm(x, "norm")
    nodes.append(h.make_node("MatMul", [x, weight("lm_head.weight", c.hidden, c.vocab)], ["logits"], name="lm_head"))
    writer.close()

    graph = h.make_graph(nodes, "llama_decoder", [h.make_tensor_value_info("input_ids", T.INT64, ["batch", "seq"])],
                         [h.make_tensor_value_info("logits", T.FLOAT, ["batch", "seq", c.vocab])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], producer_name="llama_decoder.py")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))   # by path: it checks the data file's tensors without loading them
    return path


def write_calibration(path: Path, vocab: int, samples: int = 64, tokens: int = 128, seed: int = 1) -> Path:
    """Random token ids, the model's one input, [samples, tokens]."""
    rng = np.random.default_rng(seed)
    np.savez(path, input_ids=rng.integers(0, vocab, size=(samples, tokens), dtype=np.int64))
    return path


def smoke_run(path: Path, vocab: int, batch: int = 1, seq: int = 16) -> np.ndarray:
    """One forward pass in ONNX Runtime (CPU): the model loads and its logits are finite."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(2).integers(0, vocab, size=(batch, seq), dtype=np.int64)
    (logits,) = session.run(None, {"input_ids": ids})
    if logits.shape != (batch, seq, vocab) or not np.isfinite(logits).all():
        raise RuntimeError(f"bad logits: shape {logits.shape}, finite {np.isfinite(logits).all()}")
    return logits


def main() -> None:
    defaults = LlamaConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR)
    for field in ("hidden", "layers", "ffn", "heads", "vocab"):
        parser.add_argument(f"--{field}", type=int, default=getattr(defaults, field))
    parser.add_argument("--kv-heads", type=int, help="grouped-query attention (default: --heads, no grouping)")
    parser.add_argument("--no-run", action="store_true", help="skip the ONNX Runtime forward pass")
    args = parser.parse_args()
    config = LlamaConfig(hidden=args.hidden, layers=args.layers, ffn=args.ffn, heads=args.heads,
                         kv_heads=args.kv_heads or args.heads, vocab=args.vocab)
    start = time.perf_counter()
    path = build(args.out, config)
    calib = write_calibration(args.out / "calib.npz", config.vocab)
    built = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    size = sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data"))) / 1e9
    print(f"wrote {path} (+ .data, {size:.2f} GB) and {calib.name}: {config.parameters / 1e6:.1f}M parameters, "
          f"{len(config.matrices())} MatMul weights; built in {built:.0f} s at a peak RSS of {peak:.2f} GB")
    if not args.no_run:
        start = time.perf_counter()
        logits = smoke_run(path, config.vocab)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
        print(f"ONNX Runtime forward 1 x 16: logits {list(logits.shape)}, std {logits.std():.3f}, "
              f"{time.perf_counter() - start:.1f} s (load + run), peak RSS now {peak:.2f} GB")


if __name__ == "__main__":
    main()
