"""onnx_lowrank.numerics on arrays alone: SVD factors, Tucker-2, rank rules, cost models.

Property tests draw shapes and ranks with hypothesis. Reconstructions are computed in float64,
so "exact" means 1e-9 relative: the SVD's own backward error is ~1e-15 times the norm, and
these matrices are at most 40 x 40.
"""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from onnx_lowrank.numerics import ranks as R
from onnx_lowrank.numerics.ranks import RankRule
from onnx_lowrank.numerics.svd import factorize, relative_error_by_rank, split_factors, svd
from onnx_lowrank.numerics.tucker import channel_bases, mode_basis, relative_error, tucker2, tucker2_reconstruct, unfold

FLOAT64_EXACT = 1e-9

dims = st.integers(1, 40)
seeds = st.integers(0, 2**32 - 1)


@st.composite
def low_rank_matrices(draw):
    m, n = draw(dims), draw(dims)
    rank = draw(st.integers(1, min(m, n)))
    rng = np.random.default_rng(draw(seeds))
    return rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n)), rank


@st.composite
def tucker_weights(draw):
    """w [O, I, *kernel] with channel-mode ranks (r_out, r_in), and those ranks."""
    out_ch, in_ch = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    kernel = draw(st.sampled_from([(1,), (3,), (1, 1), (3, 3), (1, 3), (2, 2, 2)]))
    r_out, r_in = draw(st.integers(1, out_ch)), draw(st.integers(1, in_ch))
    rng = np.random.default_rng(draw(seeds))
    core = rng.standard_normal((r_out, r_in, *kernel))
    w = np.einsum("rs...,or,is->oi...", core, rng.standard_normal((out_ch, r_out)), rng.standard_normal((in_ch, r_in)))
    return w, r_out, r_in


# --- SVD -----------------------------------------------------------------------------------------

@given(low_rank_matrices())
def test_factorize_reconstructs_an_exactly_low_rank_matrix(case):
    w, rank = case
    a, b = factorize(w, rank)
    assert a.shape == (w.shape[0], rank) and b.shape == (rank, w.shape[1])
    assert np.linalg.norm(a @ b - w) <= FLOAT64_EXACT * np.linalg.norm(w)


@given(dims, dims, seeds, st.data())
def test_relative_error_by_rank_is_the_actual_truncation_error(m, n, seed, data):
    w = np.random.default_rng(seed).standard_normal((m, n))
    u, s, vt = svd(w)
    errors = relative_error_by_rank(s)
    assert errors.shape == (min(m, n) + 1,)
    assert errors[0] == pytest.approx(1.0) and errors[-1] == 0.0
    assert np.all(np.diff(errors) <= 0)
    rank = data.draw(st.integers(0, min(m, n)))
    a, b = split_factors(u, s, vt, rank)
    actual = np.linalg.norm(w - a @ b) / np.linalg.norm(w)
    assert actual == pytest.approx(errors[rank], abs=FLOAT64_EXACT)


@given(low_rank_matrices())
def test_split_factors_share_the_singular_values_evenly(case):
    # Equal factor norms are what keeps float16 factors in range (svd.split_factors' docstring).
    w, rank = case
    a, b = factorize(w, rank)
    assert np.linalg.norm(a) == pytest.approx(np.linalg.norm(b), rel=1e-9)


def test_relative_error_of_a_zero_matrix_is_zero_at_every_rank():
    assert np.array_equal(relative_error_by_rank(np.zeros(3)), np.zeros(4))


def test_svd_runs_in_float64_whatever_the_weight_dtype():
    w = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float16)
    u, s, vt = svd(w)
    assert u.dtype == s.dtype == vt.dtype == np.float64


# --- Tucker-2 ------------------------------------------------------------------------------------

@given(tucker_weights())
def test_mode_basis_matches_the_svd_of_the_unfolding(case):
    w, _, _ = case
    for mode in (0, 1):
        basis = mode_basis(w, mode)
        s = np.linalg.svd(unfold(w, mode), compute_uv=False)
        # eigh of the Gram matrix squares the condition number: singular values agree to
        # ~sqrt(eps) of the largest, which is what mode_basis promises.
        assert np.allclose(basis.s[:len(s)], s, atol=1e-7 * s[0])
        assert np.allclose(basis.u.T @ basis.u, np.eye(w.shape[mode]), atol=1e-9)


@given(tucker_weights())
def test_tucker2_recovers_a_weight_of_exact_channel_ranks(case):
    w, r_out, r_in = case
    u_out, core, u_in = tucker2(w, r_out, r_in)
    assert u_out.shape == (w.shape[0], r_out) and u_in.shape == (w.shape[1], r_in)
    assert core.shape == (r_out, r_in, *w.shape[2:])
    # The Gram-matrix basis loses half the digits (see above), hence 1e-6 rather than 1e-9.
    assert relative_error(w, tucker2_reconstruct(u_out, core, u_in)) <= 1e-6


@given(st.integers(1, 16), st.integers(1, 16), st.sampled_from([(1, 1), (3, 3), (3,)]), seeds, st.data())
def test_tucker2_error_is_within_the_hosvd_bound(out_ch, in_ch, kernel, seed, data):
    """Truncated HOSVD: ||W - W_hat||^2 <= sum over modes of the discarded squared singular values,
    so relative error <= sqrt(e_out(r_out)^2 + e_in(r_in)^2), which the tolerance rule relies on."""
    w = np.random.default_rng(seed).standard_normal((out_ch, in_ch, *kernel))
    r_out, r_in = data.draw(st.integers(1, out_ch)), data.draw(st.integers(1, in_ch))
    bases = channel_bases(w)
    error = relative_error(w, tucker2_reconstruct(*tucker2(w, r_out, r_in, bases)))
    e_out, e_in = relative_error_by_rank(bases[0].s)[r_out], relative_error_by_rank(bases[1].s)[r_in]
    assert error <= math.hypot(e_out, e_in) + 1e-7
    # and no better than either mode's truncation alone
    assert error >= max(e_out, e_in) - 1e-7


# --- rank rules ----------------------------------------------------------------------------------

spectra = st.lists(st.floats(1e-6, 1e3), min_size=1, max_size=40).map(lambda v: np.array(sorted(v, reverse=True)))
fractions = st.floats(1e-4, 0.999)


@given(spectra, fractions, fractions)
def test_tolerance_rank_is_the_smallest_within_tolerance_and_monotonic(s, t1, t2):
    loose, tight = max(t1, t2), min(t1, t2)
    errors = relative_error_by_rank(s)
    rank = R.rank_for_spectrum(s, RankRule("tolerance", tight))
    assert 1 <= rank <= len(s)
    assert errors[rank] <= tight
    assert rank == 1 or errors[rank - 1] > tight
    assert R.rank_for_spectrum(s, RankRule("tolerance", loose)) <= rank


@given(spectra, fractions, fractions)
def test_energy_rank_keeps_the_energy_and_is_monotonic(s, f1, f2):
    low, high = min(f1, f2), max(f1, f2)
    energy = np.cumsum(s**2) / np.sum(s**2)
    rank = R.rank_for_spectrum(s, RankRule("energy", high))
    assert energy[rank - 1] >= high - 1e-9
    assert rank == 1 or energy[rank - 2] < high + 1e-9
    assert R.rank_for_spectrum(s, RankRule("energy", low)) <= rank


@given(spectra, st.integers(1, 100), st.floats(0.01, 1.0))
def test_fixed_rank_and_ratio_are_capped_at_full_rank(s, rank, ratio):
    assert R.rank_for_spectrum(s, RankRule("rank", rank)) == min(rank, len(s))
    assert R.rank_for_spectrum(s, RankRule("ratio", ratio)) == min(len(s), math.ceil(ratio * len(s)))


def test_energy_one_keeps_every_nonzero_singular_value():
    assert R.rank_for_spectrum(np.array([3.0, 2.0, 1.0, 0.0]), RankRule("energy", 1.0)) == 3


@given(st.integers(1, 300), st.integers(1, 64), st.integers(1, 400))
def test_round_up_to_multiple_never_passes_the_limit(rank, multiple, limit):
    rounded = R.round_up_to_multiple(rank, multiple, limit)
    assert rounded >= rank
    if rounded != rank:
        assert rounded % multiple == 0 and rounded - rank < multiple and rounded <= limit
    else:
        assert rank % multiple == 0 or -(-rank // multiple) * multiple > limit or multiple == 1


# --- cost models and break-even ------------------------------------------------------------------

@given(st.integers(1, 5000), st.integers(1, 5000))
def test_matrix_break_even_rank_is_where_the_costs_meet(k, n):
    b = R.matrix_break_even_rank(k, n)
    assert R.matrix_macs(k, n, math.floor(b)) <= R.matrix_macs(k, n)
    assert R.matrix_macs(k, n, math.floor(b) + 1) > R.matrix_macs(k, n)


@given(st.integers(1, 5000), st.integers(1, 5000), st.floats(0.0, 0.99))
def test_matrix_max_rank_is_the_largest_rank_that_saves_enough(k, n, reduction):
    r = R.matrix_max_rank(k, n, reduction)
    budget = (1 - reduction) * R.matrix_macs(k, n)
    assert 0 <= r <= min(k, n)
    assert r == 0 or R.matrix_macs(k, n, r) <= budget * (1 + 1e-12)
    assert r == min(k, n) or R.matrix_macs(k, n, r + 1) > budget


def test_matrix_break_even_of_the_acceptance_shapes():
    assert R.matrix_break_even_rank(768, 3072) == pytest.approx(614.4)
    assert R.matrix_max_rank(768, 3072, 0.1) == 552
    assert R.matrix_max_rank(1024, 1024, 0.1) == 460


@given(st.integers(1, 512), st.integers(1, 512), st.sampled_from([1, 3, 9, 25, 27]), st.sampled_from([1, 2, 4]))
def test_tucker2_break_even_rank_is_the_largest_equal_rank_that_pays(out_ch, in_ch, kernel, stride):
    r = R.tucker2_break_even_rank(out_ch, in_ch, kernel, stride)
    assert 0 <= r <= min(out_ch, in_ch)
    assert r == 0 or R.tucker2_pays(out_ch, in_ch, kernel, stride, r, r, 0.0)
    assert r == min(out_ch, in_ch) or not R.tucker2_pays(out_ch, in_ch, kernel, stride, r + 1, r + 1, 0.0)


def test_tucker2_macs_counts_the_three_stages():
    # Conv 3x3 256->256 at Tucker ranks (64, 64): 1x1 256->64, 3x3 64->64, 1x1 64->256 per pixel
    assert R.tucker2_macs(256, 256, 9, 1) == 256 * 256 * 9
    assert R.tucker2_macs(256, 256, 9, 1, 64, 64) == 256 * 64 + 64 * 64 * 9 + 64 * 256
    # a stride-2 core sees 4x the output's pixels at its input projection
    assert R.tucker2_macs(256, 128, 9, 4, 32, 16) == 4 * 128 * 16 + 16 * 32 * 9 + 32 * 256


def test_rank_rule_describes_itself_as_the_flag():
    assert RankRule("tolerance", 1e-3).describe() == "tolerance 0.001"
    assert RankRule("rank", 64).describe() == "rank 64"
    assert RankRule("ratio", 0.25).describe() == "rank-ratio 0.25"
    assert RankRule("energy", 0.99).describe() == "energy 0.99"
