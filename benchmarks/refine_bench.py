"""--refine against the closed-form fit it starts from, on all-MiniLM-L6-v2 and the digits CNN.

    .venv-torch/bin/python benchmarks/refine_bench.py minilm [--targets 1.2 1.3] [--gate]
    .venv-torch/bin/python benchmarks/refine_bench.py digits

Each run is one optimize(..., refine=True); the model refinement starts from (the closed form, at
the very same ranks) is taken from the stage's input, so the two columns differ by the refinement
alone. MiniLM: calibrated on the benchmark's templated sentences (calib.npz, minilm_export.py),
judged by the mean cosine of mean-pooled embeddings on texts of another domain (other.npz:
standard-library docstrings, minilm_other_domain.py) and on the held-out templated texts
(eval.npz); speed measured as benchmarks/minilm.py does, batch 8 x 64 tokens, interleaved.
--max-error none unless --gate (the default gate backs off lossy runs; it then judges the refined
model). Digits: accuracy on the 450 held-out digits at a --target-flops, Tucker-2 convs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import onnx_lowrank.data_aware as data_aware  # noqa: E402
from onnx_lowrank import optimize  # noqa: E402
from onnx_lowrank.options import Options  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"


def closed_form_capture() -> dict:
    """Keep the model the refinement stage is given (the closed form at the final ranks)."""
    seen: dict = {}
    stage = data_aware._refine.refine

    def capturing(plan, original, optimized, *args, **kwargs):
        seen["model"] = optimized
        return stage(plan, original, optimized, *args, **kwargs)

    data_aware._refine.refine = capturing
    return seen


def minilm(args) -> None:
    import minilm as bench   # benchmarks/minilm.py: embeddings, quality, measured_speedup

    bench.ensure_exported()
    if not (CACHE / "other.npz").is_file():
        subprocess.run([bench.TORCH_PYTHON, str(ROOT / "benchmarks" / "minilm_other_domain.py"), str(CACHE)],
                       check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    import onnx

    original = onnx.load(CACHE / "minilm.onnx")
    sets = {name: dict(np.load(CACHE / f"{name}.npz")) for name in ("other", "eval")}
    references = {name: bench.embeddings(original, data) for name, data in sets.items()}
    seen = closed_form_capture()
    rows = []
    for target in args.targets:
        began = time.perf_counter()
        model, report = optimize(original, Options(calibration=str(CACHE / "calib.npz"), target_speedup=target,
                                                   refine=True, refine_steps=args.steps,
                                                   max_error=None if args.gate else "none"))
        wall = time.perf_counter() - began
        outcome = report.data_aware.refinement
        cos = {(kind, name): bench.quality(references[name], bench.embeddings(m, sets[name]))[0]
               for kind, m in (("closed", seen["model"]), ("final", model)) for name in sets}
        speed = bench.measured_speedup(original, model, sets["eval"], batch=8, blocks=args.blocks)
        rows.append((target, speed, cos, outcome, wall))
        print(f"target {target}: measured {speed:.2f}x; other-domain cosine {cos['closed', 'other']:.4f} -> "
              f"{cos['final', 'other']:.4f}, held-out templated {cos['closed', 'eval']:.4f} -> {cos['final', 'eval']:.4f}; "
              f"refine {outcome.seconds:.0f} s wall / {outcome.cpu_seconds:.0f} s CPU, optimize {wall:.0f} s "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)
        for note in report.notes:
            if note.startswith(("refinement", "quality gate", "rank allocation", "target speedup")):
                print("   ", note.replace("\n", "\n    "))
    print("\n| --target-speedup | gate | measured speedup (b8 x 64) | other-domain cosine, closed form | + --refine "
          "| held-out templated, closed form | + --refine | refine wall / CPU s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for target, speed, cos, outcome, wall in rows:
        print(f"| {target} | {'default' if args.gate else 'none'} | {speed:.2f}x | {cos['closed', 'other']:.4f} | "
              f"{cos['final', 'other']:.4f} | {cos['closed', 'eval']:.4f} | {cos['final', 'eval']:.4f} | "
              f"{outcome.seconds:.0f} / {outcome.cpu_seconds:.0f} |")


def digits(args) -> None:
    from cnn_digits import MODEL, TEST, accuracy

    test = np.load(TEST)
    images, labels = test[test.files[0]], test[test.files[1]]
    base = accuracy(str(MODEL), images, labels)
    seen = closed_form_capture()
    print(f"original accuracy {base:.4f}")
    for flops in args.flops:
        model, report = optimize(str(MODEL), Options(calibration=str(ROOT / "models" / "digits_calib.npz"),
                                                     target_flops=flops, ops=("conv",), measure=False,
                                                     refine=True, refine_steps=args.steps, max_error="none"))
        outcome = report.data_aware.refinement
        print(f"target-flops {flops}: accuracy {accuracy(seen['model'], images, labels):.4f} (closed form) -> "
              f"{accuracy(model, images, labels):.4f} (refined); refine {outcome.seconds:.0f} s wall / "
              f"{outcome.cpu_seconds:.0f} s CPU")
        for note in report.notes:
            if note.startswith("refinement"):
                print("   ", note.replace("\n", "\n    "))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=["minilm", "digits"])
    parser.add_argument("--targets", type=float, nargs="+", default=[1.2, 1.3])
    parser.add_argument("--flops", type=float, nargs="+", default=[0.3, 0.2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--gate", action="store_true")
    parser.add_argument("--blocks", type=int, default=20)
    args = parser.parse_args()
    (minilm if args.model == "minilm" else digits)(args)


if __name__ == "__main__":
    main()
