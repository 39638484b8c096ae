"""What a layer is (LayerGeometry), how it is computed (Form), and the chain of convs each form of a
conv is written as: the one description that the decompose passes rewrite into and latency.py
times, so what is timed is what is written. Pure: no ONNX Runtime, no graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .numerics.conv_attrs import conv_attrs

METHODS = ("dense", "svd", "tucker2", "branched-tucker", "spatial-svd")


@dataclass(frozen=True)
class LayerGeometry:
    """What a layer's speed depends on. op "matmul" (MatMul and Gemm: y = x W, or y = W x when
    weight_first) or "conv"; weight_shape is [K, N] as applied to x for matmul (W [M, K] when
    weight_first), [O, I, *kernel] for conv."""

    op: str
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    weight_first: bool = False
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"

    @property
    def batch(self) -> int:
        return self.input_shape[0] if self.input_shape else 1


@dataclass(frozen=True)
class Form:
    """How the layer is computed: dense, or a factorized chain at ranks (svd/spatial-svd: (r,),
    tucker2/branched-tucker: (r_out, r_in)) with `branches` groups in the branched core."""

    method: str = "dense"
    ranks: tuple[int, ...] = ()
    branches: int = 1


DENSE = Form()

#: latency(geometry, form) -> milliseconds per run: what the rank search is handed to measure with
#: (PassContext.latency; onnx_lowrank.latency.LayerLatency times it in ONNX Runtime; None: FLOP model).
LatencyFn = Callable[[LayerGeometry, Form], float]


@dataclass(frozen=True)
class ChainConv:
    """One conv of a form's chain: the weight shape it takes and its attributes. `suffix` names it
    in the graph (`<layer>_lowrank_<suffix>`)."""

    suffix: str
    weight_shape: tuple[int, ...]
    attrs: dict


def conv_chain(weight_shape: tuple[int, ...], attrs: dict, form: Form) -> list[ChainConv]:
    """The convs a conv W [O, I, *k] with these attributes is computed by in this form, input first;
    the bias, if any, goes to the last.

        dense            the conv itself
        svd              (1x1) 1x1 I -> r (the strides and pads), 1x1 r -> O
        tucker2          1x1 I -> r_in, k x k r_in -> r_out (the conv's attributes), 1x1 r_out -> O
        branched-tucker  the same, the core a grouped conv of `branches` groups
        spatial-svd      kh x 1 I -> r (row stride, dilation, pads), 1 x kw r -> O (the columns')

    Padding a 1x1 conv pads with zeros that a bias-free 1x1 keeps at zero, so moving the pads to the
    first factor and the bias to the last is exact."""
    out_ch, in_ch, *kernel = weight_shape
    ones = (1,) * len(kernel)
    if form.method == "dense":
        chain = [ChainConv("", tuple(weight_shape), dict(attrs))]
    elif form.method == "svd":
        (r,) = form.ranks
        first = {k: v for k, v in attrs.items() if k not in ("group", "dilations")}
        chain = [ChainConv("b", (r, in_ch, *ones), first), ChainConv("a", (out_ch, r, *ones), {})]
    elif form.method in ("tucker2", "branched-tucker"):
        r_out, r_in = form.ranks
        core = {k: v for k, v in attrs.items() if k != "group"}
        groups = form.branches if form.method == "branched-tucker" else 1
        if form.method == "branched-tucker":
            core["group"] = groups
        chain = [ChainConv("in", (r_in, in_ch, *ones), {}), ChainConv("core", (r_out, r_in // groups, *kernel), core),
                 ChainConv("out", (out_ch, r_out, *ones), {})]
    elif form.method == "spatial-svd":
        (r,) = form.ranks
        kh, kw = kernel
        first, second = _spatial_attrs(attrs, (kh, kw))
        chain = [ChainConv("v", (r, in_ch, kh, 1), first), ChainConv("h", (out_ch, r, 1, kw), second)]
    else:
        raise ValueError(f"unknown method {form.method!r}")
    for conv in chain:      # a kernel_shape the conv states is its own weight's
        if "kernel_shape" in conv.attrs:
            conv.attrs["kernel_shape"] = list(conv.weight_shape[2:])
    return chain


def _spatial_attrs(attrs: dict, kernel: tuple[int, int]) -> tuple[dict, dict]:
    """The vertical conv takes the row stride, dilation and pads; the horizontal one the columns'.
    Exact: the horizontal conv's padded columns are zero columns of the vertical conv's output,
    which has no bias, just as the dense conv's are zero columns of the input."""
    conv = conv_attrs(attrs, kernel)
    (sh, sw), (dh, dw) = conv.strides, conv.dilations
    first = {"kernel_shape": [], "strides": [sh, 1], "dilations": [dh, 1]}
    second = {"kernel_shape": [], "strides": [1, sw], "dilations": [1, dw]}
    if conv.same_padded:
        first["auto_pad"] = second["auto_pad"] = conv.auto_pad   # SAME_* pads each axis from its own kernel
    else:
        top, left, bottom, right = conv.pads
        first["pads"], second["pads"] = [top, 0, bottom, 0], [0, left, 0, right]
    return first, second
