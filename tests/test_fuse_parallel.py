"""fuse_parallel: linear branches on one input whose outputs are added (LoRA adapters, RepVGG-style
parallel convs) become one layer, where one is cheaper."""

from __future__ import annotations

import numpy as np
from helpers import model_from_text, op_counts, output_errors, pass_records, scaled_weight

from models.synthetic import lora_model
from onnx_lowrank import optimize
from onnx_lowrank.passes.fuse_parallel import NAME

#: W + s A B is summed once in float64 and rounded once to float32: ~1e-7 relative. A lost scale
#: or bias is an O(1e-2..1) error.
FUSE_EXACT = 1e-5


def test_acceptance_lora_1024_rank16_scale_half_becomes_one_matmul():
    model = lora_model()
    optimized, report = optimize(model)
    counts = op_counts(optimized)
    assert counts == {"MatMul": 1, "Add": 1}
    assert report.passes[NAME] == 1 and report.parity.passed
    assert max(output_errors(model, optimized)) <= 1e-4


def test_lora_on_a_gemm_base_with_the_scale_between_the_factors():
    rng = np.random.default_rng(1)
    model = model_from_text(
        """(float[N, 64] x) => (float[N, 48] y) {
            [base] b = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (x, W, C)
            [lora_a] d = Gemm <transB = 1> (x, A)
            [lora_scale] s = Mul(S, d)
            [lora_b] u = MatMul(s, B)
            [sum] y = Add(u, b)
        }""",
        W=scaled_weight(rng, 48, 64), C=rng.standard_normal(48).astype(np.float32),
        A=scaled_weight(rng, 4, 64), B=scaled_weight(rng, 4, 48),
        S=np.array([2.0], dtype=np.float32))
    optimized, _, records = pass_records(model, NAME, ops="conv")
    assert op_counts(optimized) == {"Gemm": 1}
    assert records[0].status == "fused" and records[0].name == "base"
    assert max(output_errors(model, optimized)) <= FUSE_EXACT


def test_parallel_3x3_convs_with_biases_become_one_conv():
    rng = np.random.default_rng(2)
    model = model_from_text(
        """(float[N, 8, 9, 9] x) => (float[N, 16, 5, 5] y) {
            [left] a = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [2, 2]> (x, W1, B1)
            [right] b = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [2, 2]> (x, W2, B2)
            [sum] y = Add(a, b)
        }""",
        W1=scaled_weight(rng, 16, 8, 3, 3), B1=rng.standard_normal(16).astype(np.float32),
        W2=scaled_weight(rng, 16, 8, 3, 3), B2=rng.standard_normal(16).astype(np.float32))
    optimized, _, records = pass_records(model, NAME, ops="matmul")
    assert op_counts(optimized) == {"Conv": 1}
    assert max(output_errors(model, optimized)) <= FUSE_EXACT


def test_two_adapters_without_a_base_are_cheaper_apart():
    rng = np.random.default_rng(3)
    model = model_from_text(
        """(float[N, 256] x) => (float[N, 256] y) {
            [a1] d1 = MatMul(x, A1)
            [b1] u1 = MatMul(d1, B1)
            [a2] d2 = MatMul(x, A2)
            [b2] u2 = MatMul(d2, B2)
            [sum] y = Add(u1, u2)
        }""", A1=scaled_weight(rng, 256, 8), B1=scaled_weight(rng, 8, 256),
        A2=scaled_weight(rng, 256, 8), B2=scaled_weight(rng, 8, 256))
    optimized, _, records = pass_records(model, NAME, ops="conv")
    assert op_counts(optimized) == {"MatMul": 4, "Add": 1}
    assert [r.status for r in records] == ["skipped"] and "cheaper" in records[0].reason


def test_no_fusion_through_a_relu_or_a_shared_adapter_output():
    rng = np.random.default_rng(4)
    weights = dict(W=scaled_weight(rng, 64, 64), A=scaled_weight(rng, 64, 4), B=scaled_weight(rng, 4, 64))
    relu = model_from_text("""(float[N, 64] x) => (float[N, 64] y) {
        [base] b = MatMul(x, W)
        [lora_a] d = MatMul(x, A)
        [act] r = Relu(d)
        [lora_b] u = MatMul(r, B)
        [sum] y = Add(b, u)
    }""", **weights)
    shared = model_from_text("""(float[N, 64] x) => (float[N, 64] y, float[N, 4] d) {
        [base] b = MatMul(x, W)
        [lora_a] d = MatMul(x, A)
        [lora_b] u = MatMul(d, B)
        [sum] y = Add(b, u)
    }""", **weights)
    for model in (relu, shared):
        optimized, _, records = pass_records(model, NAME, ops="conv")
        assert op_counts(optimized) == op_counts(model)
        assert not [r for r in records if r.status == "fused"]


def test_skip_fuse_parallel_keeps_the_adapter():
    optimized, _ = optimize(lora_model(k=64, n=64, rank=4), skip=NAME, validate=False, ops="conv")
    assert op_counts(optimized)["MatMul"] == 3


def test_repvgg_3x3_plus_1x1_branches_become_one_3x3_where_they_read_the_same_pixels():
    rng = np.random.default_rng(5)
    graph = """(float[N, 8, 9, 9] x) => (float[N, 16, 5, 5] y) {{
        [k3] a = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [2, 2]> (x, W3, B3)
        [k1] b = Conv <kernel_shape = [1, 1], pads = [{pads}], strides = [2, 2]> (x, W1, B1)
        [sum] y = Add(a, b)
    }}"""
    weights = dict(W3=scaled_weight(rng, 16, 8, 3, 3), B3=rng.standard_normal(16).astype(np.float32),
                   W1=scaled_weight(rng, 16, 8, 1, 1), B1=rng.standard_normal(16).astype(np.float32))
    centred = model_from_text(graph.format(pads="0, 0, 0, 0"), **weights)
    optimized, _, records = pass_records(centred, NAME, ops="matmul")
    assert op_counts(optimized) == {"Conv": 1} and records[0].name == "k3"
    assert max(output_errors(centred, optimized)) <= FUSE_EXACT
    # padded on one side only, the 1x1 lines up with a 3x3 tap at the start but not at the end of
    # the axis, so the output sizes agree only for some input sizes: left alone
    shifted = model_from_text(graph.format(pads="1, 1, 0, 0").replace("float[N, 16, 5, 5] y", "float[N, 16, ?, ?] y"),
                              **weights)
    optimized, _, records = pass_records(shifted, NAME, ops="matmul")
    assert op_counts(optimized) == {"Conv": 2, "Add": 1}
    assert [r.status for r in records] == ["skipped"]
