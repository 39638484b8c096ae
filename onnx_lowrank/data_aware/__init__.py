"""The data-aware path of optimize, as stages in the order they run around the decompose passes:

    prepare (before decompose)
      1. calibrate   calibrate.py  Gram matrices of the candidate layers' inputs -> LayerPlan.grams
      2. allocate    allocate.py   spectra, sensitivities, time share, one global allocation for
                                   --target-*                                    -> LayerPlan.ranks
    the decompose passes rewrite the graph (whitened SVD / Tucker-2 where a Gram is known)
    finish (after the first rewrite)
      3. meet_speedup  speed.py     --target-speedup measured, re-allocated while short
      4. correct       correct.py   --error-correction: refit layers depth by depth
      4b. refine       refine/      --refine: train the factors block by block (torch)
      5. back_off      back_off.py  the quality gate on held-back samples; back off until it holds

Each stage reads the DataPlan (plan.py) and returns its outcome (report.DataAwareOutcome); every
rewrite after the first is the Rewriter's: the passes on a fresh copy of the normalized graph.
Without --calibration and without a target nothing here runs and the passes follow the rank rule.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import onnx
import onnx_graphsurgeon as gs

from ..passes import PassContext, PassEntry
from ..report import DataAwareOutcome, Report
from . import allocate as _allocate
from . import back_off as _back_off
from . import calibrate as _calibrate
from . import correct as _correct
from . import refine as _refine
from . import speed as _speed
from .plan import (DataPlan, Snapshot, analysis_shapes, fed_inputs, fit_batches, held_back_count, parity_samples,
                   replace_records, rewrite, rewrite_snapshot)
from .speed import whole_model_speedup

WEIGHT_ONLY_NOTE = ("weight-only truncation (no --calibration): on trained models the weight's own spectrum is a poor "
                    "guide to output error; pass --calibration SAMPLES.npz for whitened, data-aware ranks")



def prepare(graph: gs.Graph, original: onnx.ModelProto, context: PassContext, decompose: list[PassEntry],
            report: Report, on_batch: Callable[[int], None] | None = None
            ) -> tuple[DataPlan | None, PassContext]:
    """Stages 1 and 2 on `graph` (normalized, not yet decomposed): the plan, and the context the
    decompose passes then run with (its LayerPlan holds the Grams and the allocated ranks). No plan
    when neither --calibration nor a target is given."""
    options = context.options
    if options.calibration is None and options.target is None:
        return None, context
    if options.refine:
        _refine.require_torch()      # before calibration's minutes, not after
    plan = DataPlan(graph.copy(), set(context.state.names))
    # the survey, the allocation, the rewrites and the back-off share each layer's SVD
    context = dataclasses.replace(context, cache={})
    report.data_aware = outcome = DataAwareOutcome()
    positions = None
    if options.calibration is not None:
        grams, sums, positions, outcome.calibration = _calibrate.calibrate(plan, graph, original, context, on_batch)
        context = dataclasses.replace(context, layers=context.layers.with_(grams=grams, sums=sums))
        report.notes.append(_calibrate.describe(outcome.calibration))
    if options.target is not None:
        outcome.allocation = _allocate.allocate(plan, graph, original, context, decompose, positions, report.notes)
        context = dataclasses.replace(context, layers=context.layers.with_(ranks=dict(plan.allocation.ranks)))
    return plan, context


#: Wall seconds all refinements of backed-off models may take together (the first refinement's time
#: is what each is expected to cost): MiniLM's take ~30 s each, a ResNet-50's would take many minutes.
REFIT_BUDGET_S = 180.0


def finish(plan: DataPlan, original: onnx.ModelProto, optimized: onnx.ModelProto, context: PassContext,
           entries: list[PassEntry], report: Report, on_batch: Callable[[int], None] | None = None
           ) -> onnx.ModelProto:
    """Stages 3, 4, 4b and 5 on the rewritten model: the gate judges the refined model."""
    outcome = report.data_aware
    optimized, context, outcome.speed = _speed.meet_speedup(plan, original, optimized, context, entries, report)
    optimized, context, outcome.correction = _correct.correct(plan, original, optimized, context, entries, report,
                                                              on_batch)
    optimized, outcome.refinement = _refine.refine(plan, original, optimized, context, report, on_batch)
    refined = outcome.refinement
    refit, spent = None, 0.0
    if refined and refined.kept and refined.closed_form_error and refined.refined_error < refined.closed_form_error:
        def refine_again(model: onnx.ModelProto) -> onnx.ModelProto | None:
            nonlocal spent
            # each refinement costs about what the first did: none starts that would pass the budget
            if spent + refined.seconds > REFIT_BUDGET_S:
                return None
            model, again = _refine.refine(plan, original, model, context, report, on_batch)
            spent += again.seconds if again else 0.0
            return model if again and again.kept else None
        refit = (refined.refined_error / refined.closed_form_error, refine_again)
    optimized, outcome.gate = _back_off.back_off(plan, original, optimized, context, entries, report, refit)
    if refined and refined.kept and outcome.gate and not outcome.gate.within and not outcome.gate.refined_again:
        why = (f"a refinement takes ~{refined.seconds:.0f} s, over the {REFIT_BUDGET_S:.0f} s allowed for refining "
               "backed-off models" if refined.seconds > REFIT_BUDGET_S else
               "the backed-off models refined again were outside it too")
        report.notes.append(f"refinement: the gate refused the refined model and {why}; the model it backed off to "
                            "is the closed-form fit at lower ranks (not refined again)")
    return optimized


__all__ = ["DataPlan", "Snapshot", "WEIGHT_ONLY_NOTE", "analysis_shapes", "fed_inputs", "finish", "fit_batches", "held_back_count",
           "parity_samples", "prepare", "replace_records", "rewrite", "rewrite_snapshot", "whole_model_speedup"]
