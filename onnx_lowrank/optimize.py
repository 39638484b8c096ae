"""The pipeline: load -> analyze -> choose ranks + rewrite (the decompose passes) -> clean up ->
check -> validate. Saving is the caller's (the CLI, or the user with onnx_lowrank.save_model)."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import math
import os
from typing import Any, Callable

import onnx

from . import data_aware
from .shapes import infer_output_shapes
from .bench import bench
from .compare import Tolerance
from .errors import OptionError
from .gate import gate_for, gate_tolerances
from .graph import (count_parameters, export_graph, import_graph, materialize, model_size, quantized_op_counts,
                    structure_only, tensor_names, weight_bytes)
from .inputs import input_hints
from .io import check_input_model, load_model_with_info, staged_output, write_model
from .latency import latency_for
from .options import Options
from .parity import check_parity
from .passes import PIPELINE, PassContext, pipeline
from .passes.base import RewriteState
from .quantize import quantize_int8
from .report import Report
from .runtime import SessionConfig

#: What onnx.checker raises: a ValidationError, or shape inference's own error under full_check.
_CHECK_ERRORS = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError)

#: Output error floor for the parity check: float32 reassociation alone moves outputs ~1e-6;
#: a float16 output is rounded to ~5e-4 relative at every op, and the factorized chain has more ops.
PARITY_FLOOR = 1e-4
PARITY_FLOOR_16BIT = 1e-2

#: Summed relative weight error above which a weight-only truncation is lossy enough that
#: calibration data would change the result.
LOSSY = 1e-2


def optimize(model: onnx.ModelProto | str | os.PathLike, options: Options | None = None, *,
             on_layer: Callable[[str], None] | None = None, on_calibration: Callable[[int], None] | None = None,
             **kwargs: Any) -> tuple[onnx.ModelProto, Report]:
    """Decompose a model's weight-carrying MatMul / Gemm / Conv nodes; return (model, report).

    Keyword arguments are the fields of Options (the CLI flags with '-' -> '_'), e.g.
    optimize("in.onnx", tolerance=1e-2, rank_multiple=16, ops="matmul,gemm").
    on_layer(name) is called per candidate layer, on_calibration(samples) per calibration batch.

    What comes back is the input itself whenever the rewrite does not pay: nothing decomposed,
    factors that would add bytes, or (with --measure) a whole model that measures slower.
    optimize_file does the same from file to file in less memory.
    """
    rewritten = _rewrite(model, _options(options, kwargs), on_layer, on_calibration)
    return _run_checks(rewritten, rewritten.optimized), rewritten.report


def optimize_file(source: str | os.PathLike, output: str | os.PathLike, options: Options | None = None, *,
                  external_data: bool | None = None, keep_failed: bool = False,
                  on_layer: Callable[[str], None] | None = None, on_calibration: Callable[[int], None] | None = None,
                  **kwargs: Any) -> Report:
    """optimize() from file to file, the CLI's way: the rewritten model is written (staged beside
    `output`) and dropped before ONNX Runtime loads either model, so the parity check holds one
    model in one session at a time and the peak is bounded by the model, not a multiple of it.
    `output` appears only when the parity check passed, or with keep_failed; external_data None
    keeps the input's choice. Returns the report; the written model is the one it describes."""
    rewritten = _rewrite(source, _options(options, kwargs), on_layer, on_calibration)
    report = rewritten.report
    external = report.input_external_data if external_data is None else external_data
    with staged_output(output) as staged:
        if rewritten.optimized is rewritten.original:
            write_model(rewritten.original, staged.path, external)
            return report
        # protobuf frees a message's memory only with the message: drop each model whole as soon
        # as it is not needed (the reference is then read from its file)
        if isinstance(rewritten.reference, str):
            rewritten.original = None
            _return_freed_memory()
        write_model(rewritten.optimized, staged.path, external)
        rewritten.optimized = None
        _return_freed_memory()
        written = _run_checks(rewritten, str(staged.path))
        staged.keep = report.parity is None or report.parity.passed or keep_failed
        if staged.keep and not isinstance(written, str):   # measured slower: the input is written
            write_model(written, staged.path, external)
    return report


@dataclasses.dataclass
class _Rewritten:
    """What the rewrite hands the checks that run the models in ONNX Runtime."""
    source: Any   # the caller's model or path
    options: Options
    original: onnx.ModelProto
    optimized: onnx.ModelProto | None
    report: Report
    plan: Any
    hints: dict
    shape_notes: list[str]
    fed: list[str]
    tolerance: tuple | None = None   # parity_tolerance's (tolerance, per output, where it comes from)
    reference: onnx.ModelProto | str | None = None


def _rewrite(model, options: Options, on_layer, on_calibration) -> _Rewritten:
    """load -> normalize -> (calibrate, allocate) -> decompose -> merge -> (data-aware finish) ->
    quantize -> check: everything before ONNX Runtime runs the result."""
    unknown = sorted(set(options.skip) - {entry.name for entry in PIPELINE})
    if unknown:
        raise OptionError(f"--skip: unknown pass {', '.join(unknown)}; passes: {', '.join(e.name for e in PIPELINE)}")
    source = str(model) if not isinstance(model, onnx.ModelProto) else "<ModelProto>"
    if isinstance(model, onnx.ModelProto):
        original, external = model, False
        check_input_model(original, source)
    else:
        original, external = load_model_with_info(model)
        if external and options.calibration is not None:
            materialize(original)   # calibration runs modified copies of the model, which need every byte
    report = Report(input=source, options=options.to_dict(), input_external_data=external)
    hints = input_hints(original)

    output_shapes, shape_notes = infer_output_shapes(original, data_aware.analysis_shapes(options, original),
                                                     options.batch)
    quantized = quantized_op_counts(original)
    if quantized:
        report.notes.append("quantized ops left alone: " + ", ".join(f"{n} {op}" for op, n in quantized.items()))
    graph = import_graph(original)
    context = PassContext(options, output_shapes, on_layer=on_layer or (lambda name: None),
                          latency=latency_for(options),
                          state=RewriteState(names={t for t in graph.tensors()} | {n.name for n in graph.nodes}))
    entries = pipeline(options)
    rewrites = [e for e in entries if e.stage != "normalize"]
    _run_passes([e for e in entries if e.stage == "normalize"], graph, context, report)
    plan, context = data_aware.prepare(graph, original, context, [e for e in rewrites if e.stage == "decompose"],
                                       report, on_calibration)
    snapshot = data_aware.Snapshot(graph.copy(), set(context.state.names)) if plan is None else plan.snapshot
    _run_passes(rewrites, graph, context, report)
    if latency_note := getattr(context.latency, "describe", lambda: "")():
        report.notes.append(latency_note)

    optimized = original
    if report.changed:   # a model nothing changed is written as it came, with no run
        optimized, context = _within_bytes(export_graph(graph, original), original, snapshot, context, rewrites,
                                           report)
    if plan is not None and optimized is not original:
        optimized = data_aware.finish(plan, original, optimized, context, rewrites, report, on_calibration)
    if optimized is not original and weight_bytes(optimized) > weight_bytes(original):
        optimized = _fall_back(report, original, "the rewritten model holds more weight bytes than the input")
    if optimized is not original and not report.changed:
        optimized = _fall_back(report, original, "")
    if options.calibration is None and sum(r.weight_error or 0.0 for r in report.decomposed) > LOSSY:
        report.notes.append(data_aware.WEIGHT_ONLY_NOTE)
    if options.quantize:
        optimized, how = quantize_int8(optimized, data_aware.fit_batches(plan))
        report.quantized = how
        report.notes.append(f"--quantize int8: {how}")
    if optimized is not original:
        _check(optimized, original, report)
    if not report.decomposed:
        report.notes.append(_nothing_done(report, options))
    _measure_sizes(report, original, optimized)
    rewritten = _Rewritten(model, options, original, optimized, report, plan, hints, shape_notes,
                           data_aware.fed_inputs(optimized))
    if optimized is not original and options.validate:
        # the parity tolerance reads the model's types; computed while its weights are still here
        rewritten.tolerance = parity_tolerance(report, options, optimized)
    del graph, context, snapshot   # gs's lazy constants hold the original's tensors; release them first
    rewritten.reference = _release_if_owned(model, original, optimized)
    _return_freed_memory()
    return rewritten


def _run_checks(rewritten: _Rewritten, optimized: onnx.ModelProto | str) -> onnx.ModelProto | str:
    """Parity (the quality gate), never-slower and --bench on the rewritten model, given as a
    model or as the file it was written to; returns what is to be written: it, or the input when
    it measured slower."""
    report, options, reference = rewritten.report, rewritten.options, rewritten.reference
    changed = isinstance(optimized, str) or optimized is not rewritten.original
    plan, hints = rewritten.plan, rewritten.hints
    if options.validate and changed:
        tolerance, per_output, source_note = rewritten.tolerance
        known = plan.held_back_run if plan is not None else None   # the back-off's run of the original
        report.parity = check_parity(known or reference, optimized, tolerance=tolerance, per_output=per_output,
                                     tolerance_source=source_note, provider=options.provider, shapes=options.shape,
                                     batch=options.batch, seed=options.seed, hints=hints,
                                     samples=data_aware.parity_samples(plan))
    elif rewritten.shape_notes:
        report.notes.extend(rewritten.shape_notes)
    passed = report.parity is None or report.parity.passed
    _return_freed_memory()
    if changed and passed and options.measure and not options.allow_slower:
        if report.decomposed or report.quantized:
            optimized = _not_slower(reference, optimized, rewritten, options)
        else:
            report.notes.append(EXACT_ONLY_NOT_TIMED)
    if options.bench:
        report.bench = bench([reference, optimized], config=SessionConfig(provider=options.provider),
                             labels=["original", "optimized"], shapes=options.shape, batch=options.batch,
                             seed=options.seed, hints=hints)
    return optimized


#: Why a model that only the exact rewrites changed is not timed against the original: each of them
#: removes nodes or multiply-adds (merges only where the merged layer is cheaper), and timing two
#: sessions side by side holds the model's weights twice more.
EXACT_ONLY_NOT_TIMED = ("not timed against the original: only exact rewrites applied, each of which removes nodes or "
                        "multiply-adds; `onnx-lowrank bench INPUT OUTPUT` times the whole model")


#: A rewritten model that measures below this fraction of the original's speed is not written:
#: interleaved timings of a model against itself read 0.99-1.02x here with spinning off.
NEVER_SLOWER = 0.97


def _fall_back(report: Report, original: onnx.ModelProto, why: str) -> onnx.ModelProto:
    """The input is the output: the layer records stay as the report of what was tried."""
    if why:
        report.fallback = why
        report.notes.append(f"{why}: the output is the input, unchanged")
    for record in report.layers:
        if record.decomposed:
            record.status, record.reason = "skipped", f"undone: {why}" if why else record.reason
    report.passes = dict.fromkeys(report.passes, 0)
    return original


def _measure_sizes(report: Report, original: onnx.ModelProto, optimized: onnx.ModelProto) -> None:
    report.params_before, report.params_after = count_parameters(original), count_parameters(optimized)
    report.size_before, report.size_after = model_size(original), model_size(optimized)


def _within_bytes(optimized: onnx.ModelProto, original: onnx.ModelProto, snapshot, context: PassContext,
                  entries: list, report: Report) -> tuple[onnx.ModelProto, PassContext]:
    """A lossy rule never grows the model: a weight whose factors take more bytes than the weight
    frees (it stays in the model for a reader that keeps it dense, or the factors outweigh it) is
    kept dense by all its readers, and the model rewritten once without it."""
    if weight_bytes(optimized) <= weight_bytes(original):
        return optimized, context
    present = tensor_names(optimized)
    readers: dict[str, list] = {}
    for record in report.decomposed:
        if record.weight is not None:
            readers.setdefault(record.weight, []).append(record)
    dense = {}
    for source, records in readers.items():
        added = sum(r.factor_bytes or 0 for r in records)
        freed = 0 if source in present else (records[0].weight_bytes or 0)
        if added > freed:
            why = (f"kept dense: its factors ({added:,} B) would outweigh what they free of weight '{source}' "
                   f"({freed:,} B{'; another reader keeps it' if source in present else ''})")
            dense.update({r.name: why for r in records})
    if not dense:
        return optimized, context   # the growth is not a weight's factors: the check after the rewrite falls back
    context = dataclasses.replace(context, layers=context.layers.with_(dense={**context.layers.dense, **dense}))
    rewritten, records = data_aware.rewrite_snapshot(snapshot, original, context, entries, context.layers.ranks)
    data_aware.replace_records(report, records)
    report.notes.append(f"{len(dense)} layers kept dense so that the model does not grow (shared or "
                        "16-bit weights whose factors would add bytes)")
    return rewritten, context


def _not_slower(reference, optimized: onnx.ModelProto | str, rewritten: _Rewritten,
                options: Options) -> onnx.ModelProto | str:
    """Time the written model against the original as a whole (interleaved, spinning off, on the
    provider asked for); one that is slower is not written: the input is."""
    report, model = rewritten.report, rewritten.source
    speed = data_aware.whole_model_speedup(reference, optimized, rewritten.plan, options, rewritten.hints,
                                           report.parity.input_shapes if report.parity else None,
                                           inputs=rewritten.fed)
    report.measured_speedup = round(speed, 3)
    target = options.target_speedup
    if target is not None and speed < target and gate_for(options).max_error is not None:
        report.notes.append(f"--target-speedup {target:g}: reached {speed:.2f}x as a whole model under the gate "
                            f"{gate_for(options).describe()}; the gate, not the target, set the ranks")
    if speed >= NEVER_SLOWER:
        return optimized
    if isinstance(model, onnx.ModelProto):
        original_model = model
    else:
        original_model, _ = load_model_with_info(model)
    _fall_back(report, original_model, f"the rewritten model measured {speed:.2f}x the original's speed as a "
                                       f"whole model on {options.provider} (below {NEVER_SLOWER}x)")
    report.parity = None
    _measure_sizes(report, original_model, original_model)
    return original_model


def _release_if_owned(source, original: onnx.ModelProto, optimized: onnx.ModelProto) -> onnx.ModelProto | str:
    """What ONNX Runtime should load as the reference model. When we loaded the input ourselves and
    rewrote it, ORT reads the reference from its file (mapping external data rather than copying
    it), and the weights our copy read in for the passes are dropped with its initializers. A
    caller's ModelProto is never touched."""
    if isinstance(source, onnx.ModelProto) or optimized is original:
        return original
    original.graph.ClearField("initializer")
    return str(source)


def _return_freed_memory() -> None:
    """Hand the heap that the passes and the parity sessions freed back to the system before the
    next ONNX Runtime sessions load the weights again: glibc keeps freed blocks below its (adaptive)
    mmap threshold, 0.3 GB of them after the rewrite of a BERT-base-size model. Elsewhere a no-op."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _run_passes(entries: list, graph, context: PassContext, report: Report) -> None:
    for entry in entries:
        result = entry.run(graph, context)
        report.layers.extend(result.records)
        report.passes[entry.name] = sum(r.status != "skipped" for r in result.records)


def parity_tolerance(report: Report, options: Options, model: onnx.ModelProto
                     ) -> tuple[Tolerance, dict[str, Tolerance], str]:
    """The parity check's tolerance: the quality gate (gate.py) of a lossy run, tightened, on the
    weight-only path, to the output error the rank rule implies where that is smaller (a rewrite
    worse than its own layers' errors predict is a bug to catch, not a loss to accept). To first order a relative weight
    error e moves a layer's output by about e, and layer errors add up through the network; twice
    the sum leaves room for the nonlinearities in between."""
    gate = gate_for(options)
    report.gate = gate.describe()
    if gate.ungated:
        tolerance, per_output = gate_tolerances(gate, math.inf, model)
        return tolerance, per_output, "--max-error none"
    # with calibration, the activation-weighted error is the one that predicts the output's
    errors = [r.activation_error if r.activation_error is not None else r.weight_error
              for r in report.decomposed if r.weight_error is not None]
    floor = PARITY_FLOOR_16BIT if _has_16bit(model) else PARITY_FLOOR
    implied = max(floor, 2 * sum(errors))
    # with calibration the gate itself was checked on the held-back samples (data_aware.back_off),
    # and the same samples check parity: a tighter bound here would refuse what the back-off kept
    data_aware_run = options.calibration is not None or options.target is not None or options.quantize
    if gate.source == "--max-error" or data_aware_run or implied >= gate.max_error:
        tolerance, per_output = gate_tolerances(gate, gate.max_error, model, real_samples=options.calibration is not None)
        return tolerance, per_output, f"the quality gate, {gate.source}"
    kind = "activation" if options.calibration else "weight"
    tolerance, per_output = gate_tolerances(gate, implied, model)
    return tolerance, per_output, (f"2 x sum of layer {kind} errors, floor {floor:g}, within the gate "
                                   f"{gate.max_error:g}" if errors else "nothing decomposed: float rounding only")


def _has_16bit(model: onnx.ModelProto) -> bool:
    """16-bit outputs, or 16-bit weights: factors stored in float16 are rounded to ~5e-4 each."""
    sixteen = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return (any(o.type.tensor_type.elem_type in sixteen for o in model.graph.output)
            or any(t.data_type in sixteen for t in model.graph.initializer))


def _options(options: Options | None, kwargs: dict[str, Any]) -> Options:
    if options is not None and kwargs:
        raise TypeError("pass either an Options object or keyword options, not both")
    if options is not None:
        return options
    try:
        return Options(**kwargs)
    except TypeError as exc:
        raise OptionError(str(exc).replace("Options.__init__()", "optimize()")) from None


def _check(optimized: onnx.ModelProto, original: onnx.ModelProto, report: Report) -> None:
    """full_check (strict shape inference too) unless the input itself fails it, as models with
    custom-domain ops do; then the structural check, and a note saying so."""
    optimized, original = structure_only(optimized), structure_only(original)   # any size, no data copied
    try:
        onnx.checker.check_model(optimized, full_check=True)
        return
    except _CHECK_ERRORS:
        try:
            onnx.checker.check_model(original, full_check=True)
        except _CHECK_ERRORS:
            onnx.checker.check_model(optimized)
            report.notes.append("the input model fails onnx.checker's full check (strict shape inference); "
                                "the output was checked structurally only")
            return
        raise


def _nothing_done(report: Report, options: Options) -> str:
    """Said whenever no layer is decomposed, also when a normalize pass (BN folding) changed the graph."""
    rewrites = ", ".join(f"{name}: {n}" for name, n in report.passes.items() if n)
    outcome = f"only the exact rewrites were applied ({rewrites})" if rewrites else "the model is unchanged"
    candidates = report.candidates
    if not candidates:
        names = [op for op in ("MatMul", "Gemm", "Conv") if op.lower() in options.ops]
        ops = " or ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else names[0]
        return f"nothing to decompose: no {ops} node with a constant weight was found" + (f"; {outcome}" if rewrites else "")
    first = candidates[0]
    return (f"nothing decomposed: none of the {len(candidates)} candidate layers pays at "
            f"{options.rank_rule.describe()} (e.g. {first.name}: {first.reason}); {outcome}")
