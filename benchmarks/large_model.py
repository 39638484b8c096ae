"""Peak memory of `onnx-lowrank optimize` on a model over the 2 GB protobuf limit (issue 4).

Builds, in a separate process, a model of about SIZE_GB stored with external data: one low-rank
MatMul that gets decomposed, and 40 embedding tables (Gather) that are carried along untouched.
Then runs the CLI in a subprocess and reads its peak resident memory from the kernel, with and
without the parity check. The issue's target: peak under about 2.5 x the model size.

    python benchmarks/large_model.py [--size-gb 2.2] [--workdir /tmp/onnx-lowrank-large]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

BUILD = r'''
import sys, numpy as np, onnx
from onnx import helper as h, numpy_helper as nh, TensorProto as T
size_gb, path = float(sys.argv[1]), sys.argv[2]
# weights the size a transformer's are (40 tables of ~55 MB for 2.2 GB), not two giant ones: the
# per-tensor transients of reading and writing then stay small, as they are for real models
tables_n = 40
rows = int(size_gb * 2**30 / (1024 * 4) / tables_n)
rng = np.random.default_rng(0)
w = (rng.standard_normal((1024, 64)) @ rng.standard_normal((64, 1024)) / 32).astype(np.float32)
nodes = [h.make_node("MatMul", ["x", "W"], ["y"], name="fc")]
nodes += [h.make_node("Gather", [f"table{i}", "ids"], [f"e{i}"], name=f"embed{i}") for i in range(tables_n)]
outputs = [h.make_tensor_value_info(n, T.FLOAT, ["n", 1024]) for n in ["y"] + [f"e{i}" for i in range(tables_n)]]
initializers = [nh.from_array(w, "W")]
initializers += [nh.from_array(np.full((rows, 1024), i + 1.0, np.float32), f"table{i}") for i in range(tables_n)]
graph = h.make_graph(nodes, "large", [h.make_tensor_value_info("x", T.FLOAT, ["n", 1024]),
                                      h.make_tensor_value_info("ids", T.INT64, ["n"])], outputs, initializers)
del initializers
model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
model.ir_version = 8
onnx.save_model(model, path, save_as_external_data=True, location="large.onnx.data")
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=2.2)
    parser.add_argument("--workdir", default="/tmp/onnx-lowrank-large")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = work / "large.onnx"
    subprocess.run([sys.executable, "-c", BUILD, str(args.size_gb), str(src)], check=True)
    size = sum(p.stat().st_size for p in work.iterdir()) / 2**30
    print(f"model: {size:.2f} GB on disk (large.onnx + large.onnx.data)")
    cli = [sys.executable, "-m", "onnx_lowrank", "optimize", "-q"]
    # each run under its own probe process, whose RUSAGE_CHILDREN peak is that run's alone
    for label, extra in (("--no-validate", ["--no-validate"]), ("with parity check", [])):
        out = work / f"out{len(extra)}.onnx"
        probe = [sys.executable, "-c",
                 "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.returncode)",
                 *cli, str(src), str(out), *extra]
        start = time.perf_counter()
        proc = subprocess.run(probe, capture_output=True, text=True)
        wall = time.perf_counter() - start
        rss_kib, code = proc.stdout.strip().splitlines()[-1].split()
        peak = int(rss_kib) / 2**20
        files = sorted(p.name for p in work.iterdir() if p.name.startswith(out.name))
        print(f"{label:>18}: exit {code}, {wall:.0f} s, peak RSS {peak:.2f} GB = {peak / size:.2f} x model size; "
              f"wrote {', '.join(files)}")
        if proc.stderr.strip():
            print("   ", proc.stderr.strip().splitlines()[-1])
    check = subprocess.run([sys.executable, "-m", "onnx_lowrank", "validate", "-q", str(src), str(work / "out1.onnx")],
                           capture_output=True, text=True)
    print(f"validate large.onnx out1.onnx: exit {check.returncode}: {check.stdout.strip().splitlines()[-1]}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
