"""Whitened SVD on arrays: it minimises the error on the inputs, survives singular Grams, and is the
plain SVD when the inputs are white."""

import numpy as np
import pytest

from onnx_lowrank.numerics.svd import factorize, svd
from onnx_lowrank.numerics.whitening import (activation_error, asvd_gram, corrected_weight, whitened_svd,
                                             whitening)

RNG = np.random.default_rng(0)


def anisotropic_inputs(rows=2000, k=64, decay=3.0, seed=0):
    """Inputs whose feature scales span `decay` decades, with a random rotation: the weight's own
    top singular directions are not the ones the inputs excite."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    return (rng.standard_normal((rows, k)) * np.logspace(0, -decay, k)) @ q


@pytest.mark.parametrize("rank", [4, 8, 16])
def test_whitened_svd_beats_plain_svd_on_the_inputs(rank):
    x = anisotropic_inputs()
    w = RNG.standard_normal((64, 48))
    gram = x.T @ x
    white = whitened_svd(w, gram)
    a, b = white.factors(rank)
    plain = np.matmul(*factorize(w, rank))
    ours, theirs = activation_error(gram, w, a @ b), activation_error(gram, w, plain)
    # measured directly on X as well, not only through the Gram identity
    direct = np.linalg.norm(x @ w - x @ a @ b) / np.linalg.norm(x @ w)
    assert direct == pytest.approx(ours, rel=1e-9)
    assert ours < 0.8 * theirs
    # the spectrum predicts the error; the 1e-6 ridge moves it by ~1e-6 relative
    assert white.relative_errors()[rank] == pytest.approx(ours, rel=1e-4, abs=1e-7)


def test_whitened_truncation_is_optimal_among_rank_r():
    """Eckart-Young in the whitened space: no rank-r weight does better on X, e.g. the plain SVD of
    the weight or the whitened truncation perturbed."""
    x = anisotropic_inputs(k=32)
    w = RNG.standard_normal((32, 24))
    gram = x.T @ x
    a, b = whitened_svd(w, gram).factors(6)
    best = activation_error(gram, w, a @ b)
    for _ in range(5):
        da = 1e-3 * RNG.standard_normal(a.shape)
        assert activation_error(gram, w, (a + da) @ b) >= best - 1e-12


def test_white_inputs_give_the_plain_svd():
    w = RNG.standard_normal((40, 30))
    white = whitened_svd(w, np.eye(40))
    _, s, _ = svd(w)
    # the ridge scales the identity by (1 + 1e-6): singular values move by 5e-7 relative
    np.testing.assert_allclose(white.s, s * np.sqrt(1 + 1e-6), rtol=1e-12)
    for rank in (1, 5, 29):
        np.testing.assert_allclose(np.matmul(*white.factors(rank)), np.matmul(*factorize(w, rank)), atol=1e-9)


@pytest.mark.parametrize("rows", [0, 1, 5])
def test_rank_deficient_gram_does_not_crash(rows):
    k = 32
    x = RNG.standard_normal((rows, k))
    x[:, 3] = 0.0                     # a dead unit
    w = RNG.standard_normal((k, 16))
    gram = x.T @ x
    for ridge in (0.0, 1e-6):         # ridge 0: Cholesky of a singular matrix fails -> eigh fallback
        white = whitened_svd(w, gram, ridge=ridge)
        a, b = white.factors(max(rows, 1))
        assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
        if rows:
            # X W has rank <= rows, so a rank-`rows` truncation reproduces it on X
            assert np.linalg.norm(x @ w - x @ a @ b) <= 1e-6 * np.linalg.norm(x @ w)
    assert whitening(gram, ridge=0.0).method == "eigh"


@pytest.mark.parametrize("n", [4, 12])
def test_indefinite_gram_does_not_crash(n):
    """A streamed float sum can come out slightly indefinite; that must not crash either: a tall
    weight never factors the Gram (its outputs' Gram has only non-negative eigenvalues left once
    rounding is clamped), a wide one falls back from Cholesky to eigh."""
    gram = -np.eye(8)
    white = whitened_svd(RNG.standard_normal((8, n)), gram)
    assert white.method == ("outputs" if n <= 8 else "eigh")
    assert np.all(white.s >= 0)
    assert np.all(np.isfinite(np.matmul(*white.factors(2))))


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])
def test_both_sides_give_the_thin_svd_of_the_whitened_weight(shape):
    """Tall weights take the eigenvectors of the outputs' Gram, wide ones those of the whitened
    weight's own: either way the singular values and every truncation are those of the thin SVD
    of R^T W mapped back (SVD-LLM's construction, computed here directly)."""
    k, n = shape
    x = anisotropic_inputs(rows=400, k=k, decay=2.0)
    w = RNG.standard_normal((k, n))
    gram = x.T @ x
    white = whitened_svd(w, gram)
    root = np.linalg.cholesky(gram + 1e-6 * np.trace(gram) / k * np.eye(k))
    u, s, vt = np.linalg.svd(root.T @ w, full_matrices=False)
    np.testing.assert_allclose(white.s, s, rtol=1e-9, atol=1e-9 * s[0])
    for rank in (1, 5, min(k, n) - 1):
        expected = np.linalg.solve(root.T, u[:, :rank] * s[:rank]) @ vt[:rank]
        np.testing.assert_allclose(np.matmul(*white.factors(rank)), expected, atol=1e-8 * np.abs(expected).max())


def test_asvd_gram_of_isotropic_inputs_is_the_plain_svd():
    w = RNG.standard_normal((20, 12))
    np.testing.assert_allclose(np.matmul(*whitened_svd(w, asvd_gram(3.0 * np.eye(20))).factors(4)),
                               np.matmul(*factorize(w, 4)), atol=1e-9)


def test_corrected_weight_undoes_a_known_input_distortion():
    """If the compressed model feeds the layer X~ = X P instead of X, the correction is P^-1 W
    (without shrinkage), and with unchanged inputs it is W itself, whatever the shrinkage."""
    x = anisotropic_inputs(rows=500, k=16, decay=1.0)
    w = RNG.standard_normal((16, 8))
    p = np.eye(16) + 0.1 * RNG.standard_normal((16, 16))
    xt = x @ p
    v = corrected_weight(w, xt.T @ xt, xt.T @ x, shrinkage=0.0)
    np.testing.assert_allclose(v, np.linalg.solve(p, w), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(corrected_weight(w, x.T @ x, x.T @ x, shrinkage=0.1), w, atol=1e-10)


def test_the_outputs_gram_gives_the_inputs_whitened_svd():
    """For a tall weight Y^T Y = W^T C W and trace(C) are all the whitened SVD needs: the same
    singular values and truncations as from C itself, ridge included."""
    from onnx_lowrank.numerics.whitening import OutputGram
    x = anisotropic_inputs(rows=300, k=48, decay=2.0)
    w = RNG.standard_normal((48, 12))
    y = x @ w
    by_inputs = whitened_svd(w, x.T @ x)
    by_outputs = whitened_svd(w, OutputGram(y.T @ y, float(np.sum(x * x)), 48))
    np.testing.assert_allclose(by_outputs.s, by_inputs.s, rtol=1e-10)
    for rank in (1, 6, 11):
        np.testing.assert_allclose(np.matmul(*by_outputs.factors(rank)), np.matmul(*by_inputs.factors(rank)),
                                   atol=1e-9)
    with pytest.raises(ValueError, match="does not match"):
        whitened_svd(w.T, OutputGram(y.T @ y, 1.0, 48))
