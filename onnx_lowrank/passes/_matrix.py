"""The shared core of the matrix passes (MatMul, Gemm, 1x1 Conv): SVD, rank decision, record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..forms import LayerGeometry
from ..numerics import ranks as R
from ..numerics.svd import relative_error_by_rank, split_factors, svd
from ..numerics.tucker import relative_error
from ..numerics.whitening import corrected_weight, whitened_svd
from ..rank_allocation import LayerSpectrum
from ..rank_choice import MeasuredDecision, choose_matrix_rank, measure_matrix_rank
from .base import LayerRecord, PassContext, factor_constant


@dataclass
class MatrixFactors:
    """w [k, n] ~= first [k, r] @ second [r, n], in the weight's dtype."""

    first: np.ndarray
    second: np.ndarray
    record: LayerRecord


def factorize_matrix(context: PassContext, weight: gs.Constant, w: np.ndarray, record: LayerRecord,
                     input_axis: int = 0, geometry: LayerGeometry | None = None) -> MatrixFactors | None:
    """SVD of w [k, n] (the weight as the layer applies it), the rank decision, and the record.

    input_axis is the axis of w that the layer's input activations contract (0 for y = x w, 1 for
    y = w x). With a calibration Gram for the layer, the SVD is whitened and every error, the rank
    rule's included, is the error on the layer's output over the calibration inputs.

    With context.latency and the layer's geometry, the rule's rank is then searched on measured
    latency (rank_choice.search_ranks), and a layer that is not measurably faster stays dense.

    Returns None, with record marked skipped and its reason set, when the layer stays dense.
    """
    k, n = w.shape
    name = record.name
    cache = context.decompositions if context.decompositions is not None else {}
    if name not in cache:
        cache[name] = _decompose(w, context.grams.get(name), input_axis, context.cross_grams.get(name))
    decomposition = cache[name]
    decision = choose_matrix_rank(decomposition.s, k, n, context.options)
    record.break_even_rank = round(decision.break_even_rank, 2)
    record.max_rank = decision.max_rank
    record.params_before = record.macs_before = R.matrix_macs(k, n)
    if context.survey is not None:
        context.survey[name] = LayerSpectrum(name, k, n, relative_error_by_rank(decomposition.s), decision.max_rank,
                                             float(record.positions or 1))
        record.status, record.reason = "skipped", "surveyed only"
        return None
    if name in context.ranks:
        rank = context.ranks[name]
        if rank is None:
            record.status, record.reason = "skipped", "kept dense by the global rank allocation"
            return None
    elif decision.ranks is None:
        record.status, record.reason = "skipped", decision.reason
        return None
    else:
        (rank,) = decision.ranks
        if context.latency is not None and geometry is not None:
            measured = measure_matrix_rank(relative_error_by_rank(decomposition.s), rank, geometry,
                                           context.latency, context.options)
            record_measurement(record, measured)
            if measured.ranks is None:
                return None
            (rank,) = measured.ranks
    first, second = decomposition.factors(rank)
    record.status, record.rank = "decomposed", [rank]
    record.method = "whitened-svd" if decomposition.data_aware else "svd"
    if decomposition.data_aware:
        record.weight_error = relative_error(w, first @ second)
        record.activation_error = float(relative_error_by_rank(decomposition.s)[rank])
    else:
        record.weight_error = float(relative_error_by_rank(decomposition.s)[rank])
    record.params_after = record.macs_after = R.matrix_macs(k, n, rank)
    dtype = weight.values.dtype
    return MatrixFactors(first.astype(dtype), second.astype(dtype), record)


@dataclass(frozen=True)
class _Decomposition:
    """Singular values that rank the truncations, and the factors of a truncation."""

    s: np.ndarray
    factors: Callable[[int], tuple[np.ndarray, np.ndarray]]
    data_aware: bool


def _decompose(w: np.ndarray, gram: np.ndarray | None, input_axis: int, cross: np.ndarray | None) -> _Decomposition:
    if gram is None:
        u, s, vt = svd(w)
        return _Decomposition(s, lambda rank: split_factors(u, s, vt, rank), False)
    # y = w x is x^T w^T = y^T: whiten w^T, and transpose the factors back
    applied = w if input_axis == 0 else w.T
    if cross is not None:
        applied = corrected_weight(applied, gram, cross)
    white = whitened_svd(applied, gram)
    if input_axis == 0:
        return _Decomposition(white.s, white.factors, True)

    def factors(rank: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = white.factors(rank)
        return b.T, a.T

    return _Decomposition(white.s, factors, True)


def record_measurement(record: LayerRecord, measured: MeasuredDecision) -> None:
    record.latency_dense_ms = round(measured.latency_dense_ms, 4)
    record.latency_factorized_ms = round(measured.latency_factorized_ms, 4)
    record.decision = measured.decision
    if measured.ranks is None:
        record.status, record.reason = "skipped", measured.decision


def shared_constants(context: PassContext, weight: gs.Constant, key: tuple, arrays: dict[str, np.ndarray]
                     ) -> dict[str, gs.Constant]:
    """Constants for a weight's factors, created once per (weight, layout) even if several nodes
    share the weight, so memory is not duplicated."""
    cache_key = (weight.name, *key)
    if cache_key not in context.factors:
        context.factors[cache_key] = tuple(
            factor_constant(context, f"{weight.name}_lowrank_{suffix}", values, values.dtype)
            for suffix, values in arrays.items())
    return dict(zip(arrays, context.factors[cache_key]))
