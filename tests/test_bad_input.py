"""Bad input (issue 4): one line on stderr naming the problem, a non-zero exit, no traceback,
nothing written at the output path, the input file unchanged."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import model_from_text

from models.synthetic import low_rank_matrix
from onnx_lowrank.cli import main

W = low_rank_matrix(np.random.default_rng(0), 64, 96, 8, noise=0)


@pytest.fixture
def model_path(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(model_from_text("(float[N, 64] x) => (float[N, 96] y) { [fc] y = MatMul(x, W) }", W=W), path)
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def run_refused(capsys, argv: list[str], expected: str, code: int = 2) -> str:
    """main(argv) exits with `code`, prints exactly one stderr line containing `expected`."""
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert expected in lines[0], lines[0]
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("content,expected", [
    (None, "does not exist"),
    (b"", "is empty"),
    (bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)), "is not"),
    (b"ir_version: 8\nthis is a text file, not a model\n", "is not"),
])
def test_unreadable_inputs(tmp_path, capsys, content, expected):
    src = tmp_path / "in.onnx"
    if content is not None:
        src.write_bytes(content)
    out = tmp_path / "out.onnx"
    run_refused(capsys, ["optimize", str(src), str(out)], expected)
    assert not out.exists() and _leftovers(tmp_path) == []
    if content is not None:
        assert src.read_bytes() == content


def test_truncated_model(tmp_path, capsys, model_path):
    data = model_path.read_bytes()
    model_path.write_bytes(data[: len(data) // 2])
    before = _digest(model_path)
    run_refused(capsys, ["optimize", str(model_path), str(tmp_path / "out.onnx")], "model.onnx")
    assert _digest(model_path) == before and not (tmp_path / "out.onnx").exists()


def test_directory_as_input(tmp_path, capsys):
    run_refused(capsys, ["optimize", str(tmp_path), str(tmp_path / "out.onnx")], "is a directory")


def test_output_directory_missing(tmp_path, capsys, model_path):
    run_refused(capsys, ["optimize", str(model_path), str(tmp_path / "nope" / "out.onnx")], "does not exist")


def test_output_directory_not_writable(tmp_path, capsys, model_path):
    # root may write anywhere chmod forbids; /proc refuses new files even to root
    target = "/proc/onnx-lowrank-out.onnx" if os.geteuid() == 0 else str(_read_only_dir(tmp_path) / "out.onnx")
    run_refused(capsys, ["optimize", str(model_path), target], "cannot write" if os.geteuid() == 0 else "not writable")


def _read_only_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


def test_output_equal_to_input_needs_force(capsys, model_path):
    before = _digest(model_path)
    run_refused(capsys, ["optimize", str(model_path), str(model_path)], "--force")
    assert _digest(model_path) == before
    assert main(["optimize", "-q", str(model_path), str(model_path), "--force"]) == 0
    assert len(onnx.load(model_path).graph.node) == 2


def test_missing_external_data(tmp_path, capsys, model_path):
    model = onnx.load(model_path)
    ext = tmp_path / "ext.onnx"
    onnx.save(model, ext, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    before = _digest(ext)
    run_refused(capsys, ["optimize", str(ext), str(tmp_path / "out.onnx")], "external data file 'ext.onnx.data'")
    assert _digest(ext) == before and not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("flags,expected", [
    (["--rank", "-3"], "--rank must be a positive integer"),
    (["--rank", "abc"], "expected an integer"),
    (["--tolerance", "0"], "--tolerance must be in (0, 1)"),
    (["--tolerance", "1.5"], "--tolerance must be in (0, 1)"),
    (["--rank-ratio", "2"], "--rank-ratio must be in (0, 1]"),
    (["--energy", "0"], "--energy must be in (0, 1]"),
    (["--ops", "matmul,lstm"], "unknown op 'lstm'"),
    (["--shape", "x:1,a"], "--shape 'x:1,a'"),
    (["--shape", "nope:1,64"], "no input named 'nope'"),
    (["--shape", "x:1,2,3"], "does not fit"),
    (["--rank", "4", "--energy", "0.9"], "choose one rank rule"),
    (["--include", "("], "invalid regular expression"),
    (["--skip", "no_such_pass"], "unknown pass no_such_pass"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_invalid_options(tmp_path, capsys, model_path, flags, expected):
    before = _digest(model_path)
    out = tmp_path / "out.onnx"
    run_refused(capsys, ["optimize", str(model_path), str(out), *flags], expected)
    assert not out.exists() and _digest(model_path) == before and _leftovers(tmp_path) == []


def test_external_data_round_trip(tmp_path, capsys, model_path):
    """An input with external data gives an output with external data, written beside it."""
    ext = tmp_path / "ext.onnx"
    onnx.save(onnx.load(model_path), ext, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    out = tmp_path / "sub" / "out.onnx"
    out.parent.mkdir()
    assert main(["optimize", "-q", str(ext), str(out)]) == 0
    assert (out.parent / "out.onnx.data").is_file()
    onnx.checker.check_model(str(out), full_check=True)
    assert main(["optimize", "-q", str(ext), str(tmp_path / "inline.onnx"), "--no-external-data"]) == 0
    assert not (tmp_path / "inline.onnx.data").exists()
    capsys.readouterr()


def test_byte_identical_output_on_two_runs(tmp_path, model_path):
    for name in ("a.onnx", "b.onnx"):
        assert main(["optimize", "-q", str(model_path), str(tmp_path / name)]) == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


@pytest.mark.parametrize("flags,expected", [
    (["--seed", "-1"], "--seed must be a non-negative integer"),
    (["--shape", "x:0,64"], "positive integers"),
    (["--error-correction"], "needs --calibration"),
])
def test_more_invalid_options(tmp_path, capsys, model_path, flags, expected):
    run_refused(capsys, ["optimize", str(model_path), str(tmp_path / "out.onnx"), *flags], expected)


@pytest.mark.parametrize("command", [
    ["optimize", "{m}", "{out}", "--report", "{m}"],
    ["optimize", "{m}", "{out}", "--report", "{out}"],
    ["validate", "{m}", "{m}", "--json", "{m}"],
    ["bench", "{m}", "--json", "{m}", "--blocks", "1"],
    ["analyze", "{m}", "--json", "{m}"],
])
def test_a_report_never_overwrites_a_model(tmp_path, capsys, model_path, command):
    before = _digest(model_path)
    argv = [a.format(m=model_path, out=tmp_path / "out.onnx") for a in command]
    run_refused(capsys, argv, "is a model of this command")
    assert _digest(model_path) == before and not (tmp_path / "out.onnx").exists()


def test_missing_onnx_runtime_says_which_extra_to_install(tmp_path, capsys, model_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # import onnxruntime now raises ImportError
    run_refused(capsys, ["optimize", str(model_path), str(tmp_path / "out.onnx")], "onnx-lowrank[cpu]")
    assert not (tmp_path / "out.onnx").exists()
    # what needs no runtime still works without one
    assert main(["optimize", "-q", "--no-validate", "--no-measure", str(model_path), str(tmp_path / "out.onnx")]) == 0
