"""A BERT-base-size encoder with random weights, built with onnx helpers (no torch): 12 layers of
768x768 Q/K/V/O and 768x3072 / 3072x768 MatMuls, LayerNorms, Relu for Gelu, softmax attention, a 30522 x 768
embedding; 110M parameters, a ~420 MB file. Sizes, not weights, decide the tool's own cost, so
random weights measure it (and, near full rank, no layer pays at the default tolerance).

    python benchmarks/bert_base_random.py [OUT.onnx]     # default benchmarks/.cache/bert_base_helpers.onnx
    /usr/bin/time -v onnx-lowrank optimize OUT.onnx /tmp/out.onnx
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "benchmarks" / ".cache" / "bert_base_helpers.onnx"
HIDDEN, FFN, HEADS, LAYERS, VOCAB = 768, 3072, 12, 12, 30522


def build(layers: int = LAYERS, hidden: int = HIDDEN, ffn: int = FFN, heads: int = HEADS, vocab: int = VOCAB,
          seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, values: np.ndarray) -> str:
        inits.append(nh.from_array(np.asarray(values), name))
        return name

    def weight(name: str, k: int, n: int) -> str:
        return const(name, (rng.standard_normal((k, n), dtype=np.float32) / np.float32(np.sqrt(k))))

    def linear(x: str, name: str, k: int, n: int) -> str:
        nodes.append(h.make_node("MatMul", [x, weight(f"{name}.weight", k, n)], [f"{name}.mm"], name=name))
        nodes.append(h.make_node("Add", [f"{name}.mm", const(f"{name}.bias", np.zeros(n, np.float32))],
                                 [f"{name}.out"], name=f"{name}.add"))
        return f"{name}.out"

    def layer_norm(x: str, name: str) -> str:
        nodes.append(h.make_node("LayerNormalization", [x, const(f"{name}.g", np.ones(hidden, np.float32)),
                                                        const(f"{name}.b", np.zeros(hidden, np.float32))],
                                 [f"{name}.out"], name=name, axis=-1, epsilon=1e-12))
        return f"{name}.out"

    head = hidden // heads
    split_shape = const("split_shape", np.array([0, 0, heads, head], np.int64))
    merge_shape = const("merge_shape", np.array([0, 0, hidden], np.int64))
    scale = const("scale", np.array(1.0 / np.sqrt(head), np.float32))
    nodes.append(h.make_node("Gather", [weight("embeddings", vocab, hidden), "input_ids"], ["embedded"],
                             name="embed"))
    x = layer_norm("embedded", "embed_ln")
    for i in range(layers):
        p = f"layer{i}"
        q, k, v = (linear(x, f"{p}.{n}", hidden, hidden) for n in ("query", "key", "value"))
        for t, perm in ((q, [0, 2, 1, 3]), (k, [0, 2, 3, 1]), (v, [0, 2, 1, 3])):
            nodes.append(h.make_node("Reshape", [t, split_shape], [f"{t}.heads"], name=f"{t}.reshape"))
            nodes.append(h.make_node("Transpose", [f"{t}.heads"], [f"{t}.t"], name=f"{t}.transpose", perm=perm))
        nodes.append(h.make_node("MatMul", [f"{q}.t", f"{k}.t"], [f"{p}.scores"], name=f"{p}.scores"))
        nodes.append(h.make_node("Mul", [f"{p}.scores", scale], [f"{p}.scaled"], name=f"{p}.scale"))
        nodes.append(h.make_node("Softmax", [f"{p}.scaled"], [f"{p}.probs"], name=f"{p}.softmax", axis=-1))
        nodes.append(h.make_node("MatMul", [f"{p}.probs", f"{v}.t"], [f"{p}.ctx"], name=f"{p}.ctx"))
        nodes.append(h.make_node("Transpose", [f"{p}.ctx"], [f"{p}.ctx_t"], name=f"{p}.ctx_t", perm=[0, 2, 1, 3]))
        nodes.append(h.make_node("Reshape", [f"{p}.ctx_t", merge_shape], [f"{p}.merged"], name=f"{p}.merge"))
        attn = linear(f"{p}.merged", f"{p}.attention_output", hidden, hidden)
        nodes.append(h.make_node("Add", [attn, x], [f"{p}.res1"], name=f"{p}.res1"))
        x = layer_norm(f"{p}.res1", f"{p}.ln1")
        up = linear(x, f"{p}.intermediate", hidden, ffn)
        nodes.append(h.make_node("Relu", [up], [f"{p}.gelu"], name=f"{p}.act"))   # Gelu's cost is not ours
        down = linear(f"{p}.gelu", f"{p}.output", ffn, hidden)
        nodes.append(h.make_node("Add", [down, x], [f"{p}.res2"], name=f"{p}.res2"))
        x = layer_norm(f"{p}.res2", f"{p}.ln2")
    nodes.append(h.make_node("Identity", [x], ["last_hidden_state"], name="output"))
    graph = h.make_graph(nodes, "bert_base_random",
                         [h.make_tensor_value_info("input_ids", T.INT64, ["batch", "seq"])],
                         [h.make_tensor_value_info("last_hidden_state", T.FLOAT, ["batch", "seq", hidden])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build(), out)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
