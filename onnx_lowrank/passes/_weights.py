"""Which weight a constant is: fold_constant_weights' records of the chains it folded, the key that
makes aliases of one weight one weight (so it is factorized once), and the type it is stored in.

Kept apart from the fold pass because every decompose pass and the data-aware path read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import PassContext, WeightChoice


@dataclass(frozen=True)
class Fold:
    """How fold_constant_weights made a tensor a constant: the node it replaced, and its inputs by
    name (with the values of those that were constants in the model, None for folded ones)."""

    op: str
    node_name: str
    attrs: dict
    domain: str | None
    inputs: tuple[tuple[str, object], ...]
    value: np.ndarray
    dtype: object
    shape: object


def weight_key(context: PassContext, name: str) -> str:
    """What a weight tensor holds, whatever aliases it: Identity links lead back to their source,
    Cast and Transpose links are part of the value. Weights of one key are one weight."""
    fold = context.state.folds.get(name)
    if fold is None or not fold.inputs:
        return name
    source = weight_key(context, fold.inputs[0][0])
    if fold.op == "Identity":
        return source
    return f"{fold.op}{sorted(fold.attrs.items())}({source})"


def storage_dtype(context: PassContext, name: str) -> np.dtype | None:
    """The 16-bit float type a folded weight is stored in behind a Cast to a wider float, else
    None: factors of such a weight are stored in it too."""
    fold = context.state.folds.get(name)
    if fold is None or not fold.inputs:
        return None
    source, values = fold.inputs[0]
    if fold.op == "Cast":
        if source in context.state.folds:
            values = context.state.folds[source].value
        stored = values.dtype if isinstance(values, np.ndarray) else _lazy_dtype(values)
        wider = np.dtype(fold.value.dtype).itemsize > 2
        return np.dtype(np.float16) if stored == np.float16 and wider else None
    return storage_dtype(context, source)


def _lazy_dtype(values) -> np.dtype | None:
    tensor = getattr(values, "tensor", None)
    if tensor is None:
        return None
    return onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)


def weight_source(context: PassContext, weight: gs.Constant) -> tuple[str, int]:
    """The model's own tensor a weight is read from (through folded links) and its stored bytes."""
    name, values = weight.name, weight._values
    while name in context.state.folds and context.state.folds[name].inputs:
        name, values = context.state.folds[name].inputs[0]
        if name in context.state.folds:
            values = context.state.folds[name].value
    return name, _stored_bytes(values)


def _stored_bytes(values) -> int:
    if isinstance(values, np.ndarray):
        return int(values.nbytes)
    tensor = getattr(values, "tensor", None)   # gs's LazyValues: the TensorProto, not yet read
    if tensor is None:
        return int(np.asarray(values).nbytes)
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def prior_choice(context: PassContext, weight: gs.Constant) -> WeightChoice | None:
    """What an earlier layer reading the same weight decided, if one did."""
    return context.state.choices.get(weight_key(context, weight.name))


def record_choice(context: PassContext, weight: gs.Constant, layer: str, ranks: tuple[int, ...] | None,
                  method: str | None = None) -> None:
    """The first decision on a weight stands for every later layer that reads it."""
    if context.state.survey is None:
        context.state.choices.setdefault(weight_key(context, weight.name), WeightChoice(layer, ranks, method))


def read_values(tensor: gs.Constant) -> np.ndarray:
    """A constant's values, without keeping them in the graph: gs keeps what `.values` loads, so
    passes that only look at the weights (to refuse them, as at the default tolerance) would hold
    a second copy of every weight until export. A weight a pass changes becomes a new constant."""
    values = tensor._values
    return values.load() if isinstance(values, gs.ir.tensor.LazyValues) else values
