"""Graph shapes real exporters produce (issue 4): each one decomposed, or left alone with a reason,
and checked for parity in ONNX Runtime against the original."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import EXACT, assert_rewrite, model_from_text, op_counts, output_errors
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from models.synthetic import low_rank_conv_weight, low_rank_matrix
from onnx_lowrank import optimize

RNG = np.random.default_rng(7)
W64x96 = low_rank_matrix(RNG, 64, 96, 8, noise=0)
#: float16 weights and activations round every product to ~5e-4 relative; the issue's bound is 1e-2.
FP16_MAX_ERROR = 1e-2


def _model(nodes, inputs, outputs, initializers=(), ir=8, opsets=(("", 17),)):
    graph = h.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = h.make_model(graph, opset_imports=[h.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = ir
    return model


def test_weight_behind_constant_transpose_and_cast_is_folded_and_decomposed():
    nodes = [h.make_node("Constant", [], ["wt16"], value=nh.from_array(W64x96.T.astype(np.float16), "c")),
             h.make_node("Transpose", ["wt16"], ["w16"], perm=[1, 0]),
             h.make_node("Cast", ["w16"], ["w"], to=T.FLOAT),
             h.make_node("Identity", ["w"], ["w_id"]),
             h.make_node("MatMul", ["x", "w_id"], ["y"], name="fc")]
    model = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["n", 64])],
                   [h.make_tensor_value_info("y", T.FLOAT, ["n", 96])])
    # the weight went through float16, so it is rank 8 plus ~3e-4 relative rounding noise; its
    # factors are stored in float16 too, behind Casts, as the weight was
    optimized, report = assert_rewrite(model, ops={"MatMul": 2, "Cast": 2}, max_error=2e-3)
    assert report.layers[0].rank == [8]
    assert {t.data_type for t in optimized.graph.initializer} == {T.FLOAT16}


def test_shape_constants_are_not_folded():
    model = model_from_text("""(float[N, 64] x) => (float[N, 8, 12] y) {
        [fc] h = MatMul(x, W)
        s = Constant<value = int64[3] {-1, 8, 12}>()
        y = Reshape(h, s)
    }""", W=W64x96)
    optimized, _ = assert_rewrite(model, ops={"MatMul": 2, "Constant": 1, "Reshape": 1}, max_error=EXACT)


def test_weight_first_operand_of_matmul():
    model = model_from_text("(float[96, N] x) => (float[64, N] y) { [fc] y = MatMul(W, x) }", W=W64x96)
    assert_rewrite(model, ops={"MatMul": 2}, max_error=EXACT)


def _three_readers_of_w(third: str) -> onnx.ModelProto:
    return model_from_text(f"""(float[N, 64] x, float[N, 64] z) => (float[N, 96] y, float[N, 96] v, float[N, 96] u) {{
        [a] y = MatMul(x, W)
        [b] v = MatMul(z, W)
        [{third}] u = MatMul(x, W)
    }}""", W=W64x96)


def test_shared_weight_is_factorized_once():
    model = _three_readers_of_w("c")
    # horizontal fusion would concatenate the factors: off, to see the sharing itself
    optimized, report = assert_rewrite(model, ops={"MatMul": 6}, max_error=EXACT, skip=("fuse_horizontal",))
    names = [t.name for t in optimized.graph.initializer]
    assert sorted(names) == ["W_lowrank_a", "W_lowrank_b"], names   # one pair of factors, W gone
    assert [r.reason for r in report.candidates[1:]] == ["shares the factors of a"] * 2


def test_shared_weight_that_a_dense_reader_keeps_is_not_factorized():
    """Factorizing a and b while 'keep' still reads W would add the factors' bytes to W's."""
    model = _three_readers_of_w("keep")
    optimized, report = optimize(model, exclude="keep", skip=("fuse_horizontal",), validate=False)
    assert optimized.SerializeToString() == model.SerializeToString()
    reasons = {r.name: r.reason for r in report.candidates}
    assert reasons["a"] == reasons["b"] == ("kept dense: its factors (5,120 B) would outweigh what they free of "
                                            "weight 'W' (0 B; another reader keeps it)")


def test_float16_weights_and_activations():
    model = model_from_text("(float16[N, 64] x) => (float16[N, 96] y) { [fc] y = MatMul(x, W) }",
                            W=W64x96.astype(np.float16))
    optimized, report = assert_rewrite(model, ops={"MatMul": 2}, max_error=FP16_MAX_ERROR)
    assert {t.data_type for t in optimized.graph.initializer} == {T.FLOAT16}
    assert report.parity is None


def test_float16_conv_tucker():
    w = low_rank_conv_weight(RNG, 32, 32, 3, (8, 8), noise=0).astype(np.float16)
    model = model_from_text("(float16[N, 32, 8, 8] x) => (float16[N, 32, 8, 8] y) { [c] y = Conv<pads=[1,1,1,1]>(x, W) }", W=w)
    assert_rewrite(model, ops={"Conv": 3}, max_error=FP16_MAX_ERROR)


def test_bfloat16_weight_is_left_alone_with_a_reason():
    import ml_dtypes

    model = model_from_text("(bfloat16[N, 64] x) => (bfloat16[N, 96] y) { [fc] y = MatMul(x, W) }",
                            W=W64x96.astype(ml_dtypes.bfloat16))
    optimized, report = optimize(model, validate=False)
    assert optimized.SerializeToString() == model.SerializeToString()
    assert "bfloat16 weight" in report.layers[0].reason


def test_quantized_graph_is_left_alone_with_a_note():
    q = np.clip(np.round(W64x96 * 40), -127, 127).astype(np.int8)
    model = model_from_text("""(float[N, 64] x) => (float[N, 96] y) {
        w = DequantizeLinear(Q, S, Z)
        [fc] y = MatMul(x, w)
    }""", Q=q, S=np.array(0.025, np.float32), Z=np.array(0, np.int8))
    optimized, report = optimize(model)
    assert optimized.SerializeToString() == model.SerializeToString()
    assert any("quantized ops left alone: 1 DequantizeLinear" in n for n in report.notes), report.notes
    assert report.parity is None   # nothing changed: nothing to run


@pytest.mark.parametrize("op", ["If", "Loop"])
def test_nodes_in_subgraphs_use_outer_scope_weights(op):
    body_out = h.make_tensor_value_info("t", T.FLOAT, None)
    matmul = h.make_node("MatMul", ["x", "W"], ["t"], name="inner_fc")
    if op == "If":
        then = h.make_graph([matmul], "then", [], [body_out])
        other = h.make_graph([h.make_node("MatMul", ["x", "W"], ["e0"], name="else_fc"),
                              h.make_node("Relu", ["e0"], ["t"])], "else", [], [body_out])
        nodes = [h.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="if")]
        extra = [h.make_tensor_value_info("c", T.BOOL, [])]
        out = h.make_tensor_value_info("y", T.FLOAT, ["n", 96])
        layers = 2
    else:
        body = h.make_graph([h.make_node("Identity", ["cond_in"], ["cond_out"]), matmul], "body",
                            [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, [])],
                            [h.make_tensor_value_info("cond_out", T.BOOL, []), body_out])
        nodes = [h.make_node("Constant", [], ["trip"], value=nh.from_array(np.array(2, np.int64))),
                 h.make_node("Constant", [], ["cond"], value=nh.from_array(np.array(True))),
                 h.make_node("Loop", ["trip", "cond"], ["y"], body=body, name="loop")]
        extra = []
        out = h.make_tensor_value_info("y", T.FLOAT, [2, "n", 96])
        layers = 1
    model = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["n", 64]), *extra], [out],
                   [nh.from_array(W64x96, "W")])
    onnx.checker.check_model(model, full_check=True)
    optimized, report = optimize(model)
    assert len(report.decomposed) == layers
    onnx.checker.check_model(optimized, full_check=True)
    assert report.parity.passed, report.parity
    feeds_dims = {"n": 3}
    if op == "If":
        for branch in (True, False):
            from helpers import relative_error, run_ort
            x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
            feeds = {"x": x, "c": np.array(branch)}
            assert relative_error(run_ort(optimized, feeds)[0], run_ort(model, feeds)[0]) <= EXACT
    else:
        assert max(output_errors(model, optimized, feeds_dims)) <= EXACT


@pytest.mark.parametrize("ir,opset", [(4, 9), (5, 10), (6, 11), (7, 12), (7, 13), (8, 14), (8, 15), (8, 17), (9, 19), (10, 20), (10, 21)])
def test_ir_versions_and_opsets_are_kept(ir, opset):
    conv = low_rank_conv_weight(RNG, 32, 16, 3, (8, 8), noise=0)
    gemm = low_rank_matrix(RNG, 64, 512, 8, noise=0)
    nodes = [h.make_node("Conv", ["x", "C"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             h.make_node("Flatten", ["c"], ["f"]),
             h.make_node("Gemm", ["f", "G", "bias"], ["g"], transB=1, name="gemm"),
             h.make_node("MatMul", ["g", "W"], ["m"], name="mm"),
             h.make_node("Transpose", ["m"], ["gt"]),
             h.make_node("Gemm", ["gt", "W2", "bias2"], ["y"], transA=1, transB=1, name="gemm_ta")]
    model = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["n", 16, 4, 4])],
                   [h.make_tensor_value_info("y", T.FLOAT, ["n", 64])],
                   [nh.from_array(conv, "C"), nh.from_array(gemm, "G"), nh.from_array(W64x96[:, :96], "W"),
                    nh.from_array(np.ones(64, np.float32), "bias"), nh.from_array(np.ones(64, np.float32), "bias2"),
                    nh.from_array(W64x96, "W2")],
                   ir=ir, opsets=(("", opset),))
    # Gemm needs C before opset 11, so every Gemm here has one; merging would hide the factors
    optimized, report = assert_rewrite(model, ops=None, max_error=EXACT, skip=("merge_linear", "merge_factors"))
    assert len(report.decomposed) == 4
    assert optimized.ir_version == ir
    assert [(o.domain, o.version) for o in optimized.opset_import] == [("", opset)]


def test_custom_domain_ops_are_left_alone():
    model = _model([h.make_node("MatMul", ["x", "W"], ["m"], name="fc"),
                    h.make_node("Gelu", ["m"], ["y"], domain="com.microsoft", name="gelu")],
                   [h.make_tensor_value_info("x", T.FLOAT, ["n", 64])],
                   [h.make_tensor_value_info("y", T.FLOAT, ["n", 96])], [nh.from_array(W64x96, "W")],
                   opsets=(("", 17), ("com.microsoft", 1)))
    optimized, report = optimize(model)
    assert op_counts(optimized) == {"MatMul": 2, "Gelu": 1}
    assert report.parity.passed
    assert [(o.domain, o.version) for o in optimized.opset_import] == [("", 17), ("com.microsoft", 1)]


def test_unknown_dims_missing_output_shapes_and_odd_names():
    name = "enc/layer.0:fc weight (ü)"
    model = _model([h.make_node("MatMul", ["in put:0", name], ["out/put"], name="node with spaces/ü:0")],
                   [h.make_tensor_value_info("in put:0", T.FLOAT, [None, "seq", 64])],
                   [h.make_tensor_value_info("out/put", T.FLOAT, [None, None, None])], [nh.from_array(W64x96, name)])
    optimized, report = assert_rewrite(model, ops={"MatMul": 2}, max_error=EXACT, validate=True)
    assert report.parity.passed
    assert [i.name for i in optimized.graph.input] == ["in put:0"]
    assert [o.name for o in optimized.graph.output] == ["out/put"]
    dims = optimized.graph.input[0].type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value") and dims[1].dim_param == "seq"


def test_nothing_to_decompose_says_why_and_keeps_the_model():
    model = model_from_text("(float[N, 64] x) => (float[N, 64] y) { y = Relu(x) }")
    optimized, report = optimize(model)
    assert optimized.SerializeToString() == model.SerializeToString()
    assert report.notes[0] == "nothing to decompose: no MatMul, Gemm or Conv node with a constant weight was found"
    assert report.parity is None


def test_a_folded_weight_that_stays_dense_keeps_its_chain():
    """fp16 weight -> Cast feeding a full-rank layer: that layer is not decomposed, so its weight
    stays float16 behind its Cast, while the low-rank layer beside it is decomposed."""
    full = np.random.default_rng(1).standard_normal((96, 96)).astype(np.float16)
    model = model_from_text("""(float[N, 64] x) => (float[N, 96] y) {
        [low] h = MatMul(x, W)
        wf = Cast<to=1>(F16)
        [full] y = MatMul(h, wf)
    }""", W=W64x96, F16=full)
    optimized, report = assert_rewrite(model, ops={"MatMul": 3, "Cast": 1}, max_error=EXACT,
                                       skip=("merge_linear", "merge_factors"))
    assert [r.status for r in report.candidates] == ["decomposed", "skipped"]
    kept = {t.name: t.data_type for t in optimized.graph.initializer}
    assert kept["F16"] == T.FLOAT16 and "wf" not in kept
