"""Argument types and output helpers shared by the commands."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from ..errors import OutputError


def float_arg(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def write_text(path: str, text: str) -> None:
    """Atomically, like models: a temporary file beside the target, then a rename."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent if str(target.parent) else ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write '{path}': {exc.strerror}") from None


def add_provider_args(parser: argparse.ArgumentParser) -> None:
    """--provider and the provider options that matter, shared by validate and bench."""
    group = parser.add_argument_group("execution provider")
    group.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu",
                       help="ONNX Runtime execution provider (default cpu); never replaced by CPU if it fails to start")
    group.add_argument("--device-id", type=int_arg, default=0, metavar="N", help="GPU ordinal for cuda / tensorrt (default 0)")
    group.add_argument("--trt-fp16", action="store_true", help="tensorrt: allow fp16 kernels")
    group.add_argument("--trt-engine-cache", metavar="DIR", help="tensorrt: keep built engines in DIR between runs")


def add_input_args(parser: argparse.ArgumentParser, batch: int = 1) -> None:
    """How the models' inputs are made, shared by validate and bench."""
    group = parser.add_argument_group("inputs (generated unless --inputs)")
    group.add_argument("--inputs", metavar="FILE.npz",
                       help="arrays keyed by input name, leading axis = samples (an array of the input's own rank is one sample)")
    group.add_argument("--shape", action="append", metavar="NAME:D1,D2,...",
                       help="shape of a generated input (repeatable); dynamic dims default to --batch first, 16 elsewhere")
    group.add_argument("--batch", type=int_arg, default=batch, help=f"value of dynamic first dims (default {batch})")
    group.add_argument("--int-range", default="0:25", metavar="LO:HI",
                       help="integer inputs are drawn from [LO, HI) (default 0:25; inputs named *mask* are all ones)")
    group.add_argument("--seed", type=int_arg, default=0, help="seed of the generated inputs (default 0)")


def session_config(args: argparse.Namespace, **settings):
    from ..runtime import SessionConfig
    return SessionConfig(provider=args.provider, device_id=args.device_id, trt_fp16=args.trt_fp16,
                         trt_engine_cache=args.trt_engine_cache, **settings)


def input_options(args: argparse.Namespace, model: str) -> dict:
    """The keyword arguments of check_parity / bench that the input flags set; generated inputs
    follow what `model`'s graph says of them (inputs.input_hints)."""
    from ..errors import OptionError
    from ..inputs import model_hints, parse_int_range
    from ..options import parse_shapes
    if args.batch < 1:
        raise OptionError(f"--batch must be a positive integer, got {args.batch}")
    return dict(inputs=args.inputs, shapes=parse_shapes(args.shape), batch=args.batch, seed=args.seed,
                int_range=parse_int_range(args.int_range), hints=None if args.inputs else model_hints(model))


def add_layer_selection(group, skip_help: str) -> None:
    """--ops / --include / --exclude / --skip, shared by optimize and analyze."""
    group.add_argument("--ops", default="matmul,gemm,conv", help="comma-separated subset of matmul,gemm,conv")
    group.add_argument("--include", metavar="REGEX", help="only nodes whose name matches")
    group.add_argument("--exclude", metavar="REGEX", help="skip nodes whose name matches")
    group.add_argument("--skip", default="", metavar="PASS[,PASS]", help=skip_help)


def skip_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def require_matplotlib() -> None:
    """--plot fails before any work is done, in one line, when matplotlib is missing."""
    from ..errors import OptionError
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise OptionError("--plot needs matplotlib: pip install 'onnx-lowrank[plot]'") from None


def check_side_outputs(outputs: dict[str, str | None], models: list[str | None]) -> None:
    """Report, JSON and plot paths must be writable and must not be one of the command's models:
    `--report in.onnx` would otherwise replace the user's model with a JSON file."""
    from ..io import check_output_path

    for flag, path in outputs.items():
        if path is None:
            continue
        check_output_path(path, None, force=True)
        for model in models:
            if model is not None and Path(path).resolve() == Path(model).resolve():
                raise OutputError(f"{flag} '{path}' is a model of this command; choose another path")


def peak_memory() -> int | None:
    """This process's peak resident set in bytes, or None where the OS does not tell (Windows).
    On Linux, VmHWM: getrusage's ru_maxrss carries the parent's peak across fork and exec, so a
    run started from a large process would report that process's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024   # macOS reports bytes, Linux KiB
