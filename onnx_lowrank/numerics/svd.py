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
