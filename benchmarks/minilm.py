"""all-MiniLM-L6-v2: embedding quality against measured CPU speedup, for weight-only SVD, whitened
SVD at a uniform rank ratio, and the full data-aware method (whitened SVD + global allocation).

    /tmp/v/bin/python benchmarks/minilm.py [--quick]

The model and the tokenized texts are exported once by minilm_export.py (torch venv) into
benchmarks/.cache/. Quality is measured on 128 evaluation texts that calibration never saw: mean
cosine between original and compressed mean-pooled sentence embeddings, and nearest-neighbour
agreement (for each text, is its most similar other text the same under both models). Speed is ORT
on the CPU with graph optimizations on, original and compressed interleaved in one process with
intra-op spinning off (onnx_lowrank.bench), at batch 1 and batch 8 of 64 tokens.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_lowrank import optimize, runtime  # noqa: E402
from onnx_lowrank.bench import TimingPlan, time_interleaved  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
TORCH_PYTHON = os.environ.get("TORCH_PYTHON", "/tmp/vtorch/bin/python")


def ensure_exported() -> None:
    if all((CACHE / name).is_file() for name in ("minilm.onnx", "calib.npz", "eval.npz")):
        return
    subprocess.run([TORCH_PYTHON, str(ROOT / "benchmarks" / "minilm_export.py"), str(CACHE)], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})


def embeddings(model: onnx.ModelProto, data: dict[str, np.ndarray], batch: int = 16) -> np.ndarray:
    session = runtime.make_session(model, runtime.SessionConfig())
    out = []
    for i in range(0, len(data["input_ids"]), batch):
        feeds = {k: v[i:i + batch] for k, v in data.items()}
        hidden = runtime.run(session, feeds)[0]
        mask = feeds["attention_mask"][..., None].astype(np.float64)
        out.append((hidden * mask).sum(1) / mask.sum(1))
    e = np.concatenate(out)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def quality(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float, float]:
    """(mean cosine, min cosine, nearest-neighbour agreement)."""
    cos = np.sum(reference * candidate, axis=1)

    def neighbours(e):
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)

    return float(cos.mean()), float(cos.min()), float(np.mean(neighbours(reference) == neighbours(candidate)))


def measured_speedup(original: onnx.ModelProto, candidate: onnx.ModelProto, data: dict[str, np.ndarray],
                     batch: int, blocks: int) -> float:
    config = runtime.SessionConfig(spinning=False)
    feeds = {k: v[:batch] for k, v in data.items()}
    runners = [runtime.runner(runtime.make_session(m, config), feeds) for m in (original, candidate)]
    (a, b), _ = time_interleaved(runners, TimingPlan(blocks=blocks, block_s=0.1))
    return float(np.median(a / b))


def candidate_macs(report) -> float:
    totals = report.totals()
    before, after = totals["layer_macs_before"], totals["layer_macs_after"]
    return after / before if before else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer points and timing blocks")
    args = parser.parse_args()
    ensure_exported()
    original = onnx.load(str(CACHE / "minilm.onnx"))
    calib = str(CACHE / "calib.npz")
    with np.load(CACHE / "eval.npz") as f:
        evaluation = {k: f[k] for k in f.files}
    reference = embeddings(original, evaluation)
    blocks = 10 if args.quick else 30
    flops = [0.8, 0.65] if args.quick else [0.9, 0.8, 0.72, 0.6]
    configs = []
    for f in flops:
        # MiniLM's MACs: 1/3 in 384x384 layers (a rank ratio p keeps 2p of them), 2/3 in 384x1536 ones
        # (1.25p): a uniform rank ratio of f / 1.5 keeps about f of the candidate layers' MACs
        configs.append((f"svd, target-flops {f}", dict(target_flops=f)))
        configs.append((f"whitened, uniform rank-ratio {f / 1.5:.2f}",
                        dict(calibration=calib, rank_ratio=round(f / 1.5, 3), measure=False)))
        configs.append((f"full, target-flops {f}", dict(calibration=calib, target_flops=f)))
    configs.append(("full + error correction, target-flops 0.72",
                    dict(calibration=calib, target_flops=0.72, error_correction=True)))
    configs.append(("full, target-speedup 1.3 (acceptance command)", dict(calibration=calib, target_speedup=1.3)))
    configs.append(("full + error correction, target-speedup 1.3",
                    dict(calibration=calib, target_speedup=1.3, error_correction=True)))
    configs.append(("full + error correction, target-flops 0.8",
                    dict(calibration=calib, target_flops=0.8, error_correction=True)))
    configs.append(("full, target-speedup 1.3, max-error 0.3", dict(calibration=calib, target_speedup=1.3,
                                                                       max_error=0.3)))
    rows = []
    for label, kwargs in configs:
        start = time.perf_counter()
        model, report = optimize(original, validate=False, **kwargs)
        took = time.perf_counter() - start
        mean_cos, min_cos, nn = quality(reference, embeddings(model, evaluation))
        s1 = measured_speedup(original, model, evaluation, 1, blocks)
        s8 = measured_speedup(original, model, evaluation, 8, blocks)
        rows.append((label, len(report.decomposed), candidate_macs(report), s1, s8, mean_cos, min_cos, nn, took))
        print(f"{label:45s} layers {rows[-1][1]:2d}  MACs {rows[-1][2]:.2f}  speedup b1 {s1:.2f}x b8 {s8:.2f}x  "
              f"cos {mean_cos:.4f} (min {min_cos:.3f})  NN {nn:.1%}  [{took:.0f} s]", flush=True)
    print()
    print("| method | layers factorized | MACs of candidate layers | speedup batch 1 | speedup batch 8 "
          "| mean cosine | min cosine | NN agreement | optimize time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, n, macs, s1, s8, mc, mn, nn, took in rows:
        print(f"| {label} | {n} | {macs:.2f} | {s1:.2f}x | {s8:.2f}x | {mc:.4f} | {mn:.3f} | {nn:.1%} | {took:.0f} s |")


if __name__ == "__main__":
    main()
