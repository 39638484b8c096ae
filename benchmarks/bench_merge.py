"""Speed of the merge / fold / fuse passes (issue 5) on CPU ONNX Runtime, timed interleaved.

    python benchmarks/bench_merge.py [--batch 1,32] [--blocks 20]

Part 1, the acceptance models: original against `optimize(model)` with default options; the issue
asks for the merged chains to be >= 1.25x faster and nothing slower.
Part 2, horizontal fusion: `optimize(model)` against `optimize(model, fuse_horizontal=True)`, on
Q/K/V projections and on bert_tiny: the measurement behind fuse_horizontal being off by default.
Part 3, the paper's bottleneck merge across activations (inexact, off by default): a decomposed
bottleneck against the same with `merge_across_activations=True`, and the output error it costs.

Speedup is onnx_lowrank.bench's: the median over alternating blocks of latency(A) / latency(B),
with p10-p90; > 1 means B (the optimized model) is faster.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.synthetic import (bottleneck_model, conv1x1_chain_model, conv_bn_relu_model,  # noqa: E402
                              gemm_chain_model, lora_model, matmul_chain_model, qkv_model)
from onnx_lowrank import optimize  # noqa: E402
from onnx_lowrank.bench import TimingPlan, bench  # noqa: E402
from onnx_lowrank.numerics.svd import single_threaded_blas  # noqa: E402


def ops(model) -> str:
    return " ".join(f"{op}x{n}" for op, n in sorted(Counter(n.op_type for n in model.graph.node).items()))


def compare(label: str, a, b, batch: int, plan: TimingPlan, shapes=None) -> None:
    result = bench([a, b], batch=batch, plan=plan, shapes=shapes)
    ms = " vs ".join(f"{m.median_ms:.3f}" for m in result.models)
    print(f"{label:<34} batch {batch:>3}  {ms} ms  speedup {result.speedup:.2f}x "
          f"(p10 {result.speedup_p10:.2f}, p90 {result.speedup_p90:.2f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,32", help="comma-separated batch sizes (default 1,32)")
    parser.add_argument("--blocks", type=int, default=20, help="timed blocks per model (default 20)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    plan = TimingPlan(blocks=args.blocks)

    print("== acceptance models: original (A) vs optimize() defaults (B)")
    for build in (matmul_chain_model, lora_model, gemm_chain_model, conv1x1_chain_model, conv_bn_relu_model):
        original = build()
        with single_threaded_blas():
            optimized, report = optimize(original)
        done = ", ".join(f"{name} {n}" for name, n in report.passes.items() if n)
        print(f"{build.__name__}: {ops(original)} -> {ops(optimized)} ({done}; "
              f"rel err {report.parity.outputs[0].rel_l2_error:.1e})")
        for batch in batches:
            compare(build.__name__, original, optimized, batch, plan)

    print("\n== horizontal fusion: optimize() (A) vs optimize(fuse_horizontal=True) (B)")
    tokens = lambda batch: {"input_ids": [batch, 128], "attention_mask": [batch, 128]}   # noqa: E731
    hidden = lambda batch: {"x": [batch, 128, 768]}                                     # noqa: E731
    cases = [("Q/K/V 768, rank 64 factors", qkv_model(), hidden),
             ("Q/K/V 768, rank 192 factors", qkv_model(rank=192), hidden),
             ("bert_tiny (dense Q/K/V)", str(ROOT / "models" / "bert_tiny.onnx"), tokens)]
    for label, model, shapes in cases:
        # the FLOP model decides the ranks, so both sides decompose alike whatever the timings
        unfused, _ = optimize(model, validate=False, measure=False)
        fused, _ = optimize(model, validate=False, measure=False, fuse_horizontal=True)
        print(f"{label}: {ops(unfused)} -> {ops(fused)}")
        for batch in batches:
            compare(label, unfused, fused, batch, plan, shapes(batch))

    print("\n== bottleneck merge across activations: optimize() (A) vs optimize(merge_across_activations=True) (B)")
    model = bottleneck_model(ch=256, out_ch=1024, ranks=(64, 64), size=14)
    decomposed, _ = optimize(model, validate=False, measure=False)
    merged, report = optimize(model, measure=False, merge_across_activations=True)
    print(f"bottleneck 256->256->1024, 3x3 ranks (64, 64): {ops(decomposed)} -> {ops(merged)}; output error "
          f"rel_l2 {report.parity.outputs[0].rel_l2_error:.2f} against the original (not exact, needs fine-tuning)")
    for batch in batches:
        compare("bottleneck merged across Relu", decomposed, merged, batch, plan)


if __name__ == "__main__":
    main()
