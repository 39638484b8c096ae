"""Stage 3, meet the speedup: time the rewritten model against the original and, while it falls
short of --target-speedup, re-allocate by the measured shortfall. Also the whole-model timing that
optimize's never-slower check uses."""

from __future__ import annotations

import dataclasses

import onnx

from ..bench import TimingPlan, bench
from ..passes import PassContext, PassEntry
from ..rank_allocation import allocate_ranks, flop_ratio_for_speedup
from ..report import Report, SpeedOutcome
from ..runtime import SessionConfig
from .plan import DataPlan, fed_inputs, replace_records, rewrite

#: --target-speedup: whole-model timings after the first, each after a re-allocation that asks for
#: fewer MACs by the measured shortfall; and the timing of each (interleaved, spinning off).
SPEED_ROUNDS = 3

SPEED_PLAN = TimingPlan(warmup_s=0.1, blocks=10, max_blocks=30)

def meet_speedup(plan: DataPlan, original: onnx.ModelProto, optimized: onnx.ModelProto, context: PassContext,
                 entries: list[PassEntry], report: Report
                 ) -> tuple[onnx.ModelProto, PassContext, SpeedOutcome | None]:
    """--target-speedup S, measured: time the rewritten model against the original (on the first
    calibration batch, the inputs the layer times were profiled on). The MAC ratio came from the
    layers' profiled share of the run time and assumes their time scales with their MACs; where the
    measured speedup m falls short, their measured time ratio t = (1/m - 1 + a) / a (a: their share)
    says by how much, so the allocation is asked for ratio x t* / t, t* the time ratio S needs, and
    the model rewritten and timed again, up to SPEED_ROUNDS times. Needs --measure (the tool's
    timings are off without it) and a model that changed."""
    options = context.options
    if plan.flop_ratio is None or not options.measure or optimized is original:
        return optimized, context, None
    target, share = options.target_speedup, plan.time_fraction
    ratio, measured = plan.flop_ratio, _measured_speedup(original, optimized, plan, options)
    rounds = [[measured, ratio]]
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
        context = dataclasses.replace(context, layers=context.layers.with_(ranks=dict(allocation.ranks)))
        optimized, records = rewrite(plan, original, context, entries, context.layers.ranks)
        replace_records(report, records)
        measured = _measured_speedup(original, optimized, plan, options)
        rounds.append([measured, ratio])
    outcome = SpeedOutcome(target, measured >= target, rounds)
    report.notes.append(describe(outcome))
    return optimized, context, outcome


def describe(outcome: SpeedOutcome) -> str:
    history = [f"{s:.2f}x at {r:.2f}" + (" of the MACs" if i == 0 else "") for i, (s, r) in enumerate(outcome.rounds)]
    verdict = "met" if outcome.met else "NOT met"
    return (f"--target-speedup {outcome.target:g} measured ({verdict}): " + " -> ".join(history)
            + ("" if len(history) == 1 else " (re-allocated by the measured shortfall)"))

def _measured_speedup(original: onnx.ModelProto, candidate: onnx.ModelProto, plan: DataPlan, options) -> float:
    return whole_model_speedup(original, candidate, plan, options)

def whole_model_speedup(reference: onnx.ModelProto | str, candidate: onnx.ModelProto | str, plan: DataPlan | None,
                        options, hints=None, shapes: dict[str, list[int]] | None = None,
                        inputs: list[str] | None = None) -> float:
    """latency(reference) / latency(candidate), timed interleaved with spinning off on the provider
    asked for: on the first calibration batch when there is one (the inputs the model is served),
    else on generated inputs (at `shapes`, e.g. those the parity check ran on). `inputs`: the
    candidate's fed inputs, for a candidate given as a file."""
    config = SessionConfig(provider=options.provider)
    if plan is not None and plan.data is not None:
        batch = next(plan.data.batches(0, None))
        return bench([reference, candidate], config=config, plan=SPEED_PLAN,
                     feeds={name: batch[name] for name in inputs or fed_inputs(candidate)}).speedup
    return bench([reference, candidate], config=config, plan=SPEED_PLAN, shapes=shapes or options.shape,
                 batch=options.batch, seed=options.seed, hints=hints).speedup
