"""The quality gate of a lossy run: what output error a written model may have, per output.

Every run that decomposes a layer is gated unless the user opts out (`--max-error none`):

- each output's relative L2 error ||y - y0|| / ||y0|| must be <= the bound (`--max-error E`,
  default DEFAULT_MAX_ERROR);
- outputs that look like class scores (a rank >= 2 output computed by Gemm / MatMul / Softmax /
  LogSoftmax / Sigmoid / a 1x1 Conv, through reshapes) must also agree with the original's top-1
  on at least `--min-top1` of their rows (default DEFAULT_MIN_TOP1).

The default bound: relative L2 0.25 is a mean cosine of about 0.97 (cos ~ 1 - e^2 / 2 while norms
hold), the fidelity at which a sentence encoder's embeddings keep their nearest neighbours
(all-MiniLM-L6-v2 at 0.245 token-level error: embedding cosine 0.978); a classifier's logits can
flip low-margin rows well inside it, which is what the top-1 bar is for (ImageNet-style models are
deployed at >= 95% agreement with their float original).

Pure: reads the model's graph (onnx protos), never runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx

from .compare import Tolerance

DEFAULT_MAX_ERROR = 0.25
DEFAULT_MIN_TOP1 = 0.95
#: Ops whose output, when it is a graph output of rank >= 2, reads as scores over classes.
_SCORE_OPS = {"Gemm", "MatMul", "Softmax", "LogSoftmax", "Sigmoid", "Conv"}
#: Ops between the scoring op and the graph output that keep it scores.
_PASS_THROUGH = {"Reshape", "Flatten", "Squeeze", "Identity", "Add", "Transpose", "Cast", "GlobalAveragePool"}


@dataclass(frozen=True)
class Gate:
    """The bound a run is held to: None bound = ungated (the error is measured, nothing refused)."""

    max_error: float | None
    min_top1: float | None
    source: str                       # "default", "--max-error", "--max-error none"

    @property
    def ungated(self) -> bool:
        return self.max_error is None

    def describe(self) -> str:
        if self.ungated:
            return f"UNGATED ({self.source})"
        top1 = f", top-1 agreement >= {self.min_top1:g} on class outputs" if self.min_top1 is not None else ""
        return f"rel_l2 <= {self.max_error:g}{top1} ({self.source})"


def gate_for(options) -> Gate:
    """The gate of these Options: --max-error E | none, --min-top1 A. --no-validate checks
    nothing, the gate included."""
    if isinstance(options.max_error, str):
        return Gate(None, None, "--max-error none")
    if not options.validate:
        return Gate(None, None, "--no-validate")
    source = "--max-error" if options.max_error is not None else "default"
    bound = options.max_error if options.max_error is not None else DEFAULT_MAX_ERROR
    top1 = options.min_top1 if options.min_top1 is not None else DEFAULT_MIN_TOP1
    return Gate(float(bound), float(top1), source)


def class_outputs(model: onnx.ModelProto) -> list[str]:
    """The graph outputs that look like class scores: rank >= 2 float tensors whose value comes
    from a scoring op through reshapes, bias adds and casts."""
    producer = {out: node for node in model.graph.node for out in node.output}
    names = []
    for output in model.graph.output:
        tensor = output.type.tensor_type
        if not output.type.HasField("tensor_type") or tensor.elem_type not in _FLOATS:
            continue
        if tensor.HasField("shape") and len(tensor.shape.dim) < 2:
            continue
        node = producer.get(output.name)
        while node is not None and node.op_type in _PASS_THROUGH and node.input:
            node = producer.get(node.input[0])
        if node is not None and node.op_type in _SCORE_OPS:
            names.append(output.name)
    return names


_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def gate_tolerances(gate: Gate, bound: float, model: onnx.ModelProto, real_samples: bool = False
                    ) -> tuple[Tolerance, dict[str, Tolerance]]:
    """The parity tolerance of a gated run at rel-L2 `bound` (the gate's, or a tighter one the
    rank rule implies), and the class outputs' own, with the top-1 bar. On real held-out samples
    the agreement must be shown with confidence (its 90% lower bound reaches the bar: 32 agreeing
    rows of 32 do, 8 of 8 do not); on generated inputs, which no one serves, the measured share."""
    if gate.ungated:
        return Tolerance(max_error=math.inf), {}
    top1 = {name: Tolerance(max_error=bound, min_top1=gate.min_top1, top1_confident=real_samples)
            for name in class_outputs(model)}
    return Tolerance(max_error=bound), top1
