"""Graph passes, in pipeline order. Each is `pass(graph, context) -> PassResult`.

The registry is keyed by name, so choosing or skipping passes is a lookup, not a code change.
"""

from __future__ import annotations

from typing import Callable

import onnx_graphsurgeon as gs

from .base import PassContext, PassResult
from .decompose_conv import decompose_conv
from .decompose_gemm import decompose_gemm
from .decompose_matmul import decompose_matmul

Pass = Callable[[gs.Graph, PassContext], PassResult]

# option name in Options.ops -> the pass that rewrites that op
DECOMPOSE_PASSES: dict[str, tuple[str, Pass]] = {
    "matmul": ("decompose_matmul", decompose_matmul),
    "gemm": ("decompose_gemm", decompose_gemm),
    "conv": ("decompose_conv", decompose_conv),
}

__all__ = ["DECOMPOSE_PASSES", "Pass", "PassContext", "PassResult"]
