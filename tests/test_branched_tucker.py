"""Branched Tucker: the block-term ALS fit, against the diagonal-blocks approximation it improves
on, and the grouped-conv chain it becomes, in ONNX Runtime."""

import numpy as np
import pytest

from helpers import EXACT, assert_rewrite, model_from_text
from models.synthetic import low_rank_conv_weight
from onnx_lowrank.numerics.branched_tucker import BlockTerms, branched_tucker, branched_tucker_macs, diagonal_blocks
from onnx_lowrank.numerics.tucker import relative_error, tucker2, tucker2_reconstruct


def block_term_weight(rng, out_ch, in_ch, k, branches, ro, ri) -> np.ndarray:
    """An exact sum of `branches` Tucker-2 terms with random (non-orthogonal) factors."""
    return BlockTerms(rng.standard_normal((branches, out_ch, ro)), rng.standard_normal((branches, ro, ri, k, k)),
                      rng.standard_normal((branches, in_ch, ri))).reconstruct()


@pytest.mark.parametrize("shape", [(32, 24, 3, 2, 4, 4), (48, 40, 3, 3, 4, 4), (128, 128, 3, 4, 8, 8)])
def test_als_fits_an_exact_block_term_weight(shape):
    out_ch, in_ch, k, g, ro, ri = shape
    w = block_term_weight(np.random.default_rng(0), out_ch, in_ch, k, g, ro, ri)
    diagonal = relative_error(w, diagonal_blocks(w, g * ro, g * ri, g).reconstruct())
    fitted = relative_error(w, branched_tucker(w, g * ro, g * ri, g, iterations=300).reconstruct())
    # float64 ALS converges to rounding (~1e-15) on these; 1e-6 leaves room for slow final sweeps.
    # The diagonal blocks of the full HOSVD core drop the off-diagonal energy: tens of percent.
    assert fitted < 1e-6
    assert diagonal > 0.1


def test_als_beats_the_diagonal_blocks_on_a_weight_without_block_structure():
    w = low_rank_conv_weight(np.random.default_rng(1), 64, 64, 3, (24, 24), noise=0.05)
    diagonal = relative_error(w, diagonal_blocks(w, 32, 32, 4).reconstruct())
    fitted = relative_error(w, branched_tucker(w, 32, 32, 4).reconstruct())
    assert fitted < 0.8 * diagonal
    # one branch is plain Tucker-2 (HOSVD)
    u_out, core, u_in = tucker2(w, 32, 32)
    assert relative_error(w, branched_tucker(w, 32, 32, 1).reconstruct()) == pytest.approx(
        relative_error(w, tucker2_reconstruct(u_out, core, u_in)), rel=1e-9)


def test_factor_layouts_match_the_grouped_conv_chain():
    w = block_term_weight(np.random.default_rng(2), 12, 10, 3, 2, 3, 2)
    terms = branched_tucker(w, 6, 4, 2)
    assert terms.first_factor().shape == (10, 4) and terms.last_factor().shape == (12, 6)
    assert terms.grouped_core().shape == (6, 2, 3, 3)          # [r_out, r_in / G, k, k]
    # the chain, written densely: block-diagonal core between the concatenated factors
    dense_core = np.zeros((6, 4, 3, 3))
    for g in range(2):
        dense_core[3 * g:3 * g + 3, 2 * g:2 * g + 2] = terms.core[g]
    chain = np.einsum("rs...,or,is->oi...", dense_core, terms.last_factor(), terms.first_factor())
    np.testing.assert_allclose(chain, terms.reconstruct(), atol=1e-12)


def test_ranks_must_be_multiples_of_the_branches():
    with pytest.raises(ValueError, match="multiples of the 4 branches"):
        branched_tucker(np.ones((8, 8, 3, 3)), 6, 8, 4)


def test_macs_of_the_grouped_core_are_divided_by_the_branches():
    assert branched_tucker_macs(64, 64, 9, 1, 32, 32, 1) == 64 * 32 + 32 * 32 * 9 + 32 * 64
    assert branched_tucker_macs(64, 64, 9, 2, 32, 32, 4) == 2 * 64 * 32 + 32 * 32 * 9 // 4 + 32 * 64


@pytest.mark.parametrize("attrs", ["pads = [1, 1, 1, 1]", "strides = [2, 2], pads = [1, 0, 1, 1]"])
def test_branched_tucker_rewrite_has_a_grouped_core_and_parity_in_ort(attrs):
    rng = np.random.default_rng(3)
    w = block_term_weight(rng, 32, 32, 3, 2, 4, 4).astype(np.float32)
    model = model_from_text(
        f"(float[N, 32, 11, 11] x) => (float[N, 32, ?, ?] y) {{ [conv] y = Conv <{attrs}> (x, W, B) }}",
        W=w, B=rng.standard_normal(32).astype(np.float32))
    optimized, report = assert_rewrite(model, ops={"Conv": 3}, max_error=EXACT, conv_method="branched-tucker",
                                       branches=2, dims={"N": 2})
    (record,) = report.layers
    assert record.method == "branched-tucker" and record.rank == [8, 8]
    core = next(n for n in optimized.graph.node if n.name.endswith("_core"))
    assert {a.name: a.i for a in core.attribute if a.name == "group"} == {"group": 2}
    assert record.params_after == 32 * 8 + 8 * 4 * 9 + 8 * 32
