"""A Conv node's attributes read once, as the ONNX spec defines them, into what they mean: where its
kernel sits on its input (strides, pads, dilations, auto_pad), its group and its kernel shape.

    auto_pad  NOTSET (the default): pads as given (default zeros); VALID: no padding, the same
              as NOTSET with zero pads, and read as that; SAME_UPPER / SAME_LOWER: pads follow
              the input size, so they are unknown here (pads = ()). A str or, as onnx.helper
              may hand it over, bytes.
    strides, dilations  default 1 per spatial axis; pads default 0 per axis begin and end.

Pure: it reads an attribute dict (onnx-graphsurgeon's node.attrs, or one built by hand).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: auto_pad values whose pads depend on the input size
SAME_PADDING = ("SAME_UPPER", "SAME_LOWER")


@dataclass(frozen=True)
class ConvAttrs:
    """kernel: the spatial kernel dims (from the weight, else kernel_shape; () when neither is
    known); pads (begin..., end...) or () under SAME_*; auto_pad "NOTSET" or a SAME_* mode (or an
    unknown value, kept as written and treated as SAME_*: its pads are not known either)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    auto_pad: str = "NOTSET"
    group: int = 1

    @property
    def stride(self) -> int:
        """The product of the strides: the factor by which the output has fewer positions."""
        return math.prod(self.strides)

    @property
    def same_padded(self) -> bool:
        """Padded by auto_pad (SAME_*): the pads follow the input's size."""
        return self.auto_pad != "NOTSET"

    @property
    def padded(self) -> bool:
        """Pads anything: explicit nonzero pads, or SAME_* auto-padding."""
        return self.same_padded or any(self.pads)

    @property
    def dilated(self) -> bool:
        return any(d != 1 for d in self.dilations)

    @property
    def pointwise(self) -> bool:
        """Sees every input pixel once, as a 1x1 kernel without strides or pads does."""
        return all(d == 1 for d in self.kernel) and self.stride == 1 and not self.padded


def conv_attrs(attrs: dict, kernel: tuple[int, ...] | list[int] | None = None) -> ConvAttrs:
    """A Conv's attributes; `kernel` its weight's spatial dims (weight.shape[2:]), which fix the
    number of spatial axes the defaults are given for. Without it, kernel_shape does, else the
    longest of the attributes given (no attribute at all: no axes, and the defaults are empty)."""
    if kernel is None and "kernel_shape" in attrs:
        kernel = attrs["kernel_shape"]
    kernel = tuple(int(d) for d in kernel) if kernel is not None else ()
    spatial = len(kernel) or max(len(attrs.get("strides", ())), len(attrs.get("dilations", ())),
                                 len(attrs.get("pads", ())) // 2)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad == "VALID":
        auto_pad, pads = "NOTSET", (0,) * 2 * spatial
    elif auto_pad == "NOTSET":
        pads = _ints(attrs.get("pads"), 0, 2 * spatial)
    else:
        pads = ()
    return ConvAttrs(kernel, _ints(attrs.get("strides"), 1, spatial), pads, _ints(attrs.get("dilations"), 1, spatial),
                     auto_pad, int(attrs.get("group", 1)))


def _ints(value, default: int, count: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if value is not None else (default,) * count
