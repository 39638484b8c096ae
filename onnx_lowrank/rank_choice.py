"""Choose ranks: apply the rank rule, round to the hardware multiple, refuse what does not pay.

A decision carries either the ranks or the reason the layer is left dense, so the report can say
exactly why ("rank 254 for tolerance 0.001 > 115, the break-even rank 128 less 10%").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .forms import DENSE, Form, LatencyFn, LayerGeometry
from .numerics import ranks as R
from .numerics.svd import gram_energies, relative_error_by_rank
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
    return RankDecision((R.round_up_to_multiple(rank, options.rounding_multiple, max_rank),), break_even, max_rank)


def screen_matrix_rank(w: np.ndarray, options: Options,
                       energies: tuple[np.ndarray, float] | None = None) -> RankDecision | None:
    """The refusal choose_matrix_rank would return for w [k, n], decided without an SVD; None when
    the layer may pay, or when the cheap spectrum leaves the rule's rank in doubt: the SVD decides.

    The rank and ratio rules read only the full rank. The tolerance and energy rules read the
    spectrum from the Gram's eigenvalues (numerics.svd.gram_energies): the refusal, its reason
    and the rank it names are today's whenever no relative tail error lies within the
    eigenvalues' error bound of the budget, which is checked for every rank. `energies`: w's
    gram_energies when already computed (screen_weights, on all cores).
    """
    k, n = w.shape
    rule = options.rank_rule
    if rule.kind in ("rank", "ratio"):
        decision = choose_matrix_rank(np.zeros(min(k, n)), k, n, options)
        return decision if decision.ranks is None else None
    energy, bound = energies if energies is not None else gram_energies(w)
    s = np.sqrt(energy)
    decision = choose_matrix_rank(s, k, n, options)
    if decision.ranks is not None:
        return None
    errors = relative_error_by_rank(s)
    if np.any(np.abs(errors ** 2 - R.spectrum_budget(rule) ** 2) <= bound):
        return None
    return decision


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
    mult = options.rounding_multiple
    up_out = R.round_up_to_multiple(r_out, mult, out_ch)
    up_in = R.round_up_to_multiple(r_in, mult, in_ch)
    for ro, ri in ((up_out, up_in), (up_out, r_in), (r_out, up_in)):
        if pays(ro, ri):
            return RankDecision((ro, ri), break_even, max_rank)
    return RankDecision((r_out, r_in), break_even, max_rank)


# --- the measured path: rank search on the hardware (the paper's Algorithm 1) -----------------

#: A latency drop smaller than this fraction of the latency is taken for timing noise (spinning-off
#: micro-benchmarks on a quiet 2-core machine repeat to ~1-2%), not for a step of the kernels.
STEP_THRESHOLD = 0.03
#: --rank-multiple auto first measures on this grid, then every rank inside the largest drop.
AUTO_COARSE_STEP = 8

Ranks = tuple[int, ...]


@dataclass(frozen=True)
class MeasuredDecision:
    ranks: Ranks | None               # None: keep the layer dense
    latency_dense_ms: float
    latency_factorized_ms: float      # at `ranks`; at the rule's ranks when the layer is kept dense
    decision: str                     # one line for the report
    measured: tuple[tuple[Ranks, float], ...] = ()


def error_budget(options: Options) -> float | None:
    """The relative weight error a layer may reach: the tolerance or energy rule's bound. The rank
    and ratio rules fix the compression, not an error, so only --rank-search-floor bounds them."""
    rule = options.rank_rule
    if rule.kind == "tolerance":
        return rule.value
    if rule.kind == "energy":
        return math.sqrt(max(1.0 - rule.value, 0.0))
    return None


def search_ranks(chosen: Ranks, error_of: Callable[[Ranks], float], latency_of: Callable[[Ranks | None], float],
                 options: Options, granularity: int = 1) -> MeasuredDecision:
    """From the rule's ranks down to --rank-search-floor x them, take the ranks just below the
    largest latency drop whose error stays within the layer's budget; then keep the factorized form
    only if it beats the dense op by --min-layer-speedup.

    latency_of(None) is the dense op. All ranks move down together by the step (--rank-multiple, a
    multiple of `granularity`: branched cores need ranks divisible by their branch count). With
    --rank-multiple auto the step is found by measuring: a coarse grid first, then every rank
    inside its largest drop.
    """
    budget = error_budget(options)

    def allowed(ranks: Ranks) -> bool:
        return budget is None or ranks == chosen or error_of(ranks) <= budget + 1e-12

    auto = options.rank_multiple == "auto"
    step = math.lcm(AUTO_COARSE_STEP if auto else int(options.rank_multiple), granularity)
    floor = tuple(max(granularity, math.ceil(options.rank_search_floor * r)) for r in chosen)
    measured: dict[Ranks, float] = {}

    def lat(ranks: Ranks) -> float:
        if ranks not in measured:
            measured[ranks] = latency_of(ranks)
        return measured[ranks]

    grid = _grid(chosen, step, floor, allowed)
    below, drop = _below_largest_drop(grid, lat)
    if below is not None and auto and step > granularity:
        upper = grid[grid.index(below) - 1]
        fine_below, fine_drop = _below_largest_drop(_grid(upper, granularity, below, allowed), lat)
        if fine_below is not None:
            below, drop = fine_below, fine_drop
    if below is not None and lat(below) > (1.0 - STEP_THRESHOLD) * lat(chosen):
        below = None   # a drop followed by a rise further down: lowering the rank costs error for nothing
    ranks = below or chosen
    dense, factorized = latency_of(None), lat(ranks)
    history = tuple(sorted(measured.items(), reverse=True))
    speedup = dense / factorized if factorized > 0 else math.inf
    if speedup < options.min_layer_speedup:
        return MeasuredDecision(None, dense, factorized,
                                f"kept dense: measured {speedup:.2f}x < --min-layer-speedup {options.min_layer_speedup:g} "
                                f"(dense {dense:.3f} ms, {_fmt(ranks)} {factorized:.3f} ms)", history)
    if ranks != chosen:
        note = (f"rank search {_fmt(chosen)} -> {_fmt(ranks)}: just below a {drop:.3f} ms latency step; "
                f"{speedup:.2f}x vs dense")
    else:
        note = f"measured {speedup:.2f}x vs dense" + ("" if len(grid) < 2 else
                                                        f"; no latency step down to {_fmt(grid[-1])}")
    return MeasuredDecision(ranks, dense, factorized, note, history)


def _grid(top: Ranks, step: int, floor: Ranks, allowed: Callable[[Ranks], bool]) -> list[Ranks]:
    """top, top - step, ... while every rank stays >= its floor and the error within budget
    (error grows as ranks fall, so the grid stops at the first that is not allowed)."""
    grid = [top]
    while True:
        nxt = tuple(r - step for r in grid[-1])
        if any(r < f for r, f in zip(nxt, floor)) or not allowed(nxt):
            return grid
        grid.append(nxt)


def _below_largest_drop(grid: list[Ranks], lat: Callable[[Ranks], float]) -> tuple[Ranks | None, float]:
    """The ranks just below the largest latency drop along grid (descending ranks), if that drop
    is larger than timing noise; (None, 0) when latency has no step there."""
    if len(grid) < 2:
        return None, 0.0
    times = [lat(r) for r in grid]
    drops = [times[i] - times[i + 1] for i in range(len(grid) - 1)]
    i = max(range(len(drops)), key=lambda j: drops[j])
    if drops[i] <= STEP_THRESHOLD * times[i]:
        return None, 0.0
    return grid[i + 1], drops[i]


def _fmt(ranks: Ranks) -> str:
    return "rank " + "x".join(map(str, ranks))


def measure_matrix_rank(errors: np.ndarray, rank: int, geometry: LayerGeometry, latency: LatencyFn,
                        options: Options) -> MeasuredDecision:
    """search_ranks for an SVD layer: errors[r] is the relative error at rank r (Eckart-Young)."""
    return search_ranks((rank,), lambda ranks: float(errors[ranks[0]]),
                        lambda ranks: latency(geometry, DENSE if ranks is None else Form("svd", ranks)), options)
