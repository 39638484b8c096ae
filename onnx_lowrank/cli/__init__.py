"""The command line: parses, prints and sets exit codes; the work is done by the Python API.

Exit codes: 0 success, 1 a check failed (parity, a speed gate), 2 bad input or environment.
Each command lives in its own module with `add_parser(subparsers)`; COMMANDS lists them.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import LowRankError, OptionError
from . import analyze, bench, optimize, sweep, validate

PROG = "onnx-lowrank"
COMMANDS = [optimize, validate, bench, analyze, sweep]


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:   # one line, no usage dump
        raise OptionError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Low-rank decomposition of ONNX models, proven in ONNX Runtime.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _version() -> str:
    from .. import __version__
    return __version__


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except LowRankError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
