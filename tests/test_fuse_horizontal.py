"""fuse_horizontal: MatMuls reading one input become one MatMul on the concatenated weights and a
Split, exactly; MatMuls on other inputs or with computed weights are left alone."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import model_from_text, op_counts, output_errors

from models.synthetic import qkv_model
from onnx_lowrank import optimize
from onnx_lowrank.passes.fuse_horizontal import NAME

#: Each column block of x [A | B] is computed as x A is: equal up to the kernel's blocking, ~1e-7.
FUSE_EXACT = 1e-5


def test_decomposed_qkv_first_factors_share_one_matmul():
    model = qkv_model(hidden=128, rank=16)
    unfused, _ = optimize(model, validate=False)                  # off by default
    fused, report = optimize(model, validate=False, fuse_horizontal=True)
    onnx.checker.check_model(fused, full_check=True)
    assert op_counts(unfused) == {"MatMul": 6}
    assert op_counts(fused) == {"MatMul": 4, "Split": 1}
    (record,) = [r for r in report.layers if r.pass_name == NAME]
    assert record.status == "fused" and record.weight_shape == [128, 48]
    readers = [n for n in fused.graph.node if "x" in n.input]
    assert [n.op_type for n in readers] == ["MatMul"]
    assert max(output_errors(unfused, fused, dims={"batch": 2, "seq": 5})) <= FUSE_EXACT
    assert max(output_errors(model, fused, dims={"batch": 2, "seq": 5})) <= 1e-3   # the decomposition's error


def test_split_sizes_are_an_attribute_before_opset_13():
    rng = np.random.default_rng(1)
    model = onnx.parser.parse_model("""<ir_version: 7, opset_import: ["" : 11]>
        tiny (float[N, 16] x) => (float[N, 4] a, float[N, 6] b) {
            [pa] a = MatMul(x, A)
            [pb] b = MatMul(x, B)
        }""")
    model.graph.initializer.extend([onnx.numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "A"),
                                    onnx.numpy_helper.from_array(rng.standard_normal((16, 6)).astype(np.float32), "B")])
    fused, _ = optimize(model, validate=False, ops="conv", fuse_horizontal=True)
    onnx.checker.check_model(fused, full_check=True)
    (split,) = [n for n in fused.graph.node if n.op_type == "Split"]
    assert len(split.input) == 1 and [list(a.ints) for a in split.attribute if a.name == "split"] == [[4, 6]]
    assert max(output_errors(model, fused)) <= FUSE_EXACT


def test_matmuls_on_other_inputs_or_with_computed_weights_stay():
    rng = np.random.default_rng(2)
    model = model_from_text("""(float[N, 16] x, float[N, 16] z, float[16, 8] w)
                               => (float[N, 8] a, float[N, 8] b, float[N, 8] c) {
        [pa] a = MatMul(x, A)
        [pb] b = MatMul(z, B)
        [pc] c = MatMul(x, w)
    }""", A=rng.standard_normal((16, 8)).astype(np.float32), B=rng.standard_normal((16, 8)).astype(np.float32))
    optimized, report = optimize(model, validate=False, ops="conv", fuse_horizontal=True)
    assert op_counts(optimized) == {"MatMul": 3}
    assert not [r for r in report.layers if r.pass_name == NAME]
