"""`onnx-lowrank optimize [IN [OUT]]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import OptionError
from .common import float_arg, int_arg, write_text

#: The model `onnx-lowrank optimize` works on when given none: a low-rank MLP from models/.
SAMPLE_MODEL = Path(__file__).resolve().parents[2] / "models" / "lowrank_mlp_small.onnx"


def add_parser(sub) -> None:
    p = sub.add_parser("optimize", help="decompose a model's MatMul / Gemm / Conv weights",
                       description="Replace weight-carrying MatMul, Gemm and Conv nodes by low-rank factors, "
                                   "check the result in ONNX Runtime, and report per layer what was done.")
    p.add_argument("input", nargs="?", help=f"input .onnx (default: the bundled sample {SAMPLE_MODEL.name})")
    p.add_argument("output", nargs="?", help="output .onnx (default: INPUT's name with .lowrank.onnx, in the current directory)")
    rule = p.add_argument_group("rank rule (one of; default --tolerance 1e-3)")
    rule.add_argument("--tolerance", type=float_arg, default=1e-3, metavar="T",
                      help="smallest rank whose relative weight error is <= T (default 1e-3: near-lossless)")
    rule.add_argument("--rank", type=int_arg, metavar="N", help="this rank for every layer")
    rule.add_argument("--rank-ratio", type=float_arg, metavar="F", help="rank = F x min(K, N)")
    rule.add_argument("--energy", type=float_arg, metavar="F", help="keep fraction F of the squared singular values")
    rule.add_argument("--rank-multiple", type=int_arg, default=8, metavar="M",
                      help="round ranks up to a multiple of M, never past break-even (default 8)")
    rule.add_argument("--min-flop-reduction", type=float_arg, default=0.1, metavar="F",
                      help="decompose a layer only if it saves at least this fraction of its MACs (default 0.1)")
    sel = p.add_argument_group("which layers")
    sel.add_argument("--ops", default="matmul,gemm,conv", help="comma-separated subset of matmul,gemm,conv")
    sel.add_argument("--include", metavar="REGEX", help="only nodes whose name matches")
    sel.add_argument("--exclude", metavar="REGEX", help="skip nodes whose name matches")
    sel.add_argument("--skip", default="", metavar="PASS[,PASS]", help="passes not to run (names as in the report)")
    chk = p.add_argument_group("proof")
    chk.add_argument("--no-validate", dest="validate", action="store_false",
                     help="skip the parity check in ONNX Runtime")
    chk.add_argument("--max-error", type=float_arg, metavar="E",
                     help="parity passes if ||y - y0|| / ||y0|| <= E per output (default: implied by the rank rule)")
    chk.add_argument("--shape", action="append", metavar="NAME:D1,D2,...",
                     help="input shape for the check (repeatable); dynamic dims default to --batch, others 16")
    chk.add_argument("--batch", type=int_arg, default=4, help="value for dynamic batch dims (default 4)")
    chk.add_argument("--seed", type=int_arg, default=0, help="seed of the generated inputs (default 0)")
    out = p.add_argument_group("output")
    out.add_argument("--report", metavar="FILE.json", help="write the report as JSON")
    ext = out.add_mutually_exclusive_group()
    ext.add_argument("--external-data", dest="external_data", action="store_true", default=None,
                     help="store weights in OUTPUT.data beside the model (default: when the input did, or over 2 GB)")
    ext.add_argument("--no-external-data", dest="external_data", action="store_false",
                     help="store weights inside the .onnx file (fails over 2 GB)")
    out.add_argument("--force", action="store_true", help="overwrite the input file, or write a model that failed parity")
    out.add_argument("--quiet", "-q", action="store_true", help="print only errors and the one-line result")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..io import check_output_path, save_model
    from ..optimize import optimize
    from ..options import Options, parse_shapes
    from ..views import human_bytes, render

    if args.input is None:
        if not SAMPLE_MODEL.is_file():
            raise OptionError("no input model given, and the bundled sample is not available: pass INPUT OUTPUT")
        args.input = str(SAMPLE_MODEL)
    output = args.output or Path(args.input).name.removesuffix(".onnx") + ".lowrank.onnx"
    options = Options(tolerance=args.tolerance, rank=args.rank, rank_ratio=args.rank_ratio, energy=args.energy,
                      rank_multiple=args.rank_multiple, min_flop_reduction=args.min_flop_reduction,
                      ops=args.ops, include=args.include, exclude=args.exclude, skip=[s for s in args.skip.split(',') if s], validate=args.validate,
                      max_error=args.max_error, shape=parse_shapes(args.shape), batch=args.batch, seed=args.seed)
    if args.report:
        check_output_path(args.report, None, force=True)
    output_path = check_output_path(output, args.input, args.force)

    bar = tqdm(desc="decomposing", unit=" layers", disable=args.quiet or None, leave=False, file=sys.stderr)
    try:
        model, report = optimize(args.input, options, on_layer=lambda name: (bar.set_postfix_str(name[-40:]), bar.update()))
    finally:
        bar.close()
    if not args.quiet:
        print(render(report))
    if args.report:
        write_text(args.report, report.to_json() + "\n")
    if report.parity is not None and not report.parity.passed and not args.force:
        print(f"onnx-lowrank: parity FAILED: {output_path} not written (loosen --max-error, or --force to write it anyway)",
              file=sys.stderr)
        return 1
    external = report.input_external_data if args.external_data is None else args.external_data
    save_model(model, output_path, external_data=external)
    verdict = "" if report.parity is None else f", parity {'PASSED' if report.parity.passed else 'FAILED'}"
    print(f"wrote {output_path} ({human_bytes(report.size_before)} -> {human_bytes(report.size_after)}, "
          f"{len(report.decomposed)} of {len(report.layers)} layers decomposed{verdict})")
    return 0 if report.parity is None or report.parity.passed else 1
