"""An ONNX graph evaluated in torch, one function per op, so that gradients reach its initializers.

Why not a converter (onnx2torch): the refinement must write each trained value back into the
initializer it came from, and start a forward at any tensor of the graph (the alignment point a
block starts from). A converter turns initializers into module attributes under its own names
(a Gemm's weight becomes an nn.Linear's, transposed), and its modules run from the graph inputs;
here every value keeps its ONNX name, a block is the nodes its outputs need from the tensors
given, and an op outside this table is named in one line (`UnsupportedOp`) before any training.

Only float32 is trained; integer shape arithmetic (Shape, Gather, Concat, ...) runs on int64
tensors as the graph spells it.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper


class UnsupportedOp(Exception):
    """An op (or an attribute value of one) the evaluator has no torch function for."""


_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
           onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
           onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
           onnx.TensorProto.INT16: torch.int16, onnx.TensorProto.INT8: torch.int8,
           onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool}


def to_torch(array: np.ndarray) -> torch.Tensor:
    # a copy: onnx's arrays are read-only views, and np.ascontiguousarray would make a 0-d array 1-d
    return torch.from_numpy(np.array(array, copy=True, order="C"))


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


# --- ops: f(inputs, attrs, opset) -> list of outputs -----------------------------------------------

def _unsqueeze(x, a, opset):
    axes = a.get("axes") if opset < 13 else _ints(x[1])
    out = x[0]
    for axis in sorted(ax % (out.dim() + len(axes)) for ax in axes):
        out = out.unsqueeze(axis)
    return [out]


def _squeeze(x, a, opset):
    axes = a.get("axes") if opset < 13 else _ints(x[1] if len(x) > 1 else None)
    if axes is None:
        return [x[0].squeeze()]
    return [x[0].squeeze(tuple(ax % x[0].dim() for ax in axes))]


def _reshape(x, a, opset):
    shape = _ints(x[1])
    if not a.get("allowzero", 0):
        shape = [x[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x[0].reshape(shape)]


def _slice(x, a, opset):
    if opset < 10:
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        starts, ends = _ints(x[1]), _ints(x[2])
        axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else None
        steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else None
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    out = x[0]
    for start, end, axis, step in zip(starts, ends, axes, steps):
        size = out.shape[axis]
        if step < 0:   # torch slices only forwards: flip, slice, in reversed coordinates
            s, e, _ = slice(start, end, step).indices(size)
            out = out.index_select(axis % out.dim(), torch.arange(s, e, step))
            continue
        s, e, _ = slice(start, end, step).indices(size)
        index = [slice(None)] * out.dim()
        index[axis] = slice(s, e, step)
        out = out[tuple(index)]
    return [out]


def _reduce(fn):
    def op(x, a, opset):
        axes = a.get("axes") if opset < 18 or len(x) < 2 or x[1] is None else _ints(x[1])
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return [x[0]]
            axes = list(range(x[0].dim()))
        return [fn(x[0], dim=tuple(axes), keepdim=keep)]
    return op


def _reduce_sum(x, a, opset):
    axes = a.get("axes") if opset < 13 or len(x) < 2 or x[1] is None else _ints(x[1])
    keep = bool(a.get("keepdims", 1))
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            return [x[0]]
        axes = list(range(x[0].dim()))
    return [x[0].sum(dim=tuple(axes), keepdim=keep)]


def _gemm(x, a, opset):
    A = x[0].transpose(-1, -2) if a.get("transA", 0) else x[0]
    B = x[1].transpose(-1, -2) if a.get("transB", 0) else x[1]
    y = a.get("alpha", 1.0) * (A @ B)
    if len(x) > 2 and x[2] is not None:
        y = y + a.get("beta", 1.0) * x[2]
    return [y]


def _pads(pads: list[int], dims: int) -> tuple[list[int], bool]:
    """ONNX pads (begin..., end...) -> symmetric per-dim padding if it is symmetric."""
    begin, end = pads[:dims], pads[dims:]
    return begin, begin == end


def _auto_pad(a, x, kernel, strides, dilations):
    mode = a.get("auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    dims = len(kernel)
    if mode in ("NOTSET", "VALID"):
        return list(a.get("pads", [0] * 2 * dims)) if mode == "NOTSET" else [0] * 2 * dims
    pads_begin, pads_end = [], []
    for i in range(dims):
        size = x.shape[2 + i]
        out = math.ceil(size / strides[i])
        total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
        small = total // 2
        big = total - small
        pads_begin.append(small if mode == "SAME_UPPER" else big)
        pads_end.append(big if mode == "SAME_UPPER" else small)
    return pads_begin + pads_end


def _conv(x, a, opset):
    w = x[1]
    dims = w.dim() - 2
    strides = list(a.get("strides", [1] * dims))
    dilations = list(a.get("dilations", [1] * dims))
    pads = _auto_pad(a, x[0], list(w.shape[2:]), strides, dilations)
    begin, symmetric = _pads(pads, dims)
    inp = x[0]
    if not symmetric:
        flat = [p for i in reversed(range(dims)) for p in (pads[i], pads[dims + i])]
        inp, begin = F.pad(inp, flat), [0] * dims
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    bias = x[2] if len(x) > 2 else None
    return [conv(inp, w, bias, strides, begin, dilations, a.get("group", 1))]


def _pool(kind):
    def op(x, a, opset):
        kernel = list(a["kernel_shape"])
        dims = len(kernel)
        strides = list(a.get("strides", [1] * dims))
        dilations = list(a.get("dilations", [1] * dims))
        pads = _auto_pad(a, x[0], kernel, strides, dilations)
        begin, symmetric = _pads(pads, dims)
        inp = x[0]
        ceil = bool(a.get("ceil_mode", 0))
        if kind == "max":
            if not symmetric:
                flat = [p for i in reversed(range(dims)) for p in (pads[i], pads[dims + i])]
                inp, begin = F.pad(inp, flat, value=-math.inf), [0] * dims
            pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1]
            return [pool(inp, kernel, strides, begin, dilations, ceil_mode=ceil)]
        if not symmetric or any(d != 1 for d in dilations):
            raise UnsupportedOp("AveragePool with asymmetric pads or dilations")
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]
        return [pool(inp, kernel, strides, begin, ceil_mode=ceil,
                     count_include_pad=bool(a.get("count_include_pad", 0)))]
    return op


def _layer_norm(x, a, opset):
    axis = a.get("axis", -1) % x[0].dim()
    shape = x[0].shape[axis:]
    bias = x[2] if len(x) > 2 else None
    return [F.layer_norm(x[0], shape, x[1].expand(shape), None if bias is None else bias.expand(shape),
                         a.get("epsilon", 1e-5))]


def _batch_norm(x, a, opset):
    return [F.batch_norm(x[0], x[3], x[4], x[1], x[2], False, 0.0, a.get("epsilon", 1e-5))]


def _softmax(fn):
    def op(x, a, opset):
        axis = a.get("axis", -1 if opset >= 13 else 1)
        if opset < 13:   # softmax over the flattened trailing dims
            shape = x[0].shape
            flat = x[0].reshape(*shape[:axis % len(shape)], -1)
            return [fn(flat, -1).reshape(shape)]
        return [fn(x[0], axis)]
    return op


def _split(x, a, opset):
    axis = a.get("axis", 0)
    sizes = a.get("split") if opset < 13 else _ints(x[1] if len(x) > 1 else None)
    if sizes is None:
        parts = a.get("num_outputs")
        size = x[0].shape[axis]
        sizes = [math.ceil(size / parts)] * (parts - 1) if parts else None
        if sizes is None:
            raise UnsupportedOp("Split with neither sizes nor num_outputs")
        sizes.append(size - sum(sizes))
    return list(torch.split(x[0], list(sizes), dim=axis))


def _clip(x, a, opset):
    if opset < 11:
        low, high = a.get("min"), a.get("max")
    else:
        low = x[1] if len(x) > 1 and x[1] is not None else None
        high = x[2] if len(x) > 2 and x[2] is not None else None
    return [torch.clamp(x[0], low, high)]


def _cast(x, a, opset):
    return [x[0].to(_DTYPES[a["to"]])]


def _constant(x, a, opset):
    if "value" in a:
        return [to_torch(numpy_helper.to_array(a["value"]))]
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64), ("value_floats", np.float32),
                       ("value_ints", np.int64)):
        if key in a:
            return [to_torch(np.asarray(a[key], dtype=dtype))]
    raise UnsupportedOp("Constant without a value")


def _constant_of_shape(x, a, opset):
    value = numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
    return [torch.full(_ints(x[0]), value.reshape(-1)[0].item(), dtype=to_torch(value).dtype)]


def _resize(x, a, opset):
    mode = a.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    scales = x[2] if len(x) > 2 and x[2] is not None and x[2].numel() else None
    sizes = x[3] if len(x) > 3 and x[3] is not None and x[3].numel() else None
    spatial = x[0].dim() - 2
    transform = a.get("coordinate_transformation_mode", b"half_pixel")
    transform = transform.decode() if isinstance(transform, bytes) else transform
    if mode == "nearest":
        nearest = a.get("nearest_mode", b"round_prefer_floor")
        nearest = nearest.decode() if isinstance(nearest, bytes) else nearest
        if transform != "asymmetric" or nearest != "floor":
            raise UnsupportedOp(f"Resize nearest with {transform} / {nearest}")
        torch_mode, corners = "nearest", None
    elif mode == "linear":
        if transform not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
            raise UnsupportedOp(f"Resize linear with {transform}")
        torch_mode = ("linear", "bilinear", "trilinear")[spatial - 1]
        corners = transform == "align_corners"
    else:
        raise UnsupportedOp(f"Resize mode {mode}")
    if sizes is not None:
        return [F.interpolate(x[0], size=_ints(sizes)[2:], mode=torch_mode, align_corners=corners)]
    factors = [float(s) for s in scales.reshape(-1).tolist()[2:]]
    return [F.interpolate(x[0], scale_factor=factors, mode=torch_mode, align_corners=corners,
                          recompute_scale_factor=False)]


def _flatten(x, a, opset):
    axis = a.get("axis", 1)
    axis = axis + x[0].dim() if axis < 0 else axis     # axis == rank is allowed: [prod, 1]
    return [x[0].reshape(math.prod(x[0].shape[:axis]), -1)]


def _gather(x, a, opset):
    axis = a.get("axis", 0) % x[0].dim()
    index = x[1].long()
    index = torch.where(index < 0, index + x[0].shape[axis], index)
    out = x[0].index_select(axis, index.reshape(-1))
    return [out.reshape((*x[0].shape[:axis], *index.shape, *x[0].shape[axis + 1:]))]


def _expand(x, a, opset):
    shape = _ints(x[1])
    return [x[0].expand(torch.broadcast_shapes(x[0].shape, tuple(shape)))]


def _unary(fn):
    return lambda x, a, opset: [fn(x[0])]


def _binary(fn):
    return lambda x, a, opset: [fn(x[0], x[1])]


def _variadic(fn):
    def op(x, a, opset):
        out = x[0]
        for value in x[1:]:
            out = fn(out, value)
        return [out]
    return op


def _div(x, y):
    if not x.is_floating_point() and not y.is_floating_point():
        return torch.div(x, y, rounding_mode="trunc")
    return x / y


def _gelu(x, a, opset):
    approximate = a.get("approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    return [F.gelu(x[0], approximate=approximate)]


OPS: dict[str, Callable] = {
    "Identity": _unary(lambda v: v), "Dropout": lambda x, a, opset: [x[0]],
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _binary(_div),
    "Pow": _binary(torch.pow), "MatMul": _binary(torch.matmul), "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt), "Greater": _binary(torch.gt), "LessOrEqual": _binary(torch.le),
    "GreaterOrEqual": _binary(torch.ge), "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or),
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(torch.add),
    "Where": lambda x, a, opset: [torch.where(x[0], x[1], x[2])],
    "Not": _unary(torch.logical_not), "Neg": _unary(torch.neg), "Abs": _unary(torch.abs),
    "Sqrt": _unary(torch.sqrt), "Exp": _unary(torch.exp), "Log": _unary(torch.log),
    "Reciprocal": _unary(torch.reciprocal), "Erf": _unary(torch.erf), "Tanh": _unary(torch.tanh),
    "Sigmoid": _unary(torch.sigmoid), "Relu": _unary(F.relu), "Softplus": _unary(F.softplus),
    "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil),
    "LeakyRelu": lambda x, a, opset: [F.leaky_relu(x[0], a.get("alpha", 0.01))],
    "HardSigmoid": lambda x, a, opset: [torch.clamp(a.get("alpha", 0.2) * x[0] + a.get("beta", 0.5), 0, 1)],
    "HardSwish": _unary(F.hardswish), "Gelu": _gelu, "Clip": _clip,
    "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "Transpose": lambda x, a, opset: [x[0].permute(a["perm"]) if "perm" in a else x[0].permute(
        *reversed(range(x[0].dim())))],
    "Reshape": _reshape, "Flatten": _flatten, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
    "Concat": lambda x, a, opset: [torch.cat(x, dim=a["axis"])], "Split": _split, "Slice": _slice,
    "Gather": _gather, "GatherElements": lambda x, a, opset: [torch.gather(x[0], a.get("axis", 0), torch.where(
        x[1] < 0, x[1] + x[0].shape[a.get("axis", 0)], x[1]).long())],
    "Expand": _expand, "Cast": _cast, "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Shape": lambda x, a, opset: [torch.tensor(list(x[0].shape)[a.get("start", 0):a.get("end")],
                                               dtype=torch.int64)],
    "Range": lambda x, a, opset: [torch.arange(x[0].item(), x[1].item(), x[2].item(), dtype=x[0].dtype)],
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce_sum,
    "ReduceMax": _reduce(lambda v, dim, keepdim: torch.amax(v, dim=dim, keepdim=keepdim)),
    "Gemm": _gemm, "Conv": _conv, "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda x, a, opset: [x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True)],
    "GlobalMaxPool": lambda x, a, opset: [torch.amax(x[0], dim=tuple(range(2, x[0].dim())), keepdim=True)],
    "LayerNormalization": _layer_norm, "BatchNormalization": _batch_norm, "Resize": _resize,
}


class TorchGraph:
    """A model's graph over torch tensors: `run(known, wanted)` evaluates the nodes the wanted
    tensors need from the known ones (and the initializers)."""

    def __init__(self, model: onnx.ModelProto, trainable: set[str] = frozenset()):
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.nodes = list(model.graph.node)
        self.producer = {out: i for i, node in enumerate(self.nodes) for out in node.output if out}
        self.attrs = [_attrs(node) for node in self.nodes]
        self.values: dict[str, torch.Tensor] = {}
        self.parameters: dict[str, torch.nn.Parameter] = {}
        for init in model.graph.initializer:
            array = numpy_helper.to_array(init)
            if init.name in trainable:
                self.parameters[init.name] = torch.nn.Parameter(to_torch(array.astype(np.float32)))
            else:
                self.values[init.name] = to_torch(array)
        self._plans: dict[tuple, list[int]] = {}

    def unsupported(self) -> list[str]:
        """The op types of the graph that have no torch function here."""
        return sorted({n.op_type for n in self.nodes if n.op_type not in OPS or n.domain not in ("", "ai.onnx")})

    def _plan(self, known: frozenset[str], wanted: tuple[str, ...]) -> list[int]:
        key = (known, wanted)
        if key not in self._plans:
            needed, stack = set(), list(wanted)
            have = set(known) | set(self.values) | set(self.parameters)
            while stack:
                name = stack.pop()
                if not name or name in have or name in needed:
                    continue
                if name not in self.producer:
                    raise KeyError(f"tensor {name!r} is neither given nor produced")
                i = self.producer[name]
                needed.add(name)
                stack.extend(self.nodes[i].input)
                needed.update(o for o in self.nodes[i].output if o)
            self._plans[key] = sorted({self.producer[n] for n in needed if n in self.producer})
        return self._plans[key]

    def run(self, known: dict[str, torch.Tensor], wanted: list[str]) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = {**self.values, **self.parameters, **known}
        for i in self._plan(frozenset(known), tuple(wanted)):
            node = self.nodes[i]
            inputs = [env[name] if name else None for name in node.input]
            if node.op_type not in OPS:
                raise UnsupportedOp(node.op_type)
            outputs = OPS[node.op_type](inputs, self.attrs[i], self.opset)
            env.update(zip(node.output, outputs))
        return {name: env[name] for name in wanted}
