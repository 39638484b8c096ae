"""Stage 4b, refinement (--refine): after the closed-form fit, train the factors by gradient descent
so that the compressed model reproduces the original's tensors at its alignment points.

    blocks.py     the alignment points (tensors both graphs keep that cut the compressed graph) and
                  the blocks between them
    evaluator.py  the ONNX graph over torch tensors, so gradients reach the initializers
    train.py      one block: Adam in fp32, early stopping on held-out samples

Block by block, on the compressed model's own inputs (block b starts from the compressed model's
value at its alignment point once blocks < b are refined), to the original's value at the next
point; the last block's loss adds the model outputs. The fit samples (those the gate does not hold
back) are split into train and held-out chunks; each block keeps its best held-out state, and the
whole refined model is kept only if its output error on the held-out chunks (ONNX Runtime) is no
worse than the closed form's. The trained values are written back into the same initializers.

torch is an optional dependency (`pip install 'onnx-lowrank[refine]'`), imported here only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from ... import runtime
from ...errors import MissingDependencyError
from ...passes import PassContext
from ...report import RefinedBlock, RefineOutcome, Report
from ..plan import DataPlan, fed_inputs
from ...synthetic import synthetic_tokens
from .blocks import alignment_blocks

INSTALL = "pip install 'onnx-lowrank[refine]'"
#: Share of the fit samples held out for early stopping, and the samples of one Adam step.
HOLD_OUT = 1 / 4
CHUNK = 32
#: Adam step size per form, relative to the RMS of the parameter it moves (Adam's step is about
#: the rate in absolute units, so a fixed rate would mean different things for factors of
#: different scale). SVD and Tucker factors are truncations, with room to move; a form fitted by
#: least squares (anything else) is already at the per-layer optimum, where the same rate raised
#: held-out error in the issue's prototype.
RATES = {"svd": 4e-3, "whitened-svd": 4e-3, "tucker2": 4e-3, "whitened-tucker2": 4e-3}
REFIT_RATE = 1e-3


def require_torch():
    """torch, or the one-line error that says how to install it."""
    try:
        import torch
    except ImportError:
        raise MissingDependencyError(f"--refine needs torch, which is not installed: {INSTALL}") from None
    return torch


def refine(plan: DataPlan, original: onnx.ModelProto, optimized: onnx.ModelProto, context: PassContext,
           report: Report, on_batch: Callable[[int], None] | None = None
           ) -> tuple[onnx.ModelProto, RefineOutcome | None]:
    """The refined model (or `optimized` unchanged, with the reason in the outcome)."""
    options = context.options
    if not options.refine or plan.data is None:
        return optimized, None
    require_torch()
    from .evaluator import TorchGraph, UnsupportedOp

    began, cpu = time.perf_counter(), time.process_time()
    reference_model = plan.reference(original)
    forms = factor_forms(reference_model, optimized, report)
    outcome = RefineOutcome()
    if not forms:
        outcome.reason = "no factorized layer to refine"
        report.notes.append(describe(outcome))
        return optimized, outcome
    compressed = TorchGraph(optimized, set(forms))
    reference = TorchGraph(reference_model)
    missing = sorted(set(compressed.unsupported()) | set(reference.unsupported()))
    if missing:
        outcome.reason = f"op {', '.join(missing)} is not supported by --refine: the closed-form fit is kept"
        report.notes.append(describe(outcome))
        return optimized, outcome
    blocks = alignment_blocks(reference_model, optimized, set(forms))
    calibrated = report.data_aware.calibration if report.data_aware else None
    tables = calibrated.synthetic_inputs if calibrated and calibrated.synthetic else {}
    samples = _samples(plan, optimized, tables, options.synthetic_tokens, options.seed)
    outcome.train_samples, outcome.held_samples = samples.train_count, samples.held_count
    outcome.synthetic_samples = samples.train_count * options.synthetic_tokens if tables else 0
    try:
        outcome.blocks = _refine_blocks(compressed, reference, blocks, forms, samples, context, on_batch)
    except UnsupportedOp as exc:
        outcome.reason = f"{exc} is not supported by --refine: the closed-form fit is kept"
        report.notes.append(describe(outcome))
        return optimized, outcome
    refined = _write_back(optimized, {name: p.detach().numpy() for name, p in compressed.parameters.items()})
    # the evaluator's own arithmetic is checked where it matters: the whole refined model in ONNX
    # Runtime on the held-out chunks, against the closed form, by the loss's measure
    held = samples.held_batches
    expected = _outputs(reference_model, held, options.provider)
    outcome.closed_form_error = _output_error(expected, _outputs(optimized, held, options.provider), held)
    outcome.refined_error = _output_error(expected, _outputs(refined, held, options.provider), held)
    outcome.kept = outcome.refined_error <= outcome.closed_form_error
    outcome.seconds, outcome.cpu_seconds = time.perf_counter() - began, time.process_time() - cpu
    report.notes.append(describe(outcome))
    return (refined if outcome.kept else optimized), outcome


@dataclass
class _Samples:
    """The fit samples as chunks: inputs (torch) and padding masks per chunk, which chunks train
    and which are held out, and the held-out ones as numpy feeds for ONNX Runtime."""

    inputs: list[dict]
    masks: list
    train: list[int]
    held: list[int]
    held_batches: list[dict]
    train_count: int
    held_count: int


def _samples(plan: DataPlan, model: onnx.ModelProto, tables: dict[str, int] | None = None, copies: int = 0,
             seed: int = 0) -> _Samples:
    from .evaluator import to_torch

    held_count = max(1, int(plan.fit_stop * HOLD_OUT))
    split = plan.fit_stop - held_count
    names, trimmed = fed_inputs(model), _trimmable(model)
    train_batches = list(_chunks(plan, 0, split, trimmed))
    held_batches = list(_chunks(plan, split, plan.fit_stop, trimmed))
    # synthetic token sequences (synthetic.py) train too: the original defines the targets of any
    # input, and 96 texts of one domain are overfit within tens of steps; held-out stays real
    train_batches += [synthetic_tokens(b, tables, np.random.default_rng([seed, i, copy]))
                      for copy in range(copies) for i, b in enumerate(train_batches)] if tables else []
    inputs = [{k: to_torch(b[k]) for k in names} for b in train_batches + held_batches]
    return _Samples(inputs, [_mask(chunk) for chunk in inputs], list(range(len(train_batches))),
                    list(range(len(train_batches), len(inputs))), held_batches, split, held_count)


def _refine_blocks(compressed, reference, blocks: list, forms: dict[str, str], samples: _Samples,
                   context: PassContext, on_batch: Callable[[int], None] | None) -> list[RefinedBlock]:
    """Each block in turn from the compressed model's value at its start (earlier blocks refined)
    to the original's at its targets; the trained values stay in `compressed.parameters`."""
    import torch

    from .train import fit_block

    options, chunks, done = context.options, samples.inputs, []
    streams: list[dict] = [{} for _ in chunks]          # the compressed model's value at the block's start
    references: list[dict] = [{} for _ in chunks]       # the original's
    for index, block in enumerate(blocks):
        context.on_layer(f"refine {block.targets[0]}")
        with torch.no_grad():
            targets = [reference.run({**chunk, **references[c]}, list(block.targets)) for c, chunk in enumerate(chunks)]

        def loss(c: int) -> "torch.Tensor":
            got = compressed.run({**chunks[c], **streams[c]}, list(block.targets))
            return sum(_relative_error(got[t], targets[c][t], samples.masks[c]) for t in block.targets) / len(
                block.targets)

        parameters = [compressed.parameters[name] for name in block.parameters]
        rates = [RATES.get(forms[name], REFIT_RATE) * float(p.detach().pow(2).mean().sqrt())
                 for name, p in zip(block.parameters, parameters)]
        fit = fit_block(parameters, rates, loss, samples.train, samples.held, options.refine_steps,
                        options.seed + index, on_step=lambda c: on_batch and on_batch(len(chunks[c][next(iter(chunks[c]))])))
        done.append(RefinedBlock(block.targets[0], len(parameters), sum(p.numel() for p in parameters), fit.steps,
                                 fit.best_step, fit.train_before, fit.train_after, fit.held_before, fit.held_after))
        point = block.targets[0]      # where the next block starts
        with torch.no_grad():
            for c, chunk in enumerate(chunks):
                streams[c] = compressed.run({**chunk, **streams[c]}, [point])
                references[c] = {point: targets[c][point]}
    return done


def describe(outcome: RefineOutcome) -> str:
    if outcome.reason:
        return f"refinement: {outcome.reason}"
    synthetic = f" (+ {outcome.synthetic_samples} synthetic token sequences)" if outcome.synthetic_samples else ""
    lines = [f"refinement: {len(outcome.blocks)} blocks, {outcome.train_samples} train{synthetic} / "
             f"{outcome.held_samples} held-out samples, {outcome.seconds:.0f} s ({outcome.cpu_seconds:.0f} s CPU); output rel_l2 on the held-out samples "
             f"{outcome.closed_form_error:.4g} (closed form) -> {outcome.refined_error:.4g} (refined)"
             + ("" if outcome.kept else ": worse, the closed-form fit is kept")]
    for b in outcome.blocks:
        lines.append(f"  {b.output}: {b.parameters} parameters, {b.steps} steps (best at {b.best_step}), "
                     f"train {b.train_before:.3g} -> {b.train_after:.3g}, held-out {b.held_before:.3g} -> "
                     f"{b.held_after:.3g}")
    return "\n".join(lines)


def factor_forms(reference: onnx.ModelProto, compressed: onnx.ModelProto, report: Report) -> dict[str, str]:
    """The factors the decompose passes added (initializers the reference lacks, named after the
    weight they replace), each with its layer's form (LayerRecord.method)."""
    before = {t.name for t in reference.graph.initializer}
    prefixes = {f"{r.weight}_lowrank_": r.method for r in report.decomposed if r.weight}
    forms = {}
    for init in compressed.graph.initializer:
        if init.name in before or init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        for prefix, method in prefixes.items():
            if init.name.startswith(prefix):
                forms[init.name] = method or ""
                break
    return forms


def _chunks(plan: DataPlan, start: int, stop: int, trimmed: str | None = None):
    """Samples [start, stop) as chunks of at most CHUNK, balanced (72 -> 3 x 24, not 32 + 32 + 8).

    With `trimmed` (a right-padding mask input, see _trimmable) the samples are ordered by length
    and each chunk's [batch, seq] inputs cut to its longest sample: a token's value depends on no
    padding position, so the real tokens compute the same, and a step costs what its real tokens
    do (MiniLM's calibration texts: 35 of 64 positions on average)."""
    count = stop - start
    if count <= 0:
        return
    size = -(-count // -(-count // CHUNK))
    batches = list(plan.data.batches(start, stop))
    merged = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    lengths = None
    if trimmed is not None:
        mask = merged[trimmed] != 0
        right_padded = np.all(mask[:, :-1] >= mask[:, 1:])
        lengths = mask.sum(axis=1) if right_padded else None
    if lengths is not None:
        order = np.argsort(lengths, kind="stable")
        merged = {k: v[order] for k, v in merged.items()}
        lengths, seq = lengths[order], merged[trimmed].shape[1]
    for i in range(0, count, size):
        chunk = {k: v[i:i + size] for k, v in merged.items()}
        if lengths is not None:
            keep = max(int(lengths[i:i + size].max()), 1)
            chunk = {k: (v[:, :keep] if v.ndim == 2 and v.shape[1] == seq else v) for k, v in chunk.items()}
        yield chunk


def _trimmable(model: onnx.ModelProto) -> str | None:
    """A [batch, seq] mask input whose seq axis every [batch, seq] input shares as a dynamic dim, so
    chunks may be cut along it; None otherwise."""
    inputs = [i for i in model.graph.input if i.name in fed_inputs(model)]
    masks = [i for i in inputs if "mask" in i.name.lower() and len(i.type.tensor_type.shape.dim) == 2]
    if len(masks) != 1:
        return None
    seq = masks[0].type.tensor_type.shape.dim[1]
    if not seq.dim_param:
        return None
    for i in inputs:
        dims = i.type.tensor_type.shape.dim
        if any(d.dim_param == seq.dim_param for d in dims) and (len(dims) != 2 or dims[1].dim_param != seq.dim_param):
            return None      # the seq dim elsewhere than axis 1 of a [batch, seq] input: leave it
    return masks[0].name


def _mask(chunk: dict):
    """The padding mask of a [batch, seq] mask input, as float [batch, seq]; None without one."""
    for name, value in chunk.items():
        if "mask" in name.lower() and value.dim() == 2:
            return (value != 0).float()
    return None


def _squared_errors(got, target, mask):
    """(||y - y0||^2, ||y0||^2), over the real tokens when y is [batch, seq, ...] and a mask is
    known: padding positions are hidden from the outputs that matter, and calibration drops them too."""
    diff = (got.float() - target.float()) ** 2
    energy = target.float() ** 2
    if mask is not None and got.dim() >= 2 and tuple(got.shape[:2]) == tuple(mask.shape):
        weight = mask.reshape(*mask.shape, *([1] * (got.dim() - 2)))
        diff, energy = diff * weight, energy * weight
    return diff.sum(), energy.sum()


def _relative_error(got, target, mask):
    diff, energy = _squared_errors(got, target, mask)
    return diff / energy.clamp_min(1e-30)


def _write_back(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    refined = onnx.ModelProto()
    refined.CopyFrom(model)
    for init in refined.graph.initializer:
        if init.name in values:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            init.CopyFrom(numpy_helper.from_array(values[init.name].astype(dtype), init.name))
    return refined


def _outputs(model: onnx.ModelProto, batches: list[dict], provider: str) -> list[list[np.ndarray]]:
    session = runtime.make_session(model, runtime.SessionConfig(provider=provider, optimize=False))
    names = [i.name for i in session.get_inputs()]
    return [runtime.run(session, {k: batch[k] for k in names}) for batch in batches]


def _output_error(expected: list[list[np.ndarray]], got: list[list[np.ndarray]], batches: list[dict]) -> float:
    """The worst output's ||y - y0|| / ||y0|| over the batches, measured as the loss is."""
    import torch

    worst = 0.0
    for k in range(len(expected[0])):
        diff = energy = 0.0
        for e, g, batch in zip(expected, got, batches):
            mask = _mask({name: torch.from_numpy(v) for name, v in batch.items()})
            d, n = _squared_errors(torch.from_numpy(g[k]), torch.from_numpy(e[k]), mask)
            diff, energy = diff + float(d), energy + float(n)
        worst = max(worst, (diff / max(energy, 1e-30)) ** 0.5)
    return worst
