"""Tucker-2 decomposition of a convolution weight on its two channel modes (truncated HOSVD).

Data-aware (whitened) Tucker-2: with C = sum over samples and pixels of x x^T the Gram of the
conv's input channels and C = R R^T, the conv's output error over those inputs is, to first order
in the channel statistics (the correlation between a pixel and its neighbours under the kernel is
not modelled), the Frobenius error of the whitened weight T = W x_1 R^T:

    sum ||y - y_r||^2 ~= tr(D^T C D) = ||R^T D||_F^2,   D = unfold(W - W_r, 1)  [I, O k^2]

So the HOSVD of T, mapped back, is the Tucker-2 that is best on the calibration inputs, exactly as
whitened SVD is for a matrix: with U the leading input-mode vectors of T, the first 1x1 conv
projects with B = R^{-T} U (B^T x = U^T R^{-1} x, the whitened input on U) and the core is
W x_0 U_out^T x_1 (R U)^T, so that W_r x_1 R^T = T x_0 P_out x_1 U U^T.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .svd import single_threaded_blas
from .whitening import RIDGE, SHRINKAGE, Whitening, corrected_weight, whitened_svd, whitening


@dataclass(frozen=True)
class ModeBasis:
    """Singular values (descending) and left singular vectors of one mode's unfolding."""

    s: np.ndarray
    u: np.ndarray


def unfold(w: np.ndarray, mode: int) -> np.ndarray:
    """Mode-`mode` unfolding: that axis first, every other axis flattened into columns."""
    return np.moveaxis(w, mode, 0).reshape(w.shape[mode], -1)


def mode_basis(w: np.ndarray, mode: int) -> ModeBasis:
    """From the eigendecomposition of the unfolding's Gram matrix (channels x channels): the
    unfolding is short and wide (O x I k^2), and eigh of the small Gram is ~10x cheaper than its
    SVD. Singular values below ~1e-8 of the largest lose relative precision, far below any
    tolerance a rank rule uses."""
    m = unfold(np.asarray(w, dtype=np.float64), mode)
    with single_threaded_blas():
        eigvals, eigvecs = np.linalg.eigh(m @ m.T)
    order = np.argsort(eigvals)[::-1]
    return ModeBasis(np.sqrt(np.maximum(eigvals[order], 0.0)), eigvecs[:, order])


def channel_bases(w: np.ndarray) -> tuple[ModeBasis, ModeBasis]:
    """Bases of the output-channel and input-channel modes of w [O, I, *k]."""
    return mode_basis(w, 0), mode_basis(w, 1)


def whiten_channels(w: np.ndarray, white: Whitening) -> np.ndarray:
    """T = w x_1 R^T: the input-channel mode seen through the activations' root."""
    return np.einsum("oi...,ij->oj...", np.asarray(w, dtype=np.float64), white.root, optimize=True)


@dataclass(frozen=True)
class WhitenedBases:
    """Bases of the whitened weight T = w x_1 R^T: the singular values of each mode are
    activation-weighted (they rank truncations by output error, as the weight's own rank them by
    weight error), and the input-mode vectors live in the whitened space."""

    out_basis: ModeBasis
    in_basis: ModeBasis
    white: Whitening

    @property
    def bases(self) -> tuple[ModeBasis, ModeBasis]:
        return self.out_basis, self.in_basis


def whitened_channel_bases(w: np.ndarray, gram: np.ndarray, ridge: float = RIDGE) -> WhitenedBases:
    """w [O, I, *k]; gram [I, I] the input channels' Gram over the calibration pixels."""
    if gram.shape != (w.shape[1],) * 2:
        raise ValueError(f"channel Gram {gram.shape} does not match weight {w.shape} (expected I x I, I = {w.shape[1]})")
    white = whitening(gram, ridge)
    t = whiten_channels(w, white)
    return WhitenedBases(mode_basis(t, 0), mode_basis(t, 1), white)


def tucker2(w: np.ndarray, rank_out: int, rank_in: int,
            bases: tuple[ModeBasis, ModeBasis] | None = None,
            whitened: WhitenedBases | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [O, I, *k] ~= core x_0 u_out x_1 u_in.

    Returns u_out [O, rank_out], core [rank_out, rank_in, *k], u_in [I, rank_in]. The factor
    matrices are the leading left singular vectors of each unfolding (HOSVD); the core is the
    projection of w onto them, the least-squares optimum for those factors. With `whitened`, the
    HOSVD is that of the whitened weight (see the module docstring): u_in = R^{-T} U projects the
    input, and the core is taken with R U, so u_in is no longer orthonormal.
    """
    if whitened is not None:
        u_out, u_white = whitened.out_basis.u[:, :rank_out], whitened.in_basis.u[:, :rank_in]
        u_in, u_core = whitened.white.unwhiten(u_white), whitened.white.root @ u_white
    else:
        out_basis, in_basis = bases or channel_bases(w)
        u_out, u_in = out_basis.u[:, :rank_out], in_basis.u[:, :rank_in]
        u_core = u_in
    core = np.einsum("oi...,or,is->rs...", np.asarray(w, dtype=np.float64), u_out, u_core, optimize=True)
    return u_out, core, u_in


def tucker2_reconstruct(u_out: np.ndarray, core: np.ndarray, u_in: np.ndarray) -> np.ndarray:
    return np.einsum("rs...,or,is->oi...", core, u_out, u_in, optimize=True)


def relative_error(w: np.ndarray, approx: np.ndarray) -> float:
    w64 = np.asarray(w, dtype=np.float64)
    norm = np.linalg.norm(w64)
    return float(np.linalg.norm(w64 - approx) / norm) if norm else 0.0


def patch_channel_gram(patch_gram: np.ndarray, in_ch: int) -> np.ndarray:
    """The input channels' Gram from the Gram of the conv's patch rows [I k, I k]: the mean of its
    diagonal blocks (one per kernel offset, each the channel Gram over the pixels that offset sees)."""
    k = patch_gram.shape[0] // in_ch
    return np.einsum("ipjp->ij", np.asarray(patch_gram, dtype=np.float64).reshape(in_ch, k, in_ch, k)) / k


def corrected_tucker2(w: np.ndarray, patch_gram: np.ndarray, patch_cross: np.ndarray, rank_out: int, rank_in: int,
                      shrinkage: float = SHRINKAGE) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Tucker-2 of w [O, I, *k] fitted to the conv's original output on the inputs it sees once the
    layers before it are truncated: P~ the patch rows it sees, P the original ones (numerics/
    patches.py), patch_gram = P~^T P~ and patch_cross = P~^T P, both [I k, I k].

    1. V = the dense conv that best maps P~ to P w (corrected_weight, shrunk toward w);
    2. u_in from V's whitened input mode (the channel Gram of P~), as whitened Tucker-2 takes it;
    3. with the first 1x1 fixed, the core and the last 1x1 together are a rank-r_out map from the
       reduced patches Z~ = P~ (u_in x I_k) to the outputs: refitted by least squares and truncated
       by whitened SVD on Z~'s Gram, the optimum for that u_in (reduced-rank regression).

    Returns u_out [O, rank_out], core [rank_out, rank_in, *k], u_in [I, rank_in], as tucker2 does,
    and the relative error of step 3's truncation on Z~ (the activation error of the chain against
    the refitted map, as a corrected matrix layer's is against its corrected weight)."""
    o, i, *kernel = w.shape
    k = int(np.prod(kernel))
    target = np.asarray(w, dtype=np.float64).reshape(o, i * k).T          # y = p @ target
    gram = np.asarray(patch_gram, dtype=np.float64)
    cross = np.asarray(patch_cross, dtype=np.float64)
    dense = corrected_weight(target, gram, cross, shrinkage).T.reshape(w.shape)
    whitened = whitened_channel_bases(dense, patch_channel_gram(gram, i))
    u_full, core_full, u_in = tucker2(dense, o, rank_in, whitened=whitened)
    projection = np.kron(u_in, np.eye(k))                                  # [I k, r_in k]
    with single_threaded_blas():
        reduced_gram = projection.T @ gram @ projection
        reduced_cross = projection.T @ cross
        prior = (u_full @ core_full.reshape(o, rank_in * k)).T             # the uncorrected Tucker map
        fitted = corrected_weight(target, reduced_gram, reduced_cross, shrinkage, prior=prior)
    truncation = whitened_svd(fitted, reduced_gram)
    first, second = truncation.factors(rank_out)                            # [r_in k, r_out], [r_out, O]
    core = np.ascontiguousarray(first.T).reshape(rank_out, rank_in, *kernel)
    return np.ascontiguousarray(second.T), core, u_in, float(truncation.relative_errors()[rank_out])
