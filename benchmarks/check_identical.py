"""Is the output unchanged? Optimizes every bundled model and a set of synthetic ones at a few option
sets with `--no-measure` (so the output is independent of the machine) and hashes each output model
and its per-layer records: `--record FILE` writes the hashes, `--compare FILE` reads them and names
every output that differs. A refactoring that should not change behaviour records before and
compares after.

    python benchmarks/check_identical.py --record benchmarks/.cache/identical.json    # before
    python benchmarks/check_identical.py --compare benchmarks/.cache/identical.json   # after

The synthetic models cover MatMul, Gemm, 1x1 and k x k convs (strides, pads, dilations, every
auto_pad), BatchNorm folding, merge_linear, LoRA (fuse_parallel), the three conv methods,
calibration with --target-flops and --error-correction. Exit 0 when every output matches, 1 when
one differs or is missing, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx.parser
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import synthetic  # noqa: E402
from onnx_lowrank import optimize  # noqa: E402

MODELS = ROOT / "models"
CALIBRATION_DIR = ROOT / "benchmarks" / ".cache" / "check_identical"


def _text_model(graph: str, **weights: np.ndarray) -> onnx.ModelProto:
    model = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : 17]>\ntiny {graph}')
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in weights.items())
    return model


def _conv(attrs: str, kernel: int = 3, spatial: int = 9, ch: int = 32, relu: bool = False
          ) -> Callable[[], onnx.ModelProto]:
    """A low-rank k x k conv (Tucker ranks 8, 8, small noise) with these attributes, then a 1x1 conv
    (merged into it unless a Relu stands between)."""
    def build() -> onnx.ModelProto:
        rng = np.random.default_rng(0)
        w = synthetic.low_rank_conv_weight(rng, ch, ch, kernel, (8, 8), 1e-3) / np.float32(np.sqrt(ch * kernel ** 2))
        w2 = (synthetic.low_rank_matrix(rng, ch, ch, 8, 1e-3) / np.float32(np.sqrt(ch))).reshape(ch, ch, 1, 1)
        a = f"<{attrs}>" if attrs else ""
        return _text_model(f"(float[N, {ch}, {spatial}, {spatial}] x) => (float[N, {ch}, H, V] y) "
                           f"{{ [conv1] h0 = Conv{a}(x, W1, b1) h = {'Relu' if relu else 'Identity'}(h0) "
                           "[conv2] y = Conv(h, W2) }",
                           W1=w.astype(np.float32), b1=np.linspace(-1, 1, ch, dtype=np.float32),
                           W2=w2.astype(np.float32))
    return build


def _fp16_mlp() -> onnx.ModelProto:
    """float16 weights behind Casts to float (what fold_constant_weights folds and restores)."""
    rng = np.random.default_rng(0)
    w1 = (synthetic.low_rank_matrix(rng, 64, 96, 16, 1e-3) / 8).astype(np.float16)
    w2 = (synthetic.low_rank_matrix(rng, 96, 32, 16, 1e-3) / 10).astype(np.float16)
    return _text_model("(float[B, 64] x) => (float[B, 32] y) { c1 = Cast<to = 1>(W1) [fc1] h = MatMul(x, c1) "
                       "r = Relu(h) c2 = Cast<to = 1>(W2) [fc2] y = MatMul(r, c2) }", W1=w1, W2=w2)


def _small_cnn() -> onnx.ModelProto:
    return synthetic.bottleneck_model(ch=32, out_ch=64, ranks=(8, 8), size=8)


#: name -> model builder (or bundled file)
CASE_MODELS: dict[str, Callable[[], onnx.ModelProto] | Path] = {
    "lowrank_mlp_small": MODELS / "lowrank_mlp_small.onnx",
    "mlp": MODELS / "mlp.onnx",
    "bert_tiny": MODELS / "bert_tiny.onnx",
    "cnn_digits": MODELS / "cnn_digits.onnx",
    "matmul": lambda: synthetic.mlp_model(k=256, n=512, rank=32),
    "gemm": lambda: synthetic.gemm_model(k=256, n=192, rank=24),
    "gemm_no_trans": lambda: synthetic.gemm_model(k=128, n=160, rank=16, trans_b=0),
    "conv_3x3_1x1": lambda: synthetic.conv_model(ch=64, ranks=(16, 16), rank_1x1=16),
    "conv_strided": _conv("strides = [2, 2], pads = [1, 0, 1, 2]"),
    "conv_strided_relu": _conv("strides = [2, 2], pads = [1, 0, 1, 2]", relu=True),
    "conv_dilated": _conv("dilations = [2, 1], pads = [2, 1, 2, 1]"),
    "conv_same_upper": _conv('auto_pad = "SAME_UPPER", strides = [2, 2]'),
    "conv_same_lower": _conv('auto_pad = "SAME_LOWER", strides = [2, 2]'),
    "conv_same_lower_relu": _conv('auto_pad = "SAME_LOWER", strides = [2, 2]', relu=True),
    "conv_valid": _conv('auto_pad = "VALID"'),
    "conv_valid_relu": _conv('auto_pad = "VALID"', relu=True),
    "conv_notset": _conv('auto_pad = "NOTSET", pads = [1, 1, 1, 1]'),
    "conv_5x5": _conv("pads = [2, 2, 2, 2]", kernel=5),
    "conv_bn_relu": lambda: synthetic.conv_bn_relu_model(in_ch=32, out_ch=32, size=8),
    "matmul_chain": lambda: synthetic.matmul_chain_model(k=256, hidden=192, n=256),
    "gemm_chain": lambda: synthetic.gemm_chain_model(k=192, hidden=384, n=192),
    "conv1x1_chain": lambda: synthetic.conv1x1_chain_model(ch=64, hidden=128, size=6),
    "lora": lambda: synthetic.lora_model(k=256, n=256, rank=8),
    "qkv": lambda: synthetic.qkv_model(hidden=128, rank=16),
    "bottleneck": _small_cnn,
    "fp16_mlp": _fp16_mlp,
}

RULES = {"default": {}, "tol1e-2_m16": {"tolerance": 1e-2, "rank_multiple": 16}, "ratio0.5": {"rank_ratio": 0.5}}
CONV_METHODS = {"branched-tucker": {"conv_method": "branched-tucker", "branches": 2, "rank_ratio": 0.5},
                "spatial-svd": {"conv_method": "spatial-svd", "rank_ratio": 0.5},
                "auto": {"conv_method": "auto", "branches": 2, "tolerance": 1e-2}}
CALIBRATED = {"flops0.6": {"target_flops": 0.6}, "flops0.6_ec": {"target_flops": 0.6, "error_correction": True}}
MERGES = {"across_activations": {"merge_across_activations": True, "rank_ratio": 0.5},
          "fuse_horizontal": {"fuse_horizontal": True, "tolerance": 1e-2}}

CONV_CASES = ("cnn_digits", "conv_3x3_1x1", "conv_strided", "conv_strided_relu", "conv_dilated", "conv_same_upper",
              "conv_same_lower", "conv_same_lower_relu", "conv_valid", "conv_valid_relu", "conv_notset", "conv_5x5",
              "conv_bn_relu", "bottleneck")
CALIBRATED_CASES = ("lowrank_mlp_small", "cnn_digits", "matmul", "gemm", "conv_3x3_1x1", "conv_strided",
                    "conv_strided_relu", "conv_same_upper", "conv_same_lower_relu", "bottleneck", "fp16_mlp")


def cases() -> list[tuple[str, str, dict]]:
    """(model, option set name, options), in a fixed order."""
    out = [(m, r, o) for m in CASE_MODELS for r, o in RULES.items()]
    out += [(m, c, o) for m in CONV_CASES for c, o in CONV_METHODS.items()]
    out += [(m, c, o) for m in CALIBRATED_CASES for c, o in CALIBRATED.items()]
    out += [(m, c, o) for m in ("bottleneck", "qkv", "matmul_chain") for c, o in MERGES.items()]
    return out


def load(name: str) -> onnx.ModelProto:
    source = CASE_MODELS[name]
    return onnx.load(source) if isinstance(source, Path) else source()


def calibration_file(name: str, model: onnx.ModelProto) -> str:
    """Samples for the model's inputs: the bundled digits for the CNN, else seeded normal values
    (dynamic dims: 24 samples; any other dynamic dim 8)."""
    if name == "cnn_digits":
        return str(MODELS / "digits_calib.npz")
    CALIBRATION_DIR.mkdir(parents=True, exist_ok=True)
    path = CALIBRATION_DIR / f"{name}.npz"
    rng = np.random.default_rng(1)
    arrays = {}
    for value in model.graph.input:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 8 for d in tensor.shape.dim]
        dims[0] = 24
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        if np.issubdtype(dtype, np.integer):
            arrays[value.name] = rng.integers(0, 2 if "mask" in value.name else 100, dims).astype(dtype)
        else:
            arrays[value.name] = rng.standard_normal(dims).astype(dtype)
    np.savez(path, **arrays)
    return str(path)


def digest(name: str, option_set: str, options: dict) -> dict[str, str]:
    model = load(name)
    options = {"measure": False, **options}
    if option_set in CALIBRATED:
        options["calibration"] = calibration_file(name, model)
    try:
        optimized, report = optimize(model, **options)
    except Exception as e:   # a failure is an outcome to compare too
        return {"error": f"{type(e).__name__}: {e}"}
    layers = json.dumps([dataclasses.asdict(r) for r in report.layers], sort_keys=True, default=str)
    return {"model": hashlib.sha256(optimized.SerializeToString(deterministic=True)).hexdigest(),
            "layers": hashlib.sha256(layers.encode()).hexdigest()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", metavar="FILE", help="write the hashes of every output to FILE")
    mode.add_argument("--compare", metavar="FILE", help="compare every output against the hashes in FILE")
    p.add_argument("--only", metavar="REGEX", help="just the cases whose 'model/options' matches")
    args = p.parse_args(argv)
    selected = [c for c in cases() if args.only is None or re.search(args.only, f"{c[0]}/{c[1]}")]
    results: dict[str, dict[str, str]] = {}
    for name, option_set, options in selected:
        start = time.perf_counter()
        key = f"{name}/{option_set}"
        results[key] = digest(name, option_set, options)
        print(f"{key:40s} {time.perf_counter() - start:6.1f} s {results[key].get('error', '')}", flush=True)
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text(json.dumps(results, indent=1, sort_keys=True))
        print(f"recorded {len(results)} outputs in {args.record}")
        return 0
    baseline = json.loads(Path(args.compare).read_text())
    differ = [k for k in results if results[k] != baseline.get(k)]
    for key in differ:
        what = "missing from the baseline" if key not in baseline else ", ".join(
            part for part in sorted(set(results[key]) | set(baseline[key]))
            if results[key].get(part) != baseline[key].get(part))
        print(f"DIFFERS {key}: {what}")
    print(f"{len(results) - len(differ)} of {len(results)} outputs identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
