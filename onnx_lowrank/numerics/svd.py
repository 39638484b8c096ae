"""Truncated SVD of a weight matrix, with the singular values split evenly between the factors."""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits


def single_threaded_blas():
    """LAPACK's SVD under multi-threaded OpenBLAS ran 8-30x slower than on one thread on our 2-core
    CI machines (768x3072: 20.3 s vs 0.71 s; 2048x2048: 34.4 s vs 4.3 s), while a plain GEMM gained
    little from the second thread; so decompositions run on one BLAS thread."""
    return threadpool_limits(limits=1, user_api="blas")


def svd(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD in float64: float32/fp16 weights lose digits that the rank choice depends on."""
    with single_threaded_blas():
        return np.linalg.svd(np.asarray(w, dtype=np.float64), full_matrices=False)


def relative_error_by_rank(s: np.ndarray) -> np.ndarray:
    """err[r] = ||W - W_r||_F / ||W||_F for r = 0..len(s) (Eckart-Young: the discarded tail)."""
    energy = np.asarray(s, dtype=np.float64) ** 2
    total = energy.sum()
    if total == 0.0:
        return np.zeros(len(energy) + 1)
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
    return np.sqrt(np.maximum(tail, 0.0) / total)


def factorize(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """w [m, n] ~= a [m, rank] @ b [rank, n]."""
    return split_factors(*svd(w), rank)


def split_factors(u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The rank-`rank` truncation of u diag(s) vt as two factors.

    Each factor takes sqrt(s): the two factors then have equal norms, which keeps float16
    factors clear of overflow and underflow when written back in the model's dtype.
    """
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def gram_energies(w: np.ndarray) -> tuple[np.ndarray, float]:
    """The squared singular values of w (descending) from the eigenvalues of its smaller Gram
    matrix, without the SVD's vectors, and a bound on the error of any sum of them as a fraction
    of ||w||_F^2.

    Forming the Gram costs m^2 k multiply-adds and its eigenvalues (no vectors) about 4/3 m^3 for
    w [m, k], m <= k: several times less than the thin SVD. Each eigenvalue is off by at most
    ||dG||_2, where forming G adds <= k eps ||w||_F^2 and the symmetric eigensolver (backward
    stable) ~ m eps ||G||_2 <= m eps ||w||_F^2; a sum of up to m of them is off by m times that.
    The bound takes 16x those constants, for the rounding of the sums themselves."""
    w64 = np.asarray(w, dtype=np.float64)
    m, k = sorted(w64.shape)
    with single_threaded_blas():
        gram = w64 @ w64.T if w64.shape[0] <= w64.shape[1] else w64.T @ w64
        energy = np.linalg.eigvalsh(gram)[::-1]
    bound = 16.0 * m * (k + m) * np.finfo(np.float64).eps
    return np.maximum(energy, 0.0), bound
