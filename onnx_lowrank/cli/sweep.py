"""`onnx-lowrank sweep IN --out-dir D`: optimize at a range of targets, validate and time each."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import OptionError, OutputError
from ..options import CONV_METHODS, measure_default
from ..sweep import DEFAULT_TARGETS, SWEEP_PLAN, TARGET_KINDS
from .common import (add_input_args, add_layer_selection, add_provider_args, check_side_outputs, float_arg,
                     input_options, int_arg, require_matplotlib, session_config, skip_list, write_text)


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="optimize at several targets; table and Pareto plot of speedup against error",
                       description="For each target: optimize (as `optimize --target-KIND T`), check parity, save "
                                   "the model into --out-dir and time it against the original (interleaved). Prints "
                                   "a table and marks the fastest point whose output error is within --max-error.")
    p.add_argument("input", help="model (.onnx)")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="each point's model is written here as "
                                                                   "<stem>.<kind><t>.onnx")
    p.add_argument("--calibration", metavar="FILE.npz|DIR", help="calibration samples, as for optimize")
    p.add_argument("--error-correction", action="store_true",
                   help="with --calibration, refit the factorized layers depth by depth, as for optimize")
    p.add_argument("--quantize", choices=["int8"],
                   help="quantize every point with ONNX Runtime's int8 (as optimize --quantize) and add the "
                        "int8-alone point: the front against what a user would do instead")
    p.add_argument("--targets", metavar="T[,T...]",
                   help="comma-separated targets (default flops/params " +
                        ",".join(map(str, DEFAULT_TARGETS["flops"])) + "; speedup " +
                        ",".join(map(str, DEFAULT_TARGETS["speedup"])) + ")")
    p.add_argument("--target-kind", choices=TARGET_KINDS, default="flops",
                   help="which optimize target the values set: --target-flops, --target-params or "
                        "--target-speedup (default flops)")
    p.add_argument("--max-error", type=float_arg, metavar="E",
                   help="choose the fastest point whose output error (relative L2, max over outputs) is <= E; "
                        "exit 1 if none is")
    p.add_argument("--plot", metavar="FILE.png", help="write measured speedup against output error "
                                                      "(needs matplotlib: pip install 'onnx-lowrank[plot]')")
    p.add_argument("--json", metavar="FILE", help="write every point as JSON")
    measure = p.add_mutually_exclusive_group()
    measure.add_argument("--measure", dest="measure", action="store_true", default=measure_default(),
                         help="hardware-aware ranks, as optimize (default, unless ONNX_LOWRANK_MEASURE=0)")
    measure.add_argument("--no-measure", dest="measure", action="store_false", help="ranks by the FLOP model only")
    p.add_argument("--conv-method", default="tucker2", choices=CONV_METHODS, help="as optimize (default tucker2)")
    sel = p.add_argument_group("which layers")
    add_layer_selection(sel, "passes not to run (names as in optimize's report)")
    add_provider_args(p)
    add_input_args(p, batch=4)
    t = p.add_argument_group("timing (per point, against the original)")
    t.add_argument("--blocks", type=int_arg, default=10,
                   help="timed blocks per model, at least; up to 3x as many until the speedup is known to +-2%% "
                        "(default 10)")
    t.add_argument("--block-ms", type=float_arg, default=20.0, metavar="MS",
                   help="each block repeats runs for about MS milliseconds (default 20)")
    t.add_argument("--warmup-ms", type=float_arg, default=SWEEP_PLAN.warmup_s * 1e3, metavar="MS",
                   help="warm-up per model: at least 3 runs and MS milliseconds (default %(default)g)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..bench import TimingPlan
    from ..options import Options, parse_shapes
    from ..report import to_json
    from ..sweep import plot_sweep, sweep
    from ..views import sweep_table
    from .validate import check_model_path

    if args.plot:
        require_matplotlib()
    if args.warmup_ms < 0:
        raise OptionError(f"--warmup-ms must be >= 0, got {args.warmup_ms:g}")
    check_side_outputs({"--plot": args.plot, "--json": args.json}, [args.input])
    check_model_path(args.input)
    targets = None if args.targets is None else [_target(text) for text in args.targets.split(",") if text.strip()]
    inputs = input_options(args, args.input)
    options = Options(calibration=args.calibration, error_correction=args.error_correction, measure=args.measure,
                      conv_method=args.conv_method, ops=args.ops, quantize=args.quantize,
                      include=args.include, exclude=args.exclude, skip=skip_list(args.skip),
                      shape=parse_shapes(args.shape), batch=args.batch, seed=args.seed, provider=args.provider)
    plan: TimingPlan = replace(SWEEP_PLAN, blocks=args.blocks, max_blocks=3 * args.blocks,
                               block_s=args.block_ms / 1e3, warmup_s=args.warmup_ms / 1e3)
    try:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create --out-dir '{args.out_dir}': {exc.strerror}") from None
    result = sweep(args.input, targets, options, target_kind=args.target_kind, out_dir=args.out_dir,
                   max_error=args.max_error, plan=plan, config=session_config(args), bench_inputs=inputs,
                   on_point=lambda p: print(f"{p.label or f'{args.target_kind} {p.target:g}'}: "
                                            f"{p.decomposed}/{p.candidates} layers, "
                                            f"error {_error(p.output_error)}, speedup {_speedup(p.speedup)}",
                                            file=sys.stderr))
    print(sweep_table(result))
    if args.json:
        write_text(args.json, to_json(result) + "\n")
    if args.plot:
        plot_sweep(result, args.plot)
        print(f"wrote {args.plot}")
    return 1 if args.max_error is not None and result.best is None else 0


def _target(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise OptionError(f"--targets: expected comma-separated numbers, got {text.strip()!r}") from None


def _error(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"
