"""passes/candidates.py: which nodes the decompose passes consider, and the reason a matched one is
refused; calibration captures exactly the candidates the passes do not refuse."""

import ml_dtypes
import numpy as np
from helpers import model_from_text

from onnx_lowrank.calibration import capture_specs
from onnx_lowrank.graph import import_graph
from onnx_lowrank.options import Options
from onnx_lowrank.passes.candidates import match

RNG = np.random.default_rng(0)
W = RNG.standard_normal((16, 8)).astype(np.float32)
MODEL = model_from_text(
    "(float[N, 16] x, float[4, 16, 6, 6] img) => (float[N, 8] y, float[N, 8] z, float[8, N] t, "
    "float[4, 16, 4, 4] c, float[4, 16, 4, 4] d) {"
    " [fc] y = MatMul(x, W) [gemm] z = Gemm<transB = 1>(x, WT) xt = Transpose(x) [left] t = MatMul(WT, xt)"
    " [conv] c = Conv(img, K) [grouped] d = Conv<group = 4>(img, G) }",
    W=W, WT=W.T.copy(), K=RNG.standard_normal((16, 16, 3, 3)).astype(np.float32),
    G=RNG.standard_normal((16, 4, 3, 3)).astype(np.float32))


def candidates(model, **options):
    graph = import_graph(model)
    return {node.name: match(node, Options(**options)) for node in graph.nodes}


def test_the_pattern_names_the_weight_the_activations_and_their_axis():
    found = candidates(MODEL)
    assert found["fc"].weight.name == "W" and found["fc"].x.name == "x" and found["fc"].axis == -1
    assert found["gemm"].weight.name == "WT" and found["gemm"].axis == -1
    assert found["left"].weight_first and found["left"].x.name == "xt" and found["left"].axis == -2
    assert found["conv"].axis == 1 and found["conv"].conv.kernel == (3, 3)
    assert all(c.refusal is None for name, c in found.items() if name in ("fc", "gemm", "left", "conv"))
    assert [c for name, c in found.items() if name not in ("fc", "gemm", "left", "conv", "grouped")] == [None]


def test_refusals_carry_the_reason_the_report_gives():
    found = candidates(MODEL, exclude="^fc$")
    assert found["fc"].refusal == "excluded by --include/--exclude"
    assert found["grouped"].refusal == "group=4: grouped and depthwise convs are left alone"
    assert candidates(MODEL, ops="matmul")["conv"] is None     # --ops leaves it out: not a candidate


def test_a_refused_weight_type_gets_no_gram():
    model = model_from_text("(bfloat16[N, 16] x, float[N, 16] u) => (bfloat16[N, 8] y, float[N, 8] v) "
                            "{ [bf] y = MatMul(x, B) [fp] v = MatMul(u, W) }",
                            B=W.astype(ml_dtypes.bfloat16), W=W)
    found = candidates(model)
    assert "bfloat16 weight" in found["bf"].refusal and found["fp"].refusal is None
    assert [s.layer for s in capture_specs(import_graph(model), Options())] == ["fp"]
