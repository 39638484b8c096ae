"""What the data-aware stages share: the plan (calibration data, allocation, the layers' time
share) and the Rewriter that owns the snapshot of the normalized graph and rewrites it at any
ranks. Each stage reads the plan and returns a value; none of them edits another's state."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..calibration import CalibrationData, load_calibration
from ..graph import export_graph, export_graph_lazily
from ..passes import PassContext, PassEntry
from ..rank_allocation import Allocation, Spectrum
from ..report import LayerRecord, Report

#: Share of the calibration samples held back to check the quality gate: errors measured on the
#: samples the Grams were fitted on would flatter the truncation.
HOLD_BACK = 1 / 8
HELD_ROWS = 32


def held_back_count(samples: int) -> int:
    """An eighth of the samples, at least HELD_ROWS and at most half: top-1 agreement is shown with
    confidence on 32 rows (all agreeing: a 90% lower bound of 0.951), not on a handful."""
    return max(1, min(samples // 2, max(int(samples * HOLD_BACK), HELD_ROWS)))

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
    data: CalibrationData | None = None
    fit_stop: int = 0                       # samples [0, fit_stop) calibrate, the rest are held back
    allocation: Allocation | None = None
    spectra: list[Spectrum] = field(default_factory=list)
    time_fraction: float = 1.0              # --target-speedup: the candidate layers' share of the run time
    flop_ratio: float | None = None         # --target-speedup: the MAC ratio the allocation was asked for
    held_back_run: object | None = None     # parity.ReferenceRun: the original on the held-back samples

    def held_back(self) -> list[dict]:
        return [] if self.data is None else list(self.data.batches(self.fit_stop))

    @property
    def snapshot(self) -> Snapshot:
        return Snapshot(self.normalized, self.names)

    def reference(self, original: onnx.ModelProto) -> onnx.ModelProto:
        """The snapshot as a model, whose activations the compressed model is to match: exported
        afresh for each stage that runs it, since kept it would be one more copy of the weights
        held through every stage."""
        return export_graph(self.normalized.copy(), original)

    def reference_lazily(self, original: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
        """reference() for a stage that only writes it for ONNX Runtime: the unchanged weights
        stay the input's tensors (graph.export_graph_lazily), never copied into the export."""
        return export_graph_lazily(self.normalized.copy(), original)


def rewrite(plan: DataPlan, original: onnx.ModelProto, context: PassContext, entries: list[PassEntry],
            ranks: dict[str, int | None]) -> tuple[onnx.ModelProto, dict[str, list[LayerRecord]]]:
    return rewrite_snapshot(plan.snapshot, original, context, entries, ranks)

def rewrite_snapshot(snapshot: Snapshot, original: onnx.ModelProto, context: PassContext, entries: list[PassEntry],
                     ranks: dict[str, int | None]) -> tuple[onnx.ModelProto, dict[str, list[LayerRecord]]]:
    """The passes on a fresh copy of the normalized graph, with these ranks (and the context's
    layers kept dense)."""
    graph = snapshot.normalized.copy()
    fresh = context.rewriting(context.layers.with_(ranks=ranks), names=snapshot.names, on_layer=lambda name: None)
    records = {entry.name: entry.run(graph, fresh).records for entry in entries}
    return export_graph(graph, original), records

def replace_records(report: Report, records: dict[str, list[LayerRecord]]) -> None:
    """The records of a rewrite take the place of the earlier rewrite's, pass by pass, in order."""
    report.layers = [r for r in report.layers if r.pass_name not in records]
    for name, pass_records in records.items():
        report.layers.extend(pass_records)
        report.passes[name] = sum(r.status != "skipped" for r in pass_records)

def tucker2(record: LayerRecord) -> bool:
    """A conv factorized as Tucker-2 (ranks (r_out, r_in), LayerPlan.ranks' tuple form)."""
    return record.op == "Conv" and record.rank is not None and len(record.rank) == 2

def plan_rank(record: LayerRecord) -> int | tuple[int, ...]:
    """A decomposed layer's rank as LayerPlan.ranks holds it."""
    return tuple(record.rank) if tucker2(record) else record.rank[0]

def matrix_layer(record: LayerRecord) -> bool:
    """Factorized by one SVD, with one rank (LayerPlan.ranks' int): MatMul, Gemm, 1x1 Conv."""
    return record.op != "Conv" or all(d == 1 for d in record.weight_shape[2:])

def count(batches: list[dict]) -> int:
    return sum(len(next(iter(b.values()))) for b in batches)

def fit_batches(plan: DataPlan | None) -> list[dict] | None:
    """The calibration batches the layers were fitted on (what static int8 calibrates on), or None."""
    if plan is None or plan.data is None:
        return None
    return list(plan.data.batches(0, plan.fit_stop))


def parity_samples(plan: DataPlan | None) -> list[dict] | None:
    """Real inputs for the parity check when the user gave some: the held-back samples, else the
    first calibration batch; None (generated inputs) without calibration data."""
    if plan is None or plan.data is None:
        return None
    return plan.held_back() or list(itertools.islice(plan.data.batches(), 1))

def fed_inputs(model: onnx.ModelProto) -> list[str]:
    """The graph inputs a run is fed: those that are not initializers too (IR < 4 lists both)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]

def analysis_shapes(options, model: onnx.ModelProto) -> dict[str, list[int]]:
    """Input shapes for shape inference and layer timing: --shape if given, else those of the
    calibration samples with --batch of them (a layer timed at 16 tokens says little about one
    served at 128), else none (resolve_shapes' defaults)."""
    if options.shape or options.calibration is None:
        return dict(options.shape)
    names = fed_inputs(model)
    data = load_calibration(options.calibration, names)
    with np.load(data.files[0]) as arrays:
        return {name: [options.batch, *arrays[name].shape[1:]] for name in names}
