"""Where an `onnx-lowrank` run spends its time and memory, stage by stage: the CLI runs in-process
while a thread samples, every 0.25 s, the process's RSS and the main thread's stack (a poor man's
py-spy that also reads memory). The samples go to TRACE.json as they come (a run stopped from
outside keeps what it had), then a table: per stage (the stack cut at --depth frames), when it
began, the time spent in it and its peak RSS.

    python benchmarks/rss_trace.py TRACE.json -- optimize IN.onnx OUT.onnx --calibration C.npz ...
    python benchmarks/rss_trace.py TRACE.json --report [--depth 6]      # the table of a saved trace
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

INTERVAL = 0.25
#: frames of these modules make up a stage's name
KEPT = ("onnx_lowrank", "onnx_graphsurgeon", "onnxruntime", "numpy")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trace(out: Path, argv: list[str]) -> int:
    main_thread, samples, done = threading.get_ident(), [], threading.Event()

    def sample() -> None:
        start = time.perf_counter()
        while not done.is_set():
            frame, stack = sys._current_frames().get(main_thread), []
            while frame is not None:
                if any(k in frame.f_code.co_filename for k in KEPT):
                    stack.append(f"{Path(frame.f_code.co_filename).stem}:{frame.f_code.co_name}")
                frame = frame.f_back
            samples.append((round(time.perf_counter() - start, 2), _rss(), stack[::-1]))
            if len(samples) % 40 == 0:
                _dump(out, samples)
            done.wait(INTERVAL)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # a watchdog's kill still writes the trace
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    from onnx_lowrank.cli import main

    try:
        return main(argv)
    finally:
        done.set()
        sampler.join()
        _dump(out, samples)


def _dump(out: Path, samples: list) -> None:
    partial = out.with_suffix(".partial")
    partial.write_text(json.dumps(samples))
    partial.replace(out)


def report(path: Path, depth: int) -> None:
    samples = json.loads(path.read_text())
    peak = max(rss for _, rss, _ in samples)
    stages: dict[str, list] = {}
    for t, rss, stack in samples:
        key = " > ".join(frame.split(":")[1] for frame in stack[:depth]) or "(import, start-up)"
        stage = stages.setdefault(key, [t, 0.0, 0])
        stage[1] += INTERVAL
        stage[2] = max(stage[2], rss)
    print(f"{samples[-1][0]:.0f} s, peak RSS {peak / 1e9:.2f} GB")
    for key, (first, spent, high) in sorted(stages.items(), key=lambda kv: kv[1][0]):
        if spent >= 1.0 or high >= 0.9 * peak:
            print(f"{first:8.1f} s  {spent:7.1f} s  {high / 1e9:6.2f} GB  {key}")


def parse() -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:]
    cli = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--report", action="store_true", help="print the table of a saved trace")
    parser.add_argument("--depth", type=int, default=5)
    return parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv), cli


if __name__ == "__main__":
    args, cli = parse()
    if args.report:
        report(args.trace, args.depth)
    else:
        code = trace(args.trace, cli)
        report(args.trace, args.depth)
        sys.exit(code)
