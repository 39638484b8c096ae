"""Parity: run the reference and the candidate model in ONNX Runtime on the same inputs and compare.

Graph optimizations are off for both (ORT_DISABLE_ALL), so the comparison measures our rewrite and
not the runtime's fusions.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx

from . import runtime
from .compare import Tolerance, compare_output
from .report import OutputComparison, ParityResult


def check_parity(reference: onnx.ModelProto | str, candidate: onnx.ModelProto | str, *,
                 tolerance: Tolerance, tolerance_source: str = "", provider: str = "cpu",
                 shapes: dict[str, list[int]] | None = None, batch: int = 1, seed: int = 0,
                 samples: Iterable[dict[str, np.ndarray]] | None = None,
                 int_range: tuple[int, int] = runtime.DEFAULT_INT_RANGE) -> ParityResult:
    config = runtime.SessionConfig(provider=provider, optimize=False)
    ref_session = runtime.make_session(reference, config)
    cand_session = runtime.make_session(candidate, config)
    notes: list[str] = []
    if samples is None:
        specs = runtime.input_specs(ref_session)
        concrete, notes = runtime.resolve_shapes(specs, shapes or {}, batch)
        samples = [runtime.generate_inputs(specs, concrete, seed, int_range)]
    samples = list(samples)
    input_shapes = {name: list(value.shape) for name, value in samples[0].items()}
    names = [o.name for o in ref_session.get_outputs()]
    ref_outputs = [runtime.run(ref_session, feed) for feed in samples]
    cand_outputs = [runtime.run(cand_session, feed) for feed in samples]
    outputs = [compare_output(name,
                              _stack([out[i] for out in ref_outputs]),
                              _stack([out[i] for out in cand_outputs]), tolerance)
               for i, name in enumerate(names)]
    criterion = tolerance.describe() + (f" ({tolerance_source})" if tolerance_source else "")
    return ParityResult(provider=provider, criterion=criterion, passed=all(o.passed for o in outputs),
                        outputs=outputs, samples=len(samples), input_shapes=input_shapes, notes=notes)


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.stack(arrays)


__all__ = ["check_parity", "OutputComparison", "ParityResult", "Tolerance"]
