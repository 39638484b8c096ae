"""Checks `onnx-lowrank bench` against the acceptance of issue 3, through the CLI as a user runs it:

1. `bench M M --provider cpu --json f` reads speedup 1.00 +- 0.05 for any model M: here five
   models (the three acceptance models of the core issue, the bundled CNN and BERT), each
   `--repeats` times.
2. `bench ORIG OPT` on the core issue's low-rank MLP (768x3072, rank 128, batch 256) reads within
   25% of an independent interleaved measurement written here with plain onnxruntime: single runs
   alternating A B, B A, ..., each timed on its own, speedup = median over pairs of time(A) / time(B).

    python benchmarks/bench_check.py                # both checks
    python benchmarks/bench_check.py --repeats 5 --parts agreement --json check.json

Exit 0 when every reading is within its bound, 1 otherwise. Not a test: it depends on the machine
being otherwise idle; the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.synthetic import conv_model, gemm_model, mlp_model  # noqa: E402
from onnx_lowrank import optimize  # noqa: E402

SELF_MODELS = (  # name, model file (None: build), CLI shape flags
    ("mlp 768x3072", mlp_model, ["--batch", "256"]),
    ("gemm 1024x1024", gemm_model, ["--batch", "256"]),
    ("conv 256ch 14x14", conv_model, ["--batch", "8"]),
    ("cnn_digits", ROOT / "models" / "cnn_digits.onnx", ["--batch", "64"]),
    ("bert_tiny", ROOT / "models" / "bert_tiny.onnx", ["--shape", "input_ids:1,128", "--shape", "attention_mask:1,128"]),
)
#: the `onnx-lowrank` console script, as its entry point runs it, in this interpreter
CLI = [sys.executable, "-c", "import sys; from onnx_lowrank.cli import main; sys.exit(main())"]
SELF_BOUND = 0.05
AGREEMENT_BOUND = 0.25


def cli_bench(a: str, b: str, flags: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        subprocess.run([*CLI, "bench", a, b, "--provider", "cpu", "--json", str(out), *flags],
                       check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def independent_speedup(a: str, b: str, feeds: dict[str, np.ndarray], seconds: float = 8.0) -> float:
    """Plain onnxruntime: single runs alternating A B, B A, ..., each timed alone; the median over
    pairs of time(A) / time(B)."""
    def session(path):
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def timed(s) -> float:
        t0 = time.perf_counter()
        s.run(None, feeds)
        return time.perf_counter() - t0

    sa, sb = session(a), session(b)
    for _ in range(10):
        sa.run(None, feeds)
        sb.run(None, feeds)
    ratios = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        if len(ratios) % 2 == 0:
            ta, tb = timed(sa), timed(sb)
        else:
            tb, ta = timed(sb), timed(sa)
        ratios.append(ta / tb)
    return float(np.median(ratios))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="self,agreement", help="which checks: self, agreement or both")
    parser.add_argument("--json", help="write every reading here")
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    figures: dict = {"load_before": os.getloadavg(), "self": {}, "agreement": []}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        print(f"1. bench M M: speedup within 1 +- {SELF_BOUND}")
        for name, source, flags in SELF_MODELS if "self" in args.parts else ():
            path = str(source) if isinstance(source, Path) else str(Path(tmp) / f"{name.split()[0]}.onnx")
            if not isinstance(source, Path):
                onnx.save(source(), path)
            readings = [cli_bench(path, path, flags)["speedup"] for _ in range(args.repeats)]
            within = all(abs(s - 1) <= SELF_BOUND for s in readings)
            ok &= within
            figures["self"][name] = readings
            print(f"   {name:<18} {' '.join(f'{s:.3f}' for s in readings)}  {'ok' if within else 'OUT OF BOUND'}",
                  flush=True)

        print(f"2. bench ORIG OPT on the low-rank MLP vs an independent measurement: within {AGREEMENT_BOUND:.0%}")
        original = mlp_model()
        optimized, _ = optimize(original, batch=256)
        a, b = str(Path(tmp) / "orig.onnx"), str(Path(tmp) / "opt.onnx")
        onnx.save(original, a)
        onnx.save(optimized, b)
        feeds = {"x": np.random.default_rng(0).standard_normal((256, 768)).astype(np.float32)}
        for _ in range(args.repeats if "agreement" in args.parts else 0):
            ours = cli_bench(a, b, ["--batch", "256"])["speedup"]
            theirs = independent_speedup(a, b, feeds)
            within = abs(ours / theirs - 1) <= AGREEMENT_BOUND
            ok &= within
            figures["agreement"].append({"bench": ours, "independent": theirs})
            print(f"   bench {ours:.2f}x  independent {theirs:.2f}x  ratio {ours / theirs:.3f}  "
                  f"{'ok' if within else 'OUT OF BOUND'}", flush=True)
    figures["load_after"] = os.getloadavg()
    print(f"load average {os.getloadavg()[0]:.2f}; {'all within bounds' if ok else 'SOME READINGS OUT OF BOUND'}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
