"""Stage 5, back off: check the rewritten model against the quality gate (gate.py) on the held-back
calibration samples and, outside it, bisect along the compression path for the most compressed
model within it."""

from __future__ import annotations

from typing import Callable

import onnx

from ..gate import gate_for, gate_tolerances
from ..parity import ReferenceRun, check_parity, run_reference
from ..passes import PassContext, PassEntry
from ..report import GateOutcome, Report
from ..runtime import SessionConfig
from .plan import DataPlan, count, plan_rank, replace_records, rewrite, tucker2

#: What a refinement gave, for the back-off of a refined model: the ratio of refined to
#: closed-form output error it measured, and the refinement to run again on a model backed off to.
Refit = tuple[float, Callable[[onnx.ModelProto], onnx.ModelProto | None]]
#: Refinements more, at most, between the closed form within the gate and a refined model outside
#: it: each costs a refinement (~30-80 s on MiniLM), against the issue's 5 minutes for --refine.
REFINED_ROUNDS = 2


def back_off(plan: DataPlan, original: onnx.ModelProto, optimized: onnx.ModelProto, context: PassContext,
             entries: list[PassEntry], report: Report, refit: Refit | None = None
             ) -> tuple[onnx.ModelProto, GateOutcome | None]:
    """Check the rewritten model on the held-back samples against the quality gate (gate.py:
    --max-error, default 0.25, and top-1 agreement of class outputs); if it passes, keep it, else
    bisect along the compression path (allocation steps, or the rank rule's layers from least to
    most damaging) for the most compressed prefix within the gate.

    `optimized` refined (`refit`: refinement cut the output error by `ratio`): first the most
    compressed prefix whose closed form is within max_error / ratio is refined again and kept if it
    is within the gate; else up to REFINED_ROUNDS refined prefixes bisect between it and the closed
    form within the gate; only if none is within, the closed form itself (refining a few prefixes,
    not every bisection round: one refinement costs a minute).

    Replaces report.layers / report.passes of `entries` with those of the model returned."""
    gate = gate_for(context.options)
    samples = plan.held_back()
    if gate.ungated or not samples:
        return optimized, None
    # the original's outputs on the held-back samples, run once for every round of the bisection
    reference = run_reference(original, config=SessionConfig(provider=context.options.provider), samples=samples)
    plan.held_back_run = reference   # the final parity check compares on these samples too
    passed, measured = _within_gate(original, reference, optimized, context)
    if passed:
        outcome = GateOutcome(gate.describe(), measured, count(samples), True)
        report.notes.append(describe(outcome))
        return optimized, outcome
    # under an allocation every layer it surveyed and did not step stays dense (the rank rule would
    # decide them otherwise); the rank rule's skipped layers it decides again, the same way
    allocated = plan.allocation is not None
    path = plan.allocation.steps if allocated else _rank_rule_path(report)
    dense = set(plan.allocation.ranks) if allocated else set()
    hi, loose = len(path), 0
    ratio, refine_again = refit if refit is not None else (1.0, None)
    if refine_again is not None:
        loose, found = _bisect(plan, original, context, entries, reference, path, dense, 0, hi, slack=1 / ratio)
        if loose > 0:
            refined = _refined_within(found, refine_again, original, reference, context, report)
            if refined is not None:
                return refined, _refined_outcome(gate, measured, samples, loose, path, report)
        hi = min(hi, loose + 1)    # a closed form within the gate is within its loosened bound
    lo, best = _bisect(plan, original, context, entries, reference, path, dense, 0, hi)
    # refinement's gain on its own held-out samples overstated it on the gate's: between the closed
    # form within the gate (lo) and the refined prefix outside it (loose), a few refined rounds more
    kept, rounds = None, REFINED_ROUNDS if refine_again is not None else 0
    low, high = lo, loose
    while rounds and high - low > 1:
        mid, rounds = (low + high) // 2, rounds - 1
        candidate = rewrite(plan, original, context, entries, _prefix_ranks(path, mid, dense))
        refined = _refined_within(candidate, refine_again, original, reference, context, report)
        if refined is not None:
            low, kept = mid, (refined, candidate[1])
        else:
            high = mid
    if kept is not None:
        replace_records(report, kept[1])
        return kept[0], _refined_outcome(gate, measured, samples, low, path, report)
    model, records = best or rewrite(plan, original, context, entries, _prefix_ranks(path, 0, dense))
    restored = {name for name, _ in path[lo:]} - {name for name, _ in path[:lo]}
    for r in (r for pass_records in records.values() for r in pass_records):
        if r.name in restored and not r.decomposed:
            r.reason = f"restored by the quality gate ({gate.describe()})"
    replace_records(report, records)
    outcome = GateOutcome(gate.describe(), measured, count(samples), False, lo, len(path))
    report.notes.append(describe(outcome))
    return model, outcome


def _refined_within(candidate: tuple[onnx.ModelProto, dict], refine_again, original: onnx.ModelProto,
                    reference: ReferenceRun, context: PassContext, report: Report) -> onnx.ModelProto | None:
    """The candidate (model, records) refined, if that is within the gate; the report then holds its records."""
    model, records = candidate
    replace_records(report, records)
    refined = refine_again(model)
    return refined if refined is not None and _within_gate(original, reference, refined, context)[0] else None


def _refined_outcome(gate, measured: str, samples, kept: int, path: list, report: Report) -> GateOutcome:
    outcome = GateOutcome(gate.describe(), measured, count(samples), False, kept, len(path), refined_again=True)
    report.notes.append(describe(outcome))
    return outcome


def _bisect(plan: DataPlan, original: onnx.ModelProto, context: PassContext, entries: list[PassEntry],
            reference: ReferenceRun, path: list, dense: set[str], lo: int, hi: int, slack: float = 1.0):
    """(lo, its (model, records) or None): the longest prefix of `path` in [lo, hi) whose rewrite
    is within the gate with max_error x slack, prefix lo taken as within and prefix hi as not."""
    best = None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        model, records = rewrite(plan, original, context, entries, _prefix_ranks(path, mid, dense))
        if _within_gate(original, reference, model, context, slack)[0]:
            lo, best = mid, (model, records)
        else:
            hi = mid
    return lo, best


def describe(outcome: GateOutcome) -> str:
    if outcome.refined_again:
        return (f"quality gate {outcome.gate}: the refined model ({outcome.measured} on {outcome.samples} held-back "
                f"samples) is outside it; backed off to {outcome.steps_kept} of {outcome.steps} compression steps "
                "(as far as refinement's gain allows, bisected on refined models) and refined again: within the gate")
    if outcome.within:
        return f"quality gate {outcome.gate}: {outcome.measured} on {outcome.samples} held-back samples"
    return (f"quality gate {outcome.gate}: the planned model ({outcome.measured} on {outcome.samples} "
            f"held-back samples) is outside it; backed off to {outcome.steps_kept} of {outcome.steps} compression "
            "steps, the most damaging per unit of cost undone first"
            + ("" if outcome.steps_kept else ": no step fits the gate, nothing is decomposed"))

def _rank_rule_path(report: Report) -> list[tuple[str, int | tuple[int, ...]]]:
    """The rank rule's layers, least damaging first: SVD layers by their rank, Tucker-2 convs by
    their (r_out, r_in) (LayerPlan.ranks' two forms)."""
    done = [r for r in report.decomposed if r.method in ("svd", "whitened-svd")
            or (r.method in ("tucker2", "whitened-tucker2") and tucker2(r))]
    done.sort(key=lambda r: r.activation_error if r.activation_error is not None else (r.weight_error or 0.0))
    return [(r.name, plan_rank(r)) for r in done]

def _prefix_ranks(path: list[tuple[str, int | tuple[int, ...]]], count: int, dense: set[str]
                  ) -> dict[str, int | tuple[int, ...] | None]:
    """The first `count` steps of the path; its other layers and `dense` kept dense."""
    ranks: dict[str, int | tuple[int, ...] | None] = dict.fromkeys(dense)
    ranks.update({name: None for name, _ in path})
    for name, rank in path[:count]:
        ranks[name] = rank
    return ranks

def _within_gate(original: onnx.ModelProto, reference: ReferenceRun, candidate: onnx.ModelProto,
                 context: PassContext, slack: float = 1.0) -> tuple[bool, str]:
    """Whether the candidate is within the quality gate (its max_error x slack) on the reference
    run's samples, and what was measured."""
    gate = gate_for(context.options)
    tolerance, per_output = gate_tolerances(gate, gate.max_error * slack, original, real_samples=True)
    result = check_parity(reference, candidate, tolerance=tolerance, per_output=per_output,
                          provider=context.options.provider)
    worst = max(result.outputs, key=lambda o: o.rel_l2_error)
    top1 = [o for o in result.outputs if o.min_top1 is not None and o.top1_agreement is not None]
    measured = f"rel_l2 {worst.rel_l2_error:.3g}"
    if top1:
        low = min(top1, key=lambda o: o.top1_lower)
        measured += f", top-1 agreement {low.top1_agreement:.3f} (at least {low.top1_lower:.3f} with 90% confidence)"
    return result.passed, measured
