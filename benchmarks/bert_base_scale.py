"""The tool's own cost on a BERT-base-size encoder (issue 13's acceptance): wall time, CPU time and
peak RSS of `onnx-lowrank optimize`, default and calibrated, each in its own process.

    python benchmarks/bert_base_scale.py [--runs default,calibrated] [--json out.json]

The model is benchmarks/bert_base_random.py's (110M parameters, a 414 MiB file, random weights:
sizes decide the cost); the calibration set is 128 samples x 128 random token ids. The targets:
default < 20 s at a peak <= 2.5x the file; `--calibration --target-flops 0.8 --no-measure`
< 120 s at <= 6x. The load average is printed before and after: on a busy machine wall time
says little, CPU time (user + system) more.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
MODEL = CACHE / "bert_base_helpers.onnx"
CALIBRATION = CACHE / "bert_base_calibration_128x128.npz"
TOOL = [sys.executable, "-m", "onnx_lowrank", "optimize"]
RUNS = {
    "default": [],
    "calibrated": ["--calibration", str(CALIBRATION), "--target-flops", "0.8", "--no-measure"],
}
TARGETS = {"default": (20.0, 2.5), "calibrated": (120.0, 6.0)}


def prepare() -> None:
    if not MODEL.is_file():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bert_base_random.py"), str(MODEL)], check=True)
    if not CALIBRATION.is_file():
        rng = np.random.default_rng(0)
        np.savez(CALIBRATION, input_ids=rng.integers(0, 30522, (128, 128)).astype(np.int64))


def measure(name: str, output: Path) -> dict:
    """One run in its own process: os.wait4 gives that process's own peak RSS and CPU time."""
    start = time.perf_counter()
    process = subprocess.Popen([*TOOL, str(MODEL), str(output), "--force", "-q", *RUNS[name]], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    file_mib = MODEL.stat().st_size / 2**20
    peak_mib = usage.ru_maxrss / 1024
    wall_target, memory_target = TARGETS[name]
    return {"run": name, "exit": os.waitstatus_to_exitcode(status), "wall_s": round(wall, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "peak_mib": round(peak_mib),
            "file_mib": round(file_mib), "peak_over_file": round(peak_mib / file_mib, 2),
            "targets": f"< {wall_target:g} s, <= {memory_target:g}x", "last_line": log.strip().splitlines()[-1:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="default,calibrated")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    prepare()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results = []
    for name in args.runs.split(","):
        result = measure(name, CACHE / f"bert_base_{name}.lowrank.onnx")
        results.append(result)
        print(f"{name:10s} exit {result['exit']}  wall {result['wall_s']:6.1f} s  cpu {result['cpu_s']:6.1f} s  "
              f"peak {result['peak_mib']:5d} MiB = {result['peak_over_file']:.2f}x the file "
              f"({result['file_mib']} MiB)  targets {result['targets']}")
        print(f"           {' '.join(result['last_line'])}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
