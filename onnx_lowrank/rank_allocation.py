"""Global rank allocation: every matrix layer's rank chosen together to meet one target.

    minimise   sum_l e_l(r_l)^2            (predicted output error: squared relative errors add)
    subject to sum_l cost_l(r_l) <= ratio * sum_l cost_l(dense)

e_l(r) is the layer's relative output error at rank r: activation-weighted (whitened singular
values) when calibration data is given, the weight's own Frobenius error otherwise. A layer is
either dense or at a rank that pays (<= its max_rank); between ranks, costs are linear in r.

Greedy on marginal error per unit of cost saved: each layer offers its best next move (to any lower
rank on its rank grid: the steepest chord, so a layer whose first step barely pays is not passed
over when the steps after it are cheap), and the cheapest move overall is taken until the target is
met. The moves taken are kept in order: undoing them from the last is the back-off path of
--max-error, most damaging per unit of cost first.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

COSTS = ("flops", "params")


@dataclass(frozen=True)
class LayerSpectrum:
    """What allocation needs of one layer, y = x W with W [k, n]."""

    name: str
    k: int
    n: int
    errors: np.ndarray        # relative output error by rank, r = 0..min(k, n)
    max_rank: int             # largest rank that still meets --min-flop-reduction (0: never pays)
    positions: float = 1.0    # rows per inference: weights MACs, not parameters

    def cost(self, rank: int | None, kind: str) -> float:
        per_row = self.k * self.n if rank is None else rank * (self.k + self.n)
        return per_row * (self.positions if kind == "flops" else 1.0)

    def squared_error(self, rank: int | None) -> float:
        return 0.0 if rank is None else float(self.errors[rank]) ** 2


@dataclass
class Allocation:
    ranks: dict[str, int | None]                 # None: dense
    steps: list[tuple[str, int]] = field(default_factory=list)   # (layer, new rank), in order taken
    cost_before: float = 0.0
    cost_after: float = 0.0
    met: bool = True

    def after(self, count: int) -> dict[str, int | None]:
        """The ranks after the first `count` steps: the back-off path replays a prefix."""
        ranks: dict[str, int | None] = {name: None for name in self.ranks}
        for name, rank in self.steps[:count]:
            ranks[name] = rank
        return ranks


def rank_grid(spectrum: LayerSpectrum, multiple: int) -> list[int]:
    """Ranks a layer may take, descending: multiples of `multiple` up to max_rank (the kernels'
    preferred sizes), or every rank when max_rank is below one multiple."""
    top = spectrum.max_rank
    if top < 1:
        return []
    if top < multiple:
        return list(range(top, 0, -1))
    return list(range(top - top % multiple, 0, -multiple))


def allocate_ranks(layers: list[LayerSpectrum], ratio: float, kind: str = "flops", multiple: int = 8) -> Allocation:
    """Ranks for `layers` so that their total cost is at most ratio x the dense total."""
    if kind not in COSTS:
        raise ValueError(f"kind must be one of {COSTS}, got {kind!r}")
    grids = {layer.name: rank_grid(layer, multiple) for layer in layers}
    by_name = {layer.name: layer for layer in layers}
    state: dict[str, int | None] = {layer.name: None for layer in layers}
    before = sum(layer.cost(None, kind) for layer in layers)
    budget = ratio * before
    total = before
    heap: list[tuple[float, int, str, int]] = []
    for i, layer in enumerate(layers):
        move = _best_move(layer, None, grids[layer.name], kind)
        if move is not None:
            heapq.heappush(heap, (move[0], i, layer.name, move[1]))
    steps = []
    while total > budget * (1 + 1e-12) and heap:
        _, i, name, rank = heapq.heappop(heap)
        layer = by_name[name]
        total -= layer.cost(state[name], kind) - layer.cost(rank, kind)
        state[name] = rank
        steps.append((name, rank))
        move = _best_move(layer, rank, grids[name], kind)
        if move is not None:
            heapq.heappush(heap, (move[0], i, name, move[1]))
    return Allocation(state, steps, before, total, met=total <= budget * (1 + 1e-12))


def _best_move(layer: LayerSpectrum, current: int | None, grid: list[int], kind: str) -> tuple[float, int] | None:
    """(error added per unit of cost saved, new rank) of the steepest-descent chord from `current`."""
    cost, error = layer.cost(current, kind), layer.squared_error(current)
    best = None
    for rank in grid:
        if current is not None and rank >= current:
            continue
        saved = cost - layer.cost(rank, kind)
        if saved <= 0:
            continue
        price = (layer.squared_error(rank) - error) / saved
        if best is None or price < best[0]:
            best = (price, rank)
    return best


def predicted_error(layers: list[LayerSpectrum], ranks: dict[str, int | None]) -> float:
    """sqrt(sum e_l^2): the output error if layer errors were independent and passed through unscaled."""
    return float(np.sqrt(sum(layer.squared_error(ranks.get(layer.name)) for layer in layers)))


def flop_ratio_for_speedup(speedup: float, layer_fraction: float) -> float:
    """Amdahl: the candidate layers take `layer_fraction` of the run time and scale with their MACs,
    the rest stays; the MAC ratio that gives `speedup` overall (<= 0: out of reach)."""
    return (1.0 / speedup - (1.0 - layer_fraction)) / layer_fraction
