"""Stage 4, error correction (--error-correction): refit the factorized layers depth by depth on
the inputs they see in the compressed model, to the original layers' outputs."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Callable

import onnx
import onnx_graphsurgeon as gs

from ..calibration import capture_specs, collect_cross_grams
from ..passes import PassContext, PassEntry
from ..passes._weights import weight_key
from ..passes.base import layer_name
from ..report import CorrectionOutcome, Report
from .plan import DataPlan, matrix_layer, plan_rank, replace_records, rewrite, tucker2

def correct(plan: DataPlan, original: onnx.ModelProto, optimized: onnx.ModelProto, context: PassContext,
            entries: list[PassEntry], report: Report, on_batch: Callable[[int], None] | None = None
            ) -> tuple[onnx.ModelProto, PassContext, CorrectionOutcome | None]:
    """Sequential error correction: refit the factorized layers depth by depth, each on the inputs
    it sees once every layer before it is factorized and refitted, to the original layer's output,
    at the ranks already chosen, so that truncation errors do not compound with depth.

    Matrix layers (and 1x1 convs) take the whitened SVD of their corrected weight
    (numerics.whitening.corrected_weight), k x k convs a refitted Tucker-2
    (numerics.tucker.corrected_tucker2). Layers at one depth (no factorized layer between them,
    as Q, K and V) are refitted from one pass over the calibration samples: one pass per depth."""
    options = context.options
    if plan.data is None:
        return optimized, context, None
    if not options.error_correction:
        convs = sum(r.method == "whitened-tucker2" for r in report.decomposed)
        if convs:
            report.notes.append(f"{convs} k x k convs factorized without --error-correction: each was fitted to the "
                                "original model's activations, and several compressed together compound their "
                                "errors; --error-correction refits them depth by depth (on the bundled digits CNN "
                                "at 2.64x fewer conv MACs: 88.4% -> 99.8% accuracy)")
        return optimized, context, None
    fitted = {r.name: r for r in report.decomposed
              if r.method == "whitened-svd" or (r.method == "whitened-tucker2" and tucker2(r))}
    specs = capture_specs(plan.normalized, options, patches=True)
    users = Counter(weight_key(context, s.weight) for s in specs)
    # a shared weight has one factorization; a Tucker-2 conv is refitted on its unfolded patches
    specs = [s for s in specs if s.layer in fitted and users[weight_key(context, s.weight)] == 1
             and (s.window is not None or not tucker2(fitted[s.layer]))]
    if not specs:
        return optimized, context, None
    depths = layer_depths(plan.normalized, {s.layer for s in specs})
    final = {r.name: plan_rank(r) for r in fitted.values() if r.name in depths}
    # the allocation's choices stand (layers it kept dense stay dense), the rank rule's are fixed
    ranks = {**context.layers.ranks, **{r.name: r.rank[0] for r in report.decomposed
                                        if r.method in ("svd", "whitened-svd") and matrix_layer(r)}}
    # this stage owns what it refits with: the Grams, cross Grams and patch Grams on the compressed
    # model's inputs, and its own cache of factorizations (the first pass's were fitted elsewhere)
    grams, cross_grams, patch_grams, cache = dict(context.layers.grams), {}, {}, {}
    corrected = dataclasses.replace(context, cache=cache, layers=context.layers.with_(
        grams=grams, cross_grams=cross_grams, patch_grams=patch_grams))
    reference = plan.reference(original)
    for depth in sorted(set(depths.values())):
        level = [s for s in specs if depths[s.layer] == depth]
        partial = {**ranks, **{name: (rank if depths[name] < depth else None) for name, rank in final.items()}}
        model = reference if depth == min(depths.values()) else rewrite(plan, original, corrected, entries, partial)[0]
        _drop_superseded(cache, (grams, cross_grams, context.layers.grams),
                         [name for name in final if depths[name] < depth])
        pairs = collect_cross_grams(reference, model, level, plan.data, stop=plan.fit_stop,
                                    provider=options.provider, on_batch=on_batch)
        for spec in level:
            gram, cross = pairs[spec.layer]
            if tucker2(fitted[spec.layer]):
                patch_grams[spec.layer] = (gram, cross)
            else:
                grams[spec.layer], cross_grams[spec.layer] = gram, cross
            cache.pop(spec.layer, None)   # factorized before with the first-pass Gram
    ranks.update(final)
    model, records = rewrite(plan, original, corrected, entries, ranks)
    replace_records(report, records)
    outcome = CorrectionOutcome(len(specs), len(set(depths.values())))
    report.notes.append(describe(outcome))
    return model, dataclasses.replace(corrected, layers=corrected.layers.with_(ranks=ranks)), outcome


def describe(outcome: CorrectionOutcome) -> str:
    return (f"error correction: {outcome.layers} layers refitted to the original outputs, depth by depth "
            f"({outcome.depths} passes over the calibration samples), on the inputs they see in the compressed model")


def _drop_superseded(cache: dict, grams: tuple[dict, ...], layers: list[str]) -> None:
    """Free the Grams of matrix layers whose corrected factorization is cached (the rewrites from
    here on read the cache): BERT-base holds ~1 GB of first-pass Grams and as much again of each of
    the corrected Grams and cross Grams, which a depth-by-depth sweep would otherwise all keep."""
    for name in layers:
        if name in cache:
            for held in grams:
                held.pop(name, None)


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
