"""`onnx-lowrank optimize`: every flag, the exit codes (0 ok, 1 parity FAILED, 2 bad input or
options, as one line), the --report JSON, and what the written model keeps of the input.

The CLI runs in-process through onnx_lowrank.cli.main (one test runs the installed console
script). The model: x [batch, 64] -> [/enc/fc/MatMul] MatMul (64 x 96, rank 4) -> Relu
-> [/dec/fc/Gemm] Gemm transB=1 (96 -> 48, rank 4, bias) -> y [batch, 48].
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers import EXACT, model_from_text, op_counts, output_errors, run_cli
from models.synthetic import low_rank_matrix
from onnx_lowrank.cli.optimize import SAMPLE_MODEL

ERROR_PREFIX = "onnx-lowrank: error: "
ENC, DEC = "/enc/fc/MatMul", "/dec/fc/Gemm"


def two_layer_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    model = model_from_text("""(float[batch, 64] x) => (float[batch, 48] y) {
        h = MatMul(x, W1)
        r = Relu(h)
        y = Gemm <transB=1> (r, W2, C)
    }""", W1=low_rank_matrix(rng, 64, 96, 4, noise=0), W2=low_rank_matrix(rng, 48, 96, 4, noise=0),
        C=np.linspace(-1, 1, 48, dtype=np.float32))
    # node names as torch's exporter writes them (onnx.parser does not accept '/' in names)
    for node, name in zip(model.graph.node, (ENC, "/act/Relu", DEC)):
        node.name = name
    # what an exporter leaves on a model, all of which must survive
    model.producer_name, model.producer_version, model.model_version = "test-exporter", "9.9", 7
    model.doc_string, model.graph.doc_string = "a two-layer test model", "graph doc"
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.helper.set_model_props(model, {"author": "tests", "license": "none"})
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "two_layer.onnx"
    onnx.save(two_layer_model(), str(path))
    return path


def optimize_cli(capsys, *argv):
    return run_cli(capsys, "optimize", *argv)


def report_of(capsys, tmp_path, model_path, *flags, expect=0):
    """The --report JSON of optimizing model_path with `flags`, after checking the exit code."""
    report = tmp_path / "report.json"
    code, out, err = optimize_cli(capsys, model_path, tmp_path / "out.onnx", "--report", report, *flags)
    assert code == expect, (out, err)
    return json.loads(report.read_text())


def layers_by_name(report):
    return {layer["name"]: layer for layer in report["layers"]}


# --- success and the written model ---------------------------------------------------------------

def test_optimize_writes_a_decomposed_model_with_parity(capsys, tmp_path, model_path):
    output = tmp_path / "out.onnx"
    code, out, err = optimize_cli(capsys, model_path, output)
    assert code == 0, err
    assert "decomposed 2 of 2 candidate layers" in out and "parity PASSED" in out
    assert out.strip().splitlines()[-1].startswith(f"wrote {output} (")
    assert out.strip().endswith("2 of 2 layers decomposed, parity PASSED)")
    optimized = onnx.load(str(output))
    assert op_counts(optimized) == {"MatMul": 2, "Relu": 1, "Gemm": 2}
    assert max(output_errors(onnx.load(str(model_path)), optimized, {"batch": 8})) <= EXACT


def test_output_keeps_names_types_dims_opsets_ir_and_metadata(capsys, tmp_path, model_path):
    output = tmp_path / "out.onnx"
    assert optimize_cli(capsys, model_path, output)[0] == 0
    original, optimized = onnx.load(str(model_path)), onnx.load(str(output))
    onnx.checker.check_model(optimized, full_check=True)
    assert optimized.ir_version == 8
    for field in ("opset_import", "metadata_props", "producer_name", "producer_version", "model_version", "doc_string"):
        assert getattr(optimized, field) == getattr(original, field), field
    assert optimized.graph.doc_string == original.graph.doc_string
    # names, element types and the symbolic batch dim of every graph input and output
    assert list(optimized.graph.input) == list(original.graph.input)
    assert list(optimized.graph.output) == list(original.graph.output)
    assert optimized.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_two_runs_write_byte_identical_models(capsys, tmp_path, model_path):
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert optimize_cli(capsys, model_path, first, "-q")[0] == 0
    assert optimize_cli(capsys, model_path, second, "-q")[0] == 0
    assert first.read_bytes() == second.read_bytes()


def test_default_output_is_the_input_name_with_lowrank_in_the_current_directory(capsys, tmp_path, model_path,
                                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = optimize_cli(capsys, model_path, "-q")
    assert code == 0
    assert (tmp_path / "two_layer.lowrank.onnx").is_file()
    assert out == "wrote two_layer.lowrank.onnx (" + out.split(" (", 1)[1]


def test_no_arguments_optimizes_the_bundled_sample(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = optimize_cli(capsys)
    assert code == 0, err
    assert (tmp_path / f"{SAMPLE_MODEL.stem}.lowrank.onnx").is_file()
    assert "1 of 1 layers decomposed, parity PASSED" in out


def test_quiet_prints_only_the_result_line(capsys, tmp_path, model_path):
    code, out, err = optimize_cli(capsys, model_path, tmp_path / "out.onnx", "--quiet")
    assert code == 0 and err == ""
    assert len(out.splitlines()) == 1 and out.startswith("wrote ")


def test_report_json_has_every_field(capsys, tmp_path, model_path):
    report = report_of(capsys, tmp_path, model_path, "--exclude", "dec")
    enc, dec = layers_by_name(report)[ENC], layers_by_name(report)[DEC]
    # `layer == {**layer, field: value, ...}`: each field is present with that value
    assert enc == {**enc, "op": "MatMul", "weight_shape": [64, 96], "status": "decomposed", "method": "svd",
                   "rank": [8], "params_before": 64 * 96, "params_after": 8 * (64 + 96), "reason": "",
                   "macs_before": 64 * 96, "macs_after": 8 * (64 + 96)}
    assert enc["break_even_rank"] == pytest.approx(64 * 96 / 160, abs=0.01)
    assert 0 <= enc["weight_error"] < 1e-6
    assert dec == {**dec, "op": "Gemm", "weight_shape": [48, 96], "status": "skipped", "method": None, "rank": None,
                   "weight_error": None, "params_before": 48 * 96, "params_after": None, "macs_after": None,
                   "reason": "excluded by --include/--exclude"}
    totals = report["totals"]
    assert (totals["candidates"], totals["decomposed"], totals["skipped"]) == (2, 1, 1)
    assert totals["params_after"] == totals["params_before"] - 64 * 96 + 8 * (64 + 96)
    assert totals["size_after"] < totals["size_before"]
    parity = report["parity"]
    assert parity["passed"] is True and parity["provider"] == "cpu"
    (output,) = parity["outputs"]
    assert output["name"] == "y" and output["passed"] is True
    for figure in ("max_abs_error", "rel_l2_error", "cosine"):
        assert figure in output
    assert output["rel_l2_error"] <= EXACT
    assert report["options"]["exclude"] == "dec" and report["options"]["tolerance"] == 1e-3


# --- rank rules and layer selection --------------------------------------------------------------

def spectrum_rank(weight_name, **rule):
    """What a rule picks for a weight of the two-layer model, from numpy's SVD directly."""
    w = onnx.numpy_helper.to_array(next(t for t in two_layer_model().graph.initializer if t.name == weight_name))
    energy = np.cumsum(np.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2)
    energy /= energy[-1]
    if "energy" in rule:
        return int(np.searchsorted(energy, rule["energy"] - 1e-12) + 1)
    errors = np.sqrt(np.maximum(1 - energy, 0))
    return int(np.nonzero(errors <= rule["tolerance"])[0][0] + 1)


@pytest.mark.parametrize("flags, ranks", [
    ((), ([8], [8])),
    (("--rank", 2), ([8], [8])),
    (("--rank", 2, "--rank-multiple", 1), ([2], [2])),
    (("--rank", 3, "--rank-multiple", 3), ([3], [3])),
    (("--rank-ratio", 0.5), ([32], [24])),            # half of min(K, N): 64 -> 32, 48 -> 24
    (("--rank-ratio", 0.5, "--rank-multiple", 16), ([32], [24])),   # dec: 32 would pass its max rank 28
    (("--energy", 0.5, "--rank-multiple", 1), ([spectrum_rank("W1", energy=0.5)], [spectrum_rank("W2", energy=0.5)])),
    (("--tolerance", 0.7, "--rank-multiple", 1),
     ([spectrum_rank("W1", tolerance=0.7)], [spectrum_rank("W2", tolerance=0.7)])),
    # enc (64 -> 96) breaks even at 38.4: 40 would pass it; dec (96 -> 48) at 32 < 36: stays dense
    (("--rank", 36, "--min-flop-reduction", 0), ([36], None)),
])
def test_rank_rule_flags(capsys, tmp_path, model_path, flags, ranks):
    layers = layers_by_name(report_of(capsys, tmp_path, model_path, "--no-validate", *flags))
    assert (layers[ENC]["rank"], layers[DEC]["rank"]) == ranks


def test_min_flop_reduction_leaves_the_model_unchanged_and_says_why(capsys, tmp_path, model_path):
    output = tmp_path / "out.onnx"
    code, out, _ = optimize_cli(capsys, model_path, output, "--min-flop-reduction", 0.95)
    assert code == 0
    assert "nothing decomposed: none of the 2 candidate layers pays" in out and "the model is unchanged" in out
    assert "skipped: rank 4 for tolerance 0.001 > 1 (break-even 38 less 95%)" in out
    assert onnx.load(str(output)) == onnx.load(str(model_path))


@pytest.mark.parametrize("flags, decomposed, present", [
    (("--ops", "gemm"), {DEC}, {DEC}),
    (("--ops", "matmul,conv"), {ENC}, {ENC}),
    (("--ops", "GEMM, matmul"), {ENC, DEC}, {ENC, DEC}),
    (("--include", "^/enc/"), {ENC}, {ENC, DEC}),
    (("--exclude", "enc"), {DEC}, {ENC, DEC}),
    (("--include", "fc", "--exclude", "^/dec"), {ENC}, {ENC, DEC}),
    (("--skip", "decompose_gemm"), {ENC}, {ENC}),
    (("--skip", "decompose_matmul, decompose_gemm"), set(), set()),
])
def test_layer_selection_flags(capsys, tmp_path, model_path, flags, decomposed, present):
    report = report_of(capsys, tmp_path, model_path, *flags)
    layers = layers_by_name(report)
    assert set(layers) == present
    assert {name for name, layer in layers.items() if layer["status"] == "decomposed"} == decomposed
    for name in present - decomposed:
        assert layers[name]["reason"] == "excluded by --include/--exclude"
    if decomposed:
        assert report["parity"]["passed"]
    else:   # nothing changed: the output is the input, and there is nothing to run
        assert report["parity"] is None


# --- parity: --no-validate, --max-error, --shape, --batch, --seed, exit code 1 ----------------

def test_no_validate_skips_parity(capsys, tmp_path, model_path):
    report = tmp_path / "report.json"
    code, out, _ = optimize_cli(capsys, model_path, tmp_path / "out.onnx", "--no-validate", "--report", report)
    assert code == 0 and "parity on" not in out and "PASSED" not in out
    assert json.loads(report.read_text())["parity"] is None


def test_failed_parity_exits_1_and_writes_nothing(capsys, tmp_path, model_path):
    output, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code, out, err = optimize_cli(capsys, model_path, output, "--rank", 1, "--rank-multiple", 1,
                                  "--max-error", 1e-12, "--report", report)
    assert code == 1
    assert "parity FAILED" in out
    line = err.strip()
    assert "\n" not in line
    assert line.startswith("onnx-lowrank: parity FAILED: y: rel_l2 ") and "x the bound" in line
    assert f": {output} not written; to meet it: --calibration SAMPLES.npz" in line
    assert re.search(r"--max-error [0-9.]+ accepts this error", line) and line.endswith("--force writes it anyway")
    assert not output.exists()
    parity = json.loads(report.read_text())["parity"]
    assert parity["passed"] is False and parity["outputs"][0]["rel_l2_error"] > 1e-3


def test_force_writes_a_model_that_failed_parity_and_still_exits_1(capsys, tmp_path, model_path):
    output = tmp_path / "out.onnx"
    code, out, _ = optimize_cli(capsys, model_path, output, "--rank", 1, "--rank-multiple", 1,
                                "--max-error", 1e-12, "--force")
    assert code == 1 and output.is_file()
    assert out.strip().endswith("parity FAILED)")


def test_max_error_loose_enough_passes_a_lossy_rank(capsys, tmp_path, model_path):
    report = report_of(capsys, tmp_path, model_path, "--rank", 3, "--rank-multiple", 1, "--max-error", 0.9,
                       "--min-top1", 0)
    assert report["parity"]["passed"]
    assert report["parity"]["criterion"].startswith("rel_l2 <= 9.0e-01 (the quality gate, --max-error)")
    assert 0.1 < report["parity"]["outputs"][0]["rel_l2_error"] <= 0.9


def test_lossy_rank_is_held_to_the_default_gate(capsys, tmp_path, model_path):
    # --rank 2 of rank-4 weights, no --max-error: the default gate (rel_l2 0.25, top-1 0.95 for the
    # Gemm's class-like output) fails it, so nothing is written; a gate that cannot fail would pass it
    output = tmp_path / "out.onnx"
    report = report_of(capsys, tmp_path, model_path, "--rank", 2, "--rank-multiple", 1, expect=1)
    assert min(layer["weight_error"] for layer in report["layers"]) > 0.1
    assert report["gate"] == "rel_l2 <= 0.25, top-1 agreement >= 0.95 on class outputs (default)"
    assert report["parity"]["criterion"].startswith("rel_l2 <= 2.5e-01")
    (y,) = report["parity"]["outputs"]
    assert y["rel_l2_error"] > 0.25 or y["top1_agreement"] < 0.95
    assert not output.exists()


def test_parity_tolerance_is_the_implied_bound_when_tighter_than_the_gate(capsys, tmp_path, model_path):
    report = report_of(capsys, tmp_path, model_path)   # exact rank-4 weights at tolerance 1e-3
    assert report["parity"]["passed"]
    assert "2 x sum of layer weight errors, floor 0.0001, within the gate 0.25" in report["parity"]["criterion"]


@pytest.mark.parametrize("flags, shape", [
    (("--shape", "x:5,64"), [5, 64]),
    (("--batch", 3), [3, 64]),
    (("--batch", 3, "--shape", "x:2,64"), [2, 64]),
])
def test_shape_and_batch_set_the_parity_inputs(capsys, tmp_path, model_path, flags, shape):
    assert report_of(capsys, tmp_path, model_path, *flags)["parity"]["input_shapes"] == {"x": shape}


def test_seed_changes_the_generated_inputs(capsys, tmp_path, model_path):
    lossy = ("--rank", 3, "--rank-multiple", 1, "--max-error", 0.9, "--min-top1", 0)
    runs = [report_of(capsys, tmp_path, model_path, *lossy, "--seed", seed) for seed in (0, 1, 0)]
    errors = [run["parity"]["outputs"][0]["max_abs_error"] for run in runs]
    assert errors[0] == errors[2] != errors[1]
    assert [run["options"]["seed"] for run in runs] == [0, 1, 0]


# --- output files: --force, --external-data ------------------------------------------------------

def test_output_over_the_input_needs_force(capsys, tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(two_layer_model(), str(path))
    code, out, err = optimize_cli(capsys, path, path)
    assert code == 2 and out == ""
    assert err == f"{ERROR_PREFIX}output path '{path}' is the input model; pass --force to overwrite it\n"
    code, _, _ = optimize_cli(capsys, path, path, "--force", "-q")
    assert code == 0
    assert op_counts(onnx.load(str(path))) == {"MatMul": 2, "Relu": 1, "Gemm": 2}


@pytest.mark.parametrize("flag, external", [("--external-data", True), ("--no-external-data", False)])
def test_external_data_flags(capsys, tmp_path, model_path, flag, external):
    output = tmp_path / "out.onnx"
    assert optimize_cli(capsys, model_path, output, flag, "-q")[0] == 0
    assert (tmp_path / "out.onnx.data").is_file() == external
    optimized = onnx.load(str(output))
    assert max(output_errors(onnx.load(str(model_path)), optimized)) <= EXACT


# --- bad input and options: exit 2, one line on stderr ---------------------------------------

@pytest.mark.parametrize("flags, message", [
    (("--rank", 0), "--rank must be a positive integer, got 0"),
    (("--rank", "abc"), "argument --rank: expected an integer, got 'abc'"),
    (("--rank", 4, "--energy", 0.9), "choose one rank rule, got --rank and --energy"),
    (("--tolerance", 2), "--tolerance must be in (0, 1), got 2.0"),
    (("--rank-ratio", 1.5), "--rank-ratio must be in (0, 1], got 1.5"),
    (("--energy", 0), "--energy must be in (0, 1], got 0.0"),
    (("--rank-multiple", 0), "--rank-multiple must be a positive integer"),
    (("--min-flop-reduction", 1), "--min-flop-reduction must be in [0, 1), got 1.0"),
    (("--ops", "matmul,conv2d"), "--ops: unknown op 'conv2d'; choose from matmul,gemm,conv"),
    (("--include", "("), "--include: invalid regular expression '('"),
    (("--exclude", "[a"), "--exclude: invalid regular expression '[a'"),
    (("--skip", "decompose_everything"), "--skip: unknown pass decompose_everything; passes: "),
    (("--max-error", -1), "--max-error must be"),
    (("--shape", "x"), "--shape 'x': expected NAME:D1,D2,..."),
    (("--shape", "z:1,64"), "--shape: the model has no input named 'z' (inputs: x)"),
    (("--shape", "x:1,63"), "--shape x:1,63 does not fit the model's input shape"),
    (("--batch", 0), "--batch must be a positive integer, got 0"),
    (("--no-such-flag",), "unrecognized arguments: --no-such-flag"),
])
def test_bad_options_exit_2_with_one_line(capsys, tmp_path, model_path, flags, message):
    output = tmp_path / "out.onnx"
    code, out, err = optimize_cli(capsys, model_path, output, *flags)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(ERROR_PREFIX), err
    assert message in err
    assert not output.exists()


def test_bad_input_and_output_paths_exit_2_with_one_line(capsys, tmp_path, model_path):
    text_file = tmp_path / "notes.onnx"
    text_file.write_text("not a model")
    cases = [
        ((tmp_path / "missing.onnx", tmp_path / "o.onnx"), f"input model '{tmp_path / 'missing.onnx'}' does not exist"),
        ((text_file, tmp_path / "o.onnx"), f"input model '{text_file}' is not an ONNX model"),
        ((model_path, tmp_path / "no" / "o.onnx"), f"output directory '{tmp_path / 'no'}' does not exist"),
        ((model_path, tmp_path), f"output path '{tmp_path}' is a directory"),
    ]
    for argv, message in cases:
        code, out, err = optimize_cli(capsys, *argv)
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and err.startswith(ERROR_PREFIX + message), err


# --- the installed console script ------------------------------------------------------------

def test_console_script(tmp_path, model_path):
    script = Path(sys.executable).with_name("onnx-lowrank")
    result = subprocess.run([str(script), "optimize", str(model_path), str(tmp_path / "out.onnx"), "--rank", "2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "2 of 2 layers decomposed, parity PASSED" in result.stdout
    bad = subprocess.run([str(script), "optimize", str(model_path), "--rank", "0"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr == f"{ERROR_PREFIX}--rank must be a positive integer, got 0\n"
