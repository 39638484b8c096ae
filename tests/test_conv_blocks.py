"""The MLP-block form on convolutions (channel pruning with reconstruction): a ResNet bottleneck's
3x3 -> BN -> ReLU -> 1x1 and a MobileNet inverted residual's 1x1 -> ReLU6 -> depthwise 3x3 ->
ReLU6 -> 1x1, matched by passes.mlp_blocks and pruned by passes.prune_mlp, checked in ONNX Runtime
against the original."""

import numpy as np
import onnx
import pytest
from helpers import IR_VERSION, output_errors, pass_records
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.graph import import_graph
from onnx_lowrank.options import Options
from onnx_lowrank.passes.mlp_blocks import match_block

RNG = np.random.default_rng(3)
C_IN, C_OUT, SIZE = 8, 8, 12

#: As test_nystrom's EXACT_F32: the refit's ridge (1e-6 of the mean energy) and float32 rounding;
#: a wrong channel slice, depthwise group or bias is of order 1.
EXACT_F32 = 1e-3


def _init(name, values):
    return numpy_helper.from_array(np.asarray(values, np.float32), name)


def _duplicated(values, d):
    """Channels d/2.. repeat channels 0..d/2 on axis 0: half the channels reproduce the block."""
    values = np.array(values, np.float32)
    values[d // 2:] = values[:d // 2]
    return values


def _model(nodes, inits, c_out_size):
    graph = helper.make_graph(
        nodes, "convblock", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C_IN, SIZE, SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C_OUT, c_out_size, c_out_size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


def bottleneck(redundant=True, per_channel="bn"):
    """x -> Conv 3x3 (16 channels, bias) -> BatchNormalization | Mul/Add by [16,1,1] constants ->
    Relu -> Conv 1x1 (8 channels, bias) -> y."""
    d = 16
    dup = (lambda v: _duplicated(v, d)) if redundant else (lambda v: np.asarray(v, np.float32))
    w1 = dup(RNG.standard_normal((d, C_IN, 3, 3)) / 8)
    b1 = dup(RNG.standard_normal(d) / 4)
    inits = [_init("W1", w1), _init("B1", b1), _init("W2", RNG.standard_normal((C_OUT, d, 1, 1)) / 4),
             _init("B2", RNG.standard_normal(C_OUT))]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["h"], name="conv1", pads=[1, 1, 1, 1])]
    if per_channel == "bn":
        inits += [_init("scale", dup(RNG.uniform(0.5, 2, d))), _init("shift", dup(RNG.standard_normal(d) / 4)),
                  _init("mean", dup(RNG.standard_normal(d) / 4)), _init("var", dup(RNG.uniform(0.5, 2, d)))]
        nodes.append(helper.make_node("BatchNormalization", ["h", "scale", "shift", "mean", "var"], ["hn"], name="bn1"))
    else:
        inits += [_init("gamma", dup(RNG.uniform(0.5, 2, d)).reshape(d, 1, 1)),
                  _init("beta", dup(RNG.standard_normal(d) / 4).reshape(1, d, 1, 1))]
        nodes += [helper.make_node("Mul", ["h", "gamma"], ["hs"], name="scale1"),
                  helper.make_node("Add", ["hs", "beta"], ["hn"], name="shift1")]
    nodes += [helper.make_node("Relu", ["hn"], ["a"], name="relu1"),
              helper.make_node("Conv", ["a", "W2", "B2"], ["y"], name="conv2")]
    return _model(nodes, inits, SIZE)


def inverted_residual(stride=2):
    """x -> Conv 1x1 expand (32) -> Clip 0..6 -> depthwise Conv 3x3 (stride, bias) -> Clip -> Conv
    1x1 project (8, no bias) -> y."""
    d = 32
    inits = [_init("W1", _duplicated(RNG.standard_normal((d, C_IN, 1, 1)) / 3, d)),
             _init("Wdw", _duplicated(RNG.standard_normal((d, 1, 3, 3)) / 3, d)),
             _init("Bdw", _duplicated(RNG.standard_normal(d) / 4, d)),
             _init("W2", RNG.standard_normal((C_OUT, d, 1, 1)) / 4), _init("lo", 0.0), _init("hi", 6.0)]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["h"], name="expand"),
             helper.make_node("Clip", ["h", "lo", "hi"], ["a0"], name="relu6a"),
             helper.make_node("Conv", ["a0", "Wdw", "Bdw"], ["dw"], name="depthwise", group=d,
                              pads=[1, 1, 1, 1], strides=[stride, stride]),
             helper.make_node("Clip", ["dw", "lo", "hi"], ["a"], name="relu6b"),
             helper.make_node("Conv", ["a", "W2"], ["y"], name="project")]
    return _model(nodes, inits, (SIZE - 1) // stride + 1)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("convblock") / "calib.npz"
    np.savez(path, x=RNG.standard_normal((48, C_IN, SIZE, SIZE)).astype(np.float32))
    return str(path)


def _block(model, first):
    graph = import_graph(model)
    return match_block(next(n for n in graph.nodes if n.name == first), graph, Options())


def test_a_bottleneck_pair_is_a_block_with_its_bn_sliced():
    block = _block(bottleneck(), "conv1")
    assert block is not None and block.refusal is None, block and block.refusal
    assert block.conv and block.neurons == 16 and block.second.name == "conv2"
    # the conv's bias and the four BatchNormalization parameters hold one value per channel
    assert sorted((s.node.name, s.index, s.axis) for s in block.slices) == [
        ("bn1", 1, 0), ("bn1", 2, 0), ("bn1", 3, 0), ("bn1", 4, 0), ("conv1", 2, 0)]
    assert block.macs_in == C_IN * 9 and block.d_out == C_OUT


def test_an_inverted_residual_prunes_its_depthwise_conv_with_it():
    block = _block(inverted_residual(), "expand")
    assert block is not None and block.refusal is None, block and block.refusal
    assert [n.name for n in block.depthwise] == ["depthwise"] and block.stride == 4
    # the expansion runs at 4x the positions of the projection's input, the depthwise kernel at 1x
    assert block.macs_in == C_IN * 4 + 9


@pytest.mark.parametrize("build", [lambda: bottleneck(per_channel="bn"), lambda: bottleneck(per_channel="mul_add"),
                                   inverted_residual, lambda: inverted_residual(stride=1)],
                         ids=["bottleneck-bn", "bottleneck-scale-shift", "inverted-residual-s2",
                              "inverted-residual-s1"])
def test_pruned_conv_block_matches_the_original_in_ort(build, calib):
    """Half the channels repeat the other half: half of them reproduce the block, through ORT."""
    model = build()
    optimized, _, records = pass_records(model, "prune_mlp", calibration=calib, mlp_form="nystrom",
                                         rank_ratio=0.5, max_error="none", measure=False)
    assert [r.status for r in records] == ["decomposed", "decomposed"], [r.reason for r in records]
    d = records[0].weight_shape[0]
    assert records[0].rank == [d // 2] and "channels kept" in records[0].reason
    convs = [n for n in optimized.graph.node if n.op_type == "Conv"]
    weights = {t.name: list(t.dims) for t in optimized.graph.initializer}
    assert weights[convs[0].input[1]][0] == d // 2 and weights[convs[-1].input[1]][1] == d // 2
    groups = [a.i for n in convs for a in n.attribute if a.name == "group" and a.i > 1]
    assert groups in ([], [d // 2])
    assert len(optimized.graph.node) <= len(model.graph.node)       # no new node
    assert max(output_errors(model, optimized, {"N": 4})) < EXACT_F32


def test_a_lossy_conv_prune_keeps_the_output_close(calib):
    """Without redundancy, keeping 8 of 16 channels is a least-squares fit, not a wreck: the
    relative error on new inputs stays near the fit's own figure on the calibration samples."""
    model = bottleneck(redundant=False)
    optimized, _, records = pass_records(model, "prune_mlp", calibration=calib, mlp_form="nystrom",
                                         rank_ratio=0.5, max_error="none", measure=False)
    assert records[0].rank == [8]
    error = max(output_errors(model, optimized, {"N": 8}, seed=5))
    assert 1e-3 < error < 3 * records[1].activation_error + 0.05


def test_a_per_pixel_constant_of_more_axes_is_refused():
    """A constant of rank 5 between 4-D convs would move the channel axis."""
    model = bottleneck(per_channel="mul_add")
    gamma = next(t for t in model.graph.initializer if t.name == "gamma")
    gamma.CopyFrom(_init("gamma", np.ones((1, 1, 16, 1, 1))))
    graph = import_graph(model)
    block = match_block(next(n for n in graph.nodes if n.name == "conv1"), graph, Options())
    assert block is not None and "of shape [1, 1, 16, 1, 1]" in block.refusal


def test_a_reshaped_constant_bias_is_sliced(calib):
    """Paddle adds a conv's bias as Add(conv, Reshape(Constant [C], Constant shape)): a per-channel
    constant all the same, sliced with the channels."""
    model = bottleneck(per_channel="mul_add")
    beta = next(t for t in model.graph.initializer if t.name == "beta")
    values = numpy_helper.to_array(beta).reshape(-1)
    model.graph.initializer.remove(beta)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["beta_flat"], value=numpy_helper.from_array(values)))
    model.graph.node.insert(1, helper.make_node("Constant", [], ["beta_shape"],
                                                value=numpy_helper.from_array(np.array([1, 16, 1, 1], np.int64))))
    model.graph.node.insert(2, helper.make_node("Reshape", ["beta_flat", "beta_shape"], ["beta"]))
    onnx.checker.check_model(model, full_check=True)
    optimized, _, records = pass_records(model, "prune_mlp", calibration=calib, mlp_form="nystrom",
                                         rank_ratio=0.5, max_error="none", measure=False)
    assert [r.status for r in records] == ["decomposed", "decomposed"], [r.reason for r in records]
    assert max(output_errors(model, optimized, {"N": 4})) < EXACT_F32
