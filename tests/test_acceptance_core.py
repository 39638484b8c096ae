"""Issue 2's acceptance models with default options: weights of exact rank r plus 1e-4 relative
noise must come out at rank r (Tucker ranks (64, 64) for the 3x3 conv) with a relative output
error <= 5e-3 in ONNX Runtime. Speed is measured in benchmarks/, not asserted here.

Why 5e-3 holds with room: truncating at the true rank discards only the noise, so each layer's
weight error is ~1e-4 (the 1e-3 default tolerance admits no smaller rank: one more discarded
direction costs ~1/sqrt(r) ~ 0.1), and a weight error e moves a layer's output by about e.
"""

import pytest

from helpers import assert_unchanged, output_errors
from models.synthetic import conv_model, full_rank_mlp, gemm_model, mlp_model
from onnx_lowrank import optimize
from onnx_lowrank.passes import PIPELINE

ACCEPTED_ERROR = 5e-3

CASES = {
    "mlp 768x3072 r128": (mlp_model, 256, {"fc/MatMul": [128]}),
    "gemm 1024x1024 r96": (gemm_model, 256, {"fc/Gemm": [96]}),
    "conv3x3 256 (64,64) + 1x1 r64": (conv_model, 8, {"conv1": [64, 64], "conv2": [64]}),
}


def rank_for_weight(shape):
    """The true rank of an acceptance weight, by its shape."""
    return {(768, 3072): [128], (1024, 1024): [96], (256, 256, 3, 3): [64, 64], (256, 256, 1, 1): [64]}[tuple(shape)]


@pytest.mark.parametrize("case", CASES)
def test_default_optimize_recovers_the_rank_within_the_accepted_error(case):
    build, batch, _ = CASES[case]
    model = build()
    optimized, report = optimize(model, batch=batch)
    # The merge passes may first fuse Conv3x3 -> Conv1x1 into one 3x3 conv (exact, and cheaper):
    # whatever the decomposed layers are, each must come out at its weight's true rank.
    assert report.decomposed
    for layer in report.decomposed:
        assert layer.rank == rank_for_weight(layer.weight_shape), layer
        assert layer.weight_error < 3e-4, layer
    assert report.parity.passed and report.parity.input_shapes["x"][0] == batch
    errors = output_errors(model, optimized, {"batch": batch}, seed=1)
    assert max(errors) <= ACCEPTED_ERROR, errors
    totals = report.totals()
    assert totals["layer_macs_after"] < totals["layer_macs_before"] / 3


@pytest.mark.parametrize("case", CASES)
def test_each_layer_alone_gets_its_true_rank(case):
    """Only the decompose passes (no folding or merging): every original layer at its true rank."""
    build, batch, expected = CASES[case]
    model = build()
    others = [entry.name for entry in PIPELINE if entry.stage != "decompose"]
    optimized, report = optimize(model, batch=batch, skip=others, validate=False)
    assert {layer.name: layer.rank for layer in report.decomposed} == expected
    assert max(output_errors(model, optimized, {"batch": batch})) <= ACCEPTED_ERROR


def test_full_rank_weights_leave_the_model_unchanged_and_say_why():
    report = assert_unchanged(full_rank_mlp(), validate=True)
    (layer,) = report.layers
    assert layer.reason.startswith("rank ") and "(break-even 128 less 10%)" in layer.reason
    assert report.notes[0].startswith("nothing decomposed: none of the 1 candidate layers pays at tolerance 0.001")
    assert report.notes[0].endswith("the model is unchanged")
    assert report.parity is None   # the output is the input: no run needed
