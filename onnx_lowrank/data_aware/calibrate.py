"""Stage 1, calibrate: Gram matrices of every candidate layer's inputs on the calibration samples
(calibration.py streams them from ONNX Runtime), a share of the samples held back for the quality
gate, and the Grams of layers that read one weight summed (they are factorized once)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx

from ..calibration import capture_specs, collect_grams, load_calibration
from ..gate import gate_for
from ..inputs import input_hints
from ..passes import PassContext
from ..passes._weights import weight_key
from ..report import CalibrationOutcome
from ..synthetic import WithSyntheticTokens
from .plan import DataPlan, held_back_count


def calibrate(plan: DataPlan, graph, original, context: PassContext, on_batch: Callable[[int], None] | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, int]], dict[str, float],
                         CalibrationOutcome]:
    """(layer -> Gram, layer -> (column sums, rows), layer -> rows per sample, outcome); sets
    plan.data and plan.fit_stop."""
    options = context.options
    inputs = [t.name for t in graph.inputs]
    plan.data = load_calibration(options.calibration, inputs)
    checks = gate_for(options).max_error is not None and plan.data.samples >= 2
    plan.fit_stop = plan.data.samples - (held_back_count(plan.data.samples) if checks else 0)
    # error correction and the MLP forms read the inputs' Grams themselves, not only through the SVD
    specs = capture_specs(graph, options, outputs=not options.error_correction and options.mlp_form == "svd")
    tables = token_tables(original, inputs) if options.synthetic_tokens else {}
    data = WithSyntheticTokens(plan.data, tables, options.synthetic_tokens, options.seed) if tables else plan.data
    reference, sources = plan.reference_lazily(original)
    calibration = collect_grams(reference, specs, data, stop=plan.fit_stop, provider=options.provider,
                                on_batch=on_batch, sources=sources)
    synthetic = plan.fit_stop * options.synthetic_tokens if tables else 0
    outcome = CalibrationOutcome(len(calibration.grams), calibration.samples - synthetic,
                                 plan.data.samples - plan.fit_stop, synthetic, tables)
    return shared_grams(calibration.grams, specs, context), calibration.sums, calibration.positions, outcome


def token_tables(model, inputs: list[str]) -> dict[str, int]:
    """Graph inputs of integer ids that index a constant table (an embedding's Gather), and its rows."""
    integer = {v.name for v in model.graph.input
               if v.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)}
    return {name: hint.high for name, hint in input_hints(model).items()
            if hint.high and name in integer and name in inputs}


def describe(outcome: CalibrationOutcome) -> str:
    held = f", {outcome.held_back} held back for the quality gate" if outcome.held_back else ""
    synthetic = ""
    if outcome.synthetic:
        tables = ", ".join(f"{name} from its {rows}-row table" for name, rows in outcome.synthetic_inputs.items())
        synthetic = (f" and {outcome.synthetic} synthetic token sequences (ids of {tables}, drawn uniformly; "
                     "--synthetic-tokens 0: none)")
    return (f"calibration: Gram matrices of {outcome.layers} layers from {outcome.samples} samples{synthetic}{held}; "
            "matrix layers use whitened SVD, k x k convs whitened Tucker-2")


def shared_grams(grams: dict[str, np.ndarray], specs: list, context: PassContext) -> dict[str, np.ndarray]:
    """Layers that read one weight (through aliases too) are factorized once, so their whitening
    is the Gram of all their inputs together: the sum of their Grams, given to each of them."""
    groups: dict[tuple, list[str]] = {}
    for spec in specs:
        if spec.layer in grams:
            gram = grams[spec.layer]
            key = (weight_key(context, spec.weight), spec.axis, spec.window, type(gram), gram.shape)
            groups.setdefault(key, []).append(spec.layer)
    shared = dict(grams)
    for layers in groups.values():
        if len(layers) > 1:
            total = sum(grams[layer] for layer in layers)
            shared.update(dict.fromkeys(layers, total))
    return shared
