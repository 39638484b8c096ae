"""decompose_matmul: y = x W and y = W x with a constant 2-D W, checked in ONNX Runtime.

Exactly rank-4 weights must be decomposed (rank 4 rounded up to 8) within EXACT (see helpers);
full-rank weights must be left alone, byte for byte, with the reason in the report.
"""

import numpy as np
import onnx
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from helpers import (EXACT, assert_rewrite, assert_unchanged, make_feeds, model_from_text, only, op_counts,
                     relative_error, run_ort)
from models.synthetic import low_rank_matrix
from onnx_lowrank import optimize

K, N, RANK = 64, 48, 4     # break-even 27.4: rank 4 -> 8 pays, a full-rank 48 does not
# this pass alone: the structure asserted is its rewrite, not what the merge passes make of it
ISOLATED = {"skip": only("decompose")}


def weight(rows, cols, rank=RANK, seed=0, dtype=np.float32):
    return low_rank_matrix(np.random.default_rng(seed), rows, cols, rank, noise=0).astype(dtype)


def full_rank(rows, cols, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


FORMS = {
    "x W, 2-D": (f"(float[M, {K}] x) => (float[M, {N}] y) {{ [fc] y = MatMul(x, W) }}", (K, N)),
    "x W, batched [b, s, K]": (f"(float[B, S, {K}] x) => (float[B, S, {N}] y) {{ [fc] y = MatMul(x, W) }}", (K, N)),
    "W x, 2-D": (f"(float[{K}, M] x) => (float[{N}, M] y) {{ [fc] y = MatMul(W, x) }}", (N, K)),
    "W x, batched [b, K, s]": (f"(float[B, {K}, S] x) => (float[B, {N}, S] y) {{ [fc] y = MatMul(W, x) }}", (N, K)),
}


@pytest.mark.parametrize("form", FORMS)
def test_exactly_low_rank_matmul_is_decomposed_near_losslessly(form):
    text, shape = FORMS[form]
    model = model_from_text(text, W=weight(*shape))
    optimized, report = assert_rewrite(model, **ISOLATED, ops={"MatMul": 2}, max_error=EXACT, dims={"M": 5, "B": 2, "S": 7})
    (layer,) = report.layers
    assert (layer.name, layer.op, layer.method, layer.rank) == ("fc", "MatMul", "svd", [8])
    assert layer.weight_shape == list(shape) and layer.weight_error < 1e-6
    assert (layer.params_before, layer.params_after) == (K * N, 8 * (K + N))
    factors = sorted(tuple(t.dims) for t in optimized.graph.initializer)
    assert factors == sorted([(shape[0], 8), (8, shape[1])])


def test_matmul_inside_a_network_keeps_the_ops_around_it():
    model = model_from_text(f"""(float[M, {K}] x) => (float[M, {N}] y) {{
        [fc] h = MatMul(x, W)
        b = Add(h, bias)
        y = Relu(b)
    }}""", W=weight(K, N), bias=np.linspace(-1, 1, N, dtype=np.float32))
    assert_rewrite(model, **ISOLATED, ops={"MatMul": 2, "Add": 1, "Relu": 1}, max_error=EXACT)


@pytest.mark.parametrize("form", FORMS)
def test_full_rank_matmul_is_left_alone(form):
    text, shape = FORMS[form]
    report = assert_unchanged(model_from_text(text, W=full_rank(*shape)), **ISOLATED)
    (layer,) = report.layers
    assert layer.status == "skipped" and layer.rank is None
    assert layer.reason.startswith("rank 4") and "break-even 27 less 10%" in layer.reason


def test_matmul_between_two_activations_is_not_a_candidate():
    model = model_from_text("(float[M, 8] a, float[8, M] b) => (float[M, M] y) { y = MatMul(a, b) }")
    report = assert_unchanged(model, **ISOLATED)
    assert report.layers == []
    assert report.notes[0] == "nothing to decompose: no MatMul, Gemm or Conv node with a constant weight was found"


def test_matmul_with_a_3d_constant_is_not_a_candidate():
    model = model_from_text(f"(float[2, M, {K}] x) => (float[2, M, {N}] y) {{ y = MatMul(x, W) }}",
                            W=np.stack([weight(K, N), weight(K, N, seed=1)]))
    assert assert_unchanged(model, **ISOLATED).layers == []


def test_a_weight_shared_by_two_matmuls_is_factorized_once():
    model = model_from_text(f"""(float[M, {K}] x, float[M, {K}] z) => (float[M, {N}] y) {{
        [fc1] a = MatMul(x, W)
        [fc2] b = MatMul(z, W)
        y = Add(a, b)
    }}""", W=weight(K, N))
    optimized, report = assert_rewrite(model, **ISOLATED, ops={"MatMul": 4, "Add": 1}, max_error=EXACT)
    assert [r.name for r in report.decomposed] == ["fc1", "fc2"]
    assert len(optimized.graph.initializer) == 2


def test_new_names_never_collide_with_existing_ones():
    # The model already uses the names the rewrite would pick first for its tensors and nodes.
    model = model_from_text(f"""(float[M, {K}] x) => (float[M, {N}] y) {{
        [fc] fc_lowrank_hidden = MatMul(x, W)
        [fc_lowrank_a] y = Identity(fc_lowrank_hidden)
    }}""", W=weight(K, N))
    optimized, _ = assert_rewrite(model, **ISOLATED, ops={"MatMul": 2, "Identity": 1}, max_error=EXACT)
    names = [n.name for n in optimized.graph.node]
    assert len(set(names)) == len(names)


def test_float16_weights_give_float16_factors():
    text = f"(float16[M, {K}] x) => (float16[M, {N}] y) {{ [fc] y = MatMul(x, W) }}"
    model = model_from_text(text, W=weight(K, N, dtype=np.float16))
    # float16 keeps ~3 digits: factors and the rank-r hidden activation are rounded to 5e-4 each.
    optimized, _ = assert_rewrite(model, **ISOLATED, ops={"MatMul": 2}, max_error=5e-3)
    assert {t.data_type for t in optimized.graph.initializer} == {onnx.TensorProto.FLOAT16}


def test_matmul_in_a_subgraph_is_decomposed():
    # An If whose branches read an outer-scope weight: the rewrite reaches into subgraphs.
    then_branch = f"then_branch = g1 () => (float[M, {N}] t) {{ [fc_then] t = MatMul(x, W) }}"
    else_branch = f"else_branch = g2 () => (float[M, {N}] e) {{ e = Neg(x2) }}"
    model = model_from_text(f"""(bool c, float[M, {K}] x, float[M, {N}] x2) => (float[M, {N}] y) {{
        y = If <{then_branch}, {else_branch}> (c)
    }}""", W=weight(K, N))
    optimized, report = optimize(model, validate=False, **ISOLATED)
    assert [r.name for r in report.decomposed] == ["fc_then"]
    onnx.checker.check_model(optimized, full_check=True)
    then_graph = optimized.graph.node[0].attribute[0].g
    assert op_counts(onnx.ModelProto(graph=then_graph)) == {"MatMul": 2}
    feeds = {**make_feeds(model), "c": np.array(True)}
    assert relative_error(run_ort(optimized, feeds)[0], run_ort(model, feeds)[0]) <= EXACT


@given(st.integers(1, 40), st.integers(1, 40), st.booleans(), st.integers(0, 2**16), st.data())
def test_any_shape_at_its_true_rank_is_exact_or_left_alone(k, n, weight_first, seed, data):
    """--rank at the weight's true rank: decomposed exactly when it pays, else untouched."""
    rank = data.draw(st.integers(1, min(k, n)))
    w = weight(k, n, rank, seed)
    text = (f"(float[{n}, M] x) => (float[{k}, M] y) {{ [fc] y = MatMul(W, x) }}" if weight_first
            else f"(float[M, {k}] x) => (float[M, {n}] y) {{ [fc] y = MatMul(x, W) }}")
    model = model_from_text(text, W=w)
    options = {"rank": rank, "rank_multiple": 1, "min_flop_reduction": 0.0}
    pays = rank * (k + n) <= k * n
    event("decomposed" if pays else "left alone")
    if pays:
        _, report = assert_rewrite(model, **ISOLATED, ops={"MatMul": 2}, max_error=EXACT, **options)
        assert report.layers[0].rank == [rank]
    else:
        assert assert_unchanged(model, **ISOLATED, **options).layers[0].reason.startswith(f"rank {rank} for rank {rank} >")
