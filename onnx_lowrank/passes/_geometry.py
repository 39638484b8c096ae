"""A layer's geometry for latency measurement: its input shape at the report's shapes, its weight
as applied, its conv attributes. None when the input shape is unknown: that layer is judged by the
FLOP model alone."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..forms import LayerGeometry
from ..numerics.conv_attrs import conv_attrs
from .base import PassContext


def input_shape(context: PassContext, tensor: gs.Tensor) -> tuple[int, ...] | None:
    shape = context.output_shapes.get(tensor.name)
    if shape is None and tensor.shape is not None:
        shape = tensor.shape
    if not shape or any(not isinstance(d, int) or d <= 0 for d in shape):
        return None
    return tuple(shape)


def matmul_geometry(context: PassContext, x: gs.Tensor, k: int, n: int, weight_first: bool = False,
                    transposed_input: bool = False) -> LayerGeometry | None:
    """y = x W (W [k, n]), or y = W x (W [k, n] = [M, K]) when weight_first. A Gemm's transposed
    A is measured as the plain product: the same kernel shape up to a transpose."""
    shape = input_shape(context, x)
    if shape is None:
        return None
    if transposed_input:
        shape = shape[::-1]
    # the weight fixes the contracted dim; a dynamic one filled in by a guess may disagree
    if weight_first and len(shape) >= 2:
        shape = (*shape[:-2], n, shape[-1])
    elif not weight_first:
        shape = (*shape[:-1], k)
    return LayerGeometry("matmul", shape, (k, n), weight_first=weight_first)


def conv_geometry(context: PassContext, node: gs.Node, weight_shape: tuple[int, ...]) -> LayerGeometry | None:
    shape = input_shape(context, node.inputs[0])
    if shape is None:
        return None
    conv = conv_attrs(node.attrs, weight_shape[2:])
    return LayerGeometry("conv", shape, tuple(weight_shape), strides=conv.strides, pads=conv.pads,
                         dilations=conv.dilations, auto_pad=conv.auto_pad)
