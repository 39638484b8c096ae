"""Merge a new factor into a neighbouring linear layer with nothing between them, where cheaper:
merge_linear's merge run again after decomposition (see passes/merge_linear.py)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import PassContext, PassResult
from .merge_linear import merge_all

NAME = "merge_factors"


def merge_factors(graph: gs.Graph, context: PassContext) -> PassResult:
    """The same merge after decomposition, where a factor meets a neighbouring layer with nothing
    between: Tucker's outer 1x1s and the 1x1 convs of a bottleneck (the paper's merge, where it is
    exact), or B_1 [r1, N] then A_2 [N, r2] of two decomposed layers in a row. A layer's own factors
    stay as the decomposition chose them, and refusals are not reported again.

    With --merge-across-activations, a factor also merges into its dense neighbour across one
    activation (the paper's bottleneck merge in a real ResNet, see merge_linear._merge_across): not exact."""
    origin = {id(c): key[0] for key, constants in context.state.factors.items() for c in constants}
    return merge_all(graph, context, NAME, report_refusals=False, origin=origin,
                     across=context.options.merge_across_activations)
