"""The folders' promise (STYLE.md): passes and numerics never reach ONNX Runtime, directly or through
the modules that run it, so they can be read, tested and reused without a runtime."""

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import onnx_lowrank

PACKAGE = Path(onnx_lowrank.__file__).parent
RUNTIME_MODULES = ["onnxruntime"] + [f"onnx_lowrank.{m}" for m in
                                      ("runtime", "latency", "bench", "profiling", "calibration", "parity")]


def pure_modules() -> list[str]:
    """onnx_lowrank.passes and onnx_lowrank.numerics, and every module in them."""
    return [f"onnx_lowrank.{folder}{suffix}" for folder in ("passes", "numerics")
            for suffix in ["", *(f".{m.name}" for m in pkgutil.iter_modules([str(PACKAGE / folder)]))]]


def test_passes_and_numerics_do_not_import_onnxruntime():
    modules = pure_modules()
    assert {"onnx_lowrank.passes.decompose_conv", "onnx_lowrank.numerics.svd"} <= set(modules)
    # the package itself is registered without running its __init__ (the public API, optimize(),
    # does run ORT): what is checked is what the passes and numerics import themselves
    script = ("import importlib, importlib.util, json, sys\n"
              "spec = importlib.util.find_spec('onnx_lowrank')\n"
              "sys.modules['onnx_lowrank'] = importlib.util.module_from_spec(spec)\n"
              f"for m in {modules!r}: importlib.import_module(m)\n"
              f"print(json.dumps(sorted(m for m in {RUNTIME_MODULES!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_each_pass_lives_in_the_module_named_for_it():
    import onnx_lowrank.passes as passes

    for entry in passes.PIPELINE:
        assert entry.run.__module__ == f"onnx_lowrank.passes.{entry.name}"
        assert getattr(passes, entry.name).__name__ == entry.run.__module__   # the module, not the function
