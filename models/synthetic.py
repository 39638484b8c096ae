"""Synthetic ONNX models with known low-rank structure, for tests and benchmarks.

Pure numpy + onnx (no torch). Every model built here:

* uses the default ONNX domain at opset 17 and has ``ir_version = 8`` set explicitly
  (onnx>=1.23's ``make_model`` writes IR 14, which ONNX Runtime 1.31 refuses to load);
* passes ``onnx.checker.check_model(m, full_check=True)`` and runs in ONNX Runtime;
* has a symbolic batch dimension named ``"batch"`` on its input and output;
* is fully determined by its ``seed`` argument.

Weights are built as an *exactly* low-rank tensor plus Gaussian noise whose Frobenius
norm is ``noise`` times that of the low-rank part, so the relative error of the best
rank-``rank`` approximation is about ``noise``. Inside the model builders the weights
are further multiplied by ``1/sqrt(fan_in)`` so activations stay O(1); a scalar factor
changes neither the rank nor the relative noise.

Run ``python models/synthetic.py`` from the repository root to (re)write the bundled demo
model ``models/lowrank_mlp_small.onnx``. Larger models (the acceptance cases) are built
on the fly by tests and benchmarks so the repository stays small.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8

__all__ = [
    "OPSET",
    "IR_VERSION",
    "low_rank_matrix",
    "low_rank_conv_weight",
    "mlp_model",
    "gemm_model",
    "conv_model",
    "full_rank_mlp",
]


# --------------------------------------------------------------------------- tensors


def _add_relative_noise(rng: np.random.Generator, exact: np.ndarray, noise: float) -> np.ndarray:
    """``exact + E`` with Gaussian ``E`` scaled so ``||E||_F = noise * ||exact||_F``."""
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if noise == 0:
        return exact.astype(np.float32)
    e = rng.standard_normal(exact.shape)
    e *= noise * np.linalg.norm(exact) / np.linalg.norm(e)
    return (exact + e).astype(np.float32)


def low_rank_matrix(
    rng: np.random.Generator, rows: int, cols: int, rank: int, noise: float = 1e-4
) -> np.ndarray:
    """A ``[rows, cols]`` float32 matrix of exact rank ``rank`` plus relative noise.

    The low-rank part is ``A @ B / sqrt(rank)`` with standard Gaussian ``A [rows, rank]``
    and ``B [rank, cols]``, so its entries have unit variance. Gaussian noise with
    Frobenius norm ``noise * ||A @ B / sqrt(rank)||_F`` is added (``noise=0`` gives an
    exactly rank-``rank`` matrix, up to float32 rounding).
    """
    if not 1 <= rank <= min(rows, cols):
        raise ValueError(f"rank must be in [1, min(rows, cols)={min(rows, cols)}], got {rank}")
    a = rng.standard_normal((rows, rank))
    b = rng.standard_normal((rank, cols))
    exact = (a @ b) / np.sqrt(rank)
    return _add_relative_noise(rng, exact, noise)


def low_rank_conv_weight(
    rng: np.random.Generator,
    out_ch: int,
    in_ch: int,
    k: int,
    ranks: tuple[int, int],
    noise: float = 1e-4,
) -> np.ndarray:
    """A ``[out_ch, in_ch, k, k]`` float32 conv weight with exact Tucker-2 ranks plus noise.

    ``ranks = (r_out, r_in)``. The exact part is the core ``G [r_out, r_in, k, k]``
    multiplied by ``U [out_ch, r_out]`` on mode 0 and ``V [in_ch, r_in]`` on mode 1
    (all standard Gaussian, scaled so entries have unit variance): its mode-0 unfolding
    has rank ``r_out`` and its mode-1 unfolding rank ``r_in``. Relative Gaussian noise is
    added as in :func:`low_rank_matrix`.
    """
    r_out, r_in = (int(r) for r in ranks)
    if not 1 <= r_out <= out_ch:
        raise ValueError(f"r_out must be in [1, out_ch={out_ch}], got {r_out}")
    if not 1 <= r_in <= in_ch:
        raise ValueError(f"r_in must be in [1, in_ch={in_ch}], got {r_in}")
    if r_out > r_in * k * k or r_in > r_out * k * k:
        raise ValueError(f"Tucker ranks {ranks} are not attainable with a {k}x{k} kernel")
    core = rng.standard_normal((r_out, r_in, k, k))
    u = rng.standard_normal((out_ch, r_out))
    v = rng.standard_normal((in_ch, r_in))
    exact = np.einsum("abhw,oa,ib->oihw", core, u, v, optimize=True) / np.sqrt(r_out * r_in)
    return _add_relative_noise(rng, exact, noise)


# --------------------------------------------------------------------------- graph helpers


def _finish(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_operatorsetid("", OPSET)],
        producer_name="onnx-lowrank.models.synthetic",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def _x_y(in_shape: list, out_shape: list) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
    return x, y


def _bias(rng: np.random.Generator, n: int) -> np.ndarray:
    return (0.1 * rng.standard_normal(n)).astype(np.float32)


def _matmul_bias_relu(name: str, w: np.ndarray, b: np.ndarray, doc: str) -> onnx.ModelProto:
    k, n = w.shape
    x, y = _x_y(["batch", k], ["batch", n])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"], name="fc/MatMul"),
        helper.make_node("Add", ["xw", "bias"], ["h"], name="fc/Add"),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
    ]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "bias")]
    graph = helper.make_graph(nodes, name, [x], [y], initializer=inits)
    return _finish(graph, doc)


# --------------------------------------------------------------------------- models


def mlp_model(
    k: int = 768, n: int = 3072, rank: int = 128, noise: float = 1e-4, seed: int = 0
) -> onnx.ModelProto:
    """``y = Relu(x @ W + bias)`` with ``x [batch, k]``, ``W [k, n]`` of rank ``rank`` (+noise).

    Acceptance case 1 with the defaults: MatMul 768x3072, rank 128, bias and Relu.
    """
    rng = np.random.default_rng(seed)
    w = low_rank_matrix(rng, k, n, rank, noise) / np.float32(np.sqrt(k))
    b = _bias(rng, n)
    return _matmul_bias_relu(
        "lowrank_mlp", w.astype(np.float32), b,
        f"MatMul {k}x{n} rank {rank} noise {noise} seed {seed} + bias + Relu",
    )


def full_rank_mlp(k: int = 256, n: int = 256, seed: int = 0) -> onnx.ModelProto:
    """Like :func:`mlp_model` but ``W`` is plain Gaussian (full rank): nothing to gain."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    b = _bias(rng, n)
    return _matmul_bias_relu("full_rank_mlp", w, b, f"MatMul {k}x{n} full rank seed {seed} + bias + Relu")


def gemm_model(
    k: int = 1024,
    n: int = 1024,
    rank: int = 96,
    noise: float = 1e-4,
    alpha: float = 0.5,
    beta: float = 2.0,
    trans_b: int = 1,
    seed: int = 0,
) -> onnx.ModelProto:
    """``y = Gemm(x, B, C, alpha, beta, transB=trans_b)`` with ``x [batch, k]``, ``y [batch, n]``.

    ``B`` is stored ``[n, k]`` when ``trans_b=1`` (the nn.Linear layout) and ``[k, n]``
    otherwise; the effective ``[k, n]`` weight has rank ``rank`` (+noise). ``C`` is a
    bias of shape ``[n]``.
    """
    if trans_b not in (0, 1):
        raise ValueError(f"trans_b must be 0 or 1, got {trans_b}")
    rng = np.random.default_rng(seed)
    w = (low_rank_matrix(rng, k, n, rank, noise) / np.float32(np.sqrt(k))).astype(np.float32)
    bmat = np.ascontiguousarray(w.T) if trans_b else w
    c = _bias(rng, n)
    x, y = _x_y(["batch", k], ["batch", n])
    node = helper.make_node(
        "Gemm", ["x", "B", "C"], ["y"], name="fc/Gemm",
        alpha=float(alpha), beta=float(beta), transA=0, transB=int(trans_b),
    )
    inits = [numpy_helper.from_array(bmat, "B"), numpy_helper.from_array(c, "C")]
    graph = helper.make_graph([node], "lowrank_gemm", [x], [y], initializer=inits)
    return _finish(
        graph,
        f"Gemm {k}x{n} rank {rank} noise {noise} alpha {alpha} beta {beta} transB {trans_b} seed {seed}",
    )


def conv_model(
    ch: int = 256,
    k: int = 3,
    ranks: tuple[int, int] = (64, 64),
    rank_1x1: int = 64,
    noise: float = 1e-4,
    seed: int = 0,
) -> onnx.ModelProto:
    """``x [batch, ch, 14, 14]`` -> Conv kxk (pad k//2, Tucker-2 ranks ``ranks``, bias)
    -> Conv 1x1 ch->ch (weight of matrix rank ``rank_1x1``, bias) -> ``y [batch, ch, 14, 14]``.
    """
    rng = np.random.default_rng(seed)
    w1 = low_rank_conv_weight(rng, ch, ch, k, ranks, noise) / np.float32(np.sqrt(ch * k * k))
    b1 = _bias(rng, ch)
    w2 = low_rank_matrix(rng, ch, ch, rank_1x1, noise) / np.float32(np.sqrt(ch))
    w2 = w2.reshape(ch, ch, 1, 1)
    b2 = _bias(rng, ch)
    x, y = _x_y(["batch", ch, 14, 14], ["batch", ch, 14, 14])
    p = k // 2
    nodes = [
        helper.make_node(
            "Conv", ["x", "conv1.weight", "conv1.bias"], ["h"], name="conv1",
            kernel_shape=[k, k], pads=[p, p, p, p], strides=[1, 1],
        ),
        helper.make_node(
            "Conv", ["h", "conv2.weight", "conv2.bias"], ["y"], name="conv2",
            kernel_shape=[1, 1], strides=[1, 1],
        ),
    ]
    inits = [
        numpy_helper.from_array(w1.astype(np.float32), "conv1.weight"),
        numpy_helper.from_array(b1, "conv1.bias"),
        numpy_helper.from_array(w2.astype(np.float32), "conv2.weight"),
        numpy_helper.from_array(b2, "conv2.bias"),
    ]
    graph = helper.make_graph(nodes, "lowrank_conv", [x], [y], initializer=inits)
    return _finish(
        graph,
        f"Conv {k}x{k} {ch}->{ch} Tucker ranks {tuple(ranks)} + Conv 1x1 rank {rank_1x1}, "
        f"noise {noise} seed {seed}",
    )


def _main() -> None:
    out = Path(__file__).resolve().parent / "lowrank_mlp_small.onnx"
    model = mlp_model(k=256, n=1024, rank=32)
    onnx.save(model, out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    _main()


# --------------------------------------------------------------------------- merge / fuse acceptance models
#
# Issue 5's acceptance cases: chains and branches of *random* (full-rank) weights with no
# nonlinearity between them, so the merged weight is dense and stays one node. Biases and
# BatchNormalization statistics are non-trivial, so a dropped bias or a wrong fold shows.


def _dense(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)


def matmul_chain_model(k: int = 1024, hidden: int = 768, n: int = 1024, seed: int = 0) -> onnx.ModelProto:
    """``y = (x W1 + b1) W2 + b2`` (MatMul + Add twice, no activation), ``x [batch, k]``."""
    rng = np.random.default_rng(seed)
    x, y = _x_y(["batch", k], ["batch", n])
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1/MatMul"),
        helper.make_node("Add", ["h0", "b1"], ["h"], name="fc1/Add"),
        helper.make_node("MatMul", ["h", "W2"], ["y0"], name="fc2/MatMul"),
        helper.make_node("Add", ["y0", "b2"], ["y"], name="fc2/Add"),
    ]
    inits = [numpy_helper.from_array(_dense(rng, k, hidden), "W1"), numpy_helper.from_array(_bias(rng, hidden), "b1"),
             numpy_helper.from_array(_dense(rng, hidden, n), "W2"), numpy_helper.from_array(_bias(rng, n), "b2")]
    graph = helper.make_graph(nodes, "matmul_chain", [x], [y], initializer=inits)
    return _finish(graph, f"MatMul chain {k}->{hidden}->{n} with biases, seed {seed}")


def gemm_chain_model(k: int = 768, hidden: int = 1536, n: int = 768, seed: int = 0) -> onnx.ModelProto:
    """``Gemm(transB=1, bias) k->hidden`` then ``Gemm(transB=1, bias) hidden->n``, the nn.Linear layout."""
    rng = np.random.default_rng(seed)
    x, y = _x_y(["batch", k], ["batch", n])
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], name="fc1/Gemm", transB=1),
        helper.make_node("Gemm", ["h", "fc2.weight", "fc2.bias"], ["y"], name="fc2/Gemm", transB=1),
    ]
    inits = [numpy_helper.from_array(np.ascontiguousarray(_dense(rng, k, hidden).T), "fc1.weight"),
             numpy_helper.from_array(_bias(rng, hidden), "fc1.bias"),
             numpy_helper.from_array(np.ascontiguousarray(_dense(rng, hidden, n).T), "fc2.weight"),
             numpy_helper.from_array(_bias(rng, n), "fc2.bias")]
    graph = helper.make_graph(nodes, "gemm_chain", [x], [y], initializer=inits)
    return _finish(graph, f"Gemm chain {k}->{hidden}->{n}, transB=1, biases, seed {seed}")


def lora_model(k: int = 1024, n: int = 1024, rank: int = 16, scale: float = 0.5, seed: int = 0) -> onnx.ModelProto:
    """``y = (x W + b) + scale * ((x A) B)``: a dense base with a LoRA adapter, the scale as a Mul."""
    rng = np.random.default_rng(seed)
    x, y = _x_y(["batch", k], ["batch", n])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["base0"], name="base/MatMul"),
        helper.make_node("Add", ["base0", "b"], ["base"], name="base/Add"),
        helper.make_node("MatMul", ["x", "lora_A"], ["down"], name="lora/A"),
        helper.make_node("MatMul", ["down", "lora_B"], ["up"], name="lora/B"),
        helper.make_node("Mul", ["up", "scale"], ["delta"], name="lora/scale"),
        helper.make_node("Add", ["base", "delta"], ["y"], name="lora/Add"),
    ]
    inits = [numpy_helper.from_array(_dense(rng, k, n), "W"), numpy_helper.from_array(_bias(rng, n), "b"),
             numpy_helper.from_array(_dense(rng, k, rank), "lora_A"),
             numpy_helper.from_array(_dense(rng, rank, n), "lora_B"),
             numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale")]
    graph = helper.make_graph(nodes, "lora", [x], [y], initializer=inits)
    return _finish(graph, f"MatMul {k}x{n} + LoRA rank {rank} scale {scale}, seed {seed}")


def _batchnorm_inits(rng: np.random.Generator, prefix: str, ch: int) -> list[onnx.TensorProto]:
    stats = {"weight": 1.0 + 0.3 * rng.standard_normal(ch), "bias": 0.2 * rng.standard_normal(ch),
             "running_mean": 0.5 * rng.standard_normal(ch), "running_var": rng.uniform(0.3, 2.0, ch)}
    return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}.{k}") for k, v in stats.items()]


def conv_bn_relu_model(in_ch: int = 64, out_ch: int = 64, size: int = 16, seed: int = 0) -> onnx.ModelProto:
    """``Relu(BatchNormalization(Conv3x3(x)))``, the conv without a bias as exporters write it."""
    rng = np.random.default_rng(seed)
    x, y = _x_y(["batch", in_ch, size, size], ["batch", out_ch, size, size])
    w = (rng.standard_normal((out_ch, in_ch, 3, 3)) / np.sqrt(in_ch * 9)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"],
                         ["b"], name="bn", epsilon=1e-5),
        helper.make_node("Relu", ["b"], ["y"], name="relu"),
    ]
    inits = [numpy_helper.from_array(w, "conv.weight"), *_batchnorm_inits(rng, "bn", out_ch)]
    graph = helper.make_graph(nodes, "conv_bn_relu", [x], [y], initializer=inits)
    return _finish(graph, f"Conv3x3 {in_ch}->{out_ch} + BatchNormalization + Relu, seed {seed}")


def conv1x1_chain_model(ch: int = 256, hidden: int = 512, size: int = 14, seed: int = 0) -> onnx.ModelProto:
    """``Conv1x1 ch->hidden (bias)`` then ``Conv1x1 hidden->ch (bias)``, no activation between."""
    rng = np.random.default_rng(seed)
    x, y = _x_y(["batch", ch, size, size], ["batch", ch, size, size])
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["h"], name="conv1", kernel_shape=[1, 1]),
        helper.make_node("Conv", ["h", "conv2.weight", "conv2.bias"], ["y"], name="conv2", kernel_shape=[1, 1]),
    ]
    inits = [numpy_helper.from_array(_dense(rng, hidden, ch).reshape(hidden, ch, 1, 1), "conv1.weight"),
             numpy_helper.from_array(_bias(rng, hidden), "conv1.bias"),
             numpy_helper.from_array(_dense(rng, ch, hidden).reshape(ch, hidden, 1, 1), "conv2.weight"),
             numpy_helper.from_array(_bias(rng, ch), "conv2.bias")]
    graph = helper.make_graph(nodes, "conv1x1_chain", [x], [y], initializer=inits)
    return _finish(graph, f"Conv1x1 chain {ch}->{hidden}->{ch} with biases, seed {seed}")


def qkv_model(hidden: int = 768, rank: int = 64, noise: float = 1e-4, seed: int = 0) -> onnx.ModelProto:
    """Three projections of one input, ``q, k, v = x Wq, x Wk, x Wv`` (``x [batch, seq, hidden]``),
    each weight of rank ``rank`` (+noise): after decomposition, three first factors share x."""
    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", hidden]) for n in "qkv"]
    nodes = [helper.make_node("MatMul", ["x", f"W{n}"], [n], name=f"{n}_proj") for n in "qkv"]
    inits = [numpy_helper.from_array((low_rank_matrix(rng, hidden, hidden, rank, noise) / np.sqrt(hidden))
                                     .astype(np.float32), f"W{n}") for n in "qkv"]
    graph = helper.make_graph(nodes, "qkv", [x], outputs, initializer=inits)
    return _finish(graph, f"Q/K/V projections {hidden}x{hidden} of rank {rank}, noise {noise}, seed {seed}")


def bottleneck_model(ch: int = 64, out_ch: int = 256, ranks: tuple[int, int] = (16, 16), size: int = 8,
                     seed: int = 0) -> onnx.ModelProto:
    """A ResNet bottleneck without its shortcut, BatchNorm already folded:
    ``Conv1x1 ch->ch -> Relu -> Conv3x3 ch->ch (Tucker-2 ranks ``ranks``, exact) -> Relu -> Conv1x1 ch->out_ch``,
    every conv with a bias."""
    rng = np.random.default_rng(seed)
    x, y = _x_y(["batch", ch, size, size], ["batch", out_ch, size, size])
    w2 = low_rank_conv_weight(rng, ch, ch, 3, ranks, noise=0) / np.float32(np.sqrt(ch * 9))
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["h1"], name="conv1", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("Conv", ["a1", "conv2.weight", "conv2.bias"], ["h2"], name="conv2", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
        helper.make_node("Conv", ["a2", "conv3.weight", "conv3.bias"], ["y"], name="conv3", kernel_shape=[1, 1]),
    ]
    inits = [numpy_helper.from_array(_dense(rng, ch, ch).reshape(ch, ch, 1, 1), "conv1.weight"),
             numpy_helper.from_array(_bias(rng, ch), "conv1.bias"),
             numpy_helper.from_array(w2.astype(np.float32), "conv2.weight"),
             numpy_helper.from_array(_bias(rng, ch), "conv2.bias"),
             numpy_helper.from_array(_dense(rng, ch, out_ch).T.reshape(out_ch, ch, 1, 1).copy(), "conv3.weight"),
             numpy_helper.from_array(_bias(rng, out_ch), "conv3.bias")]
    graph = helper.make_graph(nodes, "bottleneck", [x], [y], initializer=inits)
    return _finish(graph, f"bottleneck {ch}->{ch}->{out_ch}, 3x3 Tucker ranks {tuple(ranks)}, seed {seed}")
