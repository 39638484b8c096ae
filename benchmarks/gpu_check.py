"""One prepared GPU check (issue 13, item 5): dense vs factorized latency per layer, and the whole
model original vs optimized, written to one JSON.

    python benchmarks/gpu_check.py --out gpu_check.json           # a CUDA machine: < 8 min
    python benchmarks/gpu_check.py --cpu --out /tmp/gpu_check.json  # CPU, tiny sizes (runs in the suite)

Per layer, through torch (cuBLAS / cuDNN; fp16, bf16, fp32): y = x W against y = (x A) B for the
matrix layers of the bundled transformer (models/bert_tiny.onnx) at the ranks the tool chose
(`--rank-ratio 0.5 --no-measure`: the default tolerance keeps its random weights dense) with
`--rank-multiple` 8, 16, 32 and 64, and a ResNet-style conv shape set as dense k x k conv against
its Tucker-2 chain (1x1 -> k x k -> 1x1) at the same rank multiples. Whole model: original vs
optimized bert_tiny through ONNX Runtime's CUDA and TensorRT providers, whichever are importable
and start. Needs only what a CUDA machine has (torch with CUDA, onnxruntime-gpu, this checkout): no
network, nothing downloaded, no files but the JSON.

--cpu: torch on the CPU if it is installed, else numpy (matmul) and no convs; tiny token counts;
whole model through ORT's CPU provider. It checks that the script runs, not GPU figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_lowrank import optimize  # noqa: E402
from onnx_lowrank.numerics import ranks as R  # noqa: E402

TRANSFORMER = ROOT / "models" / "bert_tiny.onnx"
RANK_MULTIPLES = (8, 16, 32, 64)
DTYPES = ("float16", "bfloat16", "float32")
#: ResNet-50 stages: (channels, spatial size) of their 3x3 convs, and the 1x1 expansion convs
CONV_SHAPES = ((64, 64, 3, 56), (128, 128, 3, 28), (256, 256, 3, 14), (512, 512, 3, 7),
               (256, 64, 1, 56), (1024, 256, 1, 14))


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def timed(fn: Callable[[], object], sync: Callable[[], None], repeats: int, warmup: int = 3) -> float:
    """Median wall time of fn in ms, after warm-up, synchronizing the device around each call."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def transformer_layers(rank_multiple: int) -> list[dict]:
    """The matrix layers of bert_tiny and the rank the tool chose for each at this multiple."""
    _, report = optimize(str(TRANSFORMER), rank_ratio=0.5, rank_multiple=rank_multiple, measure=False,
                         validate=False)
    return [{"layer": r.name, "k": r.weight_shape[0], "n": r.weight_shape[1], "rank": r.rank[0]}
            for r in report.layers if r.decomposed and r.rank and len(r.weight_shape) == 2]


def matrix_timings(layers: list[dict], tokens: int, dtypes: tuple[str, ...], device: str, repeats: int) -> list[dict]:
    torch = _torch() if device != "numpy" else None
    rows = []
    for layer in layers:
        k, n, r = layer["k"], layer["n"], layer["rank"]
        for dtype in dtypes:
            if torch is None:
                rng = np.random.default_rng(0)
                x, w = rng.standard_normal((tokens, k), np.float32), rng.standard_normal((k, n), np.float32)
                a, b = rng.standard_normal((k, r), np.float32), rng.standard_normal((r, n), np.float32)
                dense = timed(lambda: x @ w, lambda: None, repeats)
                factorized = timed(lambda: (x @ a) @ b, lambda: None, repeats)
            else:
                t = getattr(torch, dtype)
                gen = torch.Generator(device="cpu").manual_seed(0)
                x, w, a, b = (torch.randn(*s, generator=gen).to(device=device, dtype=t)
                              for s in ((tokens, k), (k, n), (k, r), (r, n)))
                sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
                with torch.inference_mode():
                    dense = timed(lambda: x @ w, sync, repeats)
                    factorized = timed(lambda: (x @ a) @ b, sync, repeats)
            rows.append({**layer, "dtype": dtype, "tokens": tokens, "dense_ms": round(dense, 5),
                         "factorized_ms": round(factorized, 5), "speedup": round(dense / factorized, 3),
                         "flop_ideal": round(R.matrix_macs(k, n) / R.matrix_macs(k, n, r), 3)})
    return rows


def conv_timings(batch: int, dtypes: tuple[str, ...], device: str, repeats: int, shrink: int) -> list[dict]:
    """Dense conv vs Tucker-2 (1x1 -> k x k -> 1x1; for 1x1 convs, two 1x1) at half the channels'
    rank rounded to each multiple."""
    torch = _torch()
    if torch is None or device == "numpy":
        return []
    import torch.nn.functional as F
    rows = []
    for out_ch, in_ch, kernel, size in CONV_SHAPES:
        out_ch, in_ch, size = max(8, out_ch // shrink), max(8, in_ch // shrink), max(4, size // shrink)
        for multiple in RANK_MULTIPLES:
            r_out = R.round_up_to_multiple(out_ch // 2, multiple, out_ch)
            r_in = R.round_up_to_multiple(in_ch // 2, multiple, in_ch)
            for dtype in dtypes:
                t = getattr(torch, dtype)
                gen = torch.Generator(device="cpu").manual_seed(0)

                def randn(*shape):
                    return torch.randn(*shape, generator=gen).to(device=device, dtype=t)

                x = randn(batch, in_ch, size, size).contiguous(memory_format=torch.channels_last)
                pad = kernel // 2
                w = randn(out_ch, in_ch, kernel, kernel)
                if kernel == 1:
                    chain = [(randn(r_in, in_ch, 1, 1), 0), (randn(out_ch, r_in, 1, 1), 0)]
                    ranks = [r_in]
                else:
                    chain = [(randn(r_in, in_ch, 1, 1), 0), (randn(r_out, r_in, kernel, kernel), pad),
                             (randn(out_ch, r_out, 1, 1), 0)]
                    ranks = [r_out, r_in]
                sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

                def factorized():
                    h = x
                    for weight, p in chain:
                        h = F.conv2d(h, weight, padding=p)
                    return h

                with torch.inference_mode():
                    dense = timed(lambda: F.conv2d(x, w, padding=pad), sync, repeats)
                    fact = timed(factorized, sync, repeats)
                macs = (R.tucker2_macs(out_ch, in_ch, kernel * kernel, 1, *ranks) if kernel > 1
                        else R.matrix_macs(in_ch, out_ch, r_in))
                rows.append({"shape": [out_ch, in_ch, kernel, kernel], "spatial": size, "batch": batch,
                             "rank_multiple": multiple, "ranks": ranks, "dtype": dtype,
                             "dense_ms": round(dense, 5), "factorized_ms": round(fact, 5),
                             "speedup": round(dense / fact, 3),
                             "flop_ideal": round(out_ch * in_ch * kernel * kernel / macs, 3)})
    return rows


def whole_model(providers: list[str], batch: int, seq: int) -> list[dict]:
    """Original vs optimized bert_tiny (--rank-ratio 0.5 --no-measure) through each provider that
    ONNX Runtime offers here; a provider that fails to start is recorded with its reason."""
    from onnx_lowrank import LowRankError
    from onnx_lowrank.bench import bench
    from onnx_lowrank.runtime import SessionConfig

    optimized, _ = optimize(str(TRANSFORMER), rank_ratio=0.5, measure=False, validate=False)
    rows = []
    for provider in providers:
        try:
            result = bench([str(TRANSFORMER), optimized], config=SessionConfig(provider=provider),
                           labels=["original", "optimized"],
                           shapes={"input_ids": [batch, seq], "attention_mask": [batch, seq]})
            rows.append({"provider": provider, "batch": batch, "seq": seq, "speedup": round(result.speedup, 3),
                         "result": dataclasses.asdict(result)})
        except LowRankError as exc:
            rows.append({"provider": provider, "error": str(exc)})
    return rows


def available_providers(cpu: bool) -> list[str]:
    if cpu:
        return ["cpu"]
    import onnxruntime as ort
    offered = ort.get_available_providers()
    return [name for name, ep in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider"))
            if ep in offered]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the JSON to write")
    p.add_argument("--cpu", action="store_true", help="CPU only, tiny sizes: checks the script runs")
    args = p.parse_args(argv)
    torch = _torch()
    if args.cpu:
        device = "cpu" if torch is not None else "numpy"
        tokens, repeats, batch, shrink, dtypes = 32, 3, 1, 8, ("float32",) if torch is None else ("float32", "bfloat16")
    else:
        if torch is None or not torch.cuda.is_available():
            print("no CUDA device through torch: run with --cpu, or on a CUDA machine", file=sys.stderr)
            return 2
        device, tokens, repeats, batch, shrink, dtypes = "cuda", 8 * 128, 50, 32, 1, DTYPES
    start = time.perf_counter()
    result: dict = {"command": " ".join(["python benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
                    "device": device, "host": platform.node(), "python": platform.python_version(),
                    "torch": getattr(torch, "__version__", None),
                    "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                    "matrix_layers": [], "conv_layers": [], "whole_model": []}
    for multiple in RANK_MULTIPLES:
        layers = [{**layer, "rank_multiple": multiple} for layer in transformer_layers(multiple)]
        result["matrix_layers"] += matrix_timings(layers, tokens, dtypes, device, repeats)
    result["conv_layers"] = conv_timings(batch, dtypes, device, repeats, shrink)
    result["whole_model"] = whole_model(available_providers(args.cpu), batch=1 if args.cpu else 8,
                                        seq=16 if args.cpu else 128)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}: {len(result['matrix_layers'])} matrix, {len(result['conv_layers'])} conv rows, "
          f"{len(result['whole_model'])} whole-model rows in {result['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
