"""The rows a 2-D conv multiplies: its input unfolded into kernel windows (im2col), in numpy.

A conv y[o, p] = sum_{i, q} W[o, i, q] x[i, p + q] is a matrix product of these patch rows
[positions, I kh kw] with W.reshape(O, I kh kw).T, so a conv's output error over calibration
inputs is a matrix layer's, on the Gram of the patch rows: what error correction fits a conv on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .conv_attrs import conv_attrs


@dataclass(frozen=True)
class ConvWindow:
    """A 2-D conv's kernel placement: (rows, cols) of each, pads as (top, left, bottom, right)."""

    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)

    @classmethod
    def from_attrs(cls, kernel: tuple[int, ...], attrs: dict) -> "ConvWindow | None":
        """None where the window is not plain: 1-D / 3-D kernels, groups, SAME_* auto-padding."""
        conv = conv_attrs(attrs, kernel)
        if len(kernel) != 2 or conv.group != 1 or conv.same_padded:
            return None
        return cls(conv.kernel, conv.strides, conv.pads, conv.dilations)


def conv_patches(x: np.ndarray, window: ConvWindow) -> np.ndarray:
    """x [N, C, H, W] -> rows [N * oh * ow, C * kh * kw], ordered as W.reshape(O, -1) is."""
    (kh, kw), (sh, sw), (top, left, bottom, right), (dh, dw) = (window.kernel, window.strides, window.pads,
                                                                 window.dilations)
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, c, h, w = padded.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    taps = [padded[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
            for i in range(kh) for j in range(kw)]
    stacked = np.stack(taps, axis=2)                       # [N, C, kh kw, oh, ow]
    return stacked.transpose(0, 3, 4, 1, 2).reshape(n * oh * ow, c * kh * kw)
