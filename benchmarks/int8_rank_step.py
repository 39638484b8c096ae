"""Which ranks (and kept-neuron counts) ONNX Runtime's int8 kernels run fastest (issue 12, item 3).

    .venv/bin/python benchmarks/int8_rank_step.py [--rows 512] [--width 384] [--ranks 96:208:8]

A factorized layer `x (rows x d) -> A (d x r) -> B (r x n)` and a pruned MLP block
`x -> W1 (d x k) -> Relu -> W2 (k x d)` are built for each r (k), quantized like `--quantize int8`
(ORT dynamic int8 of the MatMul weights), and all of them timed interleaved in one process
(spinning off, graph optimizations on, as served). The time per rank, against the fp32 form of the
same rank, shows whether the int8 kernels (MLAS QGEMM: packed panels of B) pay for multiples of 16,
32 or 64 more than the fp32 kernels do; the table ends with the mean time of the ranks at each
residue, which is what a rank step would choose between.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from onnx_lowrank import runtime  # noqa: E402
from onnx_lowrank.bench import TimingPlan, time_interleaved  # noqa: E402
from onnx_lowrank.quantize import quantize_int8  # noqa: E402


def factor_model(rows: int, d: int, n: int, r: int, block: bool, rng) -> onnx.ModelProto:
    """x @ A @ B (a factorized layer), or x @ W1 -> Relu -> @ W2 (a pruned MLP block, n = d)."""
    a = numpy_helper.from_array((rng.standard_normal((d, r)) / np.sqrt(d)).astype(np.float32), "A")
    b = numpy_helper.from_array((rng.standard_normal((r, n)) / np.sqrt(r)).astype(np.float32), "B")
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"])]
    if block:
        nodes.append(helper.make_node("Relu", ["h"], ["g"]))
        nodes.append(helper.make_node("MatMul", ["g", "B"], ["y"]))
    else:
        nodes.append(helper.make_node("MatMul", ["h", "B"], ["y"]))
    graph = helper.make_graph(nodes, f"r{r}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])], [a, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512, help="token rows per run (batch 8 x 64 tokens)")
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--out-width", type=int, default=1536, help="n of the factorized layer")
    parser.add_argument("--ranks", default="96:208:8", help="start:stop:step")
    parser.add_argument("--blocks", type=int, default=12)
    args = parser.parse_args()
    start, stop, step = (int(v) for v in args.ranks.split(":"))
    ranks = list(range(start, stop, step))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.width)).astype(np.float32)
    config = runtime.SessionConfig(spinning=False)

    for block in (False, True):
        n = args.width if block else args.out_width
        label = f"MLP block {args.width} -> k -> {args.width}" if block else \
            f"factorized layer {args.width} -> r -> {n}"
        runners, names = [], []
        for r in ranks:
            fp32 = factor_model(args.rows, args.width, n, r, block, rng)
            int8, _ = quantize_int8(fp32)
            for kind, model in (("fp32", fp32), ("int8", int8)):
                runners.append(runtime.runner(runtime.make_session(model, config), {"x": x}))
                names.append((r, kind))
        latencies, _ = time_interleaved(runners, TimingPlan(blocks=args.blocks, block_s=0.05))
        us = {key: float(np.median(t)) * 1e6 for key, t in zip(names, latencies)}
        print(f"\n{label}, {args.rows} rows, load {os.getloadavg()[0]:.1f}")
        print("| rank | fp32 us | int8 us | int8 us per rank | fp32 / int8 |")
        print("|---:|---:|---:|---:|---:|")
        for r in ranks:
            print(f"| {r} | {us[(r, 'fp32')]:.0f} | {us[(r, 'int8')]:.0f} | {us[(r, 'int8')] / r:.2f} | "
                  f"{us[(r, 'fp32')] / us[(r, 'int8')]:.2f}x |")
        # a rank's time against the straight line through all ranks: which residues sit below it
        for kind in ("fp32", "int8"):
            t = np.array([us[(r, kind)] for r in ranks])
            fit = np.polyval(np.polyfit(ranks, t, 1), ranks)
            excess = (t - fit) / fit
            by = {m: float(np.mean([e for r, e in zip(ranks, excess) if r % m == 0])) for m in (16, 32, 64)
                  if any(r % m == 0 for r in ranks)}
            odd = [e for r, e in zip(ranks, excess) if r % 16]
            print(f"{kind}: time above the linear fit, mean over ranks that are multiples of 16 / 32 / 64: "
                  + " / ".join(f"{by[m]:+.1%}" for m in by) + f"; the others (8 mod 16): {np.mean(odd):+.1%}")


if __name__ == "__main__":
    main()
