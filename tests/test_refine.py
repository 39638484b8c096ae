"""Block refinement (--refine, data_aware/refine/): the alignment blocks (graph analysis, no torch),
the one-line error without torch, and with torch: the evaluator against ONNX Runtime on the bundled
models, held-out error lowered and never raised, initializers kept by name, an unsupported op
answered with the closed form."""

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import model_from_text, relative_error, run_cli, run_ort
from onnx import numpy_helper

from onnx_lowrank import optimize
from onnx_lowrank.data_aware.refine.blocks import alignment_blocks

MODELS = Path(__file__).resolve().parent.parent / "models"
RNG = np.random.default_rng(0)
K, H = 48, 96


def _residual_mlp(extra: str = "") -> onnx.ModelProto:
    """Two post-LN residual sublayers, x -> LN(x + fc2(relu(fc1 x))) -> LN(. + fc4(relu(fc3 .))): the
    LayerNorm outputs are the residual stream (each read by the next sublayer and its skip)."""
    w = {f"W{i}": (RNG.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
         for i, shape in enumerate([(K, H), (H, K), (K, H), (H, K)], start=1)}
    ones, zeros = np.ones(K, np.float32), np.zeros(K, np.float32)
    return model_from_text(
        f"(float[B, {K}] x) => (float[B, {K}] y) {{ [fc1] h1 = MatMul(x, W1) r1 = Relu(h1) [fc2] o1 = MatMul(r1, W2) "
        "s1 = Add(x, o1) n1 = LayerNormalization(s1, G, Z) [fc3] h2 = MatMul(n1, W3) r2 = Relu(h2) "
        f"[fc4] o2 = MatMul(r2, W4) s2 = Add(n1, o2) {extra or 'y = LayerNormalization(s2, G, Z)'} }}",
        **w, G=ones, Z=zeros)


MODEL = _residual_mlp()
BASIS, _ = np.linalg.qr(RNG.standard_normal((K, K)))


def inputs(rows, seed):
    rng = np.random.default_rng(seed)
    return ((rng.standard_normal((rows, K)) * np.logspace(0, -2, K)) @ BASIS).astype(np.float32)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, x=inputs(256, seed=1))
    return str(path)


@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="--refine needs torch (pip install 'onnx-lowrank[refine]')")


def held_out_error(model, reference=MODEL):
    x = inputs(256, seed=2)
    return relative_error(run_ort(model, {"x": x})[0], run_ort(reference, {"x": x})[0])


def _factorized(calib, **options):
    options = dict(calibration=calib, target_flops=0.35, max_error="none", measure=False, **options)
    return optimize(MODEL, **options)


def test_blocks_end_at_the_residual_stream(calib):
    closed, report = _factorized(calib)
    factors = {t.name for t in closed.graph.initializer if "_lowrank_" in t.name}
    assert len(factors) == 8                       # four layers, two factors each
    blocks = alignment_blocks(MODEL, closed, factors)
    assert [(b.start, b.targets) for b in blocks] == [(None, ("n1",)), ("n1", ("y",))]
    assert [len(b.parameters) for b in blocks] == [4, 4]
    assert set().union(*(b.parameters for b in blocks)) == factors


def test_without_torch_refine_is_one_line_and_exit_code_2(tmp_path, capsys, calib, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)      # `import torch` now raises ImportError
    source = tmp_path / "m.onnx"
    onnx.save(MODEL, source)
    code, _, stderr = run_cli(capsys, "optimize", source, tmp_path / "o.onnx", "--calibration", calib,
                              "--target-flops", 0.5, "--refine")
    assert code == 2
    assert stderr.strip().count("\n") == 0 and "Traceback" not in stderr
    assert "--refine needs torch" in stderr and "pip install 'onnx-lowrank[refine]'" in stderr
    assert not (tmp_path / "o.onnx").exists()


def test_refine_needs_calibration():
    from onnx_lowrank.errors import OptionError
    from onnx_lowrank.options import Options

    with pytest.raises(OptionError, match="--refine .* needs --calibration"):
        Options(refine=True, target_flops=0.5)


@pytest.mark.parametrize("name", ["bert_tiny", "cnn_digits", "mlp"])
def test_evaluator_matches_onnx_runtime_on_the_bundled_models(torch, name):
    """Every op of the bundled models (the exporter's shape arithmetic, LayerNorm, Erf, Softmax,
    Resize, BatchNormalization, Conv, Gemm...) in torch agrees with ORT to float32 rounding: a
    wrong axis or attribute default gives errors of order 1."""
    from helpers import make_feeds

    from onnx_lowrank.data_aware.refine.evaluator import TorchGraph, to_torch

    model = onnx.load(MODELS / f"{name}.onnx")
    graph = TorchGraph(model)
    assert graph.unsupported() == []
    feeds = make_feeds(model, {"batch": 3, "batch_size": 3, "N": 3, "sequence": 16, "seq": 16})
    expected = run_ort(model, feeds)
    with torch.no_grad():
        got = graph.run({k: to_torch(v) for k, v in feeds.items()}, [o.name for o in model.graph.output])
    for output, want in zip(model.graph.output, expected):
        assert relative_error(got[output.name].numpy(), want) < 1e-5, output.name


def test_refine_lowers_held_out_error_and_keeps_the_initializers(torch, calib):
    closed, _ = _factorized(calib)
    refined, report = _factorized(calib, refine=True)
    outcome = report.data_aware.refinement
    assert outcome is not None and not outcome.reason and outcome.kept
    assert len(outcome.blocks) == 2
    # early stopping keeps the best held-out state; the first block (whitened SVD on the inputs it
    # was fitted on) is near its optimum already (measured 0.0723 -> 0.0723), the second is not
    assert all(block.held_after <= block.held_before for block in outcome.blocks)
    last = outcome.blocks[-1]
    assert last.train_after < last.train_before and last.held_after < 0.97 * last.held_before   # measured 0.94
    assert outcome.refined_error < outcome.closed_form_error
    # on samples neither the fit nor the early stopping saw
    assert held_out_error(refined) < 0.97 * held_out_error(closed)   # measured 0.346 against 0.371
    # the same initializers by name, shape and dtype; only the factors' values moved
    shapes = {t.name: (tuple(t.dims), t.data_type) for t in closed.graph.initializer}
    assert {t.name: (tuple(t.dims), t.data_type) for t in refined.graph.initializer} == shapes
    moved = {t.name for t, u in zip(closed.graph.initializer, refined.graph.initializer)
             if not np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(u))}
    assert moved and all("_lowrank_" in name for name in moved)
    assert [n.op_type for n in refined.graph.node] == [n.op_type for n in closed.graph.node]
    onnx.checker.check_model(refined, full_check=True)
    assert any(note.startswith("refinement: 2 blocks") for note in report.notes)
    assert [b["output"] for b in json.loads(report.to_json())["data_aware"]["refinement"]["blocks"]] == ["n1", "y"]


def test_early_stopping_never_raises_held_out_error(torch, calib, monkeypatch):
    """At a rate that makes every Adam step overshoot, each block keeps its closed form (best at
    step 0) and the model written is the closed-form one."""
    from onnx_lowrank.data_aware import refine

    monkeypatch.setattr(refine, "RATES", {})
    monkeypatch.setattr(refine, "REFIT_RATE", 50.0)
    closed, _ = _factorized(calib)
    refined, report = _factorized(calib, refine=True, refine_steps=30)
    for block in report.data_aware.refinement.blocks:
        assert block.best_step == 0 and block.held_after == block.held_before
    assert held_out_error(refined) == pytest.approx(held_out_error(closed), rel=1e-6)


def test_an_unsupported_op_keeps_the_closed_form(torch, calib):
    model = _residual_mlp("t = Sin(s2) y = LayerNormalization(t, G, Z)")
    options = dict(calibration=calib, target_flops=0.35, max_error="none", measure=False)
    closed, _ = optimize(model, **options)
    refined, report = optimize(model, refine=True, **options)
    assert report.data_aware.refinement.reason.startswith("op Sin is not supported by --refine")
    assert any("op Sin is not supported by --refine: the closed-form fit is kept" in n for n in report.notes)
    assert refined.SerializeToString() == closed.SerializeToString()


def test_bert_tiny_refines_on_padded_texts_cut_to_their_length(torch, tmp_path):
    """The bundled BERT (exporter graph: shape arithmetic, LayerNorm, Erf, Softmax) end to end, on
    right-padded token ids: chunks are cut to their longest text, the blocks are the LayerNorm
    outputs, and the refined model (ORT, full length) is no worse than the closed form."""
    from onnx_lowrank.data_aware.refine import _chunks, _trimmable, describe

    model = onnx.load(MODELS / "bert_tiny.onnx")
    assert _trimmable(model) == "attention_mask"
    rng = np.random.default_rng(3)
    lengths = rng.integers(4, 33, size=64)
    mask = (np.arange(32)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, 1000, size=(64, 32)) * mask
    path = tmp_path / "tokens.npz"
    np.savez(path, input_ids=ids, attention_mask=mask)
    refined, report = optimize(model, calibration=str(path), target_flops=0.5, max_error="none", measure=False,
                               refine=True, refine_steps=5)
    outcome = report.data_aware.refinement
    assert not outcome.reason and len(outcome.blocks) == 4, report.notes     # two layers, two LayerNorms each
    # the synthetic token sequences of --synthetic-tokens (default 1) train beside the real texts
    assert outcome.train_samples == 48 and outcome.synthetic_samples == 48
    assert "48 train (+ 48 synthetic token sequences) / 16 held-out" in describe(outcome)
    assert all("LayerNorm" in b.output or b.output == "last_hidden_state" for b in outcome.blocks)
    assert outcome.refined_error <= outcome.closed_form_error
    from onnx_lowrank.data_aware.plan import DataPlan
    from onnx_lowrank.calibration import load_calibration

    plan = DataPlan(None, set(), data=load_calibration(path, ["input_ids", "attention_mask"]))
    widths = [c["input_ids"].shape[1] for c in _chunks(plan, 0, 64, "attention_mask")]
    assert widths == sorted(widths) and widths[0] < 32 and max(widths) == lengths.max()
    feeds = {"input_ids": ids[:8], "attention_mask": mask[:8]}
    assert run_ort(refined, feeds)[0].shape == (8, 32, 256)
