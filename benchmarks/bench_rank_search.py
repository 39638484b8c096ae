"""Latency of a Tucker-2 conv against rank on CPU ONNX Runtime, and what the rank search gains.

    python benchmarks/bench_rank_search.py [--channels 256] [--sizes 14,28] [--step 4] [--passes 3]

The seed paper measured a Tucker-2 512x512x3x3 layer on GPU at ~3.5 ms for ranks <= 256 and ~4.0 ms
above: a step function. Part 1 sweeps r_out = r_in = r over [--min-rank, C] for a C x C x 3 x 3
layer (pad 1) at each input size, and prints latency per rank with the drops that exceed timing
noise, so the step structure (or its absence) on this CPU can be read off.

Part 2 takes rule ranks r0 across the range and compares plain rounding (r0 up to a multiple of 8,
what --no-measure does) with the measured rank search of `optimize` (rank_choice.search_ranks:
from that rank down to 0.75 x it, step 8, the rank just below the largest drop; the rank rule
bounds nothing but the floor here, as with --rank / --rank-ratio), on the same measured table.
It prints the latency ratio rounding / search (> 1: the search is faster) and the weight error each
costs, on a weight whose channel spectra decay geometrically (a trained conv's usual shape).

Timing: each rank has its own session (spinning off); ranks are timed round-robin for --passes
passes and each keeps its fastest block (onnx_lowrank.latency.block_ms), so a load change on the
machine hits all ranks alike rather than one stretch of the sweep.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_lowrank import runtime  # noqa: E402
from onnx_lowrank.latency import DENSE, Form, LayerGeometry, TimingSettings, block_ms, layer_model  # noqa: E402
from onnx_lowrank.numerics.ranks import round_up_to_multiple  # noqa: E402
from onnx_lowrank.options import Options  # noqa: E402
from onnx_lowrank.rank_choice import STEP_THRESHOLD, search_ranks  # noqa: E402


def sweep(geometry: LayerGeometry, ranks: list[int], passes: int, settings: TimingSettings,
          threads: int | None) -> tuple[float, dict[int, float]]:
    """Dense latency and latency per rank (ms), round-robin over `passes` passes, fastest block each."""
    config = runtime.SessionConfig(spinning=False, threads=threads)
    x = np.random.default_rng(0).standard_normal(geometry.input_shape).astype(np.float32)
    forms = {None: DENSE, **{r: Form("tucker2", (r, r)) for r in ranks}}
    sessions = {r: runtime.make_session(layer_model(geometry, form), config) for r, form in forms.items()}
    best = {r: float("inf") for r in forms}
    for _ in range(passes):
        for r, session in sessions.items():
            best[r] = min(best[r], block_ms(lambda: session.run(None, {"x": x}), settings))
    dense = best.pop(None)
    return dense, best


def decaying_spectrum_errors(channels: int, decay: float = 0.985) -> np.ndarray:
    """Tucker-2 error bound at equal ranks r for a weight whose two channel spectra decay as decay^i."""
    s = decay ** np.arange(channels)
    tail = np.sqrt(np.concatenate([np.cumsum((s ** 2)[::-1])[::-1], [0.0]]) / np.sum(s ** 2))
    return np.sqrt(2) * tail   # both modes truncated alike: hypot(e, e)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--sizes", default="14,28", help="input height = width, comma-separated")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--min-rank", type=int, default=32)
    parser.add_argument("--step", type=int, default=4, help="rank step of the sweep")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's choice)")
    args = parser.parse_args()
    c = args.channels
    settings = TimingSettings(block_ms=5.0, blocks=5)
    ranks = list(range(args.min_rank, c + 1, args.step))
    errors = decaying_spectrum_errors(c)
    threads = f"{args.threads} intra-op threads" if args.threads else "default threads"
    print(f"Tucker-2 {c}x{c}x3x3 conv, pad 1, batch {args.batch}, CPU ONNX Runtime ({threads}, spinning off), "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    for size in (int(s) for s in args.sizes.split(",")):
        geometry = LayerGeometry("conv", (args.batch, c, size, size), (c, c, 3, 3), strides=(1, 1), pads=(1, 1, 1, 1))
        dense, table = sweep(geometry, ranks, args.passes, settings, args.threads)
        print(f"\n== {size}x{size}: dense {dense:.3f} ms; Tucker-2 latency by rank (ms; '*' marks a drop > "
              f"{STEP_THRESHOLD:.0%} from the rank above)")
        line = []
        for prev, r in zip([None, *ranks], ranks):
            drop = prev is not None and table[prev] - table[r] > STEP_THRESHOLD * table[prev]
            line.append(f"{r:>4}:{table[r]:6.3f}{'*' if drop else ' '}")
            if len(line) == 6:
                print("  ".join(line))
                line = []
        if line:
            print("  ".join(line))
        deltas = [(table[r] - table[p]) / table[p] for p, r in zip(ranks, ranks[1:])]
        jumps = sorted(zip(deltas, ranks, ranks[1:]), reverse=True)[:5]
        print(f"rank +{args.step}: latency up > {STEP_THRESHOLD:.0%} in {sum(d > STEP_THRESHOLD for d in deltas)}, "
              f"within +-{STEP_THRESHOLD:.0%} in {sum(abs(d) <= STEP_THRESHOLD for d in deltas)}, "
              f"down > {STEP_THRESHOLD:.0%} in {sum(d < -STEP_THRESHOLD for d in deltas)} of {len(deltas)} steps; "
              "largest jumps: " + ", ".join(f"{p}->{r} +{d:.0%}" for d, p, r in jumps))
        options = Options(rank=8, rank_multiple=8, measure=False)   # rank rule: only the floor bounds the search
        print("rule rank r0 -> rounded (ms) -> searched (ms): rounding / search latency, weight error bound")
        gains = []
        for r0 in range(max(args.min_rank + 24, 64), c + 1, 20):
            rounded = round_up_to_multiple(r0, 8, c)
            if rounded not in table:
                continue
            decision = search_ranks((rounded,), lambda r: float(errors[r[0]]),
                                    lambda r: dense if r is None else table.get(r[0], np.nan), options)
            found = decision.ranks[0] if decision.ranks else rounded
            if found not in table:
                continue
            gain = table[rounded] / table[found]
            gains.append(gain)
            print(f"  r0 {r0:>3} -> {rounded:>3} ({table[rounded]:.3f}) -> {found:>3} ({table[found]:.3f}): "
                  f"{gain:.2f}x, error {errors[rounded]:.3f} -> {errors[found]:.3f}; vs dense {dense / table[found]:.2f}x")
        if gains:
            print(f"search vs plain rounding: median {np.median(gains):.2f}x, range {min(gains):.2f}x-{max(gains):.2f}x")


if __name__ == "__main__":
    main()
