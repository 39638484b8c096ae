"""Global rank allocation: every layer's rank chosen together to meet one target.

    minimise   sum_l e_l(r_l)^2            (predicted output error: squared relative errors add)
    subject to sum_l cost_l(r_l) <= ratio * sum_l cost_l(dense)

e_l(r) is the layer's relative output error at rank r: activation-weighted (whitened singular
values) when calibration data is given, the weight's own Frobenius error otherwise. A layer is
either dense or at a rank on its grid, every one of which pays: a matrix layer (LayerSpectrum) at
a rank r <= its max_rank, a k x k conv (ConvSpectrum) at Tucker-2 ranks (r_out, r_in) that shrink
together, with the HOSVD bound e^2 = e_out(r_out)^2 + e_in(r_in)^2.

Greedy on marginal error per unit of cost saved: each layer offers its best next move (to any lower
rank on its rank grid: the steepest chord, so a layer whose first step barely pays is not passed
over when the steps after it are cheap), and the cheapest move overall is taken until the target is
met. The moves taken are kept in order: undoing them from the last is the back-off path of
--max-error, most damaging per unit of cost first.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Hashable, Mapping, Protocol

import numpy as np

from .numerics import ranks as R

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

    def grid(self, multiple: int, kind: str = "flops") -> list[int]:
        return rank_grid(self, multiple)


@dataclass(frozen=True)
class ConvSpectrum:
    """What allocation needs of one k x k conv W [O, I, *k] factorized as Tucker-2."""

    name: str
    out_ch: int
    in_ch: int
    kernel: int                 # prod of the kernel dims
    stride: int                 # prod of the strides
    out_errors: np.ndarray      # relative error by output-mode rank, 0..O
    in_errors: np.ndarray       # relative error by input-mode rank, 0..I
    min_flop_reduction: float
    positions: float = 1.0      # output pixels per inference

    def cost(self, ranks: tuple[int, int] | None, kind: str) -> float:
        if kind == "flops":
            return self.positions * R.tucker2_macs(self.out_ch, self.in_ch, self.kernel, self.stride,
                                                   *(ranks or (None, None)))
        if ranks is None:
            return self.out_ch * self.in_ch * self.kernel
        r_out, r_in = ranks
        return self.out_ch * r_out + r_out * r_in * self.kernel + r_in * self.in_ch

    def squared_error(self, ranks: tuple[int, int] | None) -> float:
        return 0.0 if ranks is None else float(self.out_errors[ranks[0]] ** 2 + self.in_errors[ranks[1]] ** 2)

    def grid(self, multiple: int, kind: str = "flops") -> list[tuple[int, int]]:
        """Descending: r_in on its multiples, r_out in proportion (O / I), both rounded up to a
        multiple, kept where the MACs pay."""
        grid = []
        for r_in in range(self.in_ch - self.in_ch % multiple or self.in_ch, 0, -multiple):
            r_out = min(self.out_ch, max(multiple, math.ceil(r_in * self.out_ch / self.in_ch / multiple) * multiple))
            if R.tucker2_pays(self.out_ch, self.in_ch, self.kernel, self.stride, r_out, r_in, self.min_flop_reduction):
                grid.append((r_out, r_in))
        return grid


@dataclass(frozen=True)
class NeuronSpectrum:
    """What allocation needs of one MLP block kept on k of its d neurons (passes/prune_mlp.py):
    x [d_in] -> d neurons -> y [d_out], the block's `layers` (first, second) dense either way."""

    name: str
    layers: tuple[str, str]
    d: int
    d_in: int
    d_out: int
    errors: np.ndarray        # relative error of the block output by kept neurons, k = 0..d
    max_k: int                # most neurons that still meet --min-flop-reduction
    positions: float = 1.0

    def cost(self, k: int | None, kind: str) -> float:
        per_row = (self.d if k is None else k) * (self.d_in + self.d_out)
        return per_row * (self.positions if kind == "flops" else 1.0)

    def squared_error(self, k: int | None) -> float:
        return 0.0 if k is None else float(self.errors[k]) ** 2

    def grid(self, multiple: int, kind: str = "flops") -> list[int]:
        top = self.max_k
        if top < 1:
            return []
        if top < multiple:
            return list(range(top, 0, -1))
        return list(range(top - top % multiple, 0, -multiple))


@dataclass(frozen=True)
class BlockState:
    """An MLP block's form under the allocation: on `k` of its neurons (form "neurons"), or its two
    layers by SVD at `ranks` (form "svd"; a None rank keeps that layer dense)."""

    form: str
    k: int | None = None
    ranks: tuple[tuple[str, int | None], ...] = ()


@dataclass(frozen=True)
class BlockForms:
    """One MLP block with both of its forms on one grid (--mlp-form auto): the block on k neurons
    (NeuronSpectrum) or its layers' ranks (LayerSpectrum each; a layer the survey did not cover
    stays dense at `fixed` cost). Its grid is the Pareto front of (cost, error) over every state of
    either form, so the greedy allocation picks, at each step, the form that adds least error per
    unit of cost saved, jointly with every other layer's rank."""

    name: str
    block: NeuronSpectrum
    members: tuple[LayerSpectrum, ...]
    fixed: dict[str, float] = field(default_factory=dict)     # kind -> cost of members not surveyed

    def cost(self, state: BlockState | None, kind: str) -> float:
        if state is None:
            return self.block.cost(None, kind)
        if state.form == "neurons":
            return self.block.cost(state.k, kind)
        ranks = dict(state.ranks)
        return self.fixed.get(kind, 0.0) + sum(m.cost(ranks[m.name], kind) for m in self.members)

    def squared_error(self, state: BlockState | None) -> float:
        if state is None:
            return 0.0
        if state.form == "neurons":
            return self.block.squared_error(state.k)
        ranks = dict(state.ranks)
        return sum(m.squared_error(ranks[m.name]) for m in self.members)

    def grid(self, multiple: int, kind: str = "flops") -> list[BlockState]:
        """Descending cost, each state less error than every cheaper one, all cheaper than dense.
        The SVD states are every combination of the members' ranks (a 4096 x 11008 FFN: ~10^5),
        costed with numpy; only the front is made into states."""
        choices = [[None] + m.grid(multiple) for m in self.members]
        costs, errors = np.zeros(()), np.zeros(())
        for m, ranks in zip(self.members, choices):
            costs = np.add.outer(costs, [m.cost(r, kind) for r in ranks])
            errors = np.add.outer(errors, [m.squared_error(r) for r in ranks])
        costs, errors = costs.ravel() + self.fixed.get(kind, 0.0), errors.ravel()
        neurons = self.block.grid(multiple)
        costs = np.concatenate([[self.block.cost(k, kind) for k in neurons], costs[1:]])   # [1:]: all dense
        errors = np.concatenate([[self.block.squared_error(k) for k in neurons], errors[1:]])
        front, least = [], math.inf
        for i in np.lexsort((errors, costs)):   # cheapest first: a state stays if it errs less than all cheaper
            if costs[i] < self.cost(None, kind) and errors[i] < least:
                front.append(int(i))
                least = errors[i]
        return [self._state(i, neurons, choices) for i in front[::-1]]

    def _state(self, index: int, neurons: list[int], choices: list[list]) -> BlockState:
        if index < len(neurons):
            return BlockState("neurons", neurons[index])
        ranks = np.unravel_index(index - len(neurons) + 1, [len(c) for c in choices])
        return BlockState("svd", ranks=tuple((m.name, c[r]) for m, c, r in zip(self.members, choices, ranks)))


def layer_ranks(ranks: Mapping[str, Hashable | None]) -> dict[str, Hashable | None]:
    """The per-layer ranks the passes read: a BlockState under a block's name becomes the block's k
    (prune_mlp) or its layers' ranks (the decompose passes; the block's name then absent)."""
    expanded: dict[str, Hashable | None] = {}
    for name, rank in ranks.items():
        if isinstance(rank, BlockState):
            if rank.form == "neurons":
                expanded[name] = rank.k
            else:
                expanded.update(rank.ranks)
        else:
            expanded[name] = rank
    return expanded


class Spectrum(Protocol):
    name: str

    def cost(self, rank, kind: str) -> float: ...
    def squared_error(self, rank) -> float: ...
    def grid(self, multiple: int, kind: str = "flops") -> list: ...   # descending cost; kind: the cost it is ordered by


@dataclass
class Allocation:
    ranks: dict[str, Hashable | None]            # None: dense; an int, or (r_out, r_in) for a conv
    steps: list[tuple[str, Hashable]] = field(default_factory=list)   # (layer, new rank), in order taken
    cost_before: float = 0.0
    cost_after: float = 0.0
    met: bool = True

    def after(self, count: int) -> dict[str, Hashable | None]:
        """The ranks after the first `count` steps: the back-off path replays a prefix."""
        ranks: dict[str, Hashable | None] = {name: None for name in self.ranks}
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


def allocate_ranks(layers: list[Spectrum], ratio: float, kind: str = "flops", multiple: int = 8) -> Allocation:
    """Ranks for `layers` so that their total cost is at most ratio x the dense total."""
    if kind not in COSTS:
        raise ValueError(f"kind must be one of {COSTS}, got {kind!r}")
    grids = {layer.name: layer.grid(multiple, kind) for layer in layers}
    by_name = {layer.name: layer for layer in layers}
    state: dict[str, Hashable | None] = {layer.name: None for layer in layers}
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


def _best_move(layer: Spectrum, current: Hashable | None, grid: list, kind: str) -> tuple[float, Hashable] | None:
    """(error added per unit of cost saved, new rank) of the steepest-descent chord from `current`
    to any smaller rank (later on the descending grid)."""
    cost, error = layer.cost(current, kind), layer.squared_error(current)
    best = None
    for rank in grid[grid.index(current) + 1:] if current is not None else grid:
        saved = cost - layer.cost(rank, kind)
        if saved <= 0:
            continue
        price = (layer.squared_error(rank) - error) / saved
        if best is None or price < best[0]:
            best = (price, rank)
    return best


def predicted_error(layers: list[Spectrum], ranks: dict[str, Hashable | None]) -> float:
    """sqrt(sum e_l^2): the output error if layer errors were independent and passed through unscaled."""
    return float(np.sqrt(sum(layer.squared_error(ranks.get(layer.name)) for layer in layers)))


def flop_ratio_for_speedup(speedup: float, layer_fraction: float) -> float:
    """Amdahl: the candidate layers take `layer_fraction` of the run time and scale with their MACs,
    the rest stays; the MAC ratio that gives `speedup` overall (<= 0: out of reach)."""
    return (1.0 / speedup - (1.0 - layer_fraction)) / layer_fraction
