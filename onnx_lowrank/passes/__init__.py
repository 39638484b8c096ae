"""Graph passes and the pipeline that orders them. Each pass is `pass(graph, context) -> PassResult`.

One module per pass, named for it: `passes.fold_batchnorm` is the module, its pass the function
`fold_batchnorm.fold_batchnorm`. The registry is keyed by name, so choosing or skipping passes
(`--skip NAME`) is a lookup, not a code change. Stages run in the order of the data flow:
normalize -> decompose -> merge -> (clean up, check).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx_graphsurgeon as gs

from ..options import Options
from . import (decompose_conv, decompose_gemm, decompose_matmul, fold_batchnorm, fold_constant_weights,
               fuse_horizontal, fuse_parallel, merge_factors, merge_linear, prune_mlp, restore_folded_weights)
from .base import PassContext, PassResult

Pass = Callable[[gs.Graph, PassContext], PassResult]
STAGES = ("normalize", "decompose", "merge")


@dataclass(frozen=True)
class PassEntry:
    name: str
    run: Pass
    stage: str
    enabled: Callable[[Options], bool] = lambda options: True


PIPELINE: list[PassEntry] = [
    PassEntry(fold_constant_weights.NAME, fold_constant_weights.fold_constant_weights, "normalize"),
    # exact rewrites that hand the decompose passes the weights actually applied; --skip NAME turns one off
    PassEntry(fold_batchnorm.NAME, fold_batchnorm.fold_batchnorm, "normalize"),
    PassEntry(fuse_parallel.NAME, fuse_parallel.fuse_parallel, "normalize"),
    PassEntry(merge_linear.NAME, merge_linear.merge_linear, "normalize"),
    # before the per-layer passes: a block it shrinks or keeps whole is left dense by them
    PassEntry(prune_mlp.NAME, prune_mlp.prune_mlp, "decompose", lambda o: o.mlp_form != "svd" and ("matmul" in o.ops or "conv" in o.ops)),
    PassEntry(decompose_matmul.NAME, decompose_matmul.decompose_matmul, "decompose", lambda o: "matmul" in o.ops),
    PassEntry(decompose_gemm.NAME, decompose_gemm.decompose_gemm, "decompose", lambda o: "gemm" in o.ops),
    PassEntry(decompose_conv.NAME, decompose_conv.decompose_conv, "decompose", lambda o: "conv" in o.ops),
    PassEntry(merge_factors.NAME, merge_factors.merge_factors, "merge"),
    PassEntry(fuse_horizontal.NAME, fuse_horizontal.fuse_horizontal, "merge", lambda o: o.fuse_horizontal),
    PassEntry(restore_folded_weights.NAME, restore_folded_weights.restore_folded_weights, "merge"),
]


def pipeline(options: Options) -> list[PassEntry]:
    """The passes to run for these options, in stage order."""
    order = {stage: i for i, stage in enumerate(STAGES)}
    entries = sorted(PIPELINE, key=lambda e: order[e.stage])   # stable: registry order within a stage
    return [e for e in entries if e.enabled(options) and e.name not in options.skip]


__all__ = ["PIPELINE", "PassEntry", "Pass", "PassContext", "PassResult", "pipeline"]
