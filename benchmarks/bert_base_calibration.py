"""Does calibration of a BERT-base-size model (110M parameters) fit in 8 GB and finish in minutes
on 2 cores? Measures peak memory and wall time of `optimize --calibration` with 128 samples of
sequence length 128 on a randomly initialised BertModel (sizes, not weights, decide the cost).

    /tmp/v/bin/python benchmarks/bert_base_calibration.py [--error-correction]

The model is exported once with torch (TORCH_PYTHON, default /tmp/vtorch/bin/python) into
benchmarks/.cache/bert_base_random.onnx.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = ROOT / "benchmarks" / ".cache"
MODEL = CACHE / "bert_base_random.onnx"
SAMPLES, SEQ = 128, 128

EXPORT = """
import sys, torch, onnx
from transformers import BertConfig, BertModel
torch.manual_seed(0)
model = BertModel(BertConfig(attn_implementation="eager")).eval()
ids = torch.ones(1, 16, dtype=torch.long)
class Hidden(torch.nn.Module):
    def __init__(self, m):
        super().__init__(); self.m = m
    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
axes = {0: "batch", 1: "seq"}
torch.onnx.export(Hidden(model), (ids, ids), sys.argv[1], input_names=["input_ids", "attention_mask"],
                  output_names=["last_hidden_state"], dynamic_axes={"input_ids": axes, "attention_mask": axes,
                  "last_hidden_state": axes}, opset_version=17, dynamo=False)
m = onnx.load(sys.argv[1]); m.ir_version = 8; onnx.save(m, sys.argv[1])
"""


def main() -> None:
    from onnx_lowrank import optimize
    from onnx_lowrank.calibration import BATCH_SIZE

    correcting = "--error-correction" in sys.argv[1:]
    CACHE.mkdir(parents=True, exist_ok=True)
    if not MODEL.is_file():
        subprocess.run([os.environ.get("TORCH_PYTHON", "/tmp/vtorch/bin/python"), "-c", EXPORT, str(MODEL)],
                       check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    rng = np.random.default_rng(0)
    lengths = rng.integers(SEQ // 4, SEQ + 1, SAMPLES)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(1000, 30000, (SAMPLES, SEQ)), 0).astype(np.int64)
    calib = CACHE / "bert_base_calib.npz"
    np.savez(calib, input_ids=ids, attention_mask=mask)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    seen: list[tuple[float, float]] = []    # (time, peak RSS) after each calibration batch

    def on_batch(count: int) -> None:
        seen.append((time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))

    _, report = optimize(str(MODEL), calibration=str(calib), target_flops=0.7, validate=False, measure=False,
                         error_correction=correcting, on_calibration=on_batch)
    took = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    first = seen[-(-SAMPLES // BATCH_SIZE) - 1]    # the first pass's last batch; error correction's come after
    print(f"BERT-base (random weights), {SAMPLES} samples x {SEQ} tokens, --target-flops 0.7"
          + (" --error-correction:" if correcting else ":"))
    print(f"  calibration (load, capture, Gram matrices) done after {first[0]:.0f} s, peak RSS by then "
          f"{first[1]:.2f} GiB (before loading the model: {before:.2f} GiB)")
    if correcting:
        print("  " + next(n for n in report.notes if n.startswith("error correction")))
    print(f"  whole optimize {took:.0f} s, peak RSS {peak:.2f} GiB; {len(report.decomposed)} of "
          f"{len(report.candidates)} layers factorized")


if __name__ == "__main__":
    main()
