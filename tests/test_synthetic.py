"""synthetic.py and --synthetic-tokens: synthetic token sequences join the Gram matrices of a model
whose integer inputs index an embedding table, and nothing else changes."""

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_lowrank import optimize
from onnx_lowrank.calibration import load_calibration
from onnx_lowrank.cli import main
from onnx_lowrank.data_aware.calibrate import token_tables
from onnx_lowrank.synthetic import WithSyntheticTokens, synthetic_tokens

MODELS = Path(__file__).resolve().parents[1] / "models"


def padded_tokens(count: int = 24, width: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, width + 1, size=count)
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(5, 50, size=(count, width)) * mask
    ids[:, 0] = 2                                   # a [CLS]-like first token
    ids[np.arange(count), lengths - 1] = 3          # and a [SEP]-like last one
    return {"input_ids": ids, "attention_mask": mask}


def test_a_synthetic_sequence_keeps_length_mask_and_framing_and_draws_the_rest_from_the_table():
    batch = padded_tokens()
    out = synthetic_tokens(batch, {"input_ids": 1000}, np.random.default_rng(0))
    ids, mask = out["input_ids"], batch["attention_mask"]
    assert out["attention_mask"] is batch["attention_mask"] and ids.shape == batch["input_ids"].shape
    lengths = mask.sum(1)
    assert (ids[:, 0] == 2).all() and (ids[np.arange(len(ids)), lengths - 1] == 3).all()
    assert (ids[mask == 0] == 0).all()              # padding stays padding
    inner = np.concatenate([row[1:n - 1] for row, n in zip(ids, lengths)])
    assert inner.min() >= 0 and inner.max() < 1000 and inner.max() >= 50   # drawn from the table, not the pool
    assert not np.array_equal(ids, batch["input_ids"])
    again = synthetic_tokens(batch, {"input_ids": 1000}, np.random.default_rng(0))
    assert np.array_equal(again["input_ids"], ids)
    untouched = synthetic_tokens({"input_ids": np.zeros((2, 3, 4), np.int64)}, {"input_ids": 9},
                                 np.random.default_rng(0))
    assert not untouched["input_ids"].any()          # not [batch, sequence]: left alone


def test_each_batch_is_followed_by_its_synthetic_copies(tmp_path):
    path = tmp_path / "tokens.npz"
    np.savez(path, **padded_tokens(count=12))
    data = load_calibration(path, ["input_ids", "attention_mask"])
    batches = list(WithSyntheticTokens(data, {"input_ids": 1000}, copies=2).batches(0, 8, batch_size=4))
    assert [len(b["input_ids"]) for b in batches] == [4] * 6
    real = list(data.batches(0, 8, batch_size=4))
    assert np.array_equal(batches[0]["input_ids"], real[0]["input_ids"])
    assert np.array_equal(batches[3]["input_ids"], real[1]["input_ids"])
    assert np.array_equal(batches[1]["attention_mask"], real[0]["attention_mask"])
    assert not np.array_equal(batches[1]["input_ids"], batches[2]["input_ids"])


def test_token_tables_are_the_integer_inputs_that_index_an_embedding():
    model = onnx.load(MODELS / "bert_tiny.onnx")
    table = next(n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    vocab = next(t.dims[0] for t in model.graph.initializer if t.name == table)
    assert token_tables(model, ["input_ids", "attention_mask"]) == {"input_ids": vocab}
    assert token_tables(onnx.load(MODELS / "mlp.onnx"), ["input"]) == {}


def test_synthetic_sequences_change_the_grams_of_a_token_model_and_say_so(tmp_path):
    model = onnx.load(MODELS / "bert_tiny.onnx")
    path = tmp_path / "tokens.npz"
    np.savez(path, **padded_tokens(count=16, width=16))
    common = dict(calibration=str(path), target_flops=0.5, max_error="none", measure=False, validate=False)
    plain, plain_report = optimize(model, synthetic_tokens=0, **common)
    widened, report = optimize(model, **common)
    outcome = report.data_aware.calibration
    assert outcome.samples == 16 and outcome.synthetic == 16 and set(outcome.synthetic_inputs) == {"input_ids"}
    assert any("16 synthetic token sequences (ids of input_ids from its" in n for n in report.notes)
    assert plain_report.data_aware.calibration.synthetic == 0
    assert not any("synthetic" in n for n in plain_report.notes)
    assert widened.SerializeToString() != plain.SerializeToString()
    assert optimize(model, **common)[0].SerializeToString() == widened.SerializeToString()   # deterministic


def test_a_model_without_token_inputs_is_calibrated_as_before(tmp_path):
    data = np.load(MODELS / "digits_test_mlp.npz")
    path = tmp_path / "calib.npz"
    np.savez(path, input=data["input"][:64])
    model = onnx.load(MODELS / "mlp.onnx")
    common = dict(calibration=str(path), target_flops=0.5, max_error="none", measure=False, validate=False)
    plain, _ = optimize(model, synthetic_tokens=0, **common)
    default, report = optimize(model, **common)
    assert report.data_aware.calibration.synthetic == 0
    assert default.SerializeToString() == plain.SerializeToString()


@pytest.mark.parametrize("value", ["-1", "1.5", "x"])
def test_bad_synthetic_tokens_is_one_line_exit_2(value, capsys):
    code = main(["optimize", str(MODELS / "bert_tiny.onnx"), "/tmp/never.onnx", "--synthetic-tokens", value])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "--synthetic-tokens" in err and "\n" not in err
