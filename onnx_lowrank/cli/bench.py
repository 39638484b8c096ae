"""`onnx-lowrank bench A [B]`: latency of one model, or of A against B interleaved."""

from __future__ import annotations

import argparse
import sys

from .common import (add_input_args, add_provider_args, check_side_outputs, float_arg, input_options, int_arg,
                     session_config, write_text)
from .validate import check_model_path


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time a model, or two models against each other, in ONNX Runtime",
                       description="Time A alone, or A against B interleaved (A B, B A, ...) in one process: warm-up, "
                                   "then blocks of runs; median, p10 and p90 latency, throughput, and the per-block "
                                   "ratio A/B (the speedup of B over A). Graph optimizations on, as served.")
    p.add_argument("a", metavar="A", help="model (.onnx); the baseline when B is given")
    p.add_argument("b", metavar="B", nargs="?", help="model to time against A (.onnx)")
    add_provider_args(p)
    add_input_args(p)
    t = p.add_argument_group("timing")
    t.add_argument("--threads", type=int_arg, metavar="N", help="ORT intra-op threads (default: ORT's choice)")
    t.add_argument("--blocks", type=int_arg, default=30, help="timed blocks per model, at least (default 30)")
    t.add_argument("--max-blocks", type=int_arg, metavar="N",
                   help="A B: go on timing, up to N blocks, until the speedup's 95%% confidence interval is within "
                        "+-2%% (default 4 x --blocks; equal to --blocks: exactly --blocks)")
    t.add_argument("--block-ms", type=float_arg, default=50.0, metavar="MS",
                   help="each block repeats runs for about MS milliseconds (default 50)")
    t.add_argument("--warmup-ms", type=float_arg, default=200.0, metavar="MS",
                   help="warm-up per model: at least 3 runs and MS milliseconds (default 200)")
    t.add_argument("--profile", action="store_true",
                   help="also run ORT's profiler and show kernel time per original layer (factorized nodes summed)")
    t.add_argument("--int8-baseline", action="store_true",
                   help="also time ONNX Runtime's int8 quantization of A (what a user would deploy instead; static "
                        "QDQ calibrated on --inputs for a model with Conv, else dynamic int8 MatMul/Gemm weights) in "
                        "the same interleaved blocks, and give B's speedup over it")
    gate = p.add_argument_group("output and gates")
    gate.add_argument("--json", metavar="FILE", help="write every figure as JSON (the A/B ratio under 'speedup')")
    gate.add_argument("--min-speedup", type=float_arg, metavar="S", help="exit 1 if the speedup A/B is below S")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..bench import TimingPlan, bench, int8_baseline
    from ..errors import OptionError
    from ..report import to_json
    from ..views import bench_table

    models = [m for m in (args.a, args.b) if m is not None]
    check_side_outputs({"--json": args.json}, models)
    for path in models:
        check_model_path(path)
    if args.min_speedup is not None and args.b is None:
        raise OptionError("--min-speedup needs two models: bench A B --min-speedup S")
    if args.warmup_ms < 0:
        raise OptionError(f"--warmup-ms must be >= 0, got {args.warmup_ms:g}")
    plan = TimingPlan(blocks=args.blocks, max_blocks=args.max_blocks or 4 * args.blocks, block_s=args.block_ms / 1e3,
                      warmup_s=args.warmup_ms / 1e3)
    result = bench(models, config=session_config(args, threads=args.threads), plan=plan, profile=args.profile,
                   baseline=int8_baseline(args.a, args.inputs) if args.int8_baseline else None,
                   **input_options(args, models[0]))
    print(bench_table(result))
    if args.json:
        write_text(args.json, to_json(result) + "\n")
    if args.min_speedup is not None and result.speedup < args.min_speedup:
        print(f"onnx-lowrank: speedup {result.speedup:.3f}x is below --min-speedup {args.min_speedup:g}", file=sys.stderr)
        return 1
    return 0
