"""Tucker-2 decomposition of a convolution weight on its two channel modes (truncated HOSVD)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .svd import single_threaded_blas


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


def tucker2(w: np.ndarray, rank_out: int, rank_in: int,
            bases: tuple[ModeBasis, ModeBasis] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [O, I, *k] ~= core x_0 u_out x_1 u_in.

    Returns u_out [O, rank_out], core [rank_out, rank_in, *k], u_in [I, rank_in]. The factor
    matrices are the leading left singular vectors of each unfolding (HOSVD); the core is the
    projection of w onto them, the least-squares optimum for those factors.
    """
    out_basis, in_basis = bases or channel_bases(w)
    u_out, u_in = out_basis.u[:, :rank_out], in_basis.u[:, :rank_in]
    core = np.einsum("oi...,or,is->rs...", np.asarray(w, dtype=np.float64), u_out, u_in, optimize=True)
    return u_out, core, u_in


def tucker2_reconstruct(u_out: np.ndarray, core: np.ndarray, u_in: np.ndarray) -> np.ndarray:
    return np.einsum("rs...,or,is->oi...", core, u_out, u_in, optimize=True)


def relative_error(w: np.ndarray, approx: np.ndarray) -> float:
    w64 = np.asarray(w, dtype=np.float64)
    norm = np.linalg.norm(w64)
    return float(np.linalg.norm(w64 - approx) / norm) if norm else 0.0
