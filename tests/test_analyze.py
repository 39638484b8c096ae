"""`onnx-lowrank analyze`: per-layer spectrum table, exact errors by rank, the PNG, exit codes."""

import builtins
import json
import sys

import numpy as np
import onnx
import pytest

from helpers import model_from_text
from models.synthetic import low_rank_conv_weight, low_rank_matrix
from onnx_lowrank.analysis import _tucker2_errors_equal_rank, analyze_model
from onnx_lowrank.cli import main
from onnx_lowrank.numerics.tucker import channel_bases, relative_error, tucker2, tucker2_reconstruct
from onnx_lowrank.options import Options

RNG = np.random.default_rng(0)
MODEL = model_from_text(
    """(float[N, 64] x, float[N, 8, 10, 10] z) => (float[N, 48] y, float[N, 16, 10, 10] v) {
        [fc] y = MatMul(x, W)
        [conv] v = Conv <pads = [1, 1, 1, 1]> (z, K)
    }""",
    W=low_rank_matrix(RNG, 64, 48, rank=6, noise=0), K=low_rank_conv_weight(RNG, 16, 8, 3, (5, 4), noise=0))


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(MODEL, str(path))
    return str(path)


def test_ranks_at_each_error_level_are_the_true_ranks():
    analysis = analyze_model(MODEL, Options(measure=False))
    fc, conv = analysis.layers
    assert (fc.name, fc.form, fc.full_rank, fc.break_even_rank) == ("fc", "svd", 48, 64 * 48 / 112)
    assert [p.rank for p in fc.points] == [6, 6, 6]
    assert fc.points[0].predicted_speedup == pytest.approx(64 * 48 / (6 * 112))
    assert (conv.form, conv.full_rank) == ("tucker2", 16)
    assert [p.rank for p in conv.points] == [5, 5, 5]        # ranks (5, min(5, 8)) cover (5, 4) exactly
    assert all(p.measured_speedup is None for p in fc.points + conv.points)


def test_tucker2_errors_by_rank_are_the_exact_hosvd_errors():
    w = low_rank_conv_weight(np.random.default_rng(1), 12, 7, 3, (6, 5), noise=0.1).astype(np.float64)
    out_basis, in_basis = channel_bases(w)
    errors = _tucker2_errors_equal_rank(w, out_basis.u, in_basis.u)
    assert len(errors) == 13 and errors[0] == pytest.approx(1.0) and errors[-1] < 1e-7
    for r in (1, 3, 7, 10):
        ranks = (min(r, 12), min(r, 7))
        assert errors[r] == pytest.approx(relative_error(w, tucker2_reconstruct(*tucker2(w, *ranks))), rel=1e-6)


def test_cli_prints_the_table_and_writes_a_png(model_path, tmp_path, capsys):
    png = tmp_path / "spectra.png"
    assert main(["analyze", model_path, "--plot", str(png), "--json", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "break-even" in out and "err<=0.001" in out and f"wrote {png} (2 layers)" in out
    assert [line.split()[0] for line in out.splitlines()[2:4]] == ["fc", "conv"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    data = json.loads((tmp_path / "a.json").read_text())
    assert [layer["name"] for layer in data["layers"]] == ["fc", "conv"] and len(data["layers"][0]["errors"]) == 49


def test_cli_measure_shows_measured_speedups(model_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.modules["onnx_lowrank.analysis"], "latency_for",
                        lambda options: (lambda geometry, form: 1.0 if form.method == "dense" else 0.5))
    assert main(["analyze", model_path, "--measure", "--include", "fc"]) == 0
    out = capsys.readouterr().out
    assert "6: 4.57x (2.00x)" in out and "conv" not in out.split("each err")[0]


def test_cli_errors_are_one_line_with_exit_code_2(model_path, tmp_path, monkeypatch, capsys):
    assert main(["analyze", str(tmp_path / "missing.onnx")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert main(["analyze", model_path, "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err == "onnx-lowrank: error: --plot needs matplotlib: pip install 'onnx-lowrank[plot]'\n"
    assert not (tmp_path / "x.png").exists()


def test_a_model_without_candidates_says_so(tmp_path, capsys):
    path = tmp_path / "relu.onnx"
    onnx.save(model_from_text("(float[N, 4] x) => (float[N, 4] y) { y = Relu(x) }"), str(path))
    assert main(["analyze", str(path)]) == 0
    assert capsys.readouterr().out.startswith("no candidate layers")
