"""The shared core of the matrix passes (MatMul, Gemm, 1x1 Conv): SVD, rank decision, record."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..forms import LayerGeometry
from ..numerics import ranks as R
from ..numerics.svd import gram_energies, relative_error_by_rank, single_threaded_blas, split_factors, svd
from ..numerics.tucker import relative_error
from ..numerics.whitening import corrected_weight, whitened_svd
from ..rank_allocation import LayerSpectrum
from ..rank_choice import MeasuredDecision, RankDecision, choose_matrix_rank, measure_matrix_rank, screen_matrix_rank
from ._weights import prior_choice, read_values, record_choice, storage_dtype, weight_key, weight_source
from .base import LayerRecord, PassContext, factor_constant, layer_name, new_name


@dataclass
class MatrixFactors:
    """w [k, n] ~= first [k, r] @ second [r, n], in the weight's dtype."""

    first: np.ndarray
    second: np.ndarray
    record: LayerRecord


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def screen_weights(context: PassContext, candidates: Iterable) -> None:
    """The Gram eigenvalues that the rank rule's screen (rank_choice.screen_matrix_rank) reads, for
    every candidate layer it will screen, computed together on all cores: the layers are
    independent, and each one's eigensolver runs on one BLAS thread (single_threaded_blas), so a
    pass that screened them one by one would leave the other cores idle. The values are the ones
    the screen would compute itself (singular values do not change under a transpose or a 1x1
    conv's reshape), so every decision is the same."""
    if context.options.rank_rule.kind in ("rank", "ratio") or context.state.survey is not None:
        return
    layers = context.layers
    todo = {}
    for candidate in candidates:
        name, weight = layer_name(candidate.node), candidate.weight
        if (candidate.refusal is None and weight.name not in context.state.energies and name not in layers.dense
                and name not in layers.grams and name not in layers.ranks and prior_choice(context, weight) is None):
            todo[weight.name] = weight
    workers = min(len(todo), _cores())
    if workers < 2:
        return   # the screen computes them itself, as it goes

    def energies(weight: gs.Constant):
        w = read_values(weight)
        return gram_energies(w.reshape(w.shape[0], -1))

    with single_threaded_blas(), ThreadPoolExecutor(workers) as pool:
        context.state.energies.update(zip(todo, pool.map(energies, todo.values())))


def decompose_ahead(context: PassContext, layers: Iterable[tuple[str, gs.Constant, bool, int]]) -> None:
    """The whitened SVDs of every layer with a calibration Gram that the pass will ask for, computed
    together on all cores into context.cache, as screen_weights does for the screens: (layer name,
    weight, whether the layer applies it transposed, input_axis) per layer. Each runs on one BLAS
    thread on the same arrays the pass would hand _decompose, so the results are the same."""
    cache, grams = context.cache, context.layers.grams
    if cache is None or not grams:
        return
    todo = {name: job for name, *job in layers   # a prior choice (prune_mlp's, a shared weight's) needs none
            if name in grams and name not in cache and name not in context.layers.dense
            and prior_choice(context, job[0]) is None}
    workers = min(len(todo), _cores())
    if workers < 2:
        return

    def decompose(name: str, weight: gs.Constant, transposed: bool, input_axis: int) -> _Decomposition:
        read = _reader(weight, transposed, tuple(weight.shape))
        return _decompose(read(), grams[name], input_axis, context.layers.cross_grams.get(name), read,
                          context.options.min_flop_reduction)

    with single_threaded_blas(), ThreadPoolExecutor(workers) as pool:
        cache.update(zip(todo, pool.map(lambda item: decompose(item[0], *item[1]), todo.items())))


def factorize_matrix(context: PassContext, weight: gs.Constant, w: np.ndarray, record: LayerRecord,
                     input_axis: int = 0, geometry: LayerGeometry | None = None,
                     transposed: bool = False) -> MatrixFactors | None:
    """SVD of w [k, n] (the weight as the layer applies it), the rank decision, and the record.

    input_axis is the axis of w that the layer's input activations contract (0 for y = x w, 1 for
    y = w x). With a calibration Gram for the layer, the SVD is whitened and every error, the rank
    rule's included, is the error on the layer's output over the calibration inputs.

    `transposed`: w is the stored weight transposed (a Gemm's transB), else the stored weight
    reshaped (a 1x1 conv's [O, I, 1, 1]).

    With context.latency and the layer's geometry, the rule's rank is then searched on measured
    latency (rank_choice.search_ranks), and a layer that is not measurably faster stays dense.

    Returns None, with record marked skipped and its reason set, when the layer stays dense.
    """
    k, n = w.shape
    name = record.name
    if name in context.layers.dense:
        record.status, record.reason = "skipped", context.layers.dense[name]
        return None
    prior = prior_choice(context, weight)
    if prior is not None and prior.ranks is None:
        record.status = "skipped"
        record.reason = (f"a layer of MLP block {prior.layer}, which prune_mlp keeps dense" if prior.method == "nystrom"
                         else f"reads the weight of {prior.layer}, which stays dense")
        return None
    factors = _factorize(context, weight, w, record, input_axis, geometry, prior, transposed)
    if context.state.survey is None and prior is None:
        record_choice(context, weight, name, tuple(record.rank) if factors is not None else None)
    return factors


def _factorize(context: PassContext, weight: gs.Constant, w: np.ndarray, record: LayerRecord, input_axis: int,
               geometry: LayerGeometry | None, prior, transposed: bool) -> MatrixFactors | None:
    k, n = w.shape
    name = record.name
    cache = context.cache if context.cache is not None else {}
    if (name not in cache and name not in context.layers.grams and context.state.survey is None and prior is None
            and name not in context.layers.ranks):
        # most layers of a trained model are refused: decide that without their SVDs
        refusal = screen_matrix_rank(w, context.options, context.state.energies.get(weight.name))
        if refusal is not None:
            _record_decision(record, refusal, k, n)
            record.status, record.reason = "skipped", refusal.reason
            return None
    if name not in cache:
        cache[name] = _decompose(w, context.layers.grams.get(name), input_axis, context.layers.cross_grams.get(name),
                                 _reader(weight, transposed, w.shape), context.options.min_flop_reduction)
    decomposition = cache[name]
    decision = choose_matrix_rank(decomposition.s, k, n, context.options)
    _record_decision(record, decision, k, n)
    if context.state.survey is not None:
        context.state.survey[name] = LayerSpectrum(name, k, n, relative_error_by_rank(decomposition.s), decision.max_rank,
                                             float(record.positions or 1))
        record.status, record.reason = "skipped", "surveyed only"
        return None
    if prior is not None:
        (rank,) = prior.ranks     # one factorization per weight: the first reader's rank
        record.reason = f"shares the factors of {prior.layer}"
    elif name in context.layers.ranks:
        rank = context.layers.ranks[name]
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
    dtype = weight.dtype
    return MatrixFactors(first.astype(dtype), second.astype(dtype), record)


def _record_decision(record: LayerRecord, decision: RankDecision, k: int, n: int) -> None:
    record.break_even_rank = round(decision.break_even_rank, 2)
    record.max_rank = decision.max_rank
    record.params_before = record.macs_before = R.matrix_macs(k, n)


@dataclass(frozen=True)
class _Decomposition:
    """Singular values that rank the truncations, and the factors of a truncation."""

    s: np.ndarray
    factors: Callable[[int], tuple[np.ndarray, np.ndarray]]
    data_aware: bool


def _reader(weight: gs.Constant, transposed: bool, shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
    """The weight as the layer applies it, read again from the graph when a truncation is asked for:
    a cache entry that held the array would hold a copy of every calibrated weight through the
    allocation (2.3 GB on a 0.5B decoder)."""
    def read() -> np.ndarray:
        values = read_values(weight)
        return values.T if transposed else values.reshape(shape)
    return read


def _decompose(w: np.ndarray, gram: np.ndarray | None, input_axis: int, cross: np.ndarray | None,
               read: Callable[[], np.ndarray], min_flop_reduction: float) -> _Decomposition:
    """The spectrum and the truncations of w, the vectors kept up to the largest rank that pays
    (every rank a rule, an allocation or a back-off can give is at most that)."""
    top = R.matrix_max_rank(*w.shape, min_flop_reduction)
    if gram is None:
        u, s, vt = svd(w)
        u, vt = np.ascontiguousarray(u[:, :top]), np.ascontiguousarray(vt[:top])
        return _Decomposition(s, lambda rank: split_factors(u, s, vt, rank), False)
    # y = w x is x^T w^T = y^T: whiten w^T, and transpose the factors back
    applied = w if input_axis == 0 else w.T
    if cross is not None:
        applied = corrected_weight(applied, gram, cross)
        white = whitened_svd(applied, gram)      # the corrected weight exists only here: kept
    else:
        white = whitened_svd(applied, gram, weight=read if input_axis == 0 else lambda: read().T)
    white = white.truncated(top)
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


def shared_constants(graph: gs.Graph, context: PassContext, weight: gs.Constant, key: tuple,
                     arrays: dict[str, np.ndarray], record: LayerRecord) -> dict[str, gs.Tensor]:
    """The tensors a layer reads its factors from, made once per weight and layout however many
    nodes (or aliases) read the weight, so memory is not duplicated. A weight stored in float16
    behind a Cast gets its factors stored in float16 behind Casts too: fp32 factors would double
    its bytes."""
    cache_key = (weight_key(context, weight.name), *key)
    record.weight, record.weight_bytes = weight_source(context, weight)
    record.factor_bytes = 0
    if cache_key not in context.state.factors:
        stored = storage_dtype(context, weight.name)
        record.factor_bytes = sum(int(v.size) * np.dtype(stored or v.dtype).itemsize for v in arrays.values())
        tensors = []
        for suffix, values in arrays.items():
            base = f"{weight.name}_lowrank_{suffix}"
            if stored is None or stored == values.dtype:
                tensors.append(factor_constant(context, base, values, values.dtype))
                continue
            cast = gs.Variable(new_name(context, f"{base}_cast"), dtype=values.dtype, shape=list(values.shape))
            graph.nodes.append(gs.Node("Cast", new_name(context, f"{base}_cast"),
                                       {"to": onnx.helper.np_dtype_to_tensor_dtype(values.dtype)},
                                       inputs=[factor_constant(context, base, values, stored)], outputs=[cast]))
            tensors.append(cast)
        context.state.factors[cache_key] = tuple(tensors)
    return dict(zip(arrays, context.state.factors[cache_key]))
