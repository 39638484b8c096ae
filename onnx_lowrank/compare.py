"""Output comparison, as pure numpy: the figures Polygraphy prints, per output."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .report import OutputComparison


@dataclass(frozen=True)
class Tolerance:
    """Either a bound on ||y - y0|| / ||y0|| (max_error), or numpy.allclose-style atol/rtol."""

    max_error: float | None = 1e-3
    atol: float | None = None
    rtol: float | None = None

    def describe(self) -> str:
        if self.max_error is not None:
            return f"rel_l2 <= {self.max_error:.1e}"
        return f"|y - y0| <= {self.atol or 0:.1e} + {self.rtol or 0:.1e} |y0|"


def compare_output(name: str, reference: np.ndarray, actual: np.ndarray, tolerance: Tolerance) -> OutputComparison:
    if reference.shape != actual.shape:
        return OutputComparison(name, list(actual.shape), float("inf"), float("inf"), float("inf"), 0.0,
                                passed=False, shape_ok=False)
    y0 = np.asarray(reference, dtype=np.float64)
    y = np.asarray(actual, dtype=np.float64)
    diff = np.abs(y - y0)
    max_abs = float(diff.max()) if diff.size else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / np.abs(y0))
    max_rel = float(np.nanmax(rel)) if rel.size else 0.0
    norm0 = float(np.linalg.norm(y0))
    rel_l2 = float(np.linalg.norm(y - y0) / norm0) if norm0 else (0.0 if max_abs == 0 else float("inf"))
    norm = float(np.linalg.norm(y))
    cosine = float(np.vdot(y0.ravel(), y.ravel()) / (norm0 * norm)) if norm0 and norm else float(norm0 == norm)
    if tolerance.max_error is not None:
        passed = rel_l2 <= tolerance.max_error
    else:
        passed = bool(np.all(diff <= (tolerance.atol or 0.0) + (tolerance.rtol or 0.0) * np.abs(y0)))
    passed = passed and bool(np.all(np.isfinite(y) == np.isfinite(y0)))
    top1 = None
    if y0.ndim >= 2 and y0.shape[-1] > 1 and reference.dtype.kind == "f":
        top1 = float(np.mean(np.argmax(y0, axis=-1) == np.argmax(y, axis=-1)))
    return OutputComparison(name, list(actual.shape), max_abs, max_rel, rel_l2, cosine, passed, top1)

