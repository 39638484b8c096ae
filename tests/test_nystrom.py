"""The MLP-block form: neuron selection and the least-squares refit on arrays (numerics.nystrom),
the block matcher (passes.mlp_blocks) on every activation pattern and its refusals, the pass
(passes.prune_mlp) against ONNX Runtime, and the choice of forms in the allocation."""

import numpy as np
import onnx
import pytest
from helpers import IR_VERSION, output_errors, pass_records, relative_error, run_cli
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank import optimize
from onnx_lowrank.calibration import capture_specs, collect_grams, load_calibration
from onnx_lowrank.data_aware.allocate import mlp_forms
from onnx_lowrank.errors import OptionError
from onnx_lowrank.graph import import_graph
from onnx_lowrank.numerics.nystrom import SELECTIONS, neurons_for_rule, refit, select_neurons
from onnx_lowrank.numerics.ranks import RankRule
from onnx_lowrank.options import Options
from onnx_lowrank.passes.mlp_blocks import match_block
from onnx_lowrank.rank_allocation import (BlockForms, BlockState, LayerSpectrum, NeuronSpectrum, allocate_ranks,
                                         layer_ranks)

RNG = np.random.default_rng(0)

#: The refit solves with a ridge of 1e-6 x the mean activation energy (numerics.nystrom.RIDGE),
#: which shrinks the fit by about that ridge over the smallest eigenvalue of the kept neurons'
#: Gram: an exactly recoverable block here is refit to ~2e-5 relative in float64, not to rounding.
RIDGE_EXACT = 1e-4

#: A float32 model of an exactly recoverable block against the original in ORT: the ridge's
#: shrinkage as above plus float32 rounding of the refit weights (~6e-8) and reassociated sums
#: (~sqrt(d) eps); a wrong slice, bias or neuron order is of order 1.
EXACT_F32 = 1e-3


# --- numerics -----------------------------------------------------------------------------------

def redundant_activations(m=3000, rank=12, d=48):
    """A [m, d] of rank `rank`: `rank` independent ReLU columns and d - rank combinations of them."""
    base = np.maximum(RNG.standard_normal((m, rank)) + 0.2, 0)
    a = np.hstack([base, base @ RNG.standard_normal((rank, d - rank))])
    return a[:, RNG.permutation(d)]


def test_greedy_recovers_a_rank_deficient_activation_exactly():
    a = redundant_activations()
    w2, b2 = RNG.standard_normal((48, 10)), RNG.standard_normal(10)
    selection = select_neurons(a.T @ a, a.sum(0), len(a), w2, b2, "greedy")
    fit = refit(a.T @ a, a.sum(0), len(a), w2, b2, selection.kept(12))
    assert np.linalg.matrix_rank(a[:, fit.kept]) == 12          # it kept a basis, not dependent columns
    y, approx = a @ w2 + b2, a[:, fit.kept] @ fit.w2 + fit.bias
    assert relative_error(approx, y) < RIDGE_EXACT
    assert fit.error < RIDGE_EXACT


@pytest.mark.parametrize("intercept", [True, False])
def test_refit_is_the_least_squares_solution(intercept):
    a = np.maximum(RNG.standard_normal((800, 40)) + 0.3, 0)
    w2, b2 = RNG.standard_normal((40, 6)), RNG.standard_normal(6)
    kept = np.sort(RNG.choice(40, 15, replace=False))
    sums = a.sum(0) if intercept else None
    fit = refit(a.T @ a, sums, len(a), w2, b2 if intercept else None, kept)
    target = a @ w2 + (b2 if intercept else 0)
    design = np.hstack([a[:, kept], np.ones((len(a), 1))]) if intercept else a[:, kept]
    solution = np.linalg.lstsq(design, target, rcond=None)[0]
    # a well-conditioned design: the ridge moves the solution by ~1e-6 relative
    np.testing.assert_allclose(fit.w2, solution[:15], rtol=1e-4, atol=1e-5)
    if intercept:
        np.testing.assert_allclose(fit.bias, solution[15], rtol=1e-4, atol=1e-5)
    approx = a[:, kept] @ fit.w2 + fit.bias
    assert fit.error == pytest.approx(np.linalg.norm(approx - target) / np.linalg.norm(a @ w2), rel=1e-6)


@pytest.mark.parametrize("method", SELECTIONS)
def test_error_curve_is_the_refit_error_of_each_prefix(method):
    a = np.maximum(RNG.standard_normal((600, 32)), 0) * RNG.uniform(0.1, 2, 32)
    w2, b2 = RNG.standard_normal((32, 5)), RNG.standard_normal(5)
    gram, sums = a.T @ a, a.sum(0)
    selection = select_neurons(gram, sums, len(a), w2, b2, method)
    assert sorted(selection.order) == list(range(32))
    assert np.all(np.diff(selection.errors) <= 1e-9)              # more neurons never fit worse
    for k in (1, 8, 20, 32):
        fit = refit(gram, sums, len(a), w2, b2, selection.kept(k))
        # the curve is read off one factorization of the regularised Gram and overstates the
        # squared error by ridge x ||W2'||^2, ~1e-6 relative: sqrt(1e-6) = 1e-3 in the error
        assert fit.error - 1e-9 <= selection.errors[k] <= fit.error + 2e-3


def test_greedy_keeps_one_of_each_duplicate_where_energy_keeps_both():
    base = np.maximum(RNG.standard_normal((2000, 12)) + 0.2, 0) * np.linspace(1, 3, 12)
    a = np.hstack([base, base])                     # every neuron twice: 12 of the 24 reproduce the block
    w2, b2 = RNG.standard_normal((24, 6)), RNG.standard_normal(6)
    args = (a.T @ a, a.sum(0), len(a), w2, b2)
    errors = {method: refit(*args, select_neurons(*args, method).kept(12)).error for method in ("greedy", "energy")}
    assert errors["greedy"] < RIDGE_EXACT and errors["energy"] > 0.1, errors


def test_neurons_for_rule():
    errors = np.array([1.0, 0.5, 0.2, 0.05, 0.0])
    assert neurons_for_rule(errors, RankRule("tolerance", 0.1)) == 3
    assert neurons_for_rule(errors, RankRule("ratio", 0.5)) == 2
    assert neurons_for_rule(errors, RankRule("rank", 9)) == 4
    assert neurons_for_rule(errors, RankRule("tolerance", 0.3), multiple=4) == 4


# --- the block matcher and the pass on tiny models -----------------------------------------------

D_IN, D, D_OUT = 16, 32, 12


def _scalar(name, value):
    return numpy_helper.from_array(np.array(value, np.float32), name)


def activation(kind):
    """(nodes from 'hb' to 'a', scalar initializers, opset) of each activation pattern."""
    if kind == "Gelu":
        return [helper.make_node("Gelu", ["hb"], ["a"])], [], 20
    if kind == "Clip":
        return [helper.make_node("Clip", ["hb", "lo", "hi"], ["a"])], [_scalar("lo", 0.0), _scalar("hi", 6.0)], 17
    if kind in ("Relu", "Sigmoid", "Tanh", "HardSwish", "Softplus"):
        return [helper.make_node(kind, ["hb"], ["a"])], [], 17
    if kind == "SiLU":
        return [helper.make_node("Sigmoid", ["hb"], ["s"]), helper.make_node("Mul", ["hb", "s"], ["a"])], [], 17
    if kind == "HardSwish (decomposed)":
        return [helper.make_node("HardSigmoid", ["hb"], ["s"], alpha=1 / 6, beta=0.5),
                helper.make_node("Mul", ["hb", "s"], ["a"])], [], 17
    if kind == "Gelu (Erf)":   # as torch exports BERT's
        return [helper.make_node("Div", ["hb", "sqrt2"], ["t1"]), helper.make_node("Erf", ["t1"], ["t2"]),
                helper.make_node("Add", ["t2", "one"], ["t3"]), helper.make_node("Mul", ["hb", "t3"], ["t4"]),
                helper.make_node("Mul", ["t4", "half"], ["a"])], \
            [_scalar("sqrt2", np.sqrt(2)), _scalar("one", 1.0), _scalar("half", 0.5)], 17
    if kind == "Gelu (Erf, Constant nodes)":   # the scalars as torch.onnx.export writes them
        nodes, scalars, opset = activation("Gelu (Erf)")
        return [helper.make_node("Constant", [], [t.name], value=t) for t in scalars] + nodes, [], opset
    if kind == "Gelu (Tanh)":
        return [helper.make_node("Pow", ["hb", "three"], ["t1"]), helper.make_node("Mul", ["t1", "c"], ["t2"]),
                helper.make_node("Add", ["hb", "t2"], ["t3"]), helper.make_node("Mul", ["t3", "k"], ["t4"]),
                helper.make_node("Tanh", ["t4"], ["t5"]), helper.make_node("Add", ["t5", "one"], ["t6"]),
                helper.make_node("Mul", ["hb", "t6"], ["t7"]), helper.make_node("Mul", ["t7", "half"], ["a"])], \
            [_scalar("three", 3.0), _scalar("c", 0.044715), _scalar("k", np.sqrt(2 / np.pi)), _scalar("one", 1.0),
             _scalar("half", 0.5)], 17
    raise ValueError(kind)


ACTIVATIONS = ["Relu", "Sigmoid", "Tanh", "HardSwish", "Softplus", "Gelu", "Clip", "SiLU", "HardSwish (decomposed)",
               "Gelu (Erf)", "Gelu (Erf, Constant nodes)", "Gelu (Tanh)"]


def mlp_model(kind="Relu", redundant=True, second_bias=True, extra_nodes=(), extra_outputs=(), extra_inits=(),
              middle=None):
    """x [N, 16] -> MatMul W1 [16, 32] + b1 -> activation -> MatMul W2 [32, 12] (+ b2) -> y. With
    `redundant`, neurons 16..31 repeat neurons 0..15 (the same W1 column and b1 entry): 16 neurons
    reproduce the block exactly (W2' = the sum of the two rows)."""
    w1 = (RNG.standard_normal((D_IN, D)) / 4).astype(np.float32)
    b1 = (RNG.standard_normal(D) / 4).astype(np.float32)
    if redundant:
        w1[:, D // 2:], b1[D // 2:] = w1[:, :D // 2], b1[:D // 2]
    w2 = (RNG.standard_normal((D, D_OUT)) / 4).astype(np.float32)
    b2 = RNG.standard_normal(D_OUT).astype(np.float32)
    nodes, scalars, opset = activation(kind)
    if middle is not None:
        nodes = [*nodes[:-1], helper.make_node(nodes[-1].op_type, list(nodes[-1].input), ["a0"]), middle]
    graph_nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
                   helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"), *nodes,
                   helper.make_node("MatMul", ["a", "W2"], ["z" if second_bias else "y"], name="fc2"), *extra_nodes]
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "W2"),
             *scalars, *extra_inits]
    if second_bias:
        graph_nodes.append(helper.make_node("Add", ["z", "b2"], ["y"], name="fc2_bias"))
        inits.append(numpy_helper.from_array(b2, "b2"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", D_OUT]), *extra_outputs]
    graph = helper.make_graph(graph_nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D_IN])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("mlp") / "calib.npz"
    np.savez(path, x=RNG.standard_normal((400, D_IN)).astype(np.float32))
    return str(path)


def block_of(model, options=None):
    graph = import_graph(model)
    node = next(n for n in graph.nodes if n.name == "fc1")
    return match_block(node, graph, options or Options())


@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_every_activation_pattern_is_matched(kind):
    block = block_of(mlp_model(kind))
    assert block is not None and block.refusal is None, block and block.refusal
    assert block.activation.split(" ")[0] in {kind.split(" ")[0], "Gelu", "HardSwish", "SiLU"}
    assert block.neurons == D and block.second.name == "fc2"


@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_pruned_block_matches_the_original_in_ort(kind, calib):
    """Half the neurons duplicate the other half: 16 neurons reproduce the block, through ORT."""
    model = mlp_model(kind)
    optimized, report, records = pass_records(model, "prune_mlp", calibration=calib, mlp_form="nystrom",
                                              rank_ratio=0.5, max_error="none", measure=False)
    assert [r.status for r in records] == ["decomposed", "decomposed"], [r.reason for r in records]
    assert records[0].rank == [16] and records[0].method == "nystrom"
    shapes = {t.name: list(t.dims) for t in optimized.graph.initializer}
    assert shapes["W1_pruned"] == [D_IN, 16] and shapes["W2_pruned"] == [16, D_OUT] and shapes["b1_pruned"] == [16]
    assert sum(n.op_type == "MatMul" for n in optimized.graph.node) == 2 and len(optimized.graph.node) == len(
        model.graph.node)                                           # no new node
    assert max(output_errors(model, optimized, {"N": 64})) < EXACT_F32


def test_a_block_without_second_bias_is_refit_without_intercept(calib):
    model = mlp_model("Relu", second_bias=False)
    optimized, _, records = pass_records(model, "prune_mlp", calibration=calib, mlp_form="nystrom", rank_ratio=0.5,
                                         max_error="none", measure=False)
    assert records[0].decomposed and len(optimized.graph.node) == len(model.graph.node)
    assert max(output_errors(model, optimized, {"N": 64})) < EXACT_F32


def test_a_lossy_prune_is_the_least_squares_fit_on_calibration_rows(calib):
    """Without redundancy, the refit error the record states is the block's error on the
    calibration samples themselves, measured in ORT."""
    model = mlp_model("Gelu (Erf)", redundant=False)
    optimized, _, records = pass_records(model, "prune_mlp", calibration=calib, mlp_form="nystrom", rank_ratio=0.5,
                                         max_error="none", measure=False)
    from helpers import run_ort
    x = np.load(calib)["x"]                # the samples the Grams were fitted on (ungated: none held back)
    (y0,), (y,) = run_ort(model, {"x": x}), run_ort(optimized, {"x": x})
    b2 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b2"))
    stated = records[1].activation_error
    assert 0.01 < stated < 1
    # relative to ||A W2||: the output without its bias
    assert np.linalg.norm(y - y0) / np.linalg.norm(y0 - b2) == pytest.approx(stated, rel=1e-3)


def refusal(model, options=None):
    block = block_of(model, options)
    return None if block is None else block.refusal


def test_refused_when_the_pre_activation_is_read_elsewhere():
    extra = helper.make_tensor_value_info("hb", TensorProto.FLOAT, ["N", D])
    assert "read outside the block" in refusal(mlp_model("Relu", extra_outputs=[extra]))


def test_refused_when_the_activation_is_read_elsewhere():
    node = helper.make_node("Neg", ["a"], ["side"])   # an elementwise reader: the walk sees it as part of the region
    extra = helper.make_tensor_value_info("side", TensorProto.FLOAT, ["N", D])
    reason = refusal(mlp_model("Relu", extra_nodes=[node], extra_outputs=[extra]))
    assert "read outside the block" in reason


def test_a_non_elementwise_op_between_is_no_block(calib):
    middle = helper.make_node("Softmax", ["a0"], ["a"], axis=-1)
    model = mlp_model("Relu", middle=middle)
    assert block_of(model) is None
    _, report, records = pass_records(model, "prune_mlp", calibration=calib, mlp_form="nystrom", rank_ratio=0.5,
                                      max_error="none", measure=False)
    assert records == []


def test_a_per_neuron_constant_between_is_sliced_with_the_neurons(calib):
    """Max(a, floor) with one floor per neuron acts on each neuron alone: the pruned block keeps
    the kept neurons' floors, and (the floors repeating like the neurons) reproduces the block."""
    floor = RNG.standard_normal(D).astype(np.float32) / 4
    floor[D // 2:] = floor[:D // 2]
    model = mlp_model("Relu", middle=helper.make_node("Max", ["a0", "floor"], ["a"]),
                      extra_inits=[numpy_helper.from_array(floor, "floor")])
    assert block_of(model).refusal is None
    optimized, _, records = pass_records(model, "prune_mlp", calibration=calib, mlp_form="nystrom", rank_ratio=0.5,
                                         max_error="none", measure=False)
    assert [r.status for r in records] == ["decomposed", "decomposed"], [r.reason for r in records]
    assert {t.name: list(t.dims) for t in optimized.graph.initializer}["floor_pruned"] == [16]
    assert max(output_errors(model, optimized, {"N": 64})) < EXACT_F32


def test_refused_with_a_per_neuron_constant_in_a_constant_node():
    floor = numpy_helper.from_array(np.ones(D, np.float32), "floor")
    model = mlp_model("Relu", middle=helper.make_node("Max", ["a0", "floor"], ["a"]), extra_inits=[floor])
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "floor"))
    model.graph.node.insert(0, helper.make_node("Constant", [], ["floor"], value=floor))
    reason = refusal(model)
    assert reason == "Max '' between the layers reads the per-neuron constant 'floor' from a Constant node, which " \
                     "pruning cannot slice"


def test_refused_when_a_weight_is_shared():
    node = helper.make_node("MatMul", ["x", "W1"], ["side"], name="other")
    extra = helper.make_tensor_value_info("side", TensorProto.FLOAT, ["N", D])
    reason = refusal(mlp_model("Relu", extra_nodes=[node], extra_outputs=[extra]))
    assert reason == "weight 'W1' is read by 2 nodes: slicing it would keep both copies"


def test_refused_when_excluded():
    assert refusal(mlp_model("Relu"), Options(exclude="fc2")) == "excluded by --include/--exclude"


def test_refusal_reaches_the_report(calib):
    node = helper.make_node("MatMul", ["x", "W1"], ["side"], name="other")
    extra = helper.make_tensor_value_info("side", TensorProto.FLOAT, ["N", D])
    model = mlp_model("Relu", extra_nodes=[node], extra_outputs=[extra])
    _, report, records = pass_records(model, "prune_mlp", calibration=calib, mlp_form="nystrom", rank_ratio=0.5,
                                      max_error="none", measure=False)
    assert [r.status for r in records] == ["skipped", "skipped"]
    assert "is read by 2 nodes" in records[0].reason


def test_nystrom_needs_calibration():
    with pytest.raises(OptionError, match="needs --calibration"):
        Options(mlp_form="nystrom")


def test_default_form_leaves_blocks_to_the_svd(calib):
    _, report = optimize(mlp_model("Relu"), calibration=calib, rank_ratio=0.5, max_error="none", validate=False,
                         measure=False)
    assert not any(r.pass_name == "prune_mlp" for r in report.layers)


# --- calibration and allocation -----------------------------------------------------------------

def test_calibration_collects_the_column_sums_of_the_gram_rows(calib):
    model = mlp_model("Relu")
    graph = import_graph(model)
    data = load_calibration(calib, ["x"])
    calibration = collect_grams(model, capture_specs(graph, Options()), data)
    x = np.load(calib)["x"].astype(np.float64)
    w1 = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    b1 = numpy_helper.to_array(model.graph.initializer[1]).astype(np.float64)
    sums, rows = calibration.sums["fc2"]
    assert rows == len(x)
    np.testing.assert_allclose(sums, np.maximum(x @ w1 + b1, 0).sum(0), rtol=1e-5)


def spectra():
    d_in, d, d_out = 8, 32, 8
    svd_errors = np.linspace(1, 0, 9) ** 0.5          # rank 0..8
    layers = [LayerSpectrum("fc1", d_in, d, svd_errors, 6), LayerSpectrum("fc2", d, d_out, svd_errors, 6)]
    return layers, d, d_in, d_out


def test_auto_makes_each_block_one_choice_of_both_forms_in_the_allocation():
    layers, d, d_in, d_out = spectra()
    good = NeuronSpectrum("fc1+fc2", ("fc1", "fc2"), d, d_in, d_out, np.linspace(0.3, 0, d + 1), 28)
    bad = NeuronSpectrum("fc1+fc2", ("fc1", "fc2"), d, d_in, d_out, np.linspace(3, 0, d + 1), 28)
    options = Options(calibration="x", mlp_form="auto", rank_multiple=1)
    (joint,) = mlp_forms([*layers, good], options)
    assert isinstance(joint, BlockForms) and joint.name == "fc1+fc2" and [m.name for m in joint.members] == ["fc1", "fc2"]
    # the grid is a Pareto front: cheaper states err more, every one is cheaper than dense
    grid = joint.grid(1)
    costs, errors = [joint.cost(s, "flops") for s in grid], [joint.squared_error(s) for s in grid]
    assert costs == sorted(costs, reverse=True) and errors == sorted(errors) and costs[0] < joint.cost(None, "flops")
    assert len(set(errors)) == len(errors)
    allocation = allocate_ranks([joint], 0.5, "flops", multiple=1)
    assert allocation.met and allocation.ranks["fc1+fc2"] == BlockState("neurons", 16)
    assert layer_ranks(allocation.ranks) == {"fc1+fc2": 16}
    # where keeping neurons errs more, the same allocation takes the per-layer SVD form
    (joint,) = mlp_forms([*layers, bad], options)
    state = allocate_ranks([joint], 0.5, "flops", multiple=1).ranks["fc1+fc2"]
    assert state.form == "svd" and set(layer_ranks({"fc1+fc2": state})) == {"fc1", "fc2"}
    # nystrom takes every block on neurons, as a NeuronSpectrum
    assert mlp_forms([*layers, good], Options(calibration="x", mlp_form="nystrom")) == [good]


def test_auto_block_form_state_reaches_the_passes_as_layer_ranks():
    from onnx_lowrank.passes.base import LayerPlan
    plan = LayerPlan(ranks={"b1": BlockState("svd", ranks=(("fc1", 8), ("fc2", None))), "b2": BlockState("neurons", 4),
                            "fc3": 2, "b3": None})
    assert plan.ranks == {"fc1": 8, "fc2": None, "b2": 4, "fc3": 2, "b3": None}


def test_neuron_spectrum_costs_k_times_both_widths():
    spectrum = NeuronSpectrum("b", ("fc1", "fc2"), 1536, 384, 384, np.zeros(1537), 1382, positions=64)
    assert spectrum.cost(None, "flops") == 1536 * 768 * 64
    assert spectrum.cost(512, "flops") == 512 * 768 * 64
    assert spectrum.grid(8)[0] == 1376 and spectrum.grid(8)[-1] == 8


def test_allocation_with_the_block_form_end_to_end(calib):
    model = mlp_model("Gelu (Erf)", redundant=False)
    optimized, report = optimize(model, calibration=calib, mlp_form="nystrom", target_flops=0.5, max_error="none",
                                 validate=False, measure=False)
    records = [r for r in report.layers if r.pass_name == "prune_mlp"]
    assert records[0].decomposed and records[0].rank[0] <= 16
    assert report.totals()["layer_macs_after"] / report.totals()["layer_macs_before"] <= 0.5
    later = [r for r in report.layers if r.pass_name == "decompose_matmul"]
    assert [r.reason for r in later] == ["a layer of MLP block fc1+fc2, which prune_mlp keeps dense"] * 2
    assert len(report.candidates) == 2                       # each layer counted once, by prune_mlp


def test_cli_flag(tmp_path, capsys, calib):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model("Relu"), path)
    code, out, err = run_cli(capsys, "optimize", path, tmp_path / "out.onnx", "--calibration", calib,
                             "--mlp-form", "nystrom", "--rank-ratio", "0.5", "--max-error", "none", "--no-measure")
    assert code == 0, err
    shapes = {t.name: list(t.dims) for t in onnx.load(tmp_path / "out.onnx").graph.initializer}
    assert shapes["W1_pruned"] == [D_IN, 16]


def test_auto_prunes_a_redundant_block_under_a_target(calib):
    """Half the neurons repeat the other half: at half the MACs the block form is exact where the
    SVD of two full-rank 16x32 / 32x12 layers is not, so auto takes it."""
    model = mlp_model("SiLU")
    optimized, report = optimize(model, calibration=calib, mlp_form="auto", target_flops=0.5, max_error="none",
                                 validate=False, measure=False)
    records = [r for r in report.layers if r.pass_name == "prune_mlp"]
    assert [r.status for r in records] == ["decomposed", "decomposed"] and records[0].rank == [16]
    assert any("of 1 MLP blocks, the allocation kept 1 on fewer neurons" in note for note in report.notes)
    assert max(output_errors(model, optimized, {"N": 64})) < EXACT_F32
