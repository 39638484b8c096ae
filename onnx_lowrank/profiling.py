"""ONNX Runtime's profiler trace, summed per original layer. Pure functions on the trace's events
and the model's graph; bench.py runs the profiled sessions.

ORT times every node it executes ("<node name>_kernel_time" events), but the node names it runs
are not always the model's:

- the passes name the factors of layer L `L_lowrank_<suffix>` (and `_2`, ... on a collision), so
  stripping that suffix sums a factorized layer back into one row;
- fusions rename: Gemm + activation becomes "fused <name>", MatMul + Add "<name>/MatMulAddFusion",
  and GenerateNodeName may add "_token_<n>";
- the CPU provider's NCHWc layout pass names each Conv after its *output tensor* plus "_nchwc";
  that tensor belongs to the last node fused into the Conv (a BatchNormalization, Add or Relu),
  so the graph is walked back from it to the Conv it came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import onnx

from .report import LayerTime

_FUSED_PREFIX = re.compile(r"^(?:fused )+")
_ORT_SUFFIX = re.compile(r"(?:/\w*Fusion/?|_token_\d+)+$")
_LOWRANK = re.compile(r"_lowrank_[^/]*")
WEIGHT_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm"}
#: ops ORT's CPU fusions fold into a preceding Conv / MatMul / Gemm
_FOLDABLE = {"BatchNormalization", "Add", "Sum", "Mul", "Div", "Relu", "Clip", "LeakyRelu", "Sigmoid",
             "HardSigmoid", "Tanh", "Identity"}


@dataclass
class LayerProfile:
    ops: set[str] = field(default_factory=set)
    us: float = 0.0
    factorized: bool = False


def kernel_times(events: list[dict[str, Any]], skip_runs: int = 1) -> dict[str, tuple[str, float]]:
    """{node name: (op, total microseconds)} over the traced runs, leaving out the first
    `skip_runs` runs (the first run of a fresh session also pays for allocations)."""
    runs = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    start = runs[skip_runs - 1][1] if 0 < skip_runs <= len(runs) else float("-inf")
    times: dict[str, tuple[str, float]] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith("_kernel_time") or e.get("ts", 0) < start:
            continue
        node = name[: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", "?")
        times[node] = (op, times.get(node, (op, 0.0))[1] + float(e.get("dur", 0)))
    return times


def traced_runs(events: list[dict[str, Any]]) -> int:
    return sum(1 for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")


class LayerNames:
    """Maps the node names ORT reports back to the model's layers."""

    def __init__(self, graph: onnx.GraphProto):
        self.nodes = {node.name: node for node in graph.node if node.name}
        # ORT names an unnamed node "<op>_<index>"; the tool calls it by its first output
        self.nodes.update({f"{node.op_type}_{i}": node for i, node in enumerate(graph.node)
                           if not node.name and node.output})
        self.producer = {out: node for node in graph.node for out in node.output}

    def node(self, ort_name: str) -> str:
        """The model's node behind a name ORT reports (as the tool names layers: the node's name,
        or its first output's for an unnamed node); a node ORT made keeps its own name."""
        name = _FUSED_PREFIX.sub("", ort_name)
        if name in self.nodes:
            return _layer(self.nodes[name])
        tensor = name.removesuffix("_nchwc")
        if tensor != name and tensor in self.producer:
            return _layer(self._fused_into(self.producer[tensor]))
        # a fused node, or one ORT made (a layout reorder): without ORT's decorations, so that
        # "ReorderOutput_token_6" and "ReorderOutput_token_7" sum into one row
        return _ORT_SUFFIX.sub("", name) or name

    def layer(self, ort_name: str) -> str:
        return _LOWRANK.sub("", self.node(ort_name))

    def _fused_into(self, node: onnx.NodeProto, depth: int = 4) -> onnx.NodeProto:
        """The weight-carrying node that `node` (the last of a fused chain) was folded into."""
        if node.op_type in WEIGHT_OPS or node.op_type not in _FOLDABLE or depth == 0:
            return node
        for tensor in node.input:
            parent = self.producer.get(tensor)
            if parent is None:
                continue
            found = self._fused_into(parent, depth - 1)
            if found.op_type in WEIGHT_OPS:
                return found
        return node


def _layer(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def layer_profile(events: list[dict[str, Any]], graph: onnx.GraphProto, skip_runs: int = 1
                  ) -> dict[str, LayerProfile]:
    """{layer: LayerProfile} with microseconds per run."""
    names = LayerNames(graph)
    runs = max(traced_runs(events) - skip_runs, 1)
    layers: dict[str, LayerProfile] = {}
    for ort_name, (op, us) in kernel_times(events, skip_runs).items():
        node = names.node(ort_name)
        entry = layers.setdefault(_LOWRANK.sub("", node), LayerProfile())
        entry.ops.add(op)
        entry.us += us / runs
        entry.factorized |= _LOWRANK.search(node) is not None
    return layers


def join(profiles: Iterable[dict[str, LayerProfile]]) -> list[LayerTime]:
    """One row per layer across the models, slowest (in the first model) first."""
    profiles = list(profiles)
    layers = list(dict.fromkeys(layer for profile in profiles for layer in profile))
    rows = [LayerTime(layer, sorted(set().union(*(p[layer].ops for p in profiles if layer in p))),
                      [p[layer].us / 1e3 if layer in p else None for p in profiles],
                      profiles[-1][layer].factorized if layer in profiles[-1] else False)
            for layer in layers]
    return sorted(rows, key=lambda r: [-(ms or 0.0) for ms in r.ms])
