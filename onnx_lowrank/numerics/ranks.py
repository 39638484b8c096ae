"""Rank rules and the multiply-add cost models that decide whether a factorization pays.

Costs are multiply-adds per output position (a row of a MatMul, a pixel of a Conv): the number of
positions multiplies dense and factorized forms alike, so the ratio needs no shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .svd import relative_error_by_rank

RULES = ("tolerance", "rank", "ratio", "energy")


@dataclass(frozen=True)
class RankRule:
    """How a layer's rank is chosen. kind is one of RULES.

    tolerance: smallest rank whose relative Frobenius weight error is <= value.
    rank:      exactly value (capped at full rank).
    ratio:     ceil(value * full rank).
    energy:    smallest rank keeping >= value of the squared singular values.
    """

    kind: str = "tolerance"
    value: float = 1e-3

    def describe(self) -> str:
        names = {"tolerance": "tolerance", "rank": "rank", "ratio": "rank-ratio", "energy": "energy"}
        value = int(self.value) if self.kind == "rank" else self.value
        return f"{names[self.kind]} {value:g}"


def rank_for_spectrum(s: np.ndarray, rule: RankRule, error_budget: float | None = None) -> int:
    """The rank `rule` picks for singular values s (descending).

    error_budget overrides the tolerance rule's value (Tucker splits its budget between modes).
    """
    full = len(s)
    if full == 0:
        return 0
    if rule.kind == "rank":
        return max(1, min(int(rule.value), full))
    if rule.kind == "ratio":
        return max(1, min(full, math.ceil(rule.value * full)))
    errors = relative_error_by_rank(s)
    ok = np.nonzero(errors <= spectrum_budget(rule, error_budget))[0]
    return max(1, int(ok[0]) if len(ok) else full)


def spectrum_budget(rule: RankRule, error_budget: float | None = None) -> float:
    """The relative error the tolerance or energy rule stops at (the smallest rank within it)."""
    if rule.kind == "energy":
        # kept energy fraction = 1 - err^2; a tiny slack absorbs float rounding at value == 1.
        return math.sqrt(max(1.0 - rule.value, 0.0)) + 1e-12
    return rule.value if error_budget is None else error_budget


def round_up_to_multiple(rank: int, multiple: int, limit: int) -> int:
    """Round rank up to a multiple the kernels like, unless that passes `limit` or full rank.

    Rounding up never increases the error, so it is taken whenever it still pays; a rank that
    cannot be rounded without losing the benefit is kept as it is.
    """
    if multiple <= 1:
        return rank
    rounded = -(-rank // multiple) * multiple
    return rounded if rounded <= limit else rank


# --- matrices: y = x W, W [k, n] -> (x A) B, A [k, r], B [r, n] -----------------------------

def matrix_macs(k: int, n: int, rank: int | None = None) -> int:
    return k * n if rank is None else rank * (k + n)


def matrix_break_even_rank(k: int, n: int) -> float:
    """The rank at which the factorized form costs as much as the dense one: k n / (k + n)."""
    return k * n / (k + n)


def matrix_max_rank(k: int, n: int, min_flop_reduction: float) -> int:
    """Largest rank whose factorized cost is at most (1 - min_flop_reduction) of the dense one."""
    limit = (1.0 - min_flop_reduction) * k * n / (k + n)
    return max(0, min(math.floor(limit + 1e-9), min(k, n)))


# --- Tucker-2 convs: W [O, I, *k] -> 1x1 (I -> r_in), k (r_in -> r_out), 1x1 (r_out -> O) ------

def tucker2_macs(out_ch: int, in_ch: int, kernel: int, stride: int,
                 rank_out: int | None = None, rank_in: int | None = None) -> int:
    """Multiply-adds per output pixel; kernel = prod(kernel dims), stride = prod(strides).

    The first 1x1 runs at input resolution, `stride` times the output's pixel count: a strided
    core leaves its input projection un-strided.
    """
    if rank_out is None:
        return out_ch * in_ch * kernel
    return stride * in_ch * rank_in + rank_in * rank_out * kernel + rank_out * out_ch


def tucker2_break_even_rank(out_ch: int, in_ch: int, kernel: int, stride: int) -> int:
    """Largest equal rank r (r_out = r_in = r) whose Tucker-2 form costs no more than the dense conv."""
    dense = tucker2_macs(out_ch, in_ch, kernel, stride)
    # kernel r^2 + (stride in + out) r - dense <= 0
    b = stride * in_ch + out_ch
    r = (-b + math.sqrt(b * b + 4 * kernel * dense)) / (2 * kernel)
    return max(0, min(math.floor(r + 1e-9), out_ch, in_ch))


def tucker2_pays(out_ch: int, in_ch: int, kernel: int, stride: int,
                 rank_out: int, rank_in: int, min_flop_reduction: float) -> bool:
    dense = tucker2_macs(out_ch, in_ch, kernel, stride)
    return tucker2_macs(out_ch, in_ch, kernel, stride, rank_out, rank_in) <= (1.0 - min_flop_reduction) * dense
