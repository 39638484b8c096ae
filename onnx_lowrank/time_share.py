"""Where the time goes: the share of a model's run time spent in its candidate layers, which
--target-speedup turns into a MAC budget (Amdahl).

Two readings, checked against each other:

- profiled: ORT's profiler, kernel time per node mapped back to the model's layers
  (calibration.layer_time_fraction). ORT renames and fuses nodes (NCHWc convs named after their
  output tensor, FusedConv, Conv+Add+Relu), so a mapping that misses them reads a share near zero;
- measured: the whole model timed against the same model with every candidate layer replaced by
  a stand-in of the same output shape that costs next to nothing (a one-channel slice, pooled to
  the conv's output grid, broadcast to its channels): share = 1 - t(without) / t(with). This is
  what the layers' time is in the model as served, whatever ORT names or fuses.

The allocation uses the measured share when the two disagree by more than DISAGREE, else the
profiled one (finer: no timing noise); the report says which.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph import export_graph
from .passes.base import layer_name, unique_name

#: Absolute difference of the two shares above which the profile's mapping is taken to have missed.
DISAGREE = 0.1


@dataclass(frozen=True)
class TimeShare:
    share: float
    source: str                      # "measured" or "profiled"
    measured: float | None
    profiled: float | None

    def describe(self) -> str:
        readings = []
        if self.measured is not None:
            readings.append(f"{self.measured:.0%} measured with and without them")
        if self.profiled is not None:
            readings.append(f"{self.profiled:.0%} in ORT's profile")
        return f"{self.share:.0%} ({self.source}; " + ", ".join(readings) + ")"


def choose_share(measured: float | None, profiled: float | None) -> TimeShare | None:
    """The share the allocation uses: measured where the profile disagrees with it, None where
    neither could be read."""
    if measured is None and profiled is None:
        return None
    if measured is None:
        return TimeShare(profiled, "profiled", None, profiled)
    if profiled is None or abs(measured - profiled) > DISAGREE:
        return TimeShare(measured, "measured", measured, profiled)
    return TimeShare(profiled, "profiled", measured, profiled)


def without_layers(normalized: gs.Graph, original: onnx.ModelProto, layers: set[str], names: set[str]
                   ) -> tuple[onnx.ModelProto, int]:
    """The model with each of `layers` replaced by a stand-in of its output shape, and how many
    were replaced (a layer whose stand-in cannot be built keeps running)."""
    graph = normalized.copy()
    names = set(names)
    replaced = 0
    for node in list(graph.nodes):
        if layer_name(node) in layers and _stand_in(graph, node, names):
            replaced += 1
    return export_graph(graph, original), replaced


def _stand_in(graph: gs.Graph, node: gs.Node, names: set[str]) -> bool:
    """Rewire node's output to a cheap subgraph of the same shape; False where none fits."""
    y = node.outputs[0]
    weight = next((t for t in node.inputs[:2] if isinstance(t, gs.Constant)), None)
    if weight is None:
        return False
    dtype = np.dtype(weight.dtype)

    def tensor(part: str) -> gs.Variable:
        return gs.Variable(unique_name(names, f"{y.name}_standin_{part}"), dtype=y.dtype)

    def const(part: str, values) -> gs.Constant:
        return gs.Constant(unique_name(names, f"{y.name}_standin_{part}"), np.asarray(values))

    def add(op: str, inputs, attrs=None, out=None) -> gs.Variable:
        out = out or tensor(op.lower())
        graph.nodes.append(gs.Node(op, unique_name(names, f"{node.name}_standin_{op.lower()}"), attrs or {},
                                   inputs=inputs, outputs=[out]))
        return out

    def first(x: gs.Tensor, axis: int) -> gs.Variable:
        return add("Slice", [x, const("start", [0]), const("end", [1]), const("axis", [axis])])

    if node.op == "MatMul" and weight.shape is not None and len(weight.shape) == 2:
        if node.inputs[1] is weight:      # y = x W: [..., K] -> [..., N]
            ones = np.ones(weight.shape[1], dtype)
            x = first(node.inputs[0], -1)
        else:                             # y = W x: [..., K, P] -> [..., M, P]
            ones = np.ones((weight.shape[0], 1), dtype)
            x = first(node.inputs[1], -2)
    elif node.op == "Gemm" and node.inputs[1] is weight:
        n = weight.shape[0] if node.attrs.get("transB", 0) else weight.shape[1]
        a = node.inputs[0]
        x = first(a, 0) if node.attrs.get("transA", 0) else first(a, 1)
        if node.attrs.get("transA", 0):
            x = add("Transpose", [x])
        ones = np.ones((1, n), dtype)
    elif node.op == "Conv" and node.inputs[1] is weight and len(weight.shape) >= 3:
        kernel = list(weight.shape[2:])
        pads = node.attrs.get("pads", [0] * 2 * len(kernel))
        if any(p >= k for p, k in zip(pads, kernel + kernel)):
            return False                  # pooling refuses pads as large as its window
        attrs = {"kernel_shape": kernel}
        for key in ("strides", "pads", "dilations", "auto_pad"):
            if key in node.attrs:
                attrs[key] = node.attrs[key]
        x = add("MaxPool", [first(node.inputs[0], 1)], attrs)
        ones = np.ones((weight.shape[0], *[1] * len(kernel)), dtype)
    else:
        return False
    node.outputs.clear()
    add("Mul", [x, const("ones", ones)], out=y)
    return True
