"""The int8 stage (`--quantize int8`): ONNX Runtime's own quantization, run on the low-rank result
as the last rewrite, so that the gate and the timing judge the model that is written.

- Convolutional models with calibration samples: static QDQ (activations calibrated on the samples,
  weights per channel), what ORT's CPU provider runs as int8 Conv / MatMul kernels.
- Everything else: dynamic int8 of the MatMul / Gemm weights (activations quantized per run), the
  form ORT recommends for transformers.

Factors stay two small MatMuls, so a low-rank model quantizes like any other; what stacking buys
over int8 alone is measured, not assumed (`sweep` shows the int8-only point beside its targets).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx

from .errors import InferenceError, first_line
from .runtime import ort

MODES = ("int8",)


def quantize_int8(model: onnx.ModelProto, samples: Iterable[dict[str, np.ndarray]] | None = None
                  ) -> tuple[onnx.ModelProto, str]:
    """The model quantized to int8 and how ("dynamic int8 MatMul/Gemm weights" or "static QDQ
    int8 ..."); static QDQ when the model has convolutions and `samples` are given."""
    ort()   # one line naming the extra to install when ONNX Runtime is missing
    ops = {node.op_type for node in model.graph.node}
    samples = list(samples) if samples is not None else None
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-int8-") as tmp:
        source, target = Path(tmp) / "model.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, source)
        try:
            with _quiet_root_logger():
                how = _quantize(source, target, ops, samples, model)
        except Exception as exc:   # the quantizer raises whatever its graph walk meets
            raise InferenceError(f"--quantize int8: ONNX Runtime's quantizer failed: {first_line(exc)}") from None
        quantized = onnx.load(str(target))
    _keep_interface(model, quantized)
    return quantized, how


def _quantize(source: Path, target: Path, ops: set[str], samples, model: onnx.ModelProto) -> str:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, \
        quantize_static

    if "Conv" not in ops or not samples:
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        return "dynamic int8 (MatMul, Gemm weights; activations quantized per run)"
    fed = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}

    class Samples(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{k: v for k, v in batch.items() if k in fed} for batch in samples])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(source, target, Samples(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    return f"static QDQ int8 (Conv, MatMul, Gemm), activations calibrated on {len(samples)} batches"


@contextlib.contextmanager
def _quiet_root_logger():
    """ORT's quantizer warns through the root logger (pre-processing advice): our output is the
    report, so it is silenced for the call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _keep_interface(original: onnx.ModelProto, quantized: onnx.ModelProto) -> None:
    """What a deployment pipeline reads stays as it was: the IR version (where the quantizer kept
    the opsets; else its own, capped at 10, which ONNX Runtime 1.31 loads), producer, metadata."""
    same_opsets = {(o.domain, o.version) for o in original.opset_import} >= \
        {(o.domain, o.version) for o in quantized.opset_import if o.domain in ("", "ai.onnx")}
    quantized.ir_version = original.ir_version if same_opsets else min(max(quantized.ir_version,
                                                                           original.ir_version), 10)
    quantized.producer_name, quantized.producer_version = original.producer_name, original.producer_version
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(original.metadata_props)
