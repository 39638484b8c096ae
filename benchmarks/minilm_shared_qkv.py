"""One shared first factor for a layer's Q, K and V projections, against three (issue 12).

    .venv/bin/python benchmarks/minilm_shared_qkv.py [--calibration benchmarks/.cache/calib.npz]

Q, K and V read one tensor (the previous LayerNorm's output), so one whitened SVD of the stacked
weight [Wq Wk Wv] (d x 3d) gives a shared first factor A (d x r) and three second factors: MACs
r (d + 3d) per token, against 2 d (rq + rk + rv) for three separate whitened SVDs. At equal MACs the
shared rank is 1.5x each separate rank; it wins only if the three projections share their input
subspace by more than that.

Each stacked block is scaled by its own whitened norm ||X W||, so that the joint truncation weighs
the three projections' relative errors alike, as the separate ones do. Per layer and MAC budget:
the relative output error ||X W - X W_r|| / ||X W|| of Q, K and V, on the calibration texts' tokens
and on tokens of another domain (other.npz), for the separate and the shared form. Numpy only, on
activations captured once in ONNX Runtime.

`--model-level` then measures the whole model: the three projections are concatenated into one
d x 3d MatMul and a Split (exact), and `optimize` runs on that model and on the original with the
same calibration and MAC target; the fused layer's whitened SVD *is* the shared form (x A, then one
r x 3d MatMul, then the Split). Mean cosine of mean-pooled embeddings against the original's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from onnx_lowrank import runtime  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"


def qkv_layers(model: onnx.ModelProto) -> list[tuple[str, list[np.ndarray]]]:
    """(input tensor, [Wq, Wk, Wv]) for each set of three constant MatMuls reading one tensor."""
    weights = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights and "attention/self" in node.name:
            readers.setdefault(node.input[0], []).append(numpy_helper.to_array(weights[node.input[1]]))
    return [(name, ws) for name, ws in readers.items() if len(ws) == 3]


def activations(model: onnx.ModelProto, names: list[str], data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each named tensor's rows at real tokens (attention mask 1), float64."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    session = runtime.make_session(probe, runtime.SessionConfig())
    mask = data["attention_mask"].astype(bool)
    rows = {n: [] for n in names}
    for start in range(0, len(mask), 16):
        feeds = {k: v[start:start + 16] for k, v in data.items()}
        for name, value in zip(names, session.run(names, feeds)):
            rows[name].append(value[mask[start:start + 16]].astype(np.float64))
    return {n: np.concatenate(v) for n, v in rows.items()}


def whitened_basis(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Right singular vectors of X W (the whitened SVD's output basis, n x n), largest first."""
    _, _, vt = np.linalg.svd(x @ w, full_matrices=False)
    return vt.T


def rel_error(x: np.ndarray, w: np.ndarray, w_r: np.ndarray) -> float:
    return float(np.linalg.norm(x @ (w - w_r)) / np.linalg.norm(x @ w))


def fuse_qkv(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each set of constant MatMuls reading one tensor as one MatMul on the concatenated weight and
    a Split of its output (opset >= 13: the sizes are an input)."""
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    graph = fused.graph
    weights = {t.name: t for t in graph.initializer}
    groups: dict[str, list] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights and len(weights[node.input[1]].dims) == 2:
            groups.setdefault(node.input[0], []).append(node)
    nodes = list(graph.node)
    for x, group in groups.items():
        if len(group) < 2:
            continue
        arrays = [numpy_helper.to_array(weights[n.input[1]]) for n in group]
        cat = f"{x}/qkv_weight"
        graph.initializer.append(numpy_helper.from_array(np.concatenate(arrays, axis=1), cat))
        sizes = f"{x}/qkv_sizes"
        graph.initializer.append(numpy_helper.from_array(np.array([a.shape[1] for a in arrays], np.int64), sizes))
        matmul = onnx.helper.make_node("MatMul", [x, cat], [f"{x}/qkv"], name=f"{x}/qkv/MatMul")
        split = onnx.helper.make_node("Split", [f"{x}/qkv", sizes], [n.output[0] for n in group], axis=-1,
                                      name=f"{x}/qkv/Split")
        at = nodes.index(group[0])
        nodes = nodes[:at] + [matmul, split] + [n for n in nodes[at:] if n not in group]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return fused


def model_level(fractions: list[float], calibrations: list[str]) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import minilm as bench   # embeddings, quality
    from onnx_lowrank import optimize

    original = onnx.load(str(CACHE / "minilm.onnx"))
    fused = fuse_qkv(original)
    sets = {name: dict(np.load(CACHE / f"{name}.npz")) for name in ("eval", "other")}
    references = {name: bench.embeddings(original, data) for name, data in sets.items()}
    exact = {name: bench.quality(references[name], bench.embeddings(fused, data))[0] for name, data in sets.items()}
    onnx.save(fused, str(CACHE / "qkv_fused.onnx"))
    print(f"fused, uncompressed: cosine {exact['eval']:.6f} / {exact['other']:.6f} (exact rewrite)")
    print("| calibration | target MACs | form | layers | templated cosine | other-domain cosine |")
    print("|---|---:|---|---:|---:|---:|")
    for calibration in calibrations:
        for f in fractions:
            for label, model in (("separate Q, K, V", original), ("shared first factor", fused)):
                out, report = optimize(model, calibration=calibration, target_flops=f, max_error="none",
                                       measure=False, validate=False)
                onnx.save(out, str(CACHE / f"qkv_{Path(calibration).stem}_{f:.2f}_{'shared' if model is fused else 'separate'}.onnx"))
                cos = {name: bench.quality(references[name], bench.embeddings(out, data))[0]
                       for name, data in sets.items()}
                decomposed = sum(1 for layer in report.layers if layer.status == "decomposed")
                print(f"| {Path(calibration).name} | {f:.2f} | {label} | {decomposed} | {cos['eval']:.4f} | "
                      f"{cos['other']:.4f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", default=str(CACHE / "calib.npz"))
    parser.add_argument("--other", default=str(CACHE / "other.npz"))
    parser.add_argument("--macs", default="0.5,0.6,0.7,0.8", help="fractions of the Q/K/V MACs kept")
    parser.add_argument("--model-level", action="store_true", help="measure the whole model instead")
    parser.add_argument("--targets", default="0.8,0.72", help="--model-level: target MACs of all candidate layers")
    args = parser.parse_args()
    if args.model_level:
        model_level([float(f) for f in args.targets.split(",")], [args.calibration, str(CACHE / "mixed.npz")])
        return
    model = onnx.load(str(CACHE / "minilm.onnx"))
    layers = qkv_layers(model)
    names = [name for name, _ in layers]
    calib = activations(model, names, dict(np.load(args.calibration)))
    other = activations(model, names, dict(np.load(args.other)))
    fractions = [float(f) for f in args.macs.split(",")]

    print("| layer | Q/K/V MACs kept | separate r | shared r | separate Q / K / V error (calib; other) "
          "| shared Q / K / V error (calib; other) |")
    print("|---|---:|---:|---:|---|---|")
    totals = {f: np.zeros(4) for f in fractions}
    for index, (name, ws) in enumerate(layers):
        x, xo = calib[name], other[name]
        d = ws[0].shape[0]
        scaled = np.concatenate([w / np.linalg.norm(x @ w) for w in ws], axis=1)
        shared_basis = None
        # the shared form's output basis lives in the stacked output space; its input factor is
        # W_stack V_r, second factors V_r^T (unscaled per block)
        _, _, vt = np.linalg.svd(x @ scaled, full_matrices=False)
        shared_basis = vt.T
        separate_bases = [whitened_basis(x, w) for w in ws]
        for f in fractions:
            r_sep = int(round(f * d / 2))            # 2 d r = f d^2 per projection
            r_shared = int(round(f * 3 * d * d / (4 * d)))   # r (d + 3d) = f 3 d^2
            sep_c, sep_o, sh_c, sh_o = [], [], [], []
            v = shared_basis[:, :r_shared]
            stacked_r = scaled @ v @ v.T
            for j, (w, basis) in enumerate(zip(ws, separate_bases)):
                vr = basis[:, :r_sep]
                w_r = w @ vr @ vr.T
                sep_c.append(rel_error(x, w, w_r))
                sep_o.append(rel_error(xo, w, w_r))
                w_shared = stacked_r[:, j * d:(j + 1) * d] * np.linalg.norm(x @ w)
                sh_c.append(rel_error(x, w, w_shared))
                sh_o.append(rel_error(xo, w, w_shared))
            totals[f] += [np.mean(sep_c), np.mean(sep_o), np.mean(sh_c), np.mean(sh_o)]
            print(f"| {index} | {f:.1f} | {r_sep} | {r_shared} | "
                  f"{' / '.join(f'{e:.3f}' for e in sep_c)}; {' / '.join(f'{e:.3f}' for e in sep_o)} | "
                  f"{' / '.join(f'{e:.3f}' for e in sh_c)}; {' / '.join(f'{e:.3f}' for e in sh_o)} |")
    print("\nmean over layers and Q/K/V of the relative output error (calib / other domain):")
    for f, t in totals.items():
        t = t / len(layers)
        print(f"  MACs {f:.1f}: separate {t[0]:.4f} / {t[1]:.4f}, shared {t[2]:.4f} / {t[3]:.4f}")


if __name__ == "__main__":
    main()
