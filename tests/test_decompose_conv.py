"""decompose_conv: 1x1 convs by SVD (two 1x1 convs), larger kernels by Tucker-2 (1x1, core, 1x1),
for 2-D and 1-D convs with strides, dilations, pads and auto_pad, with and without bias.

Weights of exact channel ranks (4, 4) must be decomposed (ranks rounded up to 8) within EXACT
(see helpers); full-rank weights, grouped and depthwise convs must be left alone with a reason.
"""

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from helpers import EXACT, assert_rewrite, assert_unchanged, model_from_text, only
from models.synthetic import low_rank_matrix
from onnx_lowrank import optimize
from onnx_lowrank.numerics import ranks as R

OUT, IN = 40, 48
# this pass alone: the structure asserted is its rewrite, not what the merge passes make of it
ISOLATED = {"skip": only("decompose")}


def tucker_weight(out_ch, in_ch, kernel, ranks=(4, 4), seed=0):
    """[out_ch, in_ch, *kernel] with exact channel-mode ranks `ranks`."""
    rng = np.random.default_rng(seed)
    core = rng.standard_normal((*ranks, *kernel))
    w = np.einsum("rs...,or,is->oi...", core, rng.standard_normal((out_ch, ranks[0])),
                  rng.standard_normal((in_ch, ranks[1])))
    return (w / np.sqrt(in_ch * np.prod(kernel))).astype(np.float32)


# name: (kernel, attributes, input spatial size)
FORMS = {
    "1x1": ((1, 1), "", (6, 6)),
    "1x1 strided, padded": ((1, 1), "strides=[2, 2], pads=[1, 0, 1, 2]", (7, 7)),
    "1x1 SAME_UPPER stride 2": ((1, 1), 'auto_pad="SAME_UPPER", strides=[2, 2]', (7, 7)),
    "3x3": ((3, 3), "", (8, 8)),
    "3x3 padded": ((3, 3), "pads=[1, 1, 1, 1]", (8, 8)),
    "3x3 asymmetric pads": ((3, 3), "pads=[0, 1, 2, 1]", (8, 8)),
    "3x3 strided": ((3, 3), "strides=[2, 2], pads=[1, 1, 1, 1]", (9, 9)),
    "3x3 dilated": ((3, 3), "dilations=[2, 2], pads=[2, 2, 2, 2]", (8, 8)),
    "3x3 SAME_UPPER stride 2": ((3, 3), 'auto_pad="SAME_UPPER", strides=[2, 2]', (9, 9)),
    "5x3 kernel_shape given": ((5, 3), "kernel_shape=[5, 3], pads=[2, 1, 2, 1]", (8, 8)),
    "1-D k=3": ((3,), "pads=[1, 1], strides=[2]", (20,)),
    "1-D 1x1": ((1,), "", (20,)),
}


def conv_model(kernel, attrs, spatial, weight, bias):
    dims = ", ".join(f"S{i}" for i in range(len(spatial)))
    operands = "x, W, b" if bias else "x, W"
    attrs = f" <{attrs}>" if attrs else ""
    text = f"(float[N, {IN}, {dims}] x) => (float[N, {OUT}, {dims}] y) {{ [conv] y = Conv{attrs} ({operands}) }}"
    weights = {"W": weight}
    if bias:
        weights["b"] = np.linspace(-1, 1, OUT, dtype=np.float32)
    return model_from_text(text, **weights)


@pytest.mark.parametrize("bias", (True, False), ids=("bias", "no bias"))
@pytest.mark.parametrize("form", FORMS)
def test_exactly_low_rank_conv_is_decomposed_near_losslessly(form, bias):
    kernel, attrs, spatial = FORMS[form]
    one_by_one = all(k == 1 for k in kernel)
    weight = (low_rank_matrix(np.random.default_rng(0), OUT, IN, 4, noise=0).reshape(OUT, IN, *kernel)
              if one_by_one else tucker_weight(OUT, IN, kernel))
    model = conv_model(kernel, attrs, spatial, weight, bias)
    dims = {"N": 2, **{f"S{i}": s for i, s in enumerate(spatial)}}
    optimized, report = assert_rewrite(model, **ISOLATED, ops={"Conv": 2 if one_by_one else 3}, max_error=EXACT, dims=dims)
    (layer,) = report.layers
    assert layer.method == ("svd" if one_by_one else "tucker2")
    assert layer.rank == ([8] if one_by_one else [8, 8])
    assert layer.weight_error < 1e-6
    convs = list(optimized.graph.node)
    # the bias moves to the last stage; the original geometry stays on the stage with the kernel
    assert [len(n.input) for n in convs] == [2] * (len(convs) - 1) + [3 if bias else 2]
    geometry = {a.name for a in model.graph.node[0].attribute} - {"group"}
    spatial_stage = convs[0] if one_by_one else convs[1]
    assert {a.name for a in spatial_stage.attribute} >= geometry - ({"dilations"} if one_by_one else set())
    kernels = [list(next(t for t in optimized.graph.initializer if t.name == n.input[1]).dims[2:]) for n in convs]
    ones = [1] * len(kernel)
    assert kernels == ([ones, ones] if one_by_one else [ones, list(kernel), ones])


@pytest.mark.parametrize("form", ["1x1", "3x3 padded", "1-D k=3"])
def test_full_rank_conv_is_left_alone(form):
    kernel, attrs, spatial = FORMS[form]
    weight = np.random.default_rng(0).standard_normal((OUT, IN, *kernel)).astype(np.float32)
    report = assert_unchanged(conv_model(kernel, attrs, spatial, weight, bias=True), **ISOLATED)
    (layer,) = report.layers
    assert layer.op == "Conv" and layer.status == "skipped"
    # 1x1: a 40 x 48 matrix, break-even 40 * 48 / 88 = 21.8; larger kernels: the Tucker-2 MAC count
    expected = "break-even 22 less 10%" if max(kernel) == 1 else "of the dense MACs; needs <= 90%"
    assert expected in layer.reason


@pytest.mark.parametrize("group", (2, IN), ids=("grouped", "depthwise"))
def test_grouped_and_depthwise_convs_are_left_alone(group):
    out_ch = IN if group == IN else OUT
    weight = np.zeros((out_ch, IN // group, 3, 3), np.float32)
    weight[:, 0, 1, 1] = 1.0   # rank 1: decomposable if the group were ignored
    model = model_from_text(f"(float[N, {IN}, 8, 8] x) => (float[N, {out_ch}, 8, 8] y) "
                            f"{{ [conv] y = Conv <group={group}, pads=[1, 1, 1, 1]> (x, W) }}", W=weight)
    report = assert_unchanged(model, **ISOLATED)
    (layer,) = report.layers
    assert layer.reason == f"group={group}: grouped and depthwise convs are left alone"


def test_conv_with_an_activation_weight_is_not_a_candidate():
    model = model_from_text(f"(float[N, {IN}, 8, 8] x, float[{OUT}, {IN}, 1, 1] w) => (float[N, {OUT}, 8, 8] y) "
                            "{ y = Conv(x, w) }")
    assert assert_unchanged(model, **ISOLATED).layers == []


def test_conv_chain_reports_macs_at_the_concrete_shapes():
    """MACs per output pixel times output pixels at the report's shapes (batch 1 by default)."""
    kernel, attrs, spatial = FORMS["3x3 strided"]
    model = conv_model(kernel, attrs, spatial, tucker_weight(OUT, IN, kernel), bias=True)
    _, report = assert_rewrite(model, **ISOLATED, ops={"Conv": 3}, max_error=EXACT, shape={"x": [1, IN, 9, 9]})
    (layer,) = report.layers
    assert layer.positions == 5 * 5
    assert layer.macs_before == OUT * IN * 9
    assert layer.macs_after == 4 * IN * 8 + 8 * 8 * 9 + 8 * OUT
    assert layer.params_after == IN * 8 + 8 * 8 * 9 + 8 * OUT


@given(st.integers(1, 24), st.integers(1, 24), st.sampled_from([(1, 1), (3, 3), (2, 3), (3,), (1,)]),
       st.integers(1, 2), st.integers(1, 24), st.booleans(), st.integers(0, 2**16))
def test_any_conv_at_its_true_ranks_is_exact_or_left_alone(out_ch, in_ch, kernel, stride, rank, bias, seed):
    """--rank at the weight's true channel ranks: decomposed exactly when it pays, else untouched."""
    ranks = (min(rank, out_ch), min(rank, in_ch))
    one_by_one = max(kernel) == 1
    if one_by_one:
        ranks = (min(ranks),) * 2
    weight = tucker_weight(out_ch, in_ch, kernel, ranks, seed)
    pads = ", ".join(str(k // 2) for k in kernel * 2)
    strides = ", ".join([str(stride)] * len(kernel))
    in_dims, out_dims = ", ".join(["7"] * len(kernel)), ", ".join(["?"] * len(kernel))
    operands = "x, W, b" if bias else "x, W"
    model = model_from_text(f"(float[N, {in_ch}, {in_dims}] x) => (float[N, {out_ch}, {out_dims}] y) "
                            f"{{ y = Conv <pads=[{pads}], strides=[{strides}]> ({operands}) }}",
                            W=weight, b=np.linspace(-1, 1, out_ch, dtype=np.float32))
    options = {"rank": rank, "rank_multiple": 1, "min_flop_reduction": 0.0}
    if one_by_one:
        pays = ranks[0] * (out_ch + in_ch) <= out_ch * in_ch
    else:
        pays = R.tucker2_pays(out_ch, in_ch, int(np.prod(kernel)), stride ** len(kernel), *ranks, 0.0)
    event("decomposed" if pays else "left alone")
    if pays:
        _, report = assert_rewrite(model, **ISOLATED, ops={"Conv": 2 if one_by_one else 3}, max_error=EXACT, **options)
        assert report.layers[0].rank == ([ranks[0]] if one_by_one else list(ranks))
    else:
        assert assert_unchanged(model, **ISOLATED, **options).layers[0].reason


def test_same_model_and_options_give_byte_identical_output():
    kernel, attrs, spatial = FORMS["3x3 strided"]
    model = conv_model(kernel, attrs, spatial, tucker_weight(OUT, IN, kernel), bias=True)
    first, _ = optimize(model, validate=False, **ISOLATED)
    second, _ = optimize(model, validate=False, **ISOLATED)
    assert first.SerializeToString() == second.SerializeToString()
