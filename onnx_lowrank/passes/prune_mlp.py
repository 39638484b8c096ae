"""MLP block -> the same block on k of its neurons, the second matrix refit (numerics.nystrom):

    y = act(x W1 + b1) W2 + b2  ->  y = act(x W1[:, S] + b1[S]) W2' + b2'

The same nodes, two smaller dense MatMuls: the time saved is the MACs saved, k (d_in + d_out) of
d (d_in + d_out) per row, with no extra layer. Needs the Gram (and column sums) of the activation
on the calibration samples: the Gram the calibration already collects for the second MatMul.

k is the global allocation's (LayerPlan.ranks under the block's name, mlp_blocks.block_name), or
else the rank rule's on the block's error curve. A block this pass keeps whole, or shrinks, is
left dense by the decompose passes after it (its weights' first choice is recorded dense); a block
the allocation gave the per-layer SVD form (its layers in LayerPlan.ranks, not its own name) is
left to them.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from ..numerics.nystrom import neurons_for_rule, refit, select_neurons
from ..rank_allocation import NeuronSpectrum
from ._weights import record_choice
from .base import LayerRecord, PassContext, PassResult, factor_constant, layer_name, output_positions, walk_graphs
from .mlp_blocks import MLPBlock, match_block

NAME = "prune_mlp"


def prune_mlp(graph: gs.Graph, context: PassContext) -> PassResult:
    records = []
    for g in walk_graphs(graph):
        for node in list(g.nodes):
            block = match_block(node, g, context.options)
            if block is not None:
                records.extend(_prune(g, block, context))
    return PassResult(records)


def _records(block: MLPBlock, context: PassContext) -> list[LayerRecord]:
    records = []
    for node, weight in ((block.first, block.w1), (block.second, block.w2)):
        size = math.prod(weight.shape)
        records.append(LayerRecord(name=layer_name(node), op="MatMul", pass_name=NAME, weight_shape=list(weight.shape),
                                   status="skipped", params_before=size, macs_before=size,
                                   positions=output_positions(context, node, -1)))
    return records


def _prune(graph: gs.Graph, block: MLPBlock, context: PassContext) -> list[LayerRecord]:
    records = _records(block, context)
    first, second = records

    def skip(reason: str) -> list[LayerRecord]:
        for record in records:
            record.reason = reason
        return records

    if block.refusal:
        return skip(block.refusal)
    plan, name = context.layers, block.name
    if name not in plan.ranks and (first.name in plan.ranks or second.name in plan.ranks):
        return skip("the global allocation gave this block's layers the per-layer SVD form")
    gram, sums = plan.grams.get(second.name), plan.sums.get(second.name)
    if gram is None or sums is None:
        return skip("no calibration Gram of the activation: the refit of W2 needs --calibration")
    context.on_layer(name)
    d, d_in, d_out = block.neurons, block.w1.shape[0], block.w2.shape[1]
    bias2 = _bias_values(block.second_bias)
    intercept = block.second_bias is not None   # without a bias Add the refit has no constant to write
    cache = context.cache if context.cache is not None else {}
    key = ("nystrom", name, context.options.mlp_selection)
    if key not in cache:
        cache[key] = select_neurons(gram, sums[0] if intercept else None, sums[1], block.w2.values, bias2,
                                    method=context.options.mlp_selection)
    selection = cache[key]
    max_k = int((1 - context.options.min_flop_reduction) * d)
    if context.state.survey is not None:
        context.state.survey[name] = NeuronSpectrum(name, (first.name, second.name), d, d_in, d_out,
                                                    selection.errors, max_k, float(second.positions or 1))
        return skip("surveyed only")
    if name in plan.ranks:
        k = plan.ranks[name]
        if k is None:
            _keep_dense(context, block, name)
            return skip("kept dense by the global rank allocation")
    else:
        rule = context.options.rank_rule
        k = neurons_for_rule(selection.errors, rule, context.options.rounding_multiple)
        if k > max_k:
            return skip(f"{k} of {d} neurons for {rule.describe()} (error {selection.errors[k]:.3g}) > {max_k}, "
                        f"the most that saves {context.options.min_flop_reduction:.0%} of the MACs")
    fit = refit(gram, sums[0] if intercept else None, sums[1], block.w2.values, bias2, selection.kept(k))
    _rewrite(context, block, fit)
    _keep_dense(context, block, name)
    for record, kept in ((first, d_in * k), (second, k * d_out)):
        record.status, record.method, record.rank = "decomposed", "nystrom", [k]
        record.params_after = record.macs_after = kept
        record.activation_error = fit.error
        record.reason = (f"MLP block: {k} of {d} neurons kept ({block.activation}; {selection.method} selection), "
                         f"W2 and its bias refit by least squares: block output error {fit.error:.3g}")
    return records


def _bias_values(add: gs.Node | None) -> np.ndarray | None:
    if add is None:
        return None
    constant = next(t for t in add.inputs if isinstance(t, gs.Constant))
    return np.asarray(constant.values, np.float64).reshape(-1)


def _keep_dense(context: PassContext, block: MLPBlock, name: str) -> None:
    """The decompose passes after this one leave the block's MatMuls as they are."""
    for node in (block.first, block.second):
        weight = node.inputs[1]
        record_choice(context, weight, name, None, "nystrom")


def _rewrite(context: PassContext, block: MLPBlock, fit) -> None:
    """Slice W1 and b1 to the kept neurons, write the refit W2' and b2'; the activation's
    nodes stay, reading fewer columns."""
    dtype = np.dtype(block.w1.values.dtype)
    kept = fit.kept
    block.first.inputs[1] = factor_constant(context, f"{block.w1.name}_pruned", block.w1.values[:, kept], dtype)
    if block.first_bias is not None:
        _replace_constant(context, block.first_bias, lambda b: b[..., kept], dtype)
    block.second.inputs[1] = factor_constant(context, f"{block.w2.name}_pruned", fit.w2, dtype)
    if block.second_bias is not None:
        _replace_constant(context, block.second_bias, lambda b: fit.bias.reshape(b.shape), dtype)
    # the intermediate tensors are narrower now: their recorded shapes no longer hold
    for tensor in [block.first.outputs[0], *(t for n in (block.first_bias, *block.nodes) if n is not None
                                             for t in n.outputs)]:
        if isinstance(tensor, gs.Variable):
            tensor.shape = None


def _replace_constant(context: PassContext, add: gs.Node, values, dtype: np.dtype) -> None:
    index = next(i for i, t in enumerate(add.inputs) if isinstance(t, gs.Constant))
    old = add.inputs[index]
    add.inputs[index] = factor_constant(context, f"{old.name}_pruned", values(np.asarray(old.values)), dtype)
