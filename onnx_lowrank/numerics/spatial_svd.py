"""Spatial SVD of a 2-D convolution weight (as Qualcomm AIMET does it): a kh x 1 conv then a 1 x kw conv.

    W [O, I, kh, kw],  W[o, i, h, w] ~= sum_r U[o, r, w] V[r, i, h]
    Conv kh x 1, I -> r (V [r, I, kh, 1])  ->  Conv 1 x kw, r -> O (U [O, r, 1, kw])

The weight rearranged as the matrix M[(i, h), (o, w)] has rank <= min(I kh, O kw); its truncated SVD
is the best such pair in the Frobenius norm (Eckart-Young), so the error of every rank is known from
the spectrum before any factor is built.
"""

from __future__ import annotations

import math

import numpy as np

from .svd import split_factors, svd


def spatial_matrix(w: np.ndarray) -> np.ndarray:
    """W [O, I, kh, kw] -> M [I kh, O kw]: rows index the vertical factor, columns the horizontal."""
    out_ch, in_ch, kh, kw = w.shape
    return np.asarray(w, dtype=np.float64).transpose(1, 2, 0, 3).reshape(in_ch * kh, out_ch * kw)


def spatial_spectrum(w: np.ndarray) -> np.ndarray:
    return svd(spatial_matrix(w))[1]


def spatial_svd(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Factors of W [O, I, kh, kw] at `rank`: vertical [rank, I, kh, 1], horizontal [O, rank, 1, kw]."""
    out_ch, in_ch, kh, kw = w.shape
    u, s, vt = svd(spatial_matrix(w))
    p, q = split_factors(u, s, vt, rank)                  # p [I kh, r], q [r, O kw]
    vertical = p.T.reshape(rank, in_ch, kh, 1)
    horizontal = q.reshape(rank, out_ch, kw).transpose(1, 0, 2).reshape(out_ch, rank, 1, kw)
    return vertical, horizontal


def spatial_svd_reconstruct(vertical: np.ndarray, horizontal: np.ndarray) -> np.ndarray:
    return np.einsum("rih,orw->oihw", vertical[..., 0], horizontal[:, :, 0, :], optimize=True)


def spatial_svd_macs(out_ch: int, in_ch: int, kh: int, kw: int, stride_w: int = 1, rank: int | None = None) -> int:
    """Multiply-adds per output pixel. The vertical conv keeps the input's width: it runs at
    stride_w times the output's pixel count (its rows are already strided)."""
    if rank is None:
        return out_ch * in_ch * kh * kw
    return rank * (stride_w * in_ch * kh + out_ch * kw)


def spatial_svd_break_even_rank(out_ch: int, in_ch: int, kh: int, kw: int, stride_w: int = 1) -> int:
    dense = spatial_svd_macs(out_ch, in_ch, kh, kw)
    return min(math.floor(dense / (stride_w * in_ch * kh + out_ch * kw)), in_ch * kh, out_ch * kw)
