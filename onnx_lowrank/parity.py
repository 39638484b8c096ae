"""Parity: run the reference and the candidate model in ONNX Runtime on the same inputs and compare.

Graph optimizations are off for both (ORT_DISABLE_ALL), so the comparison measures our rewrite and
not the runtime's fusions. `optimize`'s check and `onnx-lowrank validate` are this one function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Mapping

import numpy as np
import onnx

from . import runtime
from .compare import Tolerance, compare_output
from .errors import InferenceError, OptionError
from .inputs import DEFAULT_INT_RANGE, InputHint
from .report import OutputComparison, ParityResult

TRT_FP16_NOTE = ("TensorRT fp16: both models run in half precision, which alone moves outputs by ~1e-3 "
                 "relative (more through deep stacks) before any low-rank error; the tolerance was NOT "
                 "loosened for it: judge with a looser --max-error (e.g. 1e-2), or validate the rewrite "
                 "alone in fp32 (--provider cuda or cpu)")


@dataclass
class ReferenceRun:
    """The reference model's outputs on a set of inputs, kept in place of its session: a candidate
    is compared against them without the reference's weights in memory, and several candidates
    (the back-off's rounds) against one run."""
    signature: tuple[list, list]
    names: list[str]
    samples: list[dict[str, np.ndarray]]
    outputs: list[list[np.ndarray]]
    notes: list[str]


def run_reference(reference: onnx.ModelProto | str, *, config: runtime.SessionConfig,
                  shapes: dict[str, list[int]] | None = None, batch: int = 1, seed: int = 0,
                  samples: Iterable[dict[str, np.ndarray]] | None = None, inputs: str | None = None,
                  int_range: tuple[int, int] = DEFAULT_INT_RANGE, hints: dict[str, InputHint] | None = None
                  ) -> ReferenceRun:
    """Run the reference on the inputs check_parity describes and keep its outputs."""
    config = replace(config, optimize=False, prepack=False)
    session = runtime.make_session(reference, config)
    notes: list[str] = []
    if samples is None and inputs is None:
        feeds, first_outputs, notes = runtime.runnable_inputs(session, shapes=shapes, batch=batch, seed=seed,
                                                              int_range=int_range, hints=hints)
        samples, outputs = [feeds], [first_outputs]
    else:
        if samples is None:
            samples, notes = runtime.model_inputs(session, inputs=inputs, shapes=shapes)
        samples = list(samples)
        outputs = [runtime.run(session, feed) for feed in samples]
    return ReferenceRun(_signature(session), [o.name for o in session.get_outputs()], samples, outputs, notes)


def check_parity(reference: onnx.ModelProto | str | ReferenceRun, candidate: onnx.ModelProto | str, *,
                 tolerance: Tolerance, per_output: Mapping[str, Tolerance] | None = None,
                 tolerance_source: str = "", provider: str = "cpu", config: runtime.SessionConfig | None = None,
                 shapes: dict[str, list[int]] | None = None, batch: int = 1, seed: int = 0,
                 samples: Iterable[dict[str, np.ndarray]] | None = None, inputs: str | None = None,
                 int_range: tuple[int, int] = DEFAULT_INT_RANGE, hints: dict[str, InputHint] | None = None
                 ) -> ParityResult:
    """Compare every output of `candidate` with `reference`'s on the same inputs.

    Inputs: `samples` (feed dicts), else the arrays of the .npz file `inputs` (inputs.load_samples),
    else generated from the reference's input signature and the graph's `hints` (inputs.input_hints),
    at the first candidate sizes the reference runs on (runtime.runnable_inputs). The provider is `config`'s if given, else
    `provider` with default settings. `per_output` overrides `tolerance` for the outputs it names.
    `reference` may be a ReferenceRun (run_reference): its inputs and outputs are used as they are.
    """
    config = replace(config or runtime.SessionConfig(provider=provider), optimize=False, prepack=False)
    # one session at a time: the reference's outputs are kept, not its session, so the weights of
    # the two models are never held by ONNX Runtime together
    ref = reference if isinstance(reference, ReferenceRun) else run_reference(
        reference, config=config, shapes=shapes, batch=batch, seed=seed, samples=samples, inputs=inputs,
        int_range=int_range, hints=hints)
    names, per_output = ref.names, dict(per_output or {})
    unknown = sorted(set(per_output) - set(names))
    if unknown:
        raise OptionError(f"tolerance given for output {', '.join(map(repr, unknown))}, which the model does not "
                          f"have (outputs: {', '.join(names)})")
    notes = list(ref.notes)
    input_shapes = {name: list(np.shape(value)) for name, value in ref.samples[0].items()}
    cand_session = runtime.make_session(candidate, config)
    _match_signatures(ref.signature, _signature(cand_session))
    cand_order = [o.name for o in cand_session.get_outputs()]
    cand_outputs = [dict(zip(cand_order, runtime.run(cand_session, feed))) for feed in ref.samples]
    del cand_session
    outputs = [compare_output(name,
                              _stack([out[i] for out in ref.outputs]),
                              _stack([out[name] for out in cand_outputs]), per_output.get(name, tolerance))
               for i, name in enumerate(names)]
    criterion = tolerance.describe() + (f" ({tolerance_source})" if tolerance_source else "")
    if per_output:
        criterion += "; own tolerance for " + ", ".join(per_output)
    if config.trt_fp16:
        notes.append(TRT_FP16_NOTE)
    ungated = tolerance.max_error is not None and math.isinf(tolerance.max_error)
    return ParityResult(provider=config.provider, criterion=criterion, passed=all(o.passed for o in outputs),
                        outputs=outputs, samples=len(ref.samples), input_shapes=input_shapes, notes=notes,
                        ungated=ungated)


def _signature(session) -> tuple[list, list]:
    """(name, type) of the inputs and outputs, as plain strings: ORT's NodeArgs keep their session alive."""
    return ([(a.name, a.type) for a in session.get_inputs()], [(a.name, a.type) for a in session.get_outputs()])


def _match_signatures(ref: tuple[list, list], cand: tuple[list, list]) -> None:
    """The two models must take the same inputs and give the same outputs (by name), as a rewrite
    keeps them."""
    for kind, ref_args, cand_args in (("inputs", ref[0], cand[0]), ("outputs", ref[1], cand[1])):
        if dict(ref_args) != dict(cand_args):
            raise InferenceError(f"the two models have different {kind}: "
                                 f"{_describe(ref_args)} vs {_describe(cand_args)}")


def _describe(args) -> str:
    return "(" + ", ".join(f"{name}: {type_}" for name, type_ in args) + ")"


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """One array of the outputs over several runs. Batches of samples can differ in size (the last
    held-back batch is short): those are joined along the batch axis, which keeps a class axis
    where top-1 agreement reads it."""
    if len(arrays) == 1:
        return arrays[0]
    if all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    if all(a.ndim >= 1 and a.shape[1:] == arrays[0].shape[1:] for a in arrays):
        return np.concatenate(arrays)
    return np.concatenate([a.reshape(-1) for a in arrays])


__all__ = ["check_parity", "run_reference", "ReferenceRun", "OutputComparison", "ParityResult", "Tolerance"]
