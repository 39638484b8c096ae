"""Choose ranks: apply the rank rule, round to the hardware multiple, refuse what does not pay.

A decision carries either the ranks or the reason the layer is left dense, so the report can say
exactly why ("rank 254 for tolerance 0.001 > 115, the break-even rank 128 less 10%").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .numerics import ranks as R
from .options import Options


@dataclass(frozen=True)
class RankDecision:
    ranks: tuple[int, ...] | None     # None: leave the layer dense
    break_even_rank: float
    max_rank: int
    reason: str = ""


def choose_matrix_rank(s: np.ndarray, k: int, n: int, options: Options) -> RankDecision:
    """Rank for W [k, n] with singular values s, factorized as (x A) B."""
    break_even = R.matrix_break_even_rank(k, n)
    max_rank = R.matrix_max_rank(k, n, options.min_flop_reduction)
    rule = options.rank_rule
    rank = R.rank_for_spectrum(s, rule)
    if rank > max_rank:
        return RankDecision(None, break_even, max_rank,
                            f"rank {rank} for {rule.describe()} > {max_rank} "
                            f"(break-even {break_even:.0f} less {options.min_flop_reduction:.0%})")
    return RankDecision((R.round_up_to_multiple(rank, options.rank_multiple, max_rank),), break_even, max_rank)


def choose_tucker2_ranks(s_out: np.ndarray, s_in: np.ndarray, out_ch: int, in_ch: int,
                         kernel: int, stride: int, options: Options) -> RankDecision:
    """Ranks (r_out, r_in) for a conv weight whose channel unfoldings have spectra s_out, s_in.

    Under the tolerance rule each mode gets tolerance / sqrt(2): the truncated HOSVD error is at
    most the root of the two modes' discarded energies summed, so the total stays within tolerance.
    """
    rule = options.rank_rule
    budget = rule.value / math.sqrt(2) if rule.kind == "tolerance" else None
    r_out = R.rank_for_spectrum(s_out, rule, budget)
    r_in = R.rank_for_spectrum(s_in, rule, budget)
    break_even = R.tucker2_break_even_rank(out_ch, in_ch, kernel, stride)
    m = options.min_flop_reduction

    def pays(ro: int, ri: int) -> bool:
        return R.tucker2_pays(out_ch, in_ch, kernel, stride, ro, ri, m)

    max_rank = max((r for r in range(1, min(out_ch, in_ch) + 1) if pays(r, r)), default=0)
    if not pays(r_out, r_in):
        dense = R.tucker2_macs(out_ch, in_ch, kernel, stride)
        cost = R.tucker2_macs(out_ch, in_ch, kernel, stride, r_out, r_in)
        return RankDecision(None, break_even, max_rank,
                            f"ranks ({r_out}, {r_in}) for {rule.describe()} cost {cost / dense:.0%} of the dense "
                            f"MACs; needs <= {1 - m:.0%} (break-even equal rank {break_even})")
    mult = options.rank_multiple
    up_out = R.round_up_to_multiple(r_out, mult, out_ch)
    up_in = R.round_up_to_multiple(r_in, mult, in_ch)
    for ro, ri in ((up_out, up_in), (up_out, r_in), (r_out, up_in)):
        if pays(ro, ri):
            return RankDecision((ro, ri), break_even, max_rank)
    return RankDecision((r_out, r_in), break_even, max_rank)
