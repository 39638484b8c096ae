"""Linear layers as affine maps on their channel axis, in float64: the algebra that fold_batchnorm,
merge_linear and fuse_parallel share (passes/_linear.py reads and writes the graph around it).

    matrix: y = x M + b        M [I, O], channels on the last axis  (MatMul x W; Gemm with transA=0)
    conv:   y = W * x + b      W [O, I/group, *k], channels on axis 1  (Conv; grouped convs fold
                               and add, but only group 1 chains)

Composing or adding two such maps gives one map, exactly up to float rounding, except in the cases
the functions name as their reason (a bias in front of a padded conv, kernels that do not cover
the same windows).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from .conv_attrs import ConvAttrs, conv_attrs

MATRIX, CONV = "matrix", "conv"
#: attributes that place a conv's kernel on its input; two convs add only where they agree
GEOMETRY = ("strides", "pads", "dilations", "auto_pad", "group")


@dataclass
class Affine:
    kind: str                        # MATRIX or CONV
    weight: np.ndarray               # float64: [I, O] (matrix) or [O, I, *k] (conv)
    bias: np.ndarray | None          # float64 [O]; None where the map has no constant term
    geometry: dict = field(default_factory=dict)   # conv only: GEOMETRY attributes as written

    @property
    def in_channels(self) -> int:
        return self.weight.shape[0 if self.kind == MATRIX else 1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1 if self.kind == MATRIX else 0]

    @property
    def stride(self) -> int:
        return conv_attrs(self.geometry).stride

    @property
    def pointwise(self) -> bool:
        """A conv that is a plain matrix on the channels: 1x1, stride 1, no padding, group 1."""
        return (self.kind == CONV and all(d == 1 for d in self.weight.shape[2:]) and self.stride == 1
                and not padded(self.geometry) and conv_group(self.geometry) == 1)

    def then_channelwise(self, scale: np.ndarray, shift: np.ndarray) -> Affine:
        """(y) * scale + shift on the output channels."""
        shape = (1, -1) if self.kind == MATRIX else (-1,) + (1,) * (self.weight.ndim - 1)
        bias = None if self.bias is None else self.bias * scale
        if np.any(shift):
            bias = shift if bias is None else bias + shift
        weight = self.weight if np.all(scale == 1) else self.weight * scale.reshape(shape)
        return replace(self, weight=weight, bias=bias)

    def after_channelwise(self, scale: np.ndarray, shift: np.ndarray) -> Affine | str:
        """This map applied to x * scale + shift (the channelwise op in front of it), or why not."""
        if self.kind == MATRIX:
            weight = self.weight * scale[:, None]
            moved = shift @ self.weight
        else:
            if conv_group(self.geometry) != 1:
                return "a grouped conv mixes only its group's input channels"
            if np.any(shift) and padded(self.geometry):
                return "a shift in front of a padded conv is not constant at the borders"
            weight = self.weight * scale.reshape((1, -1) + (1,) * (self.weight.ndim - 2))
            moved = _apply_to_constant(self.weight, shift)
        bias = self.bias
        if np.any(shift):
            bias = moved if bias is None else bias + moved
        return replace(self, weight=weight, bias=bias)


def compose(first: Affine, second: Affine) -> Affine | str:
    """second(first(x)) as one map, or the reason it is not one."""
    if first.kind != second.kind:
        return "a matrix and a conv do not chain"
    if conv_group(first.geometry) != 1 or conv_group(second.geometry) != 1:
        return "grouped convs do not chain into one"
    if first.out_channels != second.in_channels:
        return f"channels {first.out_channels} != {second.in_channels}"
    if first.kind == MATRIX:
        bias = _sum_bias(None if first.bias is None else first.bias @ second.weight, second.bias)
        return Affine(MATRIX, first.weight @ second.weight, bias)
    if second.pointwise:
        w2 = second.weight.reshape(second.weight.shape[:2])
        bias = _sum_bias(None if first.bias is None else w2 @ first.bias, second.bias)
        return Affine(CONV, np.einsum("oc,ci...->oi...", w2, first.weight), bias, first.geometry)
    if first.pointwise:
        if first.bias is not None and np.any(first.bias) and padded(second.geometry):
            return "the first conv's bias meets the second's zero padding: not constant at the borders"
        w1 = first.weight.reshape(first.weight.shape[:2])
        moved = None if first.bias is None else _apply_to_constant(second.weight, first.bias)
        return Affine(CONV, np.einsum("oc...,ci->oi...", second.weight, w1), _sum_bias(moved, second.bias),
                      second.geometry)
    return "neither conv is a 1x1 without stride or padding"


def add(a: Affine, b: Affine) -> Affine | str:
    """a(x) + b(x) as one map, or the reason it is not one."""
    if a.kind == CONV and a.weight.shape[:2] == b.weight.shape[:2] and a.weight.shape != b.weight.shape:
        small, big = sorted((a, b), key=lambda m: m.weight.size)
        embedded = _embed_kernel(small, big)
        if embedded is None:
            return "the convs' kernels do not cover the same windows"
        a, b = embedded, big
    if a.kind != b.kind or a.weight.shape != b.weight.shape:
        return f"weights {list(a.weight.shape)} and {list(b.weight.shape)} differ in shape"
    if a.kind == CONV and _placement(a) != _placement(b):
        return "the convs differ in strides, pads or dilations"
    return replace(a, weight=a.weight + b.weight, bias=_sum_bias(a.bias, b.bias))


def _embed_kernel(small: Affine, big: Affine) -> Affine | None:
    """small's kernel zero-padded to big's size (RepVGG's 1x1 inside a 3x3), where that reads the
    same input pixels: same strides and group, no dilation or auto_pad, and pads that differ by
    exactly the kernel offset on each side."""
    at_small, at_big = _placement(small), _placement(big)
    if any(a.dilated or a.same_padded for a in (at_small, at_big)):
        return None
    if at_small.strides != at_big.strides or at_small.group != at_big.group:
        return None
    spatial = big.weight.ndim - 2
    ps, pb = at_small.pads, at_big.pads
    index = [slice(None), slice(None)]
    for axis, (k_small, k_big) in enumerate(zip(small.weight.shape[2:], big.weight.shape[2:])):
        begin, end = pb[axis] - ps[axis], pb[axis + spatial] - ps[axis + spatial]
        if begin < 0 or end < 0 or begin + k_small + end != k_big:
            return None
        index.append(slice(begin, begin + k_small))
    weight = np.zeros_like(big.weight)
    weight[tuple(index)] = small.weight
    return replace(small, weight=weight, geometry=big.geometry)


def _apply_to_constant(weight: np.ndarray, per_channel: np.ndarray) -> np.ndarray:
    """A conv's output (less bias) on an input that is constant per channel and unpadded."""
    return np.tensordot(weight.sum(axis=tuple(range(2, weight.ndim))), per_channel, axes=1)


def _sum_bias(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None or b is None:
        return b if a is None else a
    return a + b


def _placement(conv: Affine) -> ConvAttrs:
    """A conv map's attributes as what they mean, so that pads=[0,0,0,0] equals no pads."""
    return conv_attrs(conv.geometry, conv.weight.shape[2:])


def conv_group(attrs: dict) -> int:
    return conv_attrs(attrs).group


def padded(attrs: dict) -> bool:
    return conv_attrs(attrs).padded


def representable(affine: Affine, dtype: np.dtype) -> bool:
    """The map survives being written back in the model's dtype: a folded scale of 1e3 on a float16
    weight of 100 would overflow to inf."""
    limit = np.finfo(dtype).max
    return all(a is None or bool(np.all(np.abs(a) <= limit)) for a in (affine.weight, affine.bias))

class Shaped(Protocol):
    """A linear layer's channels and kernel size (passes/_linear.Unit has them)."""

    in_channels: int
    out_channels: int
    kernel: int


def composed_macs(first: Shaped, second: Shaped) -> int:
    """MACs per output position of second(first(x)) as one layer (where compose allows it)."""
    return first.in_channels * second.out_channels * max(first.kernel, second.kernel)
