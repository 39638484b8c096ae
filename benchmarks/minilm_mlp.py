"""all-MiniLM-L6-v2's FFNs: whitened SVD against the MLP-block form (prune_mlp: k neurons kept, W2
refit) at equal FFN MACs, attention untouched; then the full data-aware command with and without it.

    .venv/bin/python benchmarks/minilm_mlp.py [--quick] [--part ffn|full|all]

Needs benchmarks/.cache/ from minilm_export.py (see minilm.py). Quality: mean cosine of mean-pooled
embeddings on the 128 evaluation texts calibration never saw; speed: whole model at batch 8 x 64
tokens, original and compressed interleaved (minilm.measured_speedup). The FFN MAC ratio is read
from the written model's FFN weights, not from the report.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm import CACHE, ROOT, embeddings, ensure_exported, measured_speedup, quality  # noqa: E402

sys.path.insert(0, str(ROOT))
from onnx_lowrank import optimize  # noqa: E402

FFN = r"intermediate/dense/MatMul|layer\.\d+/output/dense/MatMul"
DENSE_FFN = 6 * 2 * 384 * 1536


def ffn_macs(model: onnx.ModelProto) -> float:
    """MACs per token of the FFN MatMuls (their weights, factors included) over the dense FFNs'."""
    import re
    weights = {t.name: t for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == "MatMul" and re.search(r"intermediate|layer\.\d+/output/dense", node.name) \
                and "attention" not in node.name:
            w = weights.get(node.input[1])
            if w is not None:
                total += int(np.prod(w.dims))
    return total / DENSE_FFN


def run(label: str, original, reference, evaluation, blocks: int, **kwargs) -> dict:
    start = time.perf_counter()
    model, report = optimize(original, validate=False, **kwargs)
    took = time.perf_counter() - start
    mean_cos, min_cos, nn = quality(reference, embeddings(model, evaluation))
    s8 = measured_speedup(original, model, evaluation, 8, blocks)
    row = dict(label=label, ffn_macs=ffn_macs(model), speedup_b8=s8, mean_cos=mean_cos, min_cos=min_cos, nn=nn,
               took=took, measured=report.measured_speedup)
    print(f"{label:60s} FFN MACs {row['ffn_macs']:.3f}  b8 {s8:.2f}x (optimize's own {report.measured_speedup}) "
          f"cos {mean_cos:.4f} (min {min_cos:.3f}) NN {nn:.1%} [{took:.0f} s]", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", default="all", choices=["ffn", "full", "all"])
    args = parser.parse_args()
    ensure_exported()
    original = onnx.load(str(CACHE / "minilm.onnx"))
    calib = str(CACHE / "calib.npz")
    with np.load(CACHE / "eval.npz") as f:
        evaluation = {k: f[k] for k in f.files}
    reference = embeddings(original, evaluation)
    blocks = 10 if args.quick else 20
    print(f"load average {os.getloadavg()}")
    rows = []
    common = dict(calibration=calib, include=FFN, max_error="none", measure=False)
    if args.part in ("ffn", "all"):
        for f in (0.8, 0.7, 0.5):
            # 384 x 1536 at rank r costs r (384 + 1536): r / 384 = 0.8 f keeps f of the MACs
            rows.append(run(f"whitened SVD, uniform, FFN MACs {f}", original, reference, evaluation, blocks,
                            rank_ratio=round(0.8 * f, 4), **common))
            for selection in ("greedy", "energy", "leverage"):
                rows.append(run(f"Nystrom ({selection}), uniform, FFN MACs {f}", original, reference, evaluation,
                                blocks, mlp_form="nystrom", mlp_selection=selection, rank_ratio=f, **common))
            rows.append(run(f"whitened SVD, allocated, FFN MACs {f}", original, reference, evaluation, blocks,
                            target_flops=f, **common))
            rows.append(run(f"Nystrom (greedy), allocated, FFN MACs {f}", original, reference, evaluation, blocks,
                            mlp_form="nystrom", target_flops=f, **common))
            rows.append(run(f"auto, allocated, FFN MACs {f}", original, reference, evaluation, blocks,
                            mlp_form="auto", target_flops=f, **common))
    if args.part in ("full", "all"):
        for form in ("svd", "nystrom", "auto"):
            rows.append(run(f"--target-speedup 1.3 --max-error none --mlp-form {form}", original, reference,
                            evaluation, blocks, calibration=calib, target_speedup=1.3, max_error="none",
                            mlp_form=form))
    print()
    print("| method | FFN MACs | speedup batch 8 x 64 | mean cosine | min cosine | NN agreement | optimize time |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['label']} | {r['ffn_macs']:.3f} | {r['speedup_b8']:.2f}x | {r['mean_cos']:.4f} | "
              f"{r['min_cos']:.3f} | {r['nn']:.1%} | {r['took']:.0f} s |")


if __name__ == "__main__":
    main()
