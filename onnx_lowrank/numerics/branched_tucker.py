"""Branched Tucker: a block-term decomposition of a conv weight into G Tucker-2 branches.

    W [O, I, *k] ~= sum_g core_g x_0 U_g x_1 V_g,   U_g [O, r_out/G], V_g [I, r_in/G],
                                                     core_g [r_out/G, r_in/G, *k]

In the graph this is a Tucker-2 chain whose core conv is grouped (group = G): the 1x1 convs carry
the concatenated V_g and U_g, and the core conv costs G times fewer multiply-adds and parameters than
a full r_out x r_in core.

Keeping the diagonal blocks of a full Tucker-2 core is the cheap way to get such a form, but the
dropped off-diagonal blocks are pure loss. Here each branch is fitted to what the other branches
leave over (block coordinate descent): with the others fixed, a branch is a Tucker-2 problem on the
residual, and one HOOI sweep (U_g from the residual projected on V_g, then V_g, then the core as the
projection) is its exact minimizer over U_g and the core given V_g, and vice versa. The error never
increases from the diagonal-blocks start it is initialized from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .svd import single_threaded_blas
from .tucker import channel_bases, unfold


@dataclass
class BlockTerms:
    """The G branches: u [G, O, ro], core [G, ro, ri, *k], v [G, I, ri]."""

    u: np.ndarray
    core: np.ndarray
    v: np.ndarray

    @property
    def branches(self) -> int:
        return self.u.shape[0]

    def reconstruct(self) -> np.ndarray:
        return np.einsum("grs...,gor,gis->oi...", self.core, self.u, self.v, optimize=True)

    def grouped_core(self) -> np.ndarray:
        """The core as a grouped conv's weight [r_out, r_in / G, *k]: group g maps input channels
        g ri .. (g+1) ri - 1 to output channels g ro .. (g+1) ro - 1."""
        g, ro, ri, *k = self.core.shape
        return self.core.reshape(g * ro, ri, *k)

    def first_factor(self) -> np.ndarray:
        """V_g concatenated: [I, r_in], the 1x1 conv in front of the core."""
        return np.concatenate(list(self.v), axis=1)

    def last_factor(self) -> np.ndarray:
        """U_g concatenated: [O, r_out], the 1x1 conv after the core."""
        return np.concatenate(list(self.u), axis=1)


def diagonal_blocks(w: np.ndarray, rank_out: int, rank_in: int, branches: int) -> BlockTerms:
    """The approximation the ALS starts from: a full Tucker-2 (HOSVD) at (rank_out, rank_in) whose
    core keeps only its G diagonal blocks."""
    _check(w, rank_out, rank_in, branches)
    w = np.asarray(w, dtype=np.float64)
    out_basis, in_basis = channel_bases(w)
    ro, ri = rank_out // branches, rank_in // branches
    u = out_basis.u[:, :rank_out].reshape(w.shape[0], branches, ro).transpose(1, 0, 2)
    v = in_basis.u[:, :rank_in].reshape(w.shape[1], branches, ri).transpose(1, 0, 2)
    core = np.einsum("oi...,gor,gis->grs...", w, u, v, optimize=True)
    return BlockTerms(u, core, v)


def branched_tucker(w: np.ndarray, rank_out: int, rank_in: int, branches: int,
                    iterations: int = 100, tol: float = 1e-9, polish: int = 5) -> BlockTerms:
    """Fit G branches to w [O, I, *k] by alternating least squares, branch by branch.

    The sweeps run on w compressed to its leading (rank_out, rank_in) channel subspaces (the HOSVD
    core: O I / (r_out r_in) times cheaper per sweep), which hold every branch of an exact block-term
    weight; `polish` sweeps on the full weight then let the branches leave those subspaces where
    that lowers the error. A stage stops when a sweep lowers the relative error by less than `tol`
    (relative to the error), or after `iterations` sweeps.
    """
    w = np.asarray(w, dtype=np.float64)
    start = diagonal_blocks(w, rank_out, rank_in, branches)
    if branches == 1 or not np.any(w):
        return start   # one branch is plain Tucker-2, whose HOSVD start is the reference
    q_out, q_in = start.last_factor(), start.first_factor()
    compressed = np.einsum("oi...,or,is->rs...", w, q_out, q_in, optimize=True)
    eye_out, eye_in = np.eye(rank_out), np.eye(rank_in)
    ro, ri = rank_out // branches, rank_in // branches
    small = BlockTerms(eye_out.reshape(rank_out, branches, ro).transpose(1, 0, 2).copy(), start.core.copy(),
                       eye_in.reshape(rank_in, branches, ri).transpose(1, 0, 2).copy())
    with single_threaded_blas():
        _sweeps(compressed, small, iterations, tol)
        terms = BlockTerms(np.einsum("or,grs->gos", q_out, small.u), small.core,
                           np.einsum("is,gsr->gir", q_in, small.v))
        _sweeps(w, terms, polish, tol)
    return terms


def _sweeps(w: np.ndarray, terms: BlockTerms, iterations: int, tol: float) -> None:
    """Block coordinate descent in place: each branch, in turn, is refitted to the residual of the others."""
    norm = np.linalg.norm(w)
    ro, ri = terms.u.shape[2], terms.v.shape[2]
    approx = terms.reconstruct()
    error = np.linalg.norm(w - approx) / norm
    for _ in range(iterations):
        for g in range(terms.branches):
            own = np.einsum("rs...,or,is->oi...", terms.core[g], terms.u[g], terms.v[g], optimize=True)
            residual = w - approx + own
            terms.u[g] = _leading(unfold(np.einsum("oi...,is->os...", residual, terms.v[g]), 0), ro)
            terms.v[g] = _leading(unfold(np.einsum("oi...,or->ri...", residual, terms.u[g]), 1), ri)
            terms.core[g] = np.einsum("oi...,or,is->rs...", residual, terms.u[g], terms.v[g], optimize=True)
            approx += np.einsum("rs...,or,is->oi...", terms.core[g], terms.u[g], terms.v[g], optimize=True) - own
        previous, error = error, np.linalg.norm(w - approx) / norm
        if previous - error <= tol * max(error, 1e-300):
            break


def branched_tucker_macs(out_ch: int, in_ch: int, kernel: int, stride: int, rank_out: int, rank_in: int,
                         branches: int) -> int:
    """Multiply-adds per output pixel; the first 1x1 runs at input resolution (stride x the pixels)."""
    return stride * in_ch * rank_in + rank_in * rank_out * kernel // branches + rank_out * out_ch


def _leading(m: np.ndarray, rank: int) -> np.ndarray:
    """The `rank` leading left singular vectors of m (short and wide: eigh of its Gram matrix)."""
    eigvals, eigvecs = np.linalg.eigh(m @ m.T)
    return eigvecs[:, np.argsort(eigvals)[::-1][:rank]]


def _check(w: np.ndarray, rank_out: int, rank_in: int, branches: int) -> None:
    if branches < 1 or rank_out % branches or rank_in % branches:
        raise ValueError(f"ranks ({rank_out}, {rank_in}) must be multiples of the {branches} branches")
    if not (1 <= rank_out <= w.shape[0] and 1 <= rank_in <= w.shape[1]):
        raise ValueError(f"ranks ({rank_out}, {rank_in}) out of range for weight {list(w.shape)}")
