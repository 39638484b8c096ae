"""The shared core of the matrix passes (MatMul, Gemm, 1x1 Conv): SVD, rank decision, record."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..numerics import ranks as R
from ..numerics.svd import relative_error_by_rank, split_factors, svd
from ..rank_choice import choose_matrix_rank
from .base import LayerRecord, PassContext, factor_constant


@dataclass
class MatrixFactors:
    """w [k, n] ~= first [k, r] @ second [r, n], in the weight's dtype."""

    first: np.ndarray
    second: np.ndarray
    record: LayerRecord


def factorize_matrix(context: PassContext, weight: gs.Constant, w: np.ndarray, record: LayerRecord
                     ) -> MatrixFactors | None:
    """SVD of w [k, n] (the weight as the layer applies it), the rank decision, and the record.

    Returns None, with record marked skipped and its reason set, when the layer stays dense.
    """
    k, n = w.shape
    u, s, vt = svd(w)
    decision = choose_matrix_rank(s, k, n, context.options)
    record.break_even_rank = round(decision.break_even_rank, 2)
    record.max_rank = decision.max_rank
    record.params_before = record.macs_before = R.matrix_macs(k, n)
    if decision.ranks is None:
        record.status, record.reason = "skipped", decision.reason
        return None
    (rank,) = decision.ranks
    first, second = split_factors(u, s, vt, rank)
    record.status, record.method, record.rank = "decomposed", "svd", [rank]
    record.weight_error = float(relative_error_by_rank(s)[rank])
    record.params_after = record.macs_after = R.matrix_macs(k, n, rank)
    dtype = weight.values.dtype
    return MatrixFactors(first.astype(dtype), second.astype(dtype), record)


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
