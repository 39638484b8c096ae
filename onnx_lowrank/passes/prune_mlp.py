"""MLP block -> the same block on k of its neurons, the second matrix refit (numerics.nystrom):

    y = act(x W1 + b1) W2 + b2  ->  y = act(x W1[:, S] + b1[S]) W2' + b2'

The same nodes, two smaller dense MatMuls: the time saved is the MACs saved, k (d_in + d_out) of
d (d_in + d_out) per row, with no extra layer. Needs the Gram (and column sums) of the activation
on the calibration samples: the Gram the calibration already collects for the second MatMul.
A conv block (Conv -> per-channel ops -> 1x1 Conv) is channel pruning with reconstruction, as
AIMET does it: the first conv keeps k output channels, every BatchNormalization, per-channel
constant and depthwise conv between keeps the same k, and the 1x1 conv is refit on its input
channels' Gram (its pixels are the rows).

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
from .mlp_blocks import MLPBlock, match_block, reshaped_constant

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
        records.append(LayerRecord(name=layer_name(node), op=node.op, pass_name=NAME, weight_shape=list(weight.shape),
                                   status="skipped", params_before=size, macs_before=size,
                                   positions=output_positions(context, node, 1 if block.conv else -1)))
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
    d, d_out = block.neurons, block.d_out
    bias2 = _second_bias(block)
    # without a bias Add the refit has no constant to write; a conv's bias is an input it may add
    intercept = block.second_bias is not None or block.conv
    w2 = block.w2_matrix()
    cache = context.cache if context.cache is not None else {}
    key = ("nystrom", name, context.options.mlp_selection)
    if key not in cache:
        cache[key] = select_neurons(gram, sums[0] if intercept else None, sums[1], w2, bias2,
                                    method=context.options.mlp_selection)
    selection = cache[key]
    max_k = int((1 - context.options.min_flop_reduction) * d)
    if context.state.survey is not None:
        context.state.survey[name] = NeuronSpectrum(name, (first.name, second.name), d, block.macs_in, d_out,
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
    fit = refit(gram, sums[0] if intercept else None, sums[1], w2, bias2, selection.kept(k))
    _rewrite(context, block, fit)
    _keep_dense(context, block, name)
    for record, kept in ((first, first.params_before // d * k), (second, k * d_out)):
        record.status, record.method, record.rank = "decomposed", "nystrom", [k]
        record.params_after = record.macs_after = kept
        record.activation_error = fit.error
        unit = "channels" if block.conv else "neurons"
        record.reason = (f"{'conv' if block.conv else 'MLP'} block: {k} of {d} {unit} kept ({block.activation}; "
                         f"{selection.method} selection), W2 and its bias refit by least squares: block output "
                         f"error {fit.error:.3g}")
    return records


def _second_bias(block: MLPBlock) -> np.ndarray | None:
    if block.conv:
        bias = block.second.inputs[2] if len(block.second.inputs) > 2 else None
        return None if bias is None else np.asarray(bias.values, np.float64).reshape(-1)
    return _bias_values(block.second_bias)


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
    """Slice W1, b1 and every per-neuron constant between to the kept neurons, write the refit W2'
    and b2'; the nodes between stay, reading fewer neurons."""
    dtype = np.dtype(block.w1.values.dtype)
    kept = fit.kept
    w1 = block.w1.values[kept] if block.conv else block.w1.values[:, kept]
    block.first.inputs[1] = factor_constant(context, f"{block.w1.name}_pruned", w1, dtype)
    if block.first_bias is not None:
        _replace_constant(context, block.first_bias, lambda b: b[..., kept], dtype)
    for piece in block.slices:
        old = piece.node.inputs[piece.index]
        source = np.asarray(old.values) if isinstance(old, gs.Constant) else reshaped_constant(old)
        piece.node.inputs[piece.index] = factor_constant(context, f"{old.name}_pruned",
                                                         np.take(source, kept, axis=piece.axis), source.dtype)
    for node in block.depthwise:
        node.attrs["group"] = int(len(kept))
    if block.conv:
        w2 = fit.w2.T.reshape(block.d_out, len(kept), *block.w2.shape[2:])
        block.second.inputs[1] = factor_constant(context, f"{block.w2.name}_pruned", w2, dtype)
        bias = factor_constant(context, f"{layer_name(block.second)}_bias_refit", fit.bias.reshape(-1), dtype)
        if len(block.second.inputs) > 2:
            block.second.inputs[2] = bias
        else:
            block.second.inputs.append(bias)
    else:
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
