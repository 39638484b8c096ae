"""The models in models/ end to end through the CLI: trained models whose weights are not low-rank
are left as they are (and the tool says why), and bert_tiny decomposes under a lossy rank rule and
still runs at other shapes."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers import output_errors, run_cli, run_ort

MODELS = Path(__file__).resolve().parents[1] / "models"


def optimize_cli(capsys, *argv):
    return run_cli(capsys, "optimize", *argv)


# cnn_digits has BatchNormalization nodes, which an exact normalize pass may fold into its convs
@pytest.mark.parametrize("name, candidates, byte_identical", [("mlp", 3, True), ("cnn_digits", 9, False)])
def test_trained_models_have_nothing_worth_decomposing_at_the_default_tolerance(capsys, tmp_path, name, candidates,
                                                                                byte_identical):
    source, output, report_path = MODELS / f"{name}.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    code, out, err = optimize_cli(capsys, source, output, "--report", report_path)
    assert code == 0, err
    assert f"nothing decomposed: none of the {candidates} candidate layers pays at tolerance 0.001" in out
    # an unchanged model needs no run; the CNN's folded BatchNorms do
    verdict = "" if byte_identical else ", parity PASSED"
    assert out.strip().endswith(f"0 of {candidates} layers decomposed{verdict})")
    report = json.loads(report_path.read_text())
    layers = [r for r in report["layers"] if r["pass_name"].startswith("decompose_")]
    assert len(layers) == candidates and report["totals"]["decomposed"] == 0
    for layer in layers:   # each refusal is explained and printed
        assert layer["status"] == "skipped" and layer["reason"] and f"skipped: {layer['reason']}" in out
    for record in report["layers"]:   # what the exact rewrites did is not shown as a refusal
        if record["status"] not in ("skipped", "decomposed"):
            assert f"skipped: {record['reason']}" not in out
    if byte_identical or not any(report["passes"].values()):
        assert output.read_bytes() == source.read_bytes()
    # exact rewrites (BatchNormalization folding) may change the graph, never the function: 1e-5 is
    # float32 reassociation through a few layers
    original, optimized = onnx.load(str(source)), onnx.load(str(output))
    assert max(output_errors(original, optimized, {"batch": 16})) <= 1e-5


def test_cnn_digits_keeps_its_accuracy(capsys, tmp_path):
    output = tmp_path / "out.onnx"
    assert optimize_cli(capsys, MODELS / "cnn_digits.onnx", output, "-q")[0] == 0
    digits = np.load(MODELS / "digits_test.npz")
    (logits,) = run_ort(onnx.load(str(output)), {"input": digits["input"]})
    recorded = json.loads((MODELS / "accuracy.json").read_text())["cnn_digits"]
    assert np.mean(logits.argmax(1) == digits["label"]) == pytest.approx(recorded, abs=1e-9)


def ranks_by_name(report):
    return {r["name"]: r["rank"] for r in report["layers"] if r["status"] == "decomposed"}


def test_bert_tiny_decomposes_its_twelve_weight_matmuls_and_runs(capsys, tmp_path):
    source, output, report_path = MODELS / "bert_tiny.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    code, out, err = optimize_cli(capsys, source, output, "--rank-ratio", 0.25, "--report", report_path)
    assert code == 0, err
    assert out.strip().endswith("12 of 12 layers decomposed, parity PASSED)")
    report = json.loads(report_path.read_text())
    ranks = {tuple(r["weight_shape"]): r["rank"] for r in report["layers"] if r["status"] == "decomposed"}
    assert ranks == {(256, 256): [64], (256, 1024): [64], (1024, 256): [64]}
    optimized = onnx.load(str(output))
    onnx.checker.check_model(optimized, full_check=True)
    # none of the twelve dense weights is left in the model
    original_weights = {n.input[1] for n in onnx.load(str(source)).graph.node if n.name in ranks_by_name(report)}
    assert len(original_weights) == 12
    assert not original_weights & {t.name for t in optimized.graph.initializer}
    assert optimized.ir_version == onnx.load(str(source)).ir_version
    # another batch and sequence length than the parity check used, with padding in the mask
    ids = np.random.default_rng(0).integers(0, 1000, (2, 37))
    mask = np.ones((2, 37), np.int64)
    mask[1, 30:] = 0
    (hidden,) = run_ort(optimized, {"input_ids": ids, "attention_mask": mask})
    assert hidden.shape == (2, 37, 256) and np.all(np.isfinite(hidden))
