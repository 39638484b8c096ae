"""The pipeline: load -> analyze -> choose ranks + rewrite (the decompose passes) -> clean up ->
check -> validate. Saving is the caller's (the CLI, or the user with onnx_lowrank.save_model)."""

from __future__ import annotations

import os
from typing import Any, Callable

import onnx

from . import data_aware
from .shapes import infer_output_shapes
from .bench import bench
from .compare import Tolerance
from .errors import OptionError
from .graph import (count_parameters, export_graph, import_graph, materialize, model_size, quantized_op_counts,
                    structure_only)
from .io import check_input_model, load_model_with_info
from .latency import latency_for
from .options import Options
from .parity import check_parity
from .passes import PIPELINE, PassContext, pipeline
from .report import Report
from .runtime import SessionConfig

#: What onnx.checker raises: a ValidationError, or shape inference's own error under full_check.
_CHECK_ERRORS = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError)

#: Output error floor for the parity check: float32 reassociation alone moves outputs ~1e-6;
#: a float16 output is rounded to ~5e-4 relative at every op, and the factorized chain has more ops.
PARITY_FLOOR = 1e-4
PARITY_FLOOR_16BIT = 1e-2

#: An implied relative output error bound this large is met by almost any output: say so.
VACUOUS = 1.0

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
    """
    options = _options(options, kwargs)
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

    output_shapes, shape_notes = infer_output_shapes(original, data_aware.analysis_shapes(options, original),
                                                     options.batch)
    quantized = quantized_op_counts(original)
    if quantized:
        report.notes.append("quantized ops left alone: " + ", ".join(f"{n} {op}" for op, n in quantized.items()))
    graph = import_graph(original)
    context = PassContext(options, output_shapes, on_layer=on_layer or (lambda name: None),
                          names={t for t in graph.tensors()} | {n.name for n in graph.nodes},
                          latency=latency_for(options))
    entries = pipeline(options)
    rewrites = [e for e in entries if e.stage != "normalize"]
    _run_passes([e for e in entries if e.stage == "normalize"], graph, context, report)
    plan = data_aware.prepare(graph, original, context, [e for e in rewrites if e.stage == "decompose"], report,
                              on_calibration)
    _run_passes(rewrites, graph, context, report)
    if latency_note := getattr(context.latency, "describe", lambda: "")():
        report.notes.append(latency_note)

    optimized = export_graph(graph, original) if report.changed else original
    if plan is not None and report.changed:
        optimized = data_aware.finish(plan, original, optimized, context, rewrites, report, on_calibration)
    if options.calibration is None and sum(r.weight_error or 0.0 for r in report.decomposed) > LOSSY:
        report.notes.append(data_aware.WEIGHT_ONLY_NOTE)
    if report.changed:
        _check(optimized, original, report)
    else:
        optimized = original
    if not report.decomposed:
        report.notes.append(_nothing_done(report, options))
    report.params_before, report.params_after = count_parameters(original), count_parameters(optimized)
    report.size_before, report.size_after = model_size(original), model_size(optimized)
    del graph, context   # gs's lazy constants hold the original's tensors; release them first
    reference = _release_if_owned(model, original, optimized)

    if options.validate:
        tolerance, source_note = implied_tolerance(report, options, original)
        report.parity = check_parity(reference, optimized, tolerance=tolerance, tolerance_source=source_note,
                                     provider=options.provider, shapes=options.shape, batch=options.batch,
                                     seed=options.seed, samples=data_aware.parity_samples(plan))
    elif shape_notes:
        report.notes.extend(shape_notes)
    if options.bench:
        report.bench = bench([reference, optimized], config=SessionConfig(provider=options.provider),
                             labels=["original", "optimized"], shapes=options.shape, batch=options.batch,
                             seed=options.seed)
    return optimized, report


def _release_if_owned(source, original: onnx.ModelProto, optimized: onnx.ModelProto) -> onnx.ModelProto | str:
    """What ONNX Runtime should load as the reference model. When we loaded the input ourselves and
    rewrote it, ORT reads the reference from its file (mapping external data rather than copying
    it), and the weights our copy read in for the passes are dropped with its initializers. A
    caller's ModelProto is never touched."""
    if isinstance(source, onnx.ModelProto) or optimized is original:
        return original
    original.graph.ClearField("initializer")
    return str(source)


def _run_passes(entries: list, graph, context: PassContext, report: Report) -> None:
    for entry in entries:
        result = entry.run(graph, context)
        report.layers.extend(result.records)
        report.passes[entry.name] = sum(r.status != "skipped" for r in result.records)


def implied_tolerance(report: Report, options: Options, model: onnx.ModelProto) -> tuple[Tolerance, str]:
    """The output error the rank rule implies: to first order a relative weight error e moves a
    layer's output by about e, and layer errors add up through the network; twice the sum leaves
    room for the nonlinearities in between."""
    if options.max_error is not None:
        return Tolerance(max_error=options.max_error), "--max-error"
    # with calibration, the activation-weighted error is the one that predicts the output's
    errors = [r.activation_error if r.activation_error is not None else r.weight_error
              for r in report.decomposed if r.weight_error is not None]
    floor = PARITY_FLOOR_16BIT if _has_16bit_outputs(model) else PARITY_FLOOR
    bound = max(floor, 2 * sum(errors))
    if bound >= VACUOUS:
        report.notes.append(f"the rank rule implies an output error bound of {bound:.2g}, which any output meets: "
                            "parity PASSED means little here; gate on --max-error E")
    kind = "activation" if options.calibration else "weight"
    return Tolerance(max_error=bound), (f"2 x sum of layer {kind} errors, floor {floor:g}" if errors
                                        else "nothing decomposed: float rounding only")


def _has_16bit_outputs(model: onnx.ModelProto) -> bool:
    sixteen = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return any(o.type.tensor_type.elem_type in sixteen for o in model.graph.output)


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
