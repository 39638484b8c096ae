"""The pipeline: load -> analyze -> choose ranks + rewrite (the decompose passes) -> clean up ->
check -> validate. Saving is the caller's (the CLI, or the user with onnx_lowrank.save_model)."""

from __future__ import annotations

import os
from typing import Any, Callable

import onnx

from .analyze import infer_output_shapes, quantized_op_counts
from .compare import Tolerance
from .errors import OptionError
from .graph import count_parameters, export_graph, import_graph
from .io import load_model_with_info
from .options import Options
from .parity import check_parity
from .passes import PIPELINE, PassContext, pipeline
from .report import Report

#: What onnx.checker raises: a ValidationError, or shape inference's own error under full_check.
_CHECK_ERRORS = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError)

#: Output error floor for the parity check: float32 reassociation alone moves outputs ~1e-6.
PARITY_FLOOR = 1e-4


def optimize(model: onnx.ModelProto | str | os.PathLike, options: Options | None = None, *,
             on_layer: Callable[[str], None] | None = None, **kwargs: Any) -> tuple[onnx.ModelProto, Report]:
    """Decompose a model's weight-carrying MatMul / Gemm / Conv nodes; return (model, report).

    Keyword arguments are the fields of Options (the CLI flags with '-' -> '_'), e.g.
    optimize("in.onnx", tolerance=1e-2, rank_multiple=16, ops="matmul,gemm").
    """
    options = _options(options, kwargs)
    unknown = sorted(set(options.skip) - {entry.name for entry in PIPELINE})
    if unknown:
        raise OptionError(f"--skip: unknown pass {', '.join(unknown)}; passes: {', '.join(e.name for e in PIPELINE)}")
    source = str(model) if not isinstance(model, onnx.ModelProto) else "<ModelProto>"
    original, external = (model, False) if isinstance(model, onnx.ModelProto) else load_model_with_info(model)
    report = Report(input=source, options=options.to_dict(), input_external_data=external)

    output_shapes, shape_notes = infer_output_shapes(original, options.shape, options.batch)
    quantized = quantized_op_counts(original)
    if quantized:
        report.notes.append("quantized ops left alone: " + ", ".join(f"{n} {op}" for op, n in quantized.items()))
    graph = import_graph(original)
    context = PassContext(options, output_shapes, on_layer=on_layer or (lambda name: None),
                          names={t for t in graph.tensors()} | {n.name for n in graph.nodes})
    for entry in pipeline(options):
        result = entry.run(graph, context)
        report.layers.extend(result.records)
        report.passes[entry.name] = sum(r.status != "skipped" for r in result.records)

    if report.changed:
        optimized = export_graph(graph, original)
        _check(optimized, original, report)
    else:
        optimized = original
        report.notes.append(_nothing_done(report, options))
    report.params_before, report.params_after = count_parameters(original), count_parameters(optimized)
    report.size_before, report.size_after = original.ByteSize(), optimized.ByteSize()

    if options.validate:
        tolerance, source_note = implied_tolerance(report, options)
        report.parity = check_parity(original, optimized, tolerance=tolerance, tolerance_source=source_note,
                                     provider=options.provider, shapes=options.shape, batch=options.batch,
                                     seed=options.seed)
    elif shape_notes:
        report.notes.extend(shape_notes)
    return optimized, report


def implied_tolerance(report: Report, options: Options) -> tuple[Tolerance, str]:
    """The output error the rank rule implies: to first order a relative weight error e moves a
    layer's output by about e, and layer errors add up through the network; twice the sum leaves
    room for the nonlinearities in between."""
    if options.max_error is not None:
        return Tolerance(max_error=options.max_error), "--max-error"
    errors = [r.weight_error for r in report.decomposed if r.weight_error is not None]
    bound = max(PARITY_FLOOR, 2 * sum(errors))
    return Tolerance(max_error=bound), (f"2 x sum of layer weight errors, floor {PARITY_FLOOR:g}" if errors
                                        else "nothing decomposed: float rounding only")


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
    if not report.layers:
        return "nothing to decompose: no MatMul, Gemm or Conv node with a constant weight was found"
    first = report.layers[0]
    return (f"nothing decomposed: none of the {len(report.layers)} candidate layers pays at "
            f"{options.rank_rule.describe()} (e.g. {first.name}: {first.reason}); the model is unchanged")
