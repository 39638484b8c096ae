"""Stage 2, allocate: survey every candidate layer's spectrum, weigh layer errors by their measured
sensitivity, turn --target-speedup into a MAC budget by the layers' share of the run time
(time_share.py), and choose all ranks together (rank_allocation.py)."""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..calibration import layer_time_fraction, probe_deviations
from ..errors import InferenceError
from ..graph import export_graph_lazily
from ..inputs import input_hints
from ..io import write_model
from ..passes import PassContext, PassEntry
from ..passes.base import layer_name, unique_name
from ..rank_allocation import (COSTS, BlockForms, BlockState, ConvSpectrum, LayerSpectrum, NeuronSpectrum, Spectrum,
                               allocate_ranks, flop_ratio_for_speedup, predicted_error, rank_grid)
from ..report import AllocationOutcome
from ..time_share import TimeShare, choose_share, without_layers
from .plan import DataPlan
from .speed import whole_model_speedup

#: The sensitivity probe runs each layer on the first samples holding SENSITIVITY_ROWS rows (token
#: positions), at least 1 and at most SENSITIVITY_SAMPLES samples: each layer costs one run over
#: them, so on a large model the probe was most of a calibrated run (BERT-base at 128 tokens, 72
#: layers x 8 samples: 122 of 196 s). There 2 samples gave every layer's sensitivity within
#: 0.87-1.14x of 8 samples' (log correlation 0.9998 over 0.00-0.57); 1 sample 0.87-1.22x.
SENSITIVITY_ROWS = 256
SENSITIVITY_SAMPLES = 8


def sensitivity_samples(rows_per_sample: float) -> int:
    return max(1, min(SENSITIVITY_SAMPLES, math.ceil(SENSITIVITY_ROWS / max(rows_per_sample, 1.0))))



def allocate(plan: DataPlan, graph: gs.Graph, original: onnx.ModelProto, context: PassContext,
             decompose: list[PassEntry], positions: dict[str, float] | None, notes: list[str]) -> AllocationOutcome:
    """The allocation for options.target: sets plan.spectra, plan.allocation (and for a speedup
    target plan.flop_ratio and plan.time_fraction); returns what it chose."""
    options = context.options
    plan.spectra = survey(graph, context, decompose)
    if positions is not None:
        plan.spectra = [_per_sample(s, positions) for s in plan.spectra]
    sensitivity = None
    if plan.data is not None:
        weights = sensitivities(plan, original, context)
        if weights:
            # a pruned block's error is at its second layer's output, and weighs as that layer's
            plan.spectra = [dataclasses.replace(s, errors=s.errors * weights.get(_error_at(s), 1.0))
                            for s in plan.spectra]
            sensitivity = [min(weights.values()), max(weights.values())]
            notes.append(f"layer sensitivities: output error per unit of layer error from "
                         f"{sensitivity[0]:.2f} to {sensitivity[1]:.2f}, measured by "
                         "truncating one layer at a time; allocation weighs layer errors by them")
    kind, value = options.target
    ratio, share = value, None
    if kind == "speedup":
        # MACs, not the per-layer micro-benchmarks of latency.py: at 0.71 of the time those
        # predicted, MiniLM measured 1.10-1.13x whole (and 1.31-1.39x timed at 8x64 tokens),
        # while the MAC ratio of the same Amdahl target measured 1.18-1.33x
        share = time_share(value, plan.reference(original), plan, options)
        kind, ratio = "flops", _speedup_ratio(value, share, notes)
        plan.flop_ratio, plan.time_fraction = ratio, share.share
    plan.spectra = mlp_forms(plan.spectra, options)
    plan.allocation = allocate_ranks(plan.spectra, ratio, kind, options.rounding_multiple)
    forms = describe_forms(plan.spectra, plan.allocation.ranks)
    if forms:
        notes.append(forms)
    outcome = _outcome(plan, kind, ratio, sensitivity, share)
    notes.append(describe(outcome))
    return outcome


def survey(graph: gs.Graph, context: PassContext, decompose: list[PassEntry]) -> list[Spectrum]:
    """Every matrix layer's and Tucker-2 conv's spectrum, measured by the decompose passes on a copy
    that they leave unchanged (they only record in survey mode); the SVDs are kept for the rewrite."""
    probe = dataclasses.replace(context, state=context.state.fresh(survey={}),
                                on_layer=lambda name: None)
    copy = graph.copy()
    for entry in decompose:
        entry.run(copy, probe)
    return list(probe.state.survey.values())


def _error_at(spectrum: Spectrum) -> str:
    """The layer whose output a spectrum's error is measured at."""
    return spectrum.layers[1] if isinstance(spectrum, NeuronSpectrum) else spectrum.name


def mlp_forms(spectra: list[Spectrum], options) -> list[Spectrum]:
    """The spectra the allocation chooses among: per MLP block (prune_mlp's NeuronSpectrum) either
    the block on k neurons or its two layers by SVD, never both. --mlp-form nystrom takes every
    block on neurons; auto makes each block one BlockForms, whose grid holds both forms, so the
    allocation chooses the form with its ranks, jointly with every other layer."""
    blocks = [s for s in spectra if isinstance(s, NeuronSpectrum)]
    layers = [s for s in spectra if not isinstance(s, NeuronSpectrum)]
    if not blocks:
        return spectra
    replaced = {name for block in blocks for name in block.layers}
    if options.mlp_form == "nystrom":
        return [s for s in layers if s.name not in replaced] + blocks
    by_name = {s.name: s for s in layers}
    joint = []
    for block in blocks:
        members = tuple(by_name[name] for name in block.layers if isinstance(by_name.get(name), LayerSpectrum))
        if len(members) < len(block.layers) and any(name in by_name for name in block.layers):
            joint.append(block)    # a member surveyed as something else than a matrix: neurons only
            continue
        fixed = {kind: block.cost(None, kind) - sum(m.cost(None, kind) for m in members) for kind in COSTS}
        joint.append(BlockForms(block.name, block, members, fixed))
    return [s for s in layers if s.name not in replaced] + joint


def describe_forms(spectra: list[Spectrum], ranks: dict) -> str | None:
    """How --mlp-form auto's blocks came out of the allocation."""
    blocks = [s for s in spectra if isinstance(s, BlockForms)]
    if not blocks:
        return None
    forms = [ranks.get(b.name) for b in blocks]
    neurons = sum(1 for f in forms if isinstance(f, BlockState) and f.form == "neurons")
    svd = sum(1 for f in forms if isinstance(f, BlockState) and f.form == "svd")
    return (f"--mlp-form auto: of {len(blocks)} MLP blocks, the allocation kept {neurons} on fewer neurons "
            f"(prune_mlp), gave {svd} per-layer SVD and left {len(blocks) - neurons - svd} dense: each block's "
            "two forms are one choice beside every other layer's rank, the one that adds least predicted "
            "error per MAC saved")


def _per_sample(spectrum: Spectrum, positions: dict[str, float]) -> Spectrum:
    """Costs per calibration sample, the unit the calibration counted rows in: a matrix layer's
    rows, a conv's output pixels (its channel Gram counted input pixels)."""
    if _error_at(spectrum) not in positions:
        return spectrum
    rows = positions[_error_at(spectrum)]
    return dataclasses.replace(spectrum, positions=rows / spectrum.stride if isinstance(spectrum, ConvSpectrum) else rows)

def sensitivities(plan: DataPlan, original: onnx.ModelProto, context: PassContext) -> dict[str, float] | None:
    """Per layer, the model's relative output deviation when that layer alone is truncated, divided
    by the layer's own relative output error at that rank. A transformer's FFN layers measured ~10x
    more sensitive than its attention projections (their error is not diluted by the residual
    stream); weighing by this moved MiniLM's embedding cosine at 0.72 of the MACs from 0.915 to 0.94.

    One probe model, one session: each layer's output gets + s_i x (W_r - W) for its input x,
    s = one-hot over the layers, so probing is one run per layer instead of one model per layer.
    MatMul layers with the weight on the right only (transformers); None when others take part."""
    built = _probe_model(plan, original, context)
    if built is None:
        return None
    (probe, sources), probed, selected = built
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-probe-") as folder:
        # ONNX Runtime reads the probe from a file, written with the unchanged weights streamed
        # from the input's tensors, and the model is dropped before the session holds its weights
        path = Path(folder) / "probe.onnx"
        write_model(probe, path, sources=sources)
        del probe, sources, built
        samples = sensitivity_samples(max(spectrum.positions for spectrum, _ in probed))
        deviations = probe_deviations(str(path), selected, len(probed), plan.data,
                                      stop=min(plan.fit_stop, samples), provider=context.options.provider)
    return {spectrum.name: float(deviation / max(spectrum.errors[rank], 1e-12))
            for (spectrum, rank), deviation in zip(probed, deviations)}


def _probe_model(plan: DataPlan, original: onnx.ModelProto, context: PassContext):
    """(the probe model, [(spectrum, rank) probed], the selector input's name), or None. Its own
    function so that the graph, with the probe's factors in numpy, is gone once it is exported."""
    graph = plan.normalized.copy()
    nodes = {layer_name(node): node for node in graph.nodes}
    names = set(plan.names)
    probes = []
    for spectrum in plan.spectra:
        if isinstance(spectrum, NeuronSpectrum):
            continue   # weighed by its second layer's sensitivity
        node = nodes.get(spectrum.name)
        if (node is None or node.op != "MatMul" or not isinstance(node.inputs[1], gs.Constant)
                or isinstance(node.inputs[0], gs.Constant)):
            return None
        grid = rank_grid(spectrum, context.options.rounding_multiple)
        if grid and spectrum.name in context.cache:
            probes.append((spectrum, node, grid[len(grid) // 2]))
    dtypes = {np.dtype(node.inputs[1].dtype) for _, node, _ in probes}
    if not probes or len(dtypes) != 1:
        return None
    dtype = dtypes.pop()
    selector = gs.Variable(unique_name(names, "lowrank_probe_selector"), dtype=dtype, shape=[len(probes)])
    graph.inputs.append(selector)
    for i, (spectrum, node, rank) in enumerate(probes):
        first, second = context.cache[spectrum.name].factors(rank)
        x, y = node.inputs[0], node.outputs[0]
        dense, picked, on, hidden, low, same = (gs.Variable(unique_name(names, f"{y.name}_probe_{part}"), dtype=dtype)
                                                for part in ("dense", "pick", "on", "hidden", "low", "same"))
        on.dtype = np.bool_
        node.outputs.clear()
        node.outputs.append(dense)
        # y = x A B when the selector picks the layer, else x W: an If, so that a run pays for the
        # one truncated layer it probes and not for all of them (x A B everywhere, then a masked
        # sum, took 1.6x a plain run on BERT-base)
        truncated = gs.Graph(nodes=[
            gs.Node("MatMul", unique_name(names, f"{spectrum.name}_probe_a"),
                    inputs=[x, gs.Constant(unique_name(names, f"{spectrum.name}_probe_a"), first.astype(dtype))],
                    outputs=[hidden]),
            gs.Node("MatMul", unique_name(names, f"{spectrum.name}_probe_b"),
                    inputs=[hidden, gs.Constant(unique_name(names, f"{spectrum.name}_probe_b"), second.astype(dtype))],
                    outputs=[low])], outputs=[low], name=unique_name(names, f"{spectrum.name}_probe_truncated"))
        kept = gs.Graph(nodes=[gs.Node("Identity", unique_name(names, f"{spectrum.name}_probe_same"),
                                       inputs=[dense], outputs=[same])],
                        outputs=[same], name=unique_name(names, f"{spectrum.name}_probe_dense"))
        graph.nodes.extend([
            gs.Node("Gather", unique_name(names, f"{spectrum.name}_probe_pick"),
                    inputs=[selector, gs.Constant(unique_name(names, f"{spectrum.name}_probe_index"), np.array(i, np.int64))],
                    outputs=[picked]),
            gs.Node("Cast", unique_name(names, f"{spectrum.name}_probe_on"), {"to": onnx.TensorProto.BOOL},
                    inputs=[picked], outputs=[on]),
            gs.Node("If", unique_name(names, f"{spectrum.name}_probe_if"),
                    {"then_branch": truncated, "else_branch": kept}, inputs=[on], outputs=[y]),
        ])
    return export_graph_lazily(graph, original), [(spectrum, rank) for spectrum, _, rank in probes], selector.name



def time_share(speedup: float, model: onnx.ModelProto, plan: DataPlan, options) -> TimeShare:
    """The candidate layers' share of the run time, read two ways (time_share.py) and checked one
    against the other; an error that says so where neither can be read."""
    layers = {s.name for s in plan.spectra}
    profiled = (layer_time_fraction(model, layers, plan.data, provider=options.provider)
                if plan.data is not None else None)
    share = choose_share(_measured_share(model, plan, layers, options), profiled)
    if share is None:
        raise InferenceError(f"--target-speedup {speedup:g}: cannot tell where the model's time goes (ORT's profile "
                             "names none of the candidate layers and the model could not be timed without them); "
                             "give a MAC budget instead: --target-flops F")
    return share


def _speedup_ratio(speedup: float, share: TimeShare, notes: list[str]) -> float:
    """Amdahl: the MAC ratio of the candidate layers that --target-speedup S asks for."""
    ratio = flop_ratio_for_speedup(speedup, share.share)
    notes.append(f"--target-speedup {speedup:g}: the candidate layers take {share.describe()} of the run "
                 f"time; the allocation used the {share.source} share; Amdahl gives them {ratio:.2f} of "
                 "their time, taken as their MACs")
    if ratio <= 0:
        notes.append(f"--target-speedup {speedup:g} is out of reach by decomposition alone (the rest of the "
                     f"model takes {1 - share.share:.0%}); compressing as far as the layers allow")
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



def _outcome(plan: DataPlan, kind: str, ratio: float, sensitivity, share: TimeShare | None) -> AllocationOutcome:
    allocation = plan.allocation
    achieved = allocation.cost_after / allocation.cost_before if allocation.cost_before else 1.0
    return AllocationOutcome(
        kind=kind, target=ratio, achieved=achieved, met=allocation.met,
        factorized=sum(rank is not None for rank in allocation.ranks.values()), layers=len(allocation.ranks),
        predicted_error=float(predicted_error(plan.spectra, allocation.ranks)), sensitivity_range=sensitivity,
        time_share=None if share is None else share.share, time_share_source=None if share is None else share.source,
        measured_share=None if share is None else share.measured, profiled_share=None if share is None else share.profiled)


def describe(outcome: AllocationOutcome) -> str:
    verdict = "met" if outcome.met else "NOT met: every layer is at its lowest rank"
    return (f"rank allocation: {outcome.factorized} of {outcome.layers} layers factorized, {outcome.kind} of the "
            f"candidate layers {outcome.achieved:.2f} of dense (target {outcome.target:.2f}, {verdict}); predicted "
            f"output error {outcome.predicted_error:.3f}")
