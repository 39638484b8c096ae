"""Inputs to run a model on, as pure numpy and onnx: input signatures, concrete shapes for dynamic
dims, generated samples that the graph accepts, and samples read from .npz files.

Generated inputs follow what the graph says about each input (`input_hints`): integer ids that a
`Gather` looks up stay inside its table, a scalar the graph compares with constants takes one of
them, a dim name shared by several inputs gets one size. A model that still refuses them is tried
at the next candidate sizes (`candidate_shapes`: batch 1 for state tensors, spatial sizes that
are multiples of 32, 224 for images) before the caller gives up and names what it tried.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from .errors import OptionError, first_line

DEFAULT_DYNAMIC_DIM = 16
DEFAULT_INT_RANGE = (0, 25)
#: Sizes tried, in order, for the dynamic dims other than batch when a model refuses the default:
#: detection and OCR backbones downsample by 32, image classifiers are served at 224.
DIM_CANDIDATES = (DEFAULT_DYNAMIC_DIM, 32, 64, 224)
#: Ops an integer id passes through unchanged on its way to a Gather's indices.
_ID_PASSTHROUGH = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Expand", "Tile"}
#: Ops whose other operand, when constant, is a value the graph expects a scalar input to take.
_COMPARISONS = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"}


@dataclass
class InputSpec:
    name: str
    dtype: np.dtype
    shape: list[int | str | None]     # ints, symbolic names, or None for unknown


@dataclass
class InputHint:
    """What the graph says about the values one input may take."""

    high: int | None = None                            # integer ids index a table of this many rows
    values: list[float] = field(default_factory=list)  # constants a scalar is compared with


def graph_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        tensor = value.type.tensor_type
        # Paddle writes a dynamic dim as dim_value -1: a size no tensor has, so unknown
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or None)
                for d in tensor.shape.dim]
        specs.append(InputSpec(value.name, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type), dims))
    return specs


def input_hints(model: onnx.ModelProto) -> dict[str, InputHint]:
    """Per graph input, the table size of the Gathers its ids reach (through casts and reshapes)
    and the constants it is compared with. Reads shapes and small constants only: a weight's
    dims come from its TensorProto, never its bytes."""
    graph = model.graph
    dims = {t.name: list(t.dims) for t in graph.initializer}
    small = {t.name: t for t in graph.initializer if np.prod(t.dims, dtype=np.int64) <= 16}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    dims[node.output[0]] = list(attr.t.dims)
                    if np.prod(attr.t.dims, dtype=np.int64) <= 16:
                        small[node.output[0]] = attr.t
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    hints = {}
    for spec in graph_input_specs(model):
        hint = InputHint()
        frontier, seen = [spec.name], {spec.name}
        while frontier:
            tensor = frontier.pop()
            for node in consumers.get(tensor, []):
                if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == tensor:
                    table = dims.get(node.input[0])
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    if table:
                        rows = table[axis]
                        hint.high = rows if hint.high is None else min(hint.high, rows)
                elif node.op_type in _COMPARISONS:
                    for other in node.input:
                        if other != tensor and other in small:
                            hint.values.extend(float(v) for v in onnx.numpy_helper.to_array(small[other]).ravel())
                elif node.op_type in _ID_PASSTHROUGH and node.input and node.input[0] == tensor:
                    for out in node.output:
                        if out not in seen:
                            seen.add(out)
                            frontier.append(out)
        if hint.high is not None or hint.values:
            hints[spec.name] = hint
    return hints


def model_hints(path: str | os.PathLike) -> dict[str, InputHint]:
    """input_hints of a model file, read without its external data; {} where it cannot be read
    (the session that loads it then says why)."""
    try:
        return input_hints(onnx.load(str(path), load_external_data=False))
    except Exception:   # protobuf and onnx raise many types; the model's own loader reports them
        return {}


def resolve_shapes(specs: list[InputSpec], overrides: dict[str, list[int]], batch: int = 1,
                   dim: int = DEFAULT_DYNAMIC_DIM) -> tuple[dict[str, list[int]], list[str]]:
    """Concrete shapes for every input, and one note per dynamic dim that was filled in.

    Dynamic dims are never pinned silently: a dim named at the first axis of some input is the
    batch and gets `batch`, any other dynamic dim `dim`; a dim name shared by several inputs gets
    one size (a state tensor's batch at axis 1 is the same batch); each substitution is reported
    so the user can override it with --shape.
    """
    unknown = sorted(set(overrides) - {s.name for s in specs})
    if unknown:
        raise OptionError(f"--shape: the model has no input named {', '.join(map(repr, unknown))} "
                          f"(inputs: {', '.join(s.name for s in specs)})")
    named: dict[str, int] = {}
    for spec in specs:   # a user's --shape fixes the names it covers for every other input
        if spec.name in overrides and len(overrides[spec.name]) == len(spec.shape):
            for d, value in zip(spec.shape, overrides[spec.name]):
                if isinstance(d, str):
                    named.setdefault(d, value)
    batch_names = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str)}
    shapes, notes = {}, []
    for spec in specs:
        if spec.name in overrides:
            shape = overrides[spec.name]
            if not _fits(shape, spec.shape):
                raise OptionError(f"--shape {spec.name}:{','.join(map(str, shape))} does not fit the model's "
                                  f"input shape {_format_shape(spec.shape)}")
            shapes[spec.name] = list(shape)
            continue
        shape = []
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int):
                shape.append(d)
                continue
            if isinstance(d, str) and d in named:
                shape.append(named[d])
                continue
            value = batch if axis == 0 or d in batch_names else dim
            if isinstance(d, str):
                named[d] = value
            shape.append(value)
            notes.append(f"input '{spec.name}' axis {axis} ({d or '?'}) set to {value}")
        shapes[spec.name] = shape
    if notes:
        notes.append("override with --shape NAME:D1,D2,...")
    return shapes, notes


def candidate_shapes(specs: list[InputSpec], overrides: dict[str, list[int]], batch: int = 1
                     ) -> Iterator[tuple[dict[str, list[int]], list[str]]]:
    """resolve_shapes' shapes first, then the next candidates to try when a model refuses them:
    batch 1 (state tensors often fix it), and the other dynamic dims at DIM_CANDIDATES; each
    distinct set of shapes once."""
    seen = []
    for dim in DIM_CANDIDATES:
        for b in dict.fromkeys((batch, 1)):
            shapes, notes = resolve_shapes(specs, overrides, b, dim)
            if shapes not in seen:
                seen.append(shapes)
                yield shapes, notes


def generate_inputs(specs: list[InputSpec], shapes: dict[str, list[int]], seed: int = 0,
                    int_range: tuple[int, int] = DEFAULT_INT_RANGE,
                    hints: dict[str, InputHint] | None = None) -> dict[str, np.ndarray]:
    """Floats (fp32, fp64, fp16, bf16) ~ N(0, 1); integers uniform in [lo, hi), ids that index a
    table in [0, rows); a scalar the graph compares with constants takes the first of them; bools
    fair coins; integer inputs named like a mask are all ones (a random attention mask is not an
    input a model is ever served)."""
    rng = np.random.default_rng(seed)
    hints = hints or {}
    feeds = {}
    for spec in specs:
        shape = shapes[spec.name]
        kind = spec.dtype.kind
        hint = hints.get(spec.name, InputHint())
        if hint.values and not shape:
            feeds[spec.name] = np.asarray(hint.values[0]).astype(spec.dtype)
        elif kind == "b":
            feeds[spec.name] = np.asarray(rng.random(shape) < 0.5)   # a 0-d input must stay an array
        elif kind in "iu":
            if "mask" in spec.name.lower():
                feeds[spec.name] = np.ones(shape, dtype=spec.dtype)
            else:
                lo, hi = int_range
                if hint.high is not None:
                    lo, hi = max(lo, 0), max(1, min(hi, hint.high))
                info = np.iinfo(spec.dtype)
                if lo < info.min or hi - 1 > info.max:
                    raise OptionError(f"--int-range {lo}:{hi} does not fit input '{spec.name}' of type {spec.dtype}")
                feeds[spec.name] = np.asarray(rng.integers(lo, hi, size=shape)).astype(spec.dtype)
        else:   # 'f', and ml_dtypes' bfloat16 (kind 'V')
            feeds[spec.name] = np.asarray(rng.standard_normal(shape)).astype(np.float32).astype(spec.dtype)
    return feeds


def describe_shapes(shapes: dict[str, list[int]]) -> str:
    return ", ".join(f"{name} {_format_shape(shape)}" for name, shape in shapes.items())


def parse_int_range(text: str) -> tuple[int, int]:
    """'LO:HI' -> (LO, HI), the half-open range integer inputs are drawn from."""
    lo, sep, hi = text.partition(":")
    try:
        bounds = (int(lo), int(hi)) if sep else None
    except ValueError:
        bounds = None
    if bounds is None or bounds[0] >= bounds[1]:
        raise OptionError(f"--int-range {text!r}: expected LO:HI with integers LO < HI, e.g. 0:1000 "
                          "(integers are drawn from [LO, HI))")
    return bounds


def load_samples(path: str | os.PathLike, specs: list[InputSpec]) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """Samples from an .npz whose keys are input names and whose leading axis indexes samples.

    An array with exactly the input's rank is taken as a single sample (a batch saved as is, like
    models/digits_test.npz), and a note says so. Arrays are cast to the input's dtype within a
    kind (float64 -> float32), never across kinds (float -> int is an error).
    """
    arrays = read_npz(path, "--inputs")
    flag = f"--inputs {path}"
    names = [s.name for s in specs]
    check_every_input(arrays, names, path, "--inputs")
    notes = []
    extra = [k for k in arrays if k not in names]
    if extra:
        notes.append(f"--inputs: ignored arrays that are not model inputs: {', '.join(extra)}")
    per_input: dict[str, list[np.ndarray]] = {}
    for spec in specs:
        array = arrays[spec.name]
        if not np.can_cast(array.dtype, spec.dtype, "same_kind") and not (
                spec.dtype.name == "bfloat16" and array.dtype.kind == "f"):
            raise OptionError(f"{flag}: '{spec.name}' is {array.dtype}, the model takes {spec.dtype}")
        array = array.astype(spec.dtype, copy=False)
        if array.ndim == len(spec.shape) + 1:
            samples = list(array)
        elif array.ndim == len(spec.shape):
            samples = [array]
            notes.append(f"--inputs: '{spec.name}' {list(array.shape)} has the input's rank: used as one sample")
        else:
            raise OptionError(f"{flag}: '{spec.name}' has shape {list(array.shape)}; the model's input is "
                              f"{_format_shape(spec.shape)}, so expected [samples, ...] or that shape")
        for sample in samples:
            if not _fits(list(sample.shape), spec.shape):
                raise OptionError(f"{flag}: a sample of '{spec.name}' has shape {list(sample.shape)}, which does "
                                  f"not fit the model's input {_format_shape(spec.shape)}")
        per_input[spec.name] = samples
    counts = {name: len(samples) for name, samples in per_input.items()}
    if len(set(counts.values())) > 1:
        raise OptionError(f"{flag}: inputs have different sample counts: "
                          + ", ".join(f"{n} {c}" for n, c in counts.items()))
    count = next(iter(counts.values()), 0)
    if count == 0:
        raise OptionError(f"{flag}: no samples (leading axis of length 0)")
    return [{name: per_input[name][i] for name in names} for i in range(count)], notes


def read_npz(path: str | os.PathLike, flag: str) -> dict[str, np.ndarray]:
    """The named arrays of the .npz file that `flag` (--inputs, --calibration) gave."""
    if not Path(path).is_file():
        raise OptionError(f"{flag}: file '{path}' does not exist")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive of named arrays")
        with data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise OptionError(f"{flag}: '{path}' is not a readable .npz file ({first_line(exc)})") from None


def check_every_input(arrays: dict[str, np.ndarray], names: list[str], path: str | os.PathLike, flag: str) -> None:
    """Every model input has its array in the file."""
    missing = [n for n in names if n not in arrays]
    if missing:
        raise OptionError(f"{flag}: '{path}' has no array for input {', '.join(map(repr, missing))} "
                          f"(keys: {', '.join(arrays) or 'none'}; expected one per model input: {', '.join(names)})")


def _fits(shape: list[int], model_shape: list[int | str | None]) -> bool:
    return len(shape) == len(model_shape) and all(not isinstance(d, int) or d < 0 or d == v
                                                  for d, v in zip(model_shape, shape))


def _format_shape(shape) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"
