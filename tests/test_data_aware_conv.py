"""Whitened Tucker-2 for k x k convs: the input channels' Gram from --calibration steers the
input-mode truncation toward the channel directions the activations use (numerics/tucker.py)."""

import numpy as np
import pytest
from helpers import model_from_text, only, relative_error, run_ort

from onnx_lowrank import optimize
from onnx_lowrank.numerics.tucker import (channel_bases, tucker2, tucker2_reconstruct, whiten_channels,
                                          whitened_channel_bases)

RNG = np.random.default_rng(0)
#: O = RANK keeps the output mode whole at the tested ranks, so the comparison isolates the input
#: mode, the one the channel Gram whitens
C, O, R_ACT, HW, RANK = 24, 4, 6, 10, 4
W = (RNG.standard_normal((O, C, 3, 3)) / np.sqrt(9 * C)).astype(np.float32)
P = RNG.standard_normal((R_ACT, C))        # the activations' channel subspace, [r, C]
ENERGY = np.logspace(0, -1.5, R_ACT)       # its directions' scales, so that rank RANK < R_ACT can be good


def conv_model(strides=(1, 1), pads=(1, 1, 1, 1), w=W):
    return model_from_text(
        f"(float[N, {C}, {HW}, {HW}] x) => (float[N, {O}, H, V] y) {{ "
        f"[conv] y = Conv<strides = {list(strides)}, pads = {list(pads)}>(x, W) }}", W=w)


def inputs(samples, seed):
    """x = z P over the channel axis: every pixel's channel vector lies in an R_ACT-dimensional
    subspace of the C channels, so the channel Gram has rank R_ACT (Cholesky fails: eigen fallback)."""
    z = np.random.default_rng(seed).standard_normal((samples, R_ACT, HW, HW)) * ENERGY[:, None, None]
    return np.einsum("nrhw,rc->nchw", z, P).astype(np.float32)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, x=inputs(64, seed=1))
    return str(path)


def held_out_error(original, model):
    x = inputs(32, seed=2)
    return relative_error(run_ort(model, {"x": x})[0], run_ort(original, {"x": x})[0])


def decompose(model, rank, **options):
    return optimize(model, rank=rank, rank_multiple=1, validate=False, skip=only("decompose"), **options)


@pytest.mark.parametrize("strides, pads", [((1, 1), (1, 1, 1, 1)), ((2, 2), (0, 1, 1, 0))])
def test_whitened_tucker2_beats_hosvd_at_the_same_ranks(calib, strides, pads):
    """At input rank RANK HOSVD keeps the weight's strongest input channels, which the activations
    barely use; the whitened truncation keeps the directions they live in. Measured in ORT on
    held-out samples: stride 1 0.76 (HOSVD) against 0.083 (whitened), stride 2 with uneven pads
    0.77 against 0.083."""
    model = conv_model(strides, pads)
    plain, plain_report = decompose(model, RANK)
    white, white_report = decompose(model, RANK, calibration=calib)
    (p,), (w,) = plain_report.decomposed, white_report.decomposed
    assert (p.method, w.method) == ("tucker2", "whitened-tucker2")
    assert p.rank == w.rank == [RANK, RANK]
    assert w.activation_error is not None and p.activation_error is None
    plain_error, white_error = held_out_error(model, plain), held_out_error(model, white)
    assert white_error < 0.2 * plain_error, (plain_error, white_error)
    # the record's first-order error against ORT's: z is white across pixels, so the channel Gram
    # is the whole second-order statistic (measured 0.0826 against 0.0830); 10% covers the
    # held-out sampling and the padded border
    assert w.activation_error == pytest.approx(white_error, rel=0.1)


def test_whitened_rewrite_is_exact_on_the_activation_subspace(calib):
    """At input rank R_ACT the whitened projection keeps the whole activation subspace (and the
    output mode is whole), so in ORT the rewrite gives the dense conv's output on such inputs
    although the Gram is singular and the projection oblique. 1e-4: float32 sums through a
    chain of three convs over 24 x 9 terms, far below the 0.03 of one dropped direction."""
    model = conv_model()
    white, report = decompose(model, R_ACT, calibration=calib)
    (record,) = report.decomposed
    assert record.rank == [O, R_ACT]
    assert held_out_error(model, white) < 1e-4
    # the recorded error is on the regularised Gram, whose ridge (1e-6 of the mean eigenvalue) puts
    # a little energy in the 18 unused channel directions: measured 8e-4
    assert record.activation_error < 1e-2


def test_whitened_chain_matches_its_numpy_reconstruction(calib):
    """The rewritten chain (1x1 -> k x k -> 1x1) computes the conv of the reconstructed weight on
    any input, not only on the calibration subspace: the oblique u_in and the core taken with R U
    are wired the right way round."""
    model = conv_model()
    white, _ = decompose(model, RANK, calibration=calib)
    u_out, core, u_in = tucker2(W, RANK, RANK, whitened=whitened_channel_bases(W, _gram(inputs(64, seed=1))))
    approx = conv_model(w=tucker2_reconstruct(u_out, core, u_in).astype(np.float32))
    x = np.random.default_rng(4).standard_normal((4, C, HW, HW)).astype(np.float32)
    assert relative_error(run_ort(white, {"x": x})[0], run_ort(approx, {"x": x})[0]) < 1e-4


def test_rank_deficient_channel_gram_does_not_crash():
    """Zero Gram, rank-1 Gram and a Gram of dead channels: the eigen fallback whitens them all."""
    rank_one = np.outer(P[0], P[0])
    dead = np.diag(np.r_[np.ones(C // 2), np.zeros(C - C // 2)])
    for gram in (np.zeros((C, C)), rank_one, dead):
        bases = whitened_channel_bases(W, gram)
        u_out, core, u_in = tucker2(W, 8, 8, whitened=bases)
        approx = tucker2_reconstruct(u_out, core, u_in)
        assert np.all(np.isfinite(approx))
        t, ta = whiten_channels(W, bases.white), whiten_channels(approx, bases.white)
        assert np.linalg.norm(t - ta) <= np.linalg.norm(t) + 1e-12


def test_without_gram_tucker2_is_unchanged():
    bases = channel_bases(W)
    u_out, core, u_in = tucker2(W, 8, 8, bases)
    assert np.allclose(u_in.T @ u_in, np.eye(8))        # plain HOSVD: orthonormal factors, as before


def _gram(x):
    rows = np.moveaxis(x, 1, -1).reshape(-1, C).astype(np.float64)
    return rows.T @ rows


def test_tolerance_rule_uses_the_activation_weighted_spectra(calib):
    """Under --tolerance the calibrated layer's ranks come from the whitened weight's spectra: the
    input mode needs at most R_ACT channels (all of the activations' energy), where the weight's
    own input spectrum is flat over the C = 24 channels. The recorded activation error keeps to
    the tolerance (the HOSVD bound), and so does the output error in ORT. Measured: ranks (4, 5),
    activation error 0.024, ORT 0.024; weight-only wants ranks (4, 24), 169% of the dense MACs.
    0.06 in ORT: the bound is on the calibration Gram, the ORT error on held-out samples."""
    model = conv_model()
    white, report = optimize(model, tolerance=0.05, rank_multiple=1, validate=False, skip=only("decompose"),
                             calibration=calib)
    (record,) = report.decomposed
    assert record.method == "whitened-tucker2"
    assert record.rank[1] <= R_ACT
    assert record.activation_error <= 0.05
    assert held_out_error(model, white) <= 0.06
    _, plain_report = optimize(model, tolerance=0.05, rank_multiple=1, validate=False, skip=only("decompose"))
    assert not plain_report.decomposed
