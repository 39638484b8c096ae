"""The factorized forms of a k x k conv (--conv-method), their ranks, and the choice between them.

    tucker2          1x1 I -> r_in, k x k r_in -> r_out, 1x1 r_out -> O
    branched-tucker  the same chain with the core as a grouped conv (--branches G; ranks multiples
                     of G), fitted as G block terms by ALS
    spatial-svd      kh x 1 I -> r, then 1 x kw r -> O (2-D kernels)
    auto             each of them at the ranks the rule gives, measured (or costed by the FLOP
                     model): under --tolerance / --energy (one error budget) the fastest; under
                     --rank / --rank-ratio the least error among those no slower than Tucker-2

Each form gets its ranks from the rank rule, refuses itself with a reason when it does not pay
(--min-flop-reduction on MACs), and, with measured latency, goes through the rank search and the
dense-vs-factorized check of rank_choice.search_ranks.

With a calibration Gram of the conv's input channels, Tucker-2 is whitened (numerics/tucker.py):
its ranks, error bound and reported activation_error are then the error on the conv's output over
the calibration inputs, as whitened SVD's are for matrix layers. Under error correction its ranks
are fixed and its factors refitted on the patch Grams of the compressed model's inputs
(corrected_tucker2). The other forms stay weight-only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..forms import DENSE, Form, LayerGeometry
from ..numerics import ranks as R
from ..numerics.conv_attrs import conv_attrs
from ..numerics.branched_tucker import BlockTerms, branched_tucker, branched_tucker_macs
from ..numerics.spatial_svd import spatial_spectrum, spatial_svd, spatial_svd_macs
from ..numerics.svd import relative_error_by_rank
from ..numerics.tucker import (ModeBasis, WhitenedBases, channel_bases, corrected_tucker2, relative_error, tucker2,
                               tucker2_reconstruct, whiten_channels, whitened_channel_bases)
from ..rank_allocation import ConvSpectrum
from ..rank_choice import MeasuredDecision, RankDecision, choose_tucker2_ranks, error_budget, search_ranks
from .base import PassContext, layer_name, output_positions

#: Growth of branched-tucker ranks while the block-term fit misses the error budget, and the most
#: refits tried: each is an ALS fit, and a weight far from block-term structure never gets there.
BRANCH_RANK_GROWTH, BRANCH_FITS = 1.25, 4


@dataclass
class ConvPlan:
    method: str
    ranks: tuple[int, ...]
    branches: int
    weight_error: float
    params: int
    macs: int
    weights: Callable[[], list[np.ndarray]]      # of forms.conv_chain's convs; built only for the plan that is kept
    measured: MeasuredDecision | None = None
    alternatives: list[str] = field(default_factory=list)
    activation_error: float | None = None        # whitened Tucker-2: the error over the calibration inputs


@dataclass
class Refusal:
    method: str
    reason: str
    measured: MeasuredDecision | None = None


@dataclass
class _Layer:
    """A conv weight and what every form needs of it, computed once."""

    w: np.ndarray
    attrs: dict
    stride: int
    context: PassContext
    geometry: LayerGeometry | None
    bases: tuple[ModeBasis, ModeBasis]
    tucker2: RankDecision              # the rule's Tucker-2 ranks, or why they do not pay
    whitened: WhitenedBases | None = None     # with a calibration Gram: Tucker-2's bases and ranks come from it
    patch_grams: tuple[np.ndarray, np.ndarray] | None = None   # error correction's, with fixed ranks
    fixed: bool = False                # ranks fixed by context.layers.ranks: nothing to search or measure

    @property
    def out_ch(self) -> int:
        return self.w.shape[0]

    @property
    def in_ch(self) -> int:
        return self.w.shape[1]

    @property
    def kernel(self) -> int:
        return math.prod(self.w.shape[2:])

    @property
    def dense_macs(self) -> int:
        return R.tucker2_macs(self.out_ch, self.in_ch, self.kernel, self.stride)

    def pays(self, macs: int) -> bool:
        return macs <= (1.0 - self.context.options.min_flop_reduction) * self.dense_macs

    def measure(self, method: str, chosen: tuple[int, ...], error_of, granularity: int = 1, branches: int = 1
                ) -> MeasuredDecision | None:
        latency = self.context.latency
        if latency is None or self.geometry is None or self.fixed:
            return None
        return search_ranks(chosen, error_of,
                            lambda r: latency(self.geometry, DENSE if r is None else Form(method, r, branches)),
                            self.context.options, granularity)


def conv_methods(options, kernel_dims: list[int]) -> list[str]:
    if options.conv_method != "auto":
        return [options.conv_method]
    methods = ["tucker2"]
    if options.branches > 1:
        methods.append("branched-tucker")
    if len(kernel_dims) == 2:
        methods.append("spatial-svd")
    return methods


def plan_conv(context: PassContext, node: gs.Node, w: np.ndarray, geometry: LayerGeometry | None
              ) -> tuple[ConvPlan | None, list[Refusal], RankDecision]:
    """The form to rewrite w [O, I, *k] into, every form refused and why, and the Tucker-2 rank
    decision (its break-even and largest paying rank are the layer's, for the report)."""
    kernel_dims = list(w.shape[2:])
    stride = conv_attrs(node.attrs, kernel_dims).stride
    bases = channel_bases(w)
    name = layer_name(node)
    gram = context.layers.grams.get(name)
    whitened = whitened_channel_bases(w, gram) if gram is not None else None
    s_out, s_in = (b.s for b in (whitened.bases if whitened else bases))
    tucker2_decision = choose_tucker2_ranks(s_out, s_in, w.shape[0], w.shape[1], math.prod(kernel_dims),
                                            stride, context.options)
    methods = conv_methods(context.options, kernel_dims)
    if context.state.survey is not None:
        # global allocation (rank_allocation.py) chooses Tucker-2 ranks; the other forms keep the rule
        if "tucker2" in methods:
            context.state.survey[name] = ConvSpectrum(name, w.shape[0], w.shape[1], math.prod(kernel_dims), stride,
                                                relative_error_by_rank(s_out), relative_error_by_rank(s_in),
                                                context.options.min_flop_reduction,
                                                float(output_positions(context, node, 1) or 1))
        return None, [Refusal("tucker2", "surveyed only")], tucker2_decision
    fixed = name in context.layers.ranks
    if fixed:
        ranks = context.layers.ranks[name]
        if ranks is None:
            return None, [Refusal("tucker2", "kept dense by the global rank allocation")], tucker2_decision
        tucker2_decision = dataclasses.replace(tucker2_decision, ranks=tuple(ranks), reason="")
        methods = ["tucker2"]
    layer = _Layer(w, dict(node.attrs), stride, context, geometry, bases, tucker2_decision, whitened,
                   context.layers.patch_grams.get(name), fixed)
    plans, refusals = [], []
    for method in methods:
        result = _PLANNERS[method](layer)
        (plans if isinstance(result, ConvPlan) else refusals).append(result)
    if not plans:
        return None, refusals, tucker2_decision
    measured = all(p.measured is not None for p in plans)

    def cost(p: ConvPlan) -> float:
        return p.measured.latency_factorized_ms if measured else p.macs

    if error_budget(context.options) is not None:
        best = min(plans, key=cost)        # every plan is within the error budget: the fastest
    else:
        # --rank / --rank-ratio fix a size, not an error, and the forms' ranks are not comparable:
        # the least error among the forms no slower than Tucker-2 at the user's rank
        reference = next((cost(p) for p in plans if p.method == "tucker2"), max(map(cost, plans)))
        best = min((p for p in plans if cost(p) <= reference), key=lambda p: p.weight_error)
    if len(plans) + len(refusals) > 1:
        unit = (lambda p: f"{p.measured.latency_factorized_ms:.3f} ms") if measured else (lambda p: f"{p.macs} MACs/px")
        best.alternatives = [f"{p.method} {unit(p)}" for p in plans if p is not best]
        best.alternatives += [f"{r.method}: {r.reason}" for r in refusals]
    return best, refusals, tucker2_decision


# --- Tucker-2 -----------------------------------------------------------------------------------

def _tucker2_error_bound(layer: _Layer) -> Callable[[tuple[int, ...]], float]:
    """The truncated HOSVD's error is at most the root of the two modes' discarded energies summed
    (of the whitened weight's, an activation-weighted error, when the layer is calibrated)."""
    e_out, e_in = (relative_error_by_rank(b.s) for b in (layer.whitened.bases if layer.whitened else layer.bases))
    return lambda ranks: float(math.hypot(e_out[ranks[0]], e_in[ranks[1]]))


def _plan_tucker2(layer: _Layer) -> ConvPlan | Refusal:
    o, i, k, stride = layer.out_ch, layer.in_ch, layer.kernel, layer.stride
    decision = layer.tucker2
    if decision.ranks is None:
        return Refusal("tucker2", decision.reason)
    measured = layer.measure("tucker2", decision.ranks, _tucker2_error_bound(layer))
    if measured is not None and measured.ranks is None:
        return Refusal("tucker2", measured.decision, measured)
    r_out, r_in = measured.ranks if measured else decision.ranks
    activation_error = None
    if layer.patch_grams is not None:
        u_out, core, u_in, activation_error = corrected_tucker2(layer.w, *layer.patch_grams, r_out, r_in)
    else:
        u_out, core, u_in = tucker2(layer.w, r_out, r_in, layer.bases, layer.whitened)
    approx = tucker2_reconstruct(u_out, core, u_in)
    if layer.whitened is not None and activation_error is None:
        white = layer.whitened.white
        activation_error = relative_error(whiten_channels(layer.w, white), whiten_channels(approx, white))
    ones = [1] * (layer.w.ndim - 2)
    return ConvPlan("tucker2", (r_out, r_in), 1, relative_error(layer.w, approx),
                    u_out.size + core.size + u_in.size, R.tucker2_macs(o, i, k, stride, r_out, r_in),
                    lambda: [np.ascontiguousarray(u_in.T).reshape(r_in, i, *ones), core,
                             u_out.reshape(o, r_out, *ones)],
                    measured, activation_error=activation_error)


# --- branched Tucker ----------------------------------------------------------------------------

def _plan_branched(layer: _Layer) -> ConvPlan | Refusal:
    options = layer.context.options
    g = options.branches
    o, i, k, stride = layer.out_ch, layer.in_ch, layer.kernel, layer.stride
    if o < g or i < g:
        return Refusal("branched-tucker", f"{g} branches need at least {g} channels each way")
    rule = options.rank_rule
    budget = error_budget(options)
    mode_budget = rule.value / math.sqrt(2) if rule.kind == "tolerance" else None
    multiple = math.lcm(options.rounding_multiple, g)
    ranks = tuple(_round_to(R.rank_for_spectrum(b.s, rule, mode_budget), multiple, g, cap)
                  for b, cap in zip(layer.bases, (o, i)))
    fits: dict[tuple[int, int], BlockTerms] = {}

    def fit(r: tuple[int, int]) -> BlockTerms:
        if r not in fits:
            fits[r] = branched_tucker(layer.w, r[0], r[1], g)
        return fits[r]

    def error(r: tuple[int, int]) -> float:
        return relative_error(layer.w, fit(r).reconstruct())

    def macs(r: tuple[int, int]) -> int:
        return branched_tucker_macs(o, i, k, stride, r[0], r[1], g)

    for _ in range(BRANCH_FITS):
        if not layer.pays(macs(ranks)):
            return Refusal("branched-tucker", f"ranks {ranks[0]}x{ranks[1]} ({g} branches) cost "
                                              f"{macs(ranks) / layer.dense_macs:.0%} of the dense MACs")
        if budget is None or error(ranks) <= budget:
            break
        grown = tuple(_round_to(math.ceil(r * BRANCH_RANK_GROWTH), multiple, g, cap) for r, cap in zip(ranks, (o, i)))
        if grown == ranks:
            break
        ranks = grown
    else:
        return Refusal("branched-tucker", f"error {error(ranks):.1e} > {budget:g} at ranks {ranks[0]}x{ranks[1]} "
                                          f"after {BRANCH_FITS} fits")
    if budget is not None and error(ranks) > budget:
        return Refusal("branched-tucker", f"error {error(ranks):.1e} > {budget:g} at ranks {ranks[0]}x{ranks[1]}")
    measured = layer.measure("branched-tucker", ranks, error, granularity=g, branches=g)
    if measured is not None and measured.ranks is None:
        return Refusal("branched-tucker", measured.decision, measured)
    ranks = measured.ranks if measured else ranks
    terms = fit(ranks)
    r_out, r_in = ranks
    ones = [1] * (layer.w.ndim - 2)
    core = terms.grouped_core()
    return ConvPlan("branched-tucker", ranks, g, error(ranks), terms.u[0].size * g + core.size + terms.v[0].size * g,
                    macs(ranks),
                    lambda: [np.ascontiguousarray(terms.first_factor().T).reshape(r_in, i, *ones), core,
                             terms.last_factor().reshape(o, r_out, *ones)],
                    measured)


# --- spatial SVD --------------------------------------------------------------------------------

def _plan_spatial(layer: _Layer) -> ConvPlan | Refusal:
    options = layer.context.options
    if layer.w.ndim != 4:
        return Refusal("spatial-svd", "needs a 2-D kernel")
    o, i, kh, kw = layer.w.shape
    strides = conv_attrs(layer.attrs, (kh, kw)).strides
    s = spatial_spectrum(layer.w)
    errors = relative_error_by_rank(s)
    rank = R.rank_for_spectrum(s, options.rank_rule)
    max_rank = max((r for r in range(1, len(s) + 1) if layer.pays(spatial_svd_macs(o, i, kh, kw, strides[1], r))),
                   default=0)
    if rank > max_rank:
        return Refusal("spatial-svd", f"rank {rank} for {options.rank_rule.describe()} > {max_rank} "
                                      f"(pays up to {max_rank} at {options.min_flop_reduction:.0%} fewer MACs)")
    rank = R.round_up_to_multiple(rank, options.rounding_multiple, max_rank)
    measured = layer.measure("spatial-svd", (rank,), lambda r: float(errors[r[0]]))
    if measured is not None and measured.ranks is None:
        return Refusal("spatial-svd", measured.decision, measured)
    (rank,) = measured.ranks if measured else (rank,)
    vertical, horizontal = spatial_svd(layer.w, rank)
    return ConvPlan("spatial-svd", (rank,), 1, float(errors[rank]), vertical.size + horizontal.size,
                    spatial_svd_macs(o, i, kh, kw, strides[1], rank),
                    lambda: [vertical, horizontal], measured)


def _round_to(rank: int, multiple: int, granularity: int, cap: int) -> int:
    """Up to `multiple` when that stays within cap, else up to `granularity`, else down to it."""
    for m in (multiple, granularity):
        up = -(-rank // m) * m
        if up <= cap:
            return up
    return max(granularity, cap // granularity * granularity)


_PLANNERS = {"tucker2": _plan_tucker2, "branched-tucker": _plan_branched, "spatial-svd": _plan_spatial}
