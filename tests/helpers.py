"""The one shared test helper: build a tiny model, run a rewrite, check structure and parity in ORT.

    from helpers import EXACT, assert_rewrite, model_from_text, only
    from models.synthetic import low_rank_matrix

    model = model_from_text("(float[N, 64] x) => (float[N, 48] y) { [fc] y = MatMul(x, W) }",
                            W=low_rank_matrix(np.random.default_rng(0), 64, 48, rank=4, noise=0))
    optimized, report = assert_rewrite(model, ops={"MatMul": 2}, max_error=EXACT, skip=only("decompose"))

The parity oracle here is ONNX Runtime called directly, not onnx_lowrank's own parity check, so
a bug there cannot hide a bug in a rewrite.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
from onnx import numpy_helper

from onnx_lowrank import optimize
from onnx_lowrank.cli import main
from onnx_lowrank.passes import PIPELINE

IR_VERSION = 8     # ONNX Runtime 1.31 refuses the IR 14 that onnx 1.23's helpers write
OPSET = 17

#: Output error of a rewrite of an exactly low-rank weight. The float64 SVD is exact to ~1e-15;
#: what remains is float32: the factors are rounded once each (~6e-8 relative) and the products
#: are summed in a different order through the rank-r bottleneck (~sqrt(K) eps ~ 1e-6 for the
#: sizes used in tests). 1e-5 is ten times that; a wrong transpose, a dropped alpha/beta/bias, a
#: lost stride or pad gives an error of order 1.
EXACT = 1e-5


def only(*stages: str) -> list[str]:
    """The `skip` list that runs just the passes of `stages`, e.g. optimize(model, skip=only("decompose")):
    a test of one pass then sees that pass's rewrite, not what the merge passes make of it after."""
    return [entry.name for entry in PIPELINE if entry.stage not in stages]


def model_from_text(graph: str, **weights: np.ndarray) -> onnx.ModelProto:
    """A model from a graph in onnx.parser syntax, `(inputs) => (outputs) { nodes }` (give node
    names as `[name] y = Op(x)`), at IR 8 opset 17, with `weights` as initializers.

    The model passes onnx.checker's full check, so a test failure is never a malformed input.
    """
    model = onnx.parser.parse_model(f'<ir_version: {IR_VERSION}, opset_import: ["" : {OPSET}]>\ntiny {graph}')
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in weights.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(node.op_type for node in model.graph.node))


def make_feeds(model: onnx.ModelProto, dims: dict[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard normal floats, integers in [0, 10), fair-coin bools; a symbolic dim takes its value
    from `dims` (default 3)."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (dims or {}).get(d.dim_param, 3) for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        if dtype.kind == "f":
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[value.name] = rng.random(shape) < 0.5
        else:
            feeds[value.name] = rng.integers(0, 10, shape).astype(dtype)
    return feeds


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs on the CPU provider with graph optimizations off: ORT's own fusions would otherwise
    reassociate the dense and the factorized model differently."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """||y - y0|| / ||y0||, the figure optimize's parity check reports, in float64."""
    y, y0 = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(y - y0) / np.linalg.norm(y0))


def output_errors(original: onnx.ModelProto, optimized: onnx.ModelProto, dims: dict[str, int] | None = None,
                  seed: int = 0) -> list[float]:
    """Relative error of each output of `optimized` against `original`, on the same inputs."""
    feeds = make_feeds(original, dims, seed)
    return [relative_error(y, y0) for y, y0 in zip(run_ort(optimized, feeds), run_ort(original, feeds))]


def assert_interface_kept(original: onnx.ModelProto, optimized: onnx.ModelProto) -> None:
    """What a deployment pipeline relies on is unchanged: graph inputs and outputs (names, types,
    shapes and dynamic dims), IR version and opset imports."""
    def interface(model):
        weights = {t.name for t in model.graph.initializer}
        return ([v.SerializeToString() for v in model.graph.input if v.name not in weights],
                [v.SerializeToString() for v in model.graph.output])
    assert interface(optimized) == interface(original)
    assert optimized.ir_version == original.ir_version
    assert list(optimized.opset_import) == list(original.opset_import)


def assert_rewrite(model: onnx.ModelProto, *, ops: dict[str, int] | None, max_error: float,
                   dims: dict[str, int] | None = None, **options):
    """optimize(model, **options) must change the graph, pass the full checker, have exactly the op
    histogram `ops` (None: skip that check) and keep every output within `max_error` of the original
    in ORT. Parity is checked here, so optimize's own check is off unless `validate=True` is given.
    Returns (optimized, report)."""
    options.setdefault("validate", False)
    optimized, report = optimize(model, **options)
    assert report.changed, f"graph unchanged: {[(r.name, r.status, r.reason) for r in report.layers]}"
    onnx.checker.check_model(optimized, full_check=True)
    assert_interface_kept(model, optimized)
    if ops is not None:
        assert op_counts(optimized) == ops
    errors = output_errors(model, optimized, dims)
    assert max(errors) <= max_error, f"relative output errors {errors} > {max_error:g}"
    return optimized, report


def assert_unchanged(model: onnx.ModelProto, **options):
    """optimize(model, **options) must decline every layer, say why, and return the model as it was,
    byte for byte. Returns the report."""
    options.setdefault("validate", False)
    optimized, report = optimize(model, **options)
    assert not report.decomposed
    assert all(r.reason for r in report.layers), [(r.name, r.reason) for r in report.layers]
    assert any("unchanged" in note or "nothing to decompose" in note for note in report.notes), report.notes
    assert optimized.SerializeToString() == model.SerializeToString()
    return report


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `onnx-lowrank ARGV`, run in-process (argv items may be paths
    or numbers). `capsys` is pytest's fixture."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def pass_records(model: onnx.ModelProto, pass_name: str, **options):
    """optimize(model, **options) with its own parity check off (the caller checks parity with
    output_errors); the result must pass the full checker. Returns (optimized, report, the records
    of pass `pass_name`)."""
    options.setdefault("validate", False)
    optimized, report = optimize(model, **options)
    onnx.checker.check_model(optimized, full_check=True)
    return optimized, report, [r for r in report.layers if r.pass_name == pass_name]


def scaled_weight(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Gaussian float32 weights scaled by 1/sqrt(fan-in), a matrix [I, O] or a conv [O, I, *k], so
    activations stay O(1) through a chain of layers."""
    fan_in = shape[0] if len(shape) == 2 else np.prod(shape[1:])
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
