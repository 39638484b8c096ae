"""all-MiniLM-L6-v2's FFNs: whitened SVD against the MLP-block form (prune_mlp: k neurons kept, W2
refit) at equal FFN MACs, attention untouched; then the full data-aware command with and without it.

    .venv/bin/python benchmarks/minilm_mlp.py [--quick] [--part ffn|full|layers|speed|all]

ffn: the quality table at FFN MACs 0.8 / 0.7 / 0.5; full: the acceptance command with each
--mlp-form; layers: each FFN block's own refit error by neuron selection (from the calibration
Grams, no model run); speed: the uniform forms' models timed all together, interleaved (speed
depends on the shapes only, so one run of many blocks says more than one per row on a busy machine).

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


def layer_errors(original: onnx.ModelProto, calib: str) -> None:
    """Per FFN block, the relative block-output error of the refit at k = f x 1536 neurons, by
    selection rule, from the Grams the calibration collects (as prune_mlp computes it)."""
    from onnx_lowrank.calibration import capture_specs, collect_grams, load_calibration
    from onnx_lowrank.graph import import_graph
    from onnx_lowrank.numerics.nystrom import SELECTIONS, refit, select_neurons
    from onnx_lowrank.options import Options
    from onnx_lowrank.passes.mlp_blocks import match_block

    graph = import_graph(original)
    options = Options()
    data = load_calibration(calib, [t.name for t in graph.inputs])
    calibration = collect_grams(original, capture_specs(graph, options), data)
    blocks = [b for n in graph.nodes if (b := match_block(n, graph, options)) is not None and b.refusal is None]
    fractions = (0.8, 0.7, 0.5)
    print("| block | selection | " + " | ".join(f"error at {f} of the neurons" for f in fractions) + " | time |")
    print("|---|---|" + "---:|" * (len(fractions) + 1))
    for block in blocks:
        second = block.second.name
        gram, (sums, rows) = calibration.grams[second], calibration.sums[second]
        bias = np.asarray(next(t for t in block.second_bias.inputs if hasattr(t, "values")).values, np.float64)
        for method in SELECTIONS:
            start = time.perf_counter()
            selection = select_neurons(gram, sums, rows, block.w2.values, bias, method)
            took = time.perf_counter() - start
            errors = [refit(gram, sums, rows, block.w2.values, bias, selection.kept(int(f * block.neurons))).error
                      for f in fractions]
            print(f"| {block.first.name.split('/')[3]} | {method} | " + " | ".join(f"{e:.4f}" for e in errors)
                  + f" | {took:.1f} s |", flush=True)


def speed_table(original: onnx.ModelProto, calib: str, evaluation: dict, blocks: int) -> None:
    """Whole-model speedup at batch 8 x 64 tokens of the uniform SVD and Nystrom forms at each FFN
    MAC ratio, all timed in one interleaved run against the original."""
    from onnx_lowrank import runtime
    from onnx_lowrank.bench import TimingPlan, time_interleaved

    common = dict(calibration=calib, include=FFN, max_error="none", measure=False, validate=False)
    models, labels = [original], ["original"]
    built = CACHE / "mlp_speed"       # the models are kept: a rerun only times them
    built.mkdir(exist_ok=True)
    for f in (0.8, 0.7, 0.5):
        for label, kwargs in ((f"whitened SVD, FFN MACs {f}", dict(rank_ratio=round(0.8 * f, 4))),
                              (f"Nystrom, FFN MACs {f}", dict(mlp_form="nystrom", mlp_selection="energy", rank_ratio=f))):
            path = built / (label.replace(" ", "_").replace(",", "") + ".onnx")
            if not path.is_file():
                onnx.save(optimize(original, **kwargs, **common)[0], str(path))
            models.append(onnx.load(str(path)))
            labels.append(label)
    config = runtime.SessionConfig(spinning=False)
    feeds = {k: v[:8] for k, v in evaluation.items()}
    runners = [runtime.runner(runtime.make_session(m, config), feeds) for m in models]
    print(f"load average before timing {os.getloadavg()}", flush=True)
    latencies, _ = time_interleaved(runners, TimingPlan(blocks=blocks, block_s=0.2))
    print(f"load average after timing {os.getloadavg()}")
    print("| model | FFN MACs | ms per batch (median) | speedup (median of per-block ratios) | p10-p90 |")
    print("|---|---:|---:|---:|---|")
    for label, model, t in zip(labels, models, latencies):
        ratio = latencies[0] / t
        print(f"| {label} | {ffn_macs(model):.3f} | {np.median(t) * 1e3:.1f} | {np.median(ratio):.2f}x | "
              f"{np.percentile(ratio, 10):.2f}-{np.percentile(ratio, 90):.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", default="all", choices=["ffn", "full", "layers", "speed", "all"])
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
    if args.part in ("layers", "all"):
        layer_errors(original, calib)
    if args.part in ("speed", "all"):
        speed_table(original, calib, evaluation, 80 if not args.quick else 10)
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
