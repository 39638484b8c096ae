"""`onnx-lowrank validate ORIGINAL OPTIMIZED`: the same function, within a stated tolerance?"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ModelLoadError, OptionError
from ..options import Options
from .common import add_input_args, add_provider_args, check_side_outputs, input_options, session_config, write_text


def add_parser(sub) -> None:
    p = sub.add_parser("validate", help="check that two models compute the same function in ONNX Runtime",
                       description="Run ORIGINAL and OPTIMIZED in ONNX Runtime on the same inputs and compare every "
                                   "output: max abs and relative error, ||y-y0||/||y0||, cosine, top-1 agreement. "
                                   "Exit 0 if all outputs pass, 1 if any fails, 2 on bad input.")
    p.add_argument("original", help="reference model (.onnx)")
    p.add_argument("optimized", help="model to check against it (.onnx)")
    tol = p.add_argument_group("tolerance (per output with NAME:VALUE; repeatable)")
    tol.add_argument("--max-error", action="append", metavar="[NAME:]E",
                     help="pass if ||y - y0|| / ||y0|| <= E (default 1e-3)")
    tol.add_argument("--atol", action="append", metavar="[NAME:]A",
                     help="pass if |y - y0| <= A + R |y0| elementwise, like numpy.allclose (instead of --max-error; the one not given is 0)")
    tol.add_argument("--rtol", action="append", metavar="[NAME:]R", help="see --atol")
    add_input_args(p, batch=Options.batch)   # as optimize's own check does
    add_provider_args(p)
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    out.add_argument("--quiet", "-q", action="store_true", help="print only failures and the verdict")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..compare import tolerances
    from ..parity import check_parity
    from ..report import to_json
    from ..views import failure_detail, parity_table

    for path in (args.original, args.optimized):
        check_model_path(path)
    check_side_outputs({"--json": args.json}, [args.original, args.optimized])
    default, per_output = tolerances(by_output(args.max_error, "--max-error"), by_output(args.atol, "--atol"),
                                     by_output(args.rtol, "--rtol"))
    result = check_parity(args.original, args.optimized, tolerance=default, per_output=per_output,
                          config=session_config(args), **input_options(args, args.original))
    if args.json:
        write_text(args.json, to_json(result) + "\n")
    if args.quiet:
        for output in result.outputs:
            if not output.passed:
                print(f"FAILED {output.name}: {failure_detail(output)}")
        print(f"parity {'PASSED' if result.passed else 'FAILED'}")
    else:
        print(parity_table(result))
    return 0 if result.passed else 1


def by_output(values: list[str] | None, flag: str) -> dict[str | None, float]:
    """['1e-3', 'logits:1e-2'] -> {None: 1e-3, 'logits': 1e-2}; an output name may contain ':'."""
    parsed: dict[str | None, float] = {}
    for text in values or []:
        name, _, number = text.rpartition(":")
        try:
            parsed[name or None] = float(number)
        except ValueError:
            raise OptionError(f"{flag} {text!r}: expected a number or OUTPUT:NUMBER") from None
    return parsed


def check_model_path(path: str) -> None:
    if not Path(path).is_file():
        raise ModelLoadError(f"model '{path}' does not exist" if not Path(path).exists() else f"'{path}' is not a file")

