"""The data-aware path of optimize, around the decompose stage:

    normalized graph -> calibration Grams per layer (calibration.py)    -> context.grams
                     -> survey of every matrix and Tucker-2 conv layer's spectrum \\
                     -> one global allocation for --target-*              -> context.ranks
    rewrite (the passes, whitened SVD where a Gram is known)
    -> --error-correction: depth by depth, recapture each factorized layer's inputs in the model
       compressed up to it and refit it to the original layer's output
    -> --max-error on held-back calibration samples: back off along the allocation, most damaging
       step first, to the most compressed model within the bound

Without --calibration and without a target nothing here runs and the passes follow the rank rule.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .calibration import (CalibrationData, capture_specs, collect_cross_grams, collect_grams, layer_time_fraction,
                          load_calibration, probe_deviations)
from .bench import TimingPlan, bench
from .errors import InferenceError
from .gate import gate_for, gate_tolerances
from .inputs import input_hints
from .graph import export_graph
from .parity import check_parity
from .passes import PassContext, PassEntry
from .passes._weights import weight_key
from .passes.base import layer_name, unique_name
from .rank_allocation import (Allocation, ConvSpectrum, Spectrum, allocate_ranks, flop_ratio_for_speedup,
                              predicted_error, rank_grid)
from .report import LayerRecord, Report
from .runtime import SessionConfig
from .time_share import choose_share, without_layers

#: Share of the calibration samples held back to check the quality gate: errors measured on the
#: samples the Grams were fitted on would flatter the truncation. Small sets give a quarter, so
#: that a top-1 agreement is measured on more than a handful of rows.
HOLD_BACK = 1 / 8
SMALL_SET = 64


def held_back_count(samples: int) -> int:
    share = HOLD_BACK if samples >= SMALL_SET else 1 / 4
    return max(1, int(samples * share))

#: Calibration samples the sensitivity probe runs on (each layer costs one run over them).
SENSITIVITY_SAMPLES = 8

WEIGHT_ONLY_NOTE = ("weight-only truncation (no --calibration): on trained models the weight's own spectrum is a poor "
                    "guide to output error; pass --calibration SAMPLES.npz for whitened, data-aware ranks")


@dataclass(frozen=True)
class Snapshot:
    """The normalized graph before decompose, and the names in use then: every later rewrite
    (other ranks, layers kept dense) runs the passes on a fresh copy of it."""

    normalized: gs.Graph
    names: set[str]


@dataclass
class DataPlan:
    normalized: gs.Graph                    # snapshot before decompose, for later rewrites
    names: set[str]                         # names in use at the snapshot
    reference: onnx.ModelProto              # the snapshot as a model: the activations to match
    data: CalibrationData | None = None
    fit_stop: int = 0                       # samples [0, fit_stop) calibrate, the rest are held back
    allocation: Allocation | None = None
    spectra: list[Spectrum] = field(default_factory=list)
    time_fraction: float = 1.0              # --target-speedup: the candidate layers' share of the run time
    flop_ratio: float | None = None         # --target-speedup: the MAC ratio the allocation was asked for

    def held_back(self) -> list[dict]:
        return [] if self.data is None else list(self.data.batches(self.fit_stop))

    @property
    def snapshot(self) -> Snapshot:
        return Snapshot(self.normalized, self.names)


def prepare(graph: gs.Graph, original: onnx.ModelProto, context: PassContext, decompose: list[PassEntry],
            report: Report, on_batch: Callable[[int], None] | None = None) -> DataPlan | None:
    """Calibrate and allocate ranks for `graph` (normalized, not yet decomposed); fills
    context.grams and context.ranks. None when neither --calibration nor a target is given."""
    options = context.options
    if options.calibration is None and options.target is None:
        return None
    model = export_graph(graph.copy(), original)
    plan = DataPlan(graph.copy(), set(context.names), model)
    context.decompositions = {}   # the survey, the allocation and the back-off reuse each layer's SVD
    if options.calibration is not None:
        inputs = [t.name for t in graph.inputs]
        plan.data = load_calibration(options.calibration, inputs)
        checks = gate_for(options).max_error is not None and plan.data.samples >= 2
        plan.fit_stop = plan.data.samples - (held_back_count(plan.data.samples) if checks else 0)
        specs = capture_specs(graph, options)
        calibration = collect_grams(model, specs, plan.data, stop=plan.fit_stop, provider=options.provider,
                                    on_batch=on_batch)
        context.grams = shared_grams(calibration.grams, specs, context)
        held_note = f", {plan.data.samples - plan.fit_stop} held back for the quality gate" if plan.fit_stop < plan.data.samples else ""
        report.notes.append(f"calibration: Gram matrices of {len(calibration.grams)} layers from {calibration.samples} "
                            f"samples{held_note}; matrix layers use whitened SVD, k x k convs whitened Tucker-2")
    if options.target is not None:
        plan.spectra = survey(graph, context, decompose)
        if options.calibration is not None:
            plan.spectra = [_per_sample(s, calibration.positions) for s in plan.spectra]
        if plan.data is not None:
            weights = sensitivities(plan, original, context)
            if weights:
                plan.spectra = [dataclasses.replace(s, errors=s.errors * weights.get(s.name, 1.0)) for s in plan.spectra]
                report.notes.append(f"layer sensitivities: output error per unit of layer error from "
                                    f"{min(weights.values()):.2f} to {max(weights.values()):.2f}, measured by "
                                    "truncating one layer at a time; allocation weighs layer errors by them")
        kind, value = options.target
        ratio = value
        if kind == "speedup":
            # MACs, not the per-layer micro-benchmarks of latency.py: at 0.71 of the time those
            # predicted, MiniLM measured 1.10-1.13x whole (and 1.31-1.39x timed at 8x64 tokens),
            # while the MAC ratio of the same Amdahl target measured 1.18-1.33x
            kind, ratio = "flops", _time_ratio(value, model, plan, options, report)
            plan.flop_ratio = ratio
        plan.allocation = allocate_ranks(plan.spectra, ratio, kind, options.rounding_multiple)
        context.ranks = dict(plan.allocation.ranks)
        _note_allocation(plan, kind, ratio, report)
    return plan


def shared_grams(grams: dict[str, np.ndarray], specs: list, context: PassContext) -> dict[str, np.ndarray]:
    """Layers that read one weight (through aliases too) are factorized once, so their whitening
    is the Gram of all their inputs together: the sum of their Grams, given to each of them."""
    groups: dict[tuple, list[str]] = {}
    for spec in specs:
        if spec.layer in grams:
            key = (weight_key(context, spec.weight), spec.axis, spec.window, grams[spec.layer].shape)
            groups.setdefault(key, []).append(spec.layer)
    shared = dict(grams)
    for layers in groups.values():
        if len(layers) > 1:
            total = sum(grams[layer] for layer in layers)
            shared.update(dict.fromkeys(layers, total))
    return shared


def survey(graph: gs.Graph, context: PassContext, decompose: list[PassEntry]) -> list[Spectrum]:
    """Every matrix layer's and Tucker-2 conv's spectrum, measured by the decompose passes on a copy
    that they leave unchanged (they only record in survey mode); the SVDs are kept for the rewrite."""
    probe = dataclasses.replace(context, survey={}, names=set(context.names), factors={}, choices={},
                                on_layer=lambda name: None)
    copy = graph.copy()
    for entry in decompose:
        entry.run(copy, probe)
    return list(probe.survey.values())


def _per_sample(spectrum: Spectrum, positions: dict[str, float]) -> Spectrum:
    """Costs per calibration sample, the unit the calibration counted rows in: a matrix layer's
    rows, a conv's output pixels (its channel Gram counted input pixels)."""
    if spectrum.name not in positions:
        return spectrum
    rows = positions[spectrum.name]
    return dataclasses.replace(spectrum, positions=rows / spectrum.stride if isinstance(spectrum, ConvSpectrum) else rows)


def sensitivities(plan: DataPlan, original: onnx.ModelProto, context: PassContext) -> dict[str, float] | None:
    """Per layer, the model's relative output deviation when that layer alone is truncated, divided
    by the layer's own relative output error at that rank. A transformer's FFN layers measured ~10x
    more sensitive than its attention projections (their error is not diluted by the residual
    stream); weighing by this moved MiniLM's embedding cosine at 0.72 of the MACs from 0.915 to 0.94.

    One probe model, one session: each layer's output gets + s_i x (W_r - W) for its input x,
    s = one-hot over the layers, so probing is one run per layer instead of one model per layer.
    MatMul layers with the weight on the right only (transformers); None when others take part."""
    graph = plan.normalized.copy()
    nodes = {layer_name(node): node for node in graph.nodes}
    names = set(plan.names)
    probes = []
    for spectrum in plan.spectra:
        node = nodes.get(spectrum.name)
        if (node is None or node.op != "MatMul" or not isinstance(node.inputs[1], gs.Constant)
                or isinstance(node.inputs[0], gs.Constant)):
            return None
        grid = rank_grid(spectrum, context.options.rounding_multiple)
        if grid and spectrum.name in context.decompositions:
            probes.append((spectrum, node, grid[len(grid) // 2]))
    dtypes = {np.dtype(node.inputs[1].values.dtype) for _, node, _ in probes}
    if not probes or len(dtypes) != 1:
        return None
    dtype = dtypes.pop()
    selector = gs.Variable(unique_name(names, "lowrank_probe_selector"), dtype=dtype, shape=[len(probes)])
    graph.inputs.append(selector)
    for i, (spectrum, node, rank) in enumerate(probes):
        first, second = context.decompositions[spectrum.name].factors(rank)
        x, y = node.inputs[0], node.outputs[0]
        dense, hidden, low, moved, scale, scaled = (
            gs.Variable(unique_name(names, f"{y.name}_probe_{part}"), dtype=y.dtype)
            for part in ("dense", "hidden", "low", "delta", "scale", "scaled"))
        node.outputs.clear()
        node.outputs.append(dense)
        # the truncation's change x (A B - W) as x A B - x W: the factors are small, a dense
        # difference weight would double the model in memory
        graph.nodes.extend([
            gs.Node("MatMul", unique_name(names, f"{spectrum.name}_probe_a"),
                    inputs=[x, gs.Constant(unique_name(names, f"{spectrum.name}_probe_a"), first.astype(dtype))],
                    outputs=[hidden]),
            gs.Node("MatMul", unique_name(names, f"{spectrum.name}_probe_b"),
                    inputs=[hidden, gs.Constant(unique_name(names, f"{spectrum.name}_probe_b"), second.astype(dtype))],
                    outputs=[low]),
            gs.Node("Sub", unique_name(names, f"{spectrum.name}_probe_delta"), inputs=[low, dense], outputs=[moved]),
            gs.Node("Gather", unique_name(names, f"{spectrum.name}_probe_pick"),
                    inputs=[selector, gs.Constant(unique_name(names, f"{spectrum.name}_probe_index"), np.array(i, np.int64))],
                    outputs=[scale]),
            gs.Node("Mul", unique_name(names, f"{spectrum.name}_probe_mul"), inputs=[moved, scale], outputs=[scaled]),
            gs.Node("Add", unique_name(names, f"{spectrum.name}_probe_add"), inputs=[dense, scaled], outputs=[y]),
        ])
    probe = export_graph(graph, original)
    deviations = probe_deviations(probe, selector.name, len(probes), plan.data,
                                  stop=min(plan.fit_stop, SENSITIVITY_SAMPLES), provider=context.options.provider)
    return {spectrum.name: float(deviation / max(spectrum.errors[rank], 1e-12))
            for (spectrum, _, rank), deviation in zip(probes, deviations)}


def _time_ratio(speedup: float, model: onnx.ModelProto, plan: DataPlan, options, report: Report) -> float:
    """The MAC ratio of the candidate layers that --target-speedup S asks for: Amdahl over their
    share of the run time, read two ways (time_share.py) and checked one against the other."""
    layers = {s.name for s in plan.spectra}
    profiled = (layer_time_fraction(model, layers, plan.data, provider=options.provider)
                if plan.data is not None else None)
    share = choose_share(_measured_share(model, plan, layers, options), profiled)
    if share is None:
        raise InferenceError(f"--target-speedup {speedup:g}: cannot tell where the model's time goes (ORT's profile "
                             "names none of the candidate layers and the model could not be timed without them); "
                             "give a MAC budget instead: --target-flops F")
    plan.time_fraction = fraction = share.share
    ratio = flop_ratio_for_speedup(speedup, fraction)
    report.notes.append(f"--target-speedup {speedup:g}: the candidate layers take {share.describe()} of the run "
                        f"time; the allocation used the {share.source} share; Amdahl gives them {ratio:.2f} of "
                        "their time, taken as their MACs")
    if ratio <= 0:
        report.notes.append(f"--target-speedup {speedup:g} is out of reach by decomposition alone (the rest of the "
                            f"model takes {1 - fraction:.0%}); compressing as far as the layers allow")
    return max(ratio, 0.0)


def _measured_share(model: onnx.ModelProto, plan: DataPlan, layers: set[str], options) -> float | None:
    """1 - t(model without the layers) / t(model), timed interleaved; None where no stand-in could
    be built or the model not timed."""
    standin, replaced = without_layers(plan.normalized, model, layers, plan.names)
    if not replaced:
        return None
    try:
        speed = whole_model_speedup(model, standin, plan, options, hints=input_hints(model))
    except InferenceError:
        return None
    return float(min(1.0, max(0.0, 1.0 - 1.0 / speed))) if speed else None


def _note_allocation(plan: DataPlan, kind: str, ratio: float, report: Report) -> None:
    allocation = plan.allocation
    chosen = sum(rank is not None for rank in allocation.ranks.values())
    achieved = allocation.cost_after / allocation.cost_before if allocation.cost_before else 1.0
    verdict = "met" if allocation.met else "NOT met: every layer is at its lowest rank"
    report.notes.append(f"rank allocation: {chosen} of {len(allocation.ranks)} layers factorized, {kind} of the "
                        f"candidate layers {achieved:.2f} of dense (target {ratio:.2f}, {verdict}); predicted "
                        f"output error {predicted_error(plan.spectra, allocation.ranks):.3f}")


# --- after the first rewrite ---------------------------------------------------------------------

def finish(plan: DataPlan, original: onnx.ModelProto, optimized: onnx.ModelProto, context: PassContext,
           entries: list[PassEntry], report: Report, on_batch: Callable[[int], None] | None = None
           ) -> onnx.ModelProto:
    """--target-speedup measured, error correction, then the --max-error back-off, on the rewritten model."""
    optimized, context = meet_speedup(plan, original, optimized, context, entries, report)
    optimized, context = correct(plan, original, optimized, context, entries, report, on_batch)
    return back_off(plan, original, optimized, context, entries, report)


#: --target-speedup: whole-model timings after the first, each after a re-allocation that asks for
#: fewer MACs by the measured shortfall; and the timing of each (interleaved, spinning off).
SPEED_ROUNDS = 3
SPEED_PLAN = TimingPlan(warmup_s=0.1, blocks=10, max_blocks=30)


def meet_speedup(plan: DataPlan, original: onnx.ModelProto, optimized: onnx.ModelProto, context: PassContext,
                 entries: list[PassEntry], report: Report) -> tuple[onnx.ModelProto, PassContext]:
    """--target-speedup S, measured: time the rewritten model against the original (on the first
    calibration batch, the inputs the layer times were profiled on). The MAC ratio came from the
    layers' profiled share of the run time and assumes their time scales with their MACs; where the
    measured speedup m falls short, their measured time ratio t = (1/m - 1 + a) / a (a: their share)
    says by how much, so the allocation is asked for ratio x t* / t, t* the time ratio S needs, and
    the model rewritten and timed again, up to SPEED_ROUNDS times. Needs --measure (the tool's
    timings are off without it) and a model that changed."""
    options = context.options
    if plan.flop_ratio is None or not options.measure or optimized is original:
        return optimized, context
    target, share = options.target_speedup, plan.time_fraction
    ratio, measured = plan.flop_ratio, _measured_speedup(original, optimized, plan, options)
    history = [f"{measured:.2f}x at {ratio:.2f} of the MACs"]
    for _ in range(SPEED_ROUNDS):
        if measured >= target or share <= 0:
            break
        needed = flop_ratio_for_speedup(target, share)
        achieved = flop_ratio_for_speedup(measured, share)
        if needed <= 0 or achieved <= 0:
            break
        ratio = ratio * needed / achieved
        allocation = allocate_ranks(plan.spectra, ratio, "flops", options.rounding_multiple)
        if allocation.ranks == plan.allocation.ranks:
            break                      # at the lowest ranks the layers allow
        plan.allocation = allocation
        context.ranks = dict(allocation.ranks)
        optimized, records = rewrite(plan, original, context, entries, context.ranks)
        replace_records(report, records)
        measured = _measured_speedup(original, optimized, plan, options)
        history.append(f"{measured:.2f}x at {ratio:.2f}")
    verdict = "met" if measured >= target else "NOT met"
    report.notes.append(f"--target-speedup {target:g} measured ({verdict}): " + " -> ".join(history)
                        + ("" if len(history) == 1 else " (re-allocated by the measured shortfall)"))
    return optimized, context


def _measured_speedup(original: onnx.ModelProto, candidate: onnx.ModelProto, plan: DataPlan, options) -> float:
    return whole_model_speedup(original, candidate, plan, options)


def whole_model_speedup(reference: onnx.ModelProto | str, candidate: onnx.ModelProto, plan: DataPlan | None,
                        options, hints=None, shapes: dict[str, list[int]] | None = None) -> float:
    """latency(reference) / latency(candidate), timed interleaved with spinning off on the provider
    asked for: on the first calibration batch when there is one (the inputs the model is served),
    else on generated inputs (at `shapes`, e.g. those the parity check ran on)."""
    config = SessionConfig(provider=options.provider)
    if plan is not None and plan.data is not None:
        batch = next(plan.data.batches(0, None))
        return bench([reference, candidate], config=config, plan=SPEED_PLAN,
                     feeds={name: batch[name] for name in _fed_inputs(candidate)}).speedup
    return bench([reference, candidate], config=config, plan=SPEED_PLAN, shapes=shapes or options.shape,
                 batch=options.batch, seed=options.seed, hints=hints).speedup


def correct(plan: DataPlan, original: onnx.ModelProto, optimized: onnx.ModelProto, context: PassContext,
            entries: list[PassEntry], report: Report, on_batch: Callable[[int], None] | None = None
            ) -> tuple[onnx.ModelProto, PassContext]:
    """Sequential error correction: refit the factorized layers depth by depth, each on the inputs
    it sees once every layer before it is factorized and refitted, to the original layer's output,
    at the ranks already chosen, so that truncation errors do not compound with depth.

    Matrix layers (and 1x1 convs) take the whitened SVD of their corrected weight
    (numerics.whitening.corrected_weight), k x k convs a refitted Tucker-2
    (numerics.tucker.corrected_tucker2). Layers at one depth (no factorized layer between them,
    as Q, K and V) are refitted from one pass over the calibration samples: one pass per depth."""
    options = context.options
    if plan.data is None:
        return optimized, context
    if not options.error_correction:
        convs = sum(r.method == "whitened-tucker2" for r in report.decomposed)
        if convs:
            report.notes.append(f"{convs} k x k convs factorized without --error-correction: each was fitted to the "
                                "original model's activations, and several compressed together compound their "
                                "errors; --error-correction refits them depth by depth (on the bundled digits CNN "
                                "at 2.64x fewer conv MACs: 88.4% -> 99.8% accuracy)")
        return optimized, context
    fitted = {r.name: r for r in report.decomposed
              if r.method == "whitened-svd" or (r.method == "whitened-tucker2" and _tucker2(r))}
    specs = capture_specs(plan.normalized, options, patches=True)
    users = Counter(weight_key(context, s.weight) for s in specs)
    # a shared weight has one factorization; a Tucker-2 conv is refitted on its unfolded patches
    specs = [s for s in specs if s.layer in fitted and users[weight_key(context, s.weight)] == 1
             and (s.window is not None or not _tucker2(fitted[s.layer]))]
    if not specs:
        return optimized, context
    depths = layer_depths(plan.normalized, {s.layer for s in specs})
    final = {r.name: _plan_rank(r) for r in fitted.values() if r.name in depths}
    # the allocation's choices stand (layers it kept dense stay dense), the rank rule's are fixed
    ranks = {**context.ranks, **{r.name: r.rank[0] for r in report.decomposed
                                 if r.method in ("svd", "whitened-svd") and _matrix_layer(r)}}
    corrected = dataclasses.replace(context, grams=dict(context.grams), cross_grams={}, patch_grams={},
                                    decompositions={})
    for depth in sorted(set(depths.values())):
        level = [s for s in specs if depths[s.layer] == depth]
        partial = {**ranks, **{name: (rank if depths[name] < depth else None) for name, rank in final.items()}}
        model = plan.reference if depth == min(depths.values()) else rewrite(plan, original, corrected, entries, partial)[0]
        _drop_superseded(corrected, context, [name for name in final if depths[name] < depth])
        pairs = collect_cross_grams(plan.reference, model, level, plan.data, stop=plan.fit_stop,
                                    provider=options.provider, on_batch=on_batch)
        for spec in level:
            gram, cross = pairs[spec.layer]
            if _tucker2(fitted[spec.layer]):
                corrected.patch_grams[spec.layer] = (gram, cross)
            else:
                corrected.grams[spec.layer], corrected.cross_grams[spec.layer] = gram, cross
            corrected.decompositions.pop(spec.layer, None)   # factorized before with the first-pass Gram
    ranks.update(final)
    model, records = rewrite(plan, original, corrected, entries, ranks)
    replace_records(report, records)
    report.notes.append(f"error correction: {len(specs)} layers refitted to the original outputs, depth by depth "
                        f"({len(set(depths.values()))} passes over the calibration samples), on the inputs they see "
                        "in the compressed model")
    return model, dataclasses.replace(corrected, ranks=ranks)


def _drop_superseded(corrected: PassContext, first: PassContext, layers: list[str]) -> None:
    """Free the Grams of matrix layers whose corrected factorization is cached (the rewrites from
    here on read the cache): BERT-base holds ~1 GB of first-pass Grams and as much again of each of
    the corrected Grams and cross Grams, which a depth-by-depth sweep would otherwise all keep."""
    for name in layers:
        if name in corrected.decompositions:
            for grams in (corrected.grams, corrected.cross_grams, first.grams):
                grams.pop(name, None)


def layer_depths(graph: gs.Graph, layers: set[str]) -> dict[str, int]:
    """layer -> 1 + the most `layers` on any path from the graph inputs to it: layers of one depth
    never feed each other, so one compressed model gives all their inputs at once."""
    depth_of: dict[str, int] = {}            # tensor name -> most layers upstream of it
    depths = {}
    for node in graph.copy().toposort().nodes:
        above = max((depth_of.get(t.name, 0) for t in node.inputs), default=0)
        name = layer_name(node)
        if name in layers:
            depths[name] = above = above + 1
        for t in node.outputs:
            depth_of[t.name] = above
    return depths


# --- --max-error ---------------------------------------------------------------------------------

def back_off(plan: DataPlan, original: onnx.ModelProto, optimized: onnx.ModelProto, context: PassContext,
             entries: list[PassEntry], report: Report) -> onnx.ModelProto:
    """Check the rewritten model on the held-back samples against the quality gate (gate.py:
    --max-error, default 0.25, and top-1 agreement of class outputs); if it passes, keep it, else
    bisect along the compression path (allocation steps, or the rank rule's layers from least to
    most damaging) for the most compressed prefix within the gate.

    Replaces report.layers / report.passes of `entries` with those of the model returned."""
    gate = gate_for(context.options)
    samples = plan.held_back()
    if gate.ungated or not samples:
        return optimized
    passed, measured = _within_gate(original, optimized, samples, context)
    if passed:
        report.notes.append(f"quality gate {gate.describe()}: {measured} on {_count(samples)} held-back samples")
        return optimized
    # under an allocation every layer it surveyed and did not step stays dense (the rank rule would
    # decide them otherwise); the rank rule's skipped layers it decides again, the same way
    allocated = plan.allocation is not None
    path = plan.allocation.steps if allocated else _rank_rule_path(report)
    dense = set(plan.allocation.ranks) if allocated else set()
    lo, hi = 0, len(path)          # prefix lo is within the gate (0: the original), prefix hi is not
    best = None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        model, records = rewrite(plan, original, context, entries, _prefix_ranks(path, mid, dense))
        if _within_gate(original, model, samples, context)[0]:
            lo, best = mid, (model, records)
        else:
            hi = mid
    model, records = best or rewrite(plan, original, context, entries, _prefix_ranks(path, 0, dense))
    restored = {name for name, _ in path[lo:]} - {name for name, _ in path[:lo]}
    for r in (r for pass_records in records.values() for r in pass_records):
        if r.name in restored and not r.decomposed:
            r.reason = f"restored by the quality gate ({gate.describe()})"
    replace_records(report, records)
    report.notes.append(f"quality gate {gate.describe()}: the planned model ({measured} on {_count(samples)} "
                        f"held-back samples) is outside it; backed off to {lo} of {len(path)} compression "
                        "steps, the most damaging per unit of cost undone first"
                        + ("" if lo else ": no step fits the gate, nothing is decomposed"))
    return model


def rewrite(plan: DataPlan, original: onnx.ModelProto, context: PassContext, entries: list[PassEntry],
            ranks: dict[str, int | None]) -> tuple[onnx.ModelProto, dict[str, list[LayerRecord]]]:
    return rewrite_snapshot(plan.snapshot, original, context, entries, ranks)


def rewrite_snapshot(snapshot: Snapshot, original: onnx.ModelProto, context: PassContext, entries: list[PassEntry],
                     ranks: dict[str, int | None]) -> tuple[onnx.ModelProto, dict[str, list[LayerRecord]]]:
    """The passes on a fresh copy of the normalized graph, with these ranks (and the context's
    layers kept dense)."""
    graph = snapshot.normalized.copy()
    fresh = dataclasses.replace(context, ranks=ranks, names=set(snapshot.names), factors={}, choices={}, survey=None,
                                on_layer=lambda name: None)
    records = {entry.name: entry.run(graph, fresh).records for entry in entries}
    return export_graph(graph, original), records


def replace_records(report: Report, records: dict[str, list[LayerRecord]]) -> None:
    """The records of a rewrite take the place of the earlier rewrite's, pass by pass, in order."""
    report.layers = [r for r in report.layers if r.pass_name not in records]
    for name, pass_records in records.items():
        report.layers.extend(pass_records)
        report.passes[name] = sum(r.status != "skipped" for r in pass_records)


def _rank_rule_path(report: Report) -> list[tuple[str, int | tuple[int, ...]]]:
    """The rank rule's layers, least damaging first: SVD layers by their rank, Tucker-2 convs by
    their (r_out, r_in) (context.ranks' two forms)."""
    done = [r for r in report.decomposed if r.method in ("svd", "whitened-svd")
            or (r.method in ("tucker2", "whitened-tucker2") and _tucker2(r))]
    done.sort(key=lambda r: r.activation_error if r.activation_error is not None else (r.weight_error or 0.0))
    return [(r.name, _plan_rank(r)) for r in done]


def _prefix_ranks(path: list[tuple[str, int | tuple[int, ...]]], count: int, dense: set[str]
                  ) -> dict[str, int | tuple[int, ...] | None]:
    """The first `count` steps of the path; its other layers and `dense` kept dense."""
    ranks: dict[str, int | tuple[int, ...] | None] = dict.fromkeys(dense)
    ranks.update({name: None for name, _ in path})
    for name, rank in path[:count]:
        ranks[name] = rank
    return ranks


def _tucker2(record: LayerRecord) -> bool:
    """A conv factorized as Tucker-2 (ranks (r_out, r_in), context.ranks' tuple form)."""
    return record.op == "Conv" and record.rank is not None and len(record.rank) == 2


def _plan_rank(record: LayerRecord) -> int | tuple[int, ...]:
    """A decomposed layer's rank as context.ranks holds it."""
    return tuple(record.rank) if _tucker2(record) else record.rank[0]


def _matrix_layer(record: LayerRecord) -> bool:
    """Factorized by one SVD, with one rank (context.ranks' int): MatMul, Gemm, 1x1 Conv."""
    return record.op != "Conv" or all(d == 1 for d in record.weight_shape[2:])


def _within_gate(original: onnx.ModelProto, candidate: onnx.ModelProto, samples: list[dict],
                 context: PassContext) -> tuple[bool, str]:
    """Whether the candidate is within the quality gate on these samples, and what was measured."""
    gate = gate_for(context.options)
    tolerance, per_output = gate_tolerances(gate, gate.max_error, original)
    result = check_parity(original, candidate, tolerance=tolerance, per_output=per_output,
                          provider=context.options.provider, samples=samples)
    worst = max(result.outputs, key=lambda o: o.rel_l2_error)
    top1 = [o.top1_agreement for o in result.outputs if o.min_top1 is not None]
    measured = f"rel_l2 {worst.rel_l2_error:.3g}" + (f", top-1 agreement {min(top1):.3f}" if top1 else "")
    return result.passed, measured


def _count(batches: list[dict]) -> int:
    return sum(len(next(iter(b.values()))) for b in batches)


def parity_samples(plan: DataPlan | None) -> list[dict] | None:
    """Real inputs for the parity check when the user gave some: the held-back samples, else the
    first calibration batch; None (generated inputs) without calibration data."""
    if plan is None or plan.data is None:
        return None
    return plan.held_back() or list(itertools.islice(plan.data.batches(), 1))


def _fed_inputs(model: onnx.ModelProto) -> list[str]:
    """The graph inputs a run is fed: those that are not initializers too (IR < 4 lists both)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def analysis_shapes(options, model: onnx.ModelProto) -> dict[str, list[int]]:
    """Input shapes for shape inference and layer timing: --shape if given, else those of the
    calibration samples with --batch of them (a layer timed at 16 tokens says little about one
    served at 128), else none (resolve_shapes' defaults)."""
    if options.shape or options.calibration is None:
        return dict(options.shape)
    names = _fed_inputs(model)
    data = load_calibration(options.calibration, names)
    with np.load(data.files[0]) as arrays:
        return {name: [options.batch, *arrays[name].shape[1:]] for name in names}
