"""decompose_gemm: Y = alpha A' B' + beta C with a constant B, for every transA / transB /
alpha / beta combination, with C absent, a bias vector, a full matrix, or a graph input.

Exactly rank-4 weights: decomposed within EXACT (see helpers). Full-rank: left alone.
"""

import itertools

import numpy as np
import pytest

from helpers import EXACT, assert_rewrite, assert_unchanged, model_from_text, only
from models.synthetic import low_rank_matrix

K, N, M, RANK = 64, 48, 5, 4
# this pass alone: the structure asserted is its rewrite, not what the merge passes make of it
ISOLATED = {"skip": only("decompose")}


def gemm_model(trans_a, trans_b, alpha, beta, c, weight):
    """Gemm(A, B[, C]) with A [M, K] (or [K, M] when transA) and weight as the effective [K, N]."""
    a_shape = f"[{K}, {M}]" if trans_a else f"[{M}, {K}]"
    inputs = [f"float{a_shape} a"] + ([f"float[{M}, {N}] c"] if c == "input" else [])
    operands = "a, B" + ("" if c is None else ", c" if c == "input" else ", C")
    weights = {"B": np.ascontiguousarray(weight.T) if trans_b else weight}
    if c == "vector":
        weights["C"] = np.linspace(-1, 1, N, dtype=np.float32)
    elif c == "matrix":
        weights["C"] = np.linspace(-1, 1, M * N, dtype=np.float32).reshape(M, N)
    text = (f"({', '.join(inputs)}) => (float[{M}, {N}] y) {{ [fc] y = Gemm <alpha={alpha}, beta={beta}, "
            f"transA={trans_a}, transB={trans_b}> ({operands}) }}")
    return model_from_text(text, **weights)


COMBINATIONS = list(itertools.product((0, 1), (0, 1), ((1.0, 1.0), (0.5, 2.0)), (None, "vector", "matrix", "input")))


@pytest.mark.parametrize("trans_a, trans_b, alpha_beta, c", COMBINATIONS,
                         ids=[f"transA{a}-transB{b}-alpha{ab[0]}-beta{ab[1]}-C_{c}" for a, b, ab, c in COMBINATIONS])
def test_exactly_low_rank_gemm_is_decomposed_near_losslessly(trans_a, trans_b, alpha_beta, c):
    weight = low_rank_matrix(np.random.default_rng(0), K, N, RANK, noise=0)
    model = gemm_model(trans_a, trans_b, *alpha_beta, c, weight)
    # A MatMul can take the first factor only when neither operand is stored transposed.
    ops = {"Gemm": 2} if trans_a or trans_b else {"MatMul": 1, "Gemm": 1}
    optimized, report = assert_rewrite(model, **ISOLATED, ops=ops, max_error=EXACT)
    (layer,) = report.layers
    assert (layer.name, layer.op, layer.method, layer.rank) == ("fc", "Gemm", "svd", [8])
    assert layer.weight_shape == ([N, K] if trans_b else [K, N])
    # the factors keep the stored layout: transB=1 weights stay [out, in]
    shapes = sorted(tuple(t.dims) for t in optimized.graph.initializer if t.name != "C")
    assert shapes == sorted([(8, K), (N, 8)] if trans_b else [(K, 8), (8, N)])


@pytest.mark.parametrize("trans_b", (0, 1))
def test_full_rank_gemm_is_left_alone(trans_b):
    weight = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)
    report = assert_unchanged(gemm_model(0, trans_b, 0.5, 2.0, "vector", weight), **ISOLATED)
    (layer,) = report.layers
    assert layer.op == "Gemm" and "break-even 27 less 10%" in layer.reason


def test_gemm_with_a_constant_first_operand_is_not_a_candidate():
    weight = low_rank_matrix(np.random.default_rng(0), M, K, 2, noise=0)
    model = model_from_text(f"(float[{K}, {N}] b) => (float[{M}, {N}] y) {{ y = Gemm(A, b) }}", A=weight)
    assert assert_unchanged(model, **ISOLATED).layers == []
