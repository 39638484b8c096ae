"""The core issue's benchmark: measured CPU speedup of factorized layers against the FLOP-ideal one,
and the three acceptance models optimized with defaults against their speedup targets.

    python benchmarks/bench_core.py                 # everything, ORT's default thread count
    python benchmarks/bench_core.py --threads 1,2   # the same per thread count
    python benchmarks/bench_core.py --json out.json

Part 1 (ranks): a bare MatMul 768x3072 at batch 256 and a bare Conv 3x3 256->256 (pad 1, bias) at
14x14 batch 8, each factorized at fixed ranks (`optimize --rank R --no-measure`); dense and
factorized are timed interleaved in one process by onnx_lowrank.bench. ideal = dense MACs /
factorized MACs; realized/ideal = measured speedup / ideal.

Part 2 (acceptance): models/synthetic.py's mlp_model(), gemm_model() and conv_model() (exactly
low rank + 1e-4 relative noise), optimized with every default, timed at batch 256, 256 and 8
against the targets 2.4x, 2.5x and 3.0x; the relative output error is optimize's parity figure.

Not a test: timings depend on the machine and on what else runs on it (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.synthetic import conv_model, gemm_model, mlp_model  # noqa: E402
from onnx_lowrank import optimize  # noqa: E402
from onnx_lowrank.bench import TimingPlan, bench  # noqa: E402
from onnx_lowrank.runtime import SessionConfig  # noqa: E402

MATMUL_RANKS = (64, 128, 256, 384)
CONV_RANKS = (32, 64, 96, 128)
ACCEPTANCE = (  # name, builder, batch, target speedup
    ("mlp 768x3072 r128 + bias + Relu", mlp_model, 256, 2.4),
    ("gemm 1024x1024 r96 transB alpha beta", gemm_model, 256, 2.5),
    ("conv3x3 256 (64,64) + conv1x1 r64", conv_model, 8, 3.0),
)


def bare_matmul(k: int = 768, n: int = 3072, seed: int = 0) -> onnx.ModelProto:
    # the weight's values do not change the timing of either form; --rank fixes the factorization
    w = np.random.default_rng(seed).standard_normal((k, n)) / np.sqrt(k)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
                              [numpy_helper.from_array(w.astype(np.float32), "W")])
    return _model(graph)


def bare_conv(ch: int = 256, size: int = 14, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((ch, ch, 3, 3)) / np.sqrt(ch * 9)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
        "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", ch, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", ch, size, size])],
        [numpy_helper.from_array(w.astype(np.float32), "W"),
         numpy_helper.from_array((0.1 * rng.standard_normal(ch)).astype(np.float32), "B")])
    return _model(graph)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", 17)])
    model.ir_version = 8    # ORT 1.31 refuses the IR 14 that onnx 1.23 writes
    return model


def ranks_part(threads: int | None, plan: TimingPlan) -> list[dict]:
    rows = []
    for name, dense, ranks, batch in (("MatMul 768x3072", bare_matmul(), MATMUL_RANKS, 256),
                                      ("Conv3x3 256->256 14x14", bare_conv(), CONV_RANKS, 8)):
        for rank in ranks:
            factorized, report = optimize(dense, rank=rank, validate=False, measure=False, rank_multiple=1)
            (layer,) = report.layers
            assert layer.decomposed, layer.reason
            ideal = layer.macs_before / layer.macs_after
            result = bench([dense, factorized], config=SessionConfig(threads=threads), batch=batch, plan=plan)
            rows.append(dict(layer=name, batch=batch, rank="x".join(map(str, layer.rank)), ideal=ideal,
                             speedup=result.speedup, ci=[result.speedup_ci_low, result.speedup_ci_high],
                             realized=result.speedup / ideal,
                             dense_ms=result.models[0].median_ms, factorized_ms=result.models[1].median_ms))
            _print_rank_row(rows[-1])
    return rows


def acceptance_part(threads: int | None, plan: TimingPlan) -> list[dict]:
    rows = []
    for name, build, batch, target in ACCEPTANCE:
        model = build()
        optimized, report = optimize(model, batch=batch)
        totals = report.totals()
        ideal = totals["layer_macs_before"] / totals["layer_macs_after"] if totals["layer_macs_after"] else None
        result = bench([model, optimized], config=SessionConfig(threads=threads), batch=batch, plan=plan)
        rows.append(dict(model=name, batch=batch, target=target, speedup=result.speedup,
                         ci=[result.speedup_ci_low, result.speedup_ci_high], ideal=ideal, met=result.speedup >= target,
                         ranks={r.name: r.rank for r in report.decomposed},
                         rel_error=max(o.rel_l2_error for o in report.parity.outputs),
                         dense_ms=result.models[0].median_ms, optimized_ms=result.models[1].median_ms))
        _print_acceptance_row(rows[-1])
    return rows


def _print_rank_row(r: dict) -> None:
    print(f"  {r['layer']:<24} rank {r['rank']:>7}  ideal {r['ideal']:5.2f}x  measured {r['speedup']:5.2f}x "
          f"(95% CI {r['ci'][0]:.2f}-{r['ci'][1]:.2f})  realized/ideal {r['realized']:.2f}  "
          f"[{r['dense_ms']:.3f} -> {r['factorized_ms']:.3f} ms]", flush=True)


def _print_acceptance_row(r: dict) -> None:
    print(f"  {r['model']:<38} batch {r['batch']:>3}  speedup {r['speedup']:5.2f}x (95% CI {r['ci'][0]:.2f}-"
          f"{r['ci'][1]:.2f})  target {r['target']}x {'MET' if r['met'] else 'MISSED'}  ideal {r['ideal']:.2f}x  "
          f"ranks {r['ranks']}  rel error {r['rel_error']:.1e}  [{r['dense_ms']:.3f} -> {r['optimized_ms']:.3f} ms]",
          flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="default",
                        help="comma-separated intra-op thread counts; 'default' is ORT's choice (default)")
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--block-ms", type=float, default=50.0)
    parser.add_argument("--parts", default="ranks,acceptance")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    plan = TimingPlan(blocks=args.blocks, block_s=args.block_ms / 1e3)
    figures: dict = {"cpu_count": os.cpu_count(), "load_before": os.getloadavg()}
    import onnxruntime
    print(f"onnxruntime {onnxruntime.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    for threads_text in args.threads.split(","):
        threads = None if threads_text == "default" else int(threads_text)
        label = f"threads={threads_text}"
        figures[label] = {}
        if "ranks" in args.parts:
            print(f"[{label}] measured vs FLOP-ideal speedup")
            figures[label]["ranks"] = ranks_part(threads, plan)
        if "acceptance" in args.parts:
            print(f"[{label}] acceptance models, default optimize")
            figures[label]["acceptance"] = acceptance_part(threads, plan)
    figures["load_after"] = os.getloadavg()
    print(f"load average {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
