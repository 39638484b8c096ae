"""Output comparison, as pure numpy: the figures Polygraphy prints, per output."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .errors import OptionError
from .report import OutputComparison


@dataclass(frozen=True)
class Tolerance:
    """Either a bound on ||y - y0|| / ||y0|| (max_error), or numpy.allclose-style atol/rtol
    (|y - y0| <= atol + rtol |y0| elementwise)."""

    max_error: float | None = 1e-3
    atol: float | None = None
    rtol: float | None = None
    min_top1: float | None = None     # and argmax over the last axis agrees on this share of rows
    # ... shown with confidence: the one-sided 90% Wilson lower bound of the agreement must reach
    # min_top1 (real held-out samples); else the measured share itself (generated inputs)
    top1_confident: bool = False

    def describe(self) -> str:
        top1 = f", top-1 agreement >= {self.min_top1:g}" if self.min_top1 is not None else ""
        if self.max_error is not None and math.isinf(self.max_error):
            return "ungated (measured only)"
        if self.max_error is not None:
            return f"rel_l2 <= {self.max_error:.1e}{top1}"
        return f"|y - y0| <= {self.atol or 0:.1e} + {self.rtol or 0:.1e} |y0|{top1}"


def tolerances(max_error: Mapping[str | None, float] | None = None, atol: Mapping[str | None, float] | None = None,
               rtol: Mapping[str | None, float] | None = None, default_max_error: float = 1e-3
               ) -> tuple[Tolerance, dict[str, Tolerance]]:
    """The default tolerance and the per-output ones from {output name or None: value} maps, as the
    CLI's repeatable `--max-error [NAME:]E`, `--atol [NAME:]A`, `--rtol [NAME:]R` give them.

    An output (or the default, key None) is judged by atol/rtol if either is given for it, else by
    max_error; giving both kinds for the same output is an error, not a silent choice."""
    max_error, atol, rtol = dict(max_error or {}), dict(atol or {}), dict(rtol or {})
    for key in max_error.keys() & (atol.keys() | rtol.keys()):
        where = f" for output '{key}'" if key is not None else ""
        raise OptionError(f"--max-error and --atol/--rtol are alternatives{where}: give one kind")
    for flag, values in (("--max-error", max_error), ("--atol", atol), ("--rtol", rtol)):
        for key, value in values.items():
            if not value >= 0:
                raise OptionError(f"{flag} must be >= 0, got {value}")

    def tolerance_for(key: str | None, base: Tolerance | None) -> Tolerance:
        if key in atol or key in rtol:
            inherit = base if base is not None and base.max_error is None else Tolerance(None, 0.0, 0.0)
            return Tolerance(None, atol.get(key, inherit.atol), rtol.get(key, inherit.rtol))
        if key in max_error:
            return Tolerance(max_error[key])
        return base if base is not None else Tolerance(default_max_error)

    default = tolerance_for(None, None)
    names = (max_error.keys() | atol.keys() | rtol.keys()) - {None}
    return default, {name: tolerance_for(name, default) for name in sorted(names)}


def compare_output(name: str, reference: np.ndarray, actual: np.ndarray, tolerance: Tolerance) -> OutputComparison:
    criterion = tolerance.describe()
    if reference.shape != actual.shape:
        return OutputComparison(name, list(actual.shape), float("inf"), float("inf"), float("inf"), 0.0,
                                passed=False, shape_ok=False, criterion=criterion, bound=tolerance.max_error,
                                reference_shape=list(reference.shape))
    sums = _OutputSums.over(reference, actual, tolerance)
    max_abs, max_rel, mismatched = sums.max_abs, sums.max_rel, sums.mismatched
    norm0, norm, norm_diff = math.sqrt(sums.squares0), math.sqrt(sums.squares), math.sqrt(sums.squares_diff)
    rel_l2 = norm_diff / norm0 if norm0 else (0.0 if max_abs == 0 else float("inf"))
    cosine = sums.dot / (norm0 * norm) if norm0 and norm else float(norm0 == norm)
    passed = rel_l2 <= tolerance.max_error if tolerance.max_error is not None else mismatched == 0
    # a NaN or inf where the reference has a finite value (or the other way) never passes
    passed = passed and sums.finite_alike
    top1 = top1_lower = None
    if reference.ndim >= 2 and reference.shape[-1] > 1 and reference.dtype.kind in "fV":
        top1 = sums.top1_agreeing / sums.rows if sums.rows else float("nan")
        top1_lower = wilson_lower_bound(top1, sums.rows)
    if tolerance.min_top1 is not None and top1 is not None:
        passed = passed and (top1_lower if tolerance.top1_confident else top1) >= tolerance.min_top1
    return OutputComparison(name, list(actual.shape), max_abs, max_rel, rel_l2, cosine, passed, top1,
                            criterion=criterion, bound=tolerance.max_error, mismatched=mismatched,
                            min_top1=tolerance.min_top1 if top1 is not None else None,
                            top1_lower=top1_lower if tolerance.top1_confident else None)


#: float64 elements per piece of an output compared at once: a decoder's logits over 32 held-back
#: samples are [32, 128, 32000], 1 GB in float32, and each whole-array float64 temporary doubled that
CHUNK_ELEMENTS = 1 << 22


@dataclass
class _OutputSums:
    """The sums and extremes every figure of compare_output is made of, gathered over pieces of
    rows (the last axis kept whole, for top-1) in float64, so no temporary is the output's size."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    squares0: float = 0.0
    squares: float = 0.0
    squares_diff: float = 0.0
    dot: float = 0.0
    mismatched: int | None = None
    finite_alike: bool = True
    top1_agreeing: int = 0
    rows: int = 0

    @classmethod
    def over(cls, reference: np.ndarray, actual: np.ndarray, tolerance: Tolerance) -> "_OutputSums":
        width = reference.shape[-1] if reference.ndim >= 2 and reference.shape[-1] else 1
        ref_rows, act_rows = reference.reshape(-1, width), actual.reshape(-1, width)
        sums = cls(mismatched=0 if tolerance.max_error is None else None)
        abs_maxima, rel_maxima = [], []
        step = max(1, CHUNK_ELEMENTS // width)
        for start in range(0, len(ref_rows), step):
            y0 = np.asarray(ref_rows[start:start + step], dtype=np.float64)
            y = np.asarray(act_rows[start:start + step], dtype=np.float64)
            delta = y - y0
            diff = np.abs(delta)
            abs_maxima.append(diff.max())
            with np.errstate(divide="ignore", invalid="ignore"):
                rel_maxima.append(np.nanmax(np.where(diff == 0, 0.0, diff / np.abs(y0))))
            sums.squares0 += float(np.vdot(y0, y0))
            sums.squares += float(np.vdot(y, y))
            sums.squares_diff += float(np.vdot(delta, delta))
            sums.dot += float(np.vdot(y0, y))
            if sums.mismatched is not None:
                sums.mismatched += int(np.count_nonzero(~(diff <= (tolerance.atol or 0.0)
                                                          + (tolerance.rtol or 0.0) * np.abs(y0))))
            sums.finite_alike = sums.finite_alike and bool(np.all(np.isfinite(y) == np.isfinite(y0)))
            if width > 1:
                sums.top1_agreeing += int(np.count_nonzero(np.argmax(y0, axis=-1) == np.argmax(y, axis=-1)))
            sums.rows += len(y0)
        if abs_maxima:
            sums.max_abs = float(np.max(abs_maxima))
            with np.errstate(invalid="ignore"):
                sums.max_rel = float(np.nanmax(rel_maxima))
        return sums


#: z of a one-sided 90% bound
_Z90 = 1.2816


def wilson_lower_bound(share: float, n: int, z: float = _Z90) -> float:
    """The Wilson score lower bound of a proportion measured as `share` of `n` trials: what a
    share of rows can be said to be at least, with confidence. n agreeing rows out of n show at
    least n / (n + z^2): 32 of 32 show 0.951, 8 of 8 only 0.83."""
    if n <= 0:
        return 0.0
    z2 = z * z
    centre = share + z2 / (2 * n)
    spread = z * math.sqrt(share * (1 - share) / n + z2 / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z2 / n))
