"""Build the trained sample models in ``models/`` with PyTorch and export them to ONNX.

Run from the repository root::

    python models/build_models.py

Needs torch (CPU build is enough), onnx, onnxruntime (or onnxruntime-gpu), scikit-learn
and numpy; none of these beyond onnx/onnxruntime/numpy are dependencies of onnx-lowrank
itself. Everything is seeded and trained on CPU in well under two minutes.

Writes (next to this file):

* ``mlp.onnx``          MLP 64-256-256-10 trained on scikit-learn's 8x8 digits
* ``cnn_digits.onnx``   small ResNet-style CNN trained on the same digits
* ``bert_tiny.onnx``    randomly initialised (fixed seed) BERT-style encoder
* ``digits_test.npz``   held-out digits, ``input`` [n,1,8,8] float32 in [0,1], ``label`` int64
* ``digits_test_mlp.npz`` the same images flattened, ``input`` [n,64]
* ``digits_calib.npz``  256 training digits, ``input`` [256,1,8,8]: --calibration samples
* ``accuracy.json``     held-out accuracy of the exported models, computed in ONNX Runtime

All models are exported with the TorchScript-based exporter (``dynamo=False``) at opset
17, get ``ir_version`` lowered to 8 (ONNX Runtime 1.31 refuses IR 14), pass
``onnx.checker.check_model(full_check=True)`` and are checked against torch in ONNX
Runtime (CPUExecutionProvider) to 1e-4.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

OPSET = 17
IR_VERSION = 8  # lowest IR version that carries opset 17
SEED = 0
TOL = 1e-4
HERE = Path(__file__).resolve().parent


def seed_everything(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


# --------------------------------------------------------------------------- data


def digits_split():
    """Digits scaled to [0, 1], split 75/25 stratified with a fixed seed."""
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)  # [1797, 64], pixels are 0..16
    y = d.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    """64 -> 256 -> 256 -> 10, ReLU. Input [batch, 64] in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 256)
        self.fc3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class BasicBlock(nn.Module):
    """ResNet basic block: Conv3x3-BN-ReLU-Conv3x3-BN (+ shortcut) - ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:  # 1x1 projection shortcut
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """Input [batch, 1, 8, 8] in [0, 1]; nearest-upsampled x2 to 16x16 inside the model.

    stem Conv3x3(1->32)-BN-ReLU @16x16 -> block(32->32) @16x16 -> block(32->64, stride 2,
    1x1 projection) @8x8 -> block(64->64) @8x8 -> global average pool -> Linear(64->10).
    """

    def __init__(self, c1: int = 32, c2: int = 64) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.stem = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU()
        )
        self.layer1 = BasicBlock(c1, c1)
        self.layer2 = BasicBlock(c1, c2, stride=2)
        self.layer3 = BasicBlock(c2, c2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.up(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class BertLayer(nn.Module):
    """Post-LN BERT encoder layer with separate Q/K/V projections (each its own MatMul)."""

    def __init__(self, hidden: int, heads: int, ffn: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.intermediate = nn.Linear(hidden, ffn)
        self.output = nn.Linear(ffn, hidden)
        self.out_norm = nn.LayerNorm(hidden, eps=eps)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, self.heads, self.head_dim).transpose(1, 2)  # [b, h, s, d]

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        b, s, hdim = x.shape
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask_bias
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)  # [b, h, s, d]
        ctx = ctx.transpose(1, 2).reshape(b, s, hdim)
        x = self.attn_norm(x + self.attn_out(ctx))
        return self.out_norm(x + self.output(F.gelu(self.intermediate(x))))


class BertTiny(nn.Module):
    """Word + position embeddings, LayerNorm, ``layers`` post-LN encoder layers (GELU FFN)."""

    def __init__(
        self,
        vocab: int = 1000,
        hidden: int = 256,
        heads: int = 4,
        layers: int = 2,
        ffn: int = 1024,
        max_pos: int = 128,
    ) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(max_pos, hidden)
        self.emb_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer(hidden, heads, ffn) for _ in range(layers))
        self.register_buffer("position_ids", torch.arange(max_pos).unsqueeze(0), persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:  # BERT's initialiser
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.normal_(m.bias, mean=0.0, std=0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        x = self.word(input_ids) + self.position(self.position_ids[:, :seq])
        x = self.emb_norm(x)
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, mask_bias)
        return x


# --------------------------------------------------------------------------- training


def train_classifier(model, x_tr, y_tr, *, epochs, lr, batch, weight_decay=1e-4, name=""):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(x_tr) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(SEED)
    x_tr, y_tr = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    t0 = time.time()
    for ep in range(epochs):
        perm = torch.randperm(len(x_tr), generator=g)
        total = 0.0
        for i in range(0, len(x_tr), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if ep == epochs - 1 or ep % 10 == 0:
            print(f"  [{name}] epoch {ep + 1}/{epochs} loss {total / len(x_tr):.4f} ({time.time() - t0:.1f}s)")
    model.eval()
    return model


# --------------------------------------------------------------------------- export / check


def export(model, args, path: Path, input_names, output_names, dynamic_axes, keep_bn=False):
    """Legacy (TorchScript) export at opset 17, IR lowered to 8, checked, saved."""
    model.eval()
    buf = io.BytesIO()
    kwargs = {}
    if keep_bn:
        # In EVAL mode the TorchScript exporter folds BatchNorm into the preceding Conv
        # (eval peephole). PRESERVE with the model in eval() keeps BatchNormalization nodes
        # (inference form, running stats as initializers) so a later pass can fold them.
        kwargs["training"] = torch.onnx.TrainingMode.PRESERVE
    with torch.no_grad(), warnings.catch_warnings():
        # "legacy TorchScript-based ONNX export" deprecation, and the constant-folding
        # advice for PRESERVE, which only matters for models in train() mode.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*constant folding be turned off.*")
        torch.onnx.export(
            model, args, buf, dynamo=False, opset_version=OPSET,
            input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
            do_constant_folding=True, **kwargs,
        )
    m = onnx.load_from_string(buf.getvalue())
    tidy(m)
    torch_ir = m.ir_version
    if m.ir_version > IR_VERSION:
        m.ir_version = IR_VERSION
    m.producer_name = "onnx-lowrank/models/build_models.py (torch %s)" % torch.__version__
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, path)
    ops = Counter(n.op_type for n in m.graph.node)
    print(f"  wrote {path.name}: {path.stat().st_size} bytes, IR {m.ir_version} (torch wrote {torch_ir}), "
          f"opset {m.opset_import[0].version}, ops {dict(ops)}")
    return m


def tidy(m: onnx.ModelProto) -> None:
    """Make the exported graph plainer for graph passes, without changing what it computes.

    * The exporter deduplicates equal initializers (e.g. all-ones LayerNorm gammas, equal
      BN biases) and re-creates them with ``Identity`` nodes; give each its own
      initializer again so no weight is shared between layers.
    * The transposed ``nn.Linear`` weights of MatMul nodes get anonymous names
      (``onnx::MatMul_123``); name them after the module (``layers.0.query.weight_t``).
    """
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    keep = []
    for n in g.node:
        if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs:
            t = onnx.TensorProto()
            t.CopyFrom(inits[n.input[0]])
            t.name = n.output[0]
            g.initializer.append(t)
            inits[t.name] = t
        else:
            keep.append(n)
    del g.node[:]
    g.node.extend(keep)

    uses = Counter(i for n in g.node for i in n.input)
    renames = {}
    for n in g.node:
        if n.op_type != "MatMul" or len(n.input) != 2:
            continue
        w = n.input[1]
        if w in inits and w.startswith("onnx::") and uses[w] == 1 and n.name.endswith("/MatMul"):
            new = n.name.strip("/").rsplit("/", 1)[0].replace("/", ".") + ".weight_t"
            if new not in inits and new not in renames.values():
                renames[w] = new
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in renames:
                n.input[i] = renames[name]
    for t in g.initializer:
        if t.name in renames:
            t.name = renames[t.name]


def ort_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_close(model, sess, feeds: dict, name: str) -> None:
    with torch.no_grad():
        ref = model(*[torch.from_numpy(v) for v in feeds.values()]).numpy()
    got = sess.run(None, feeds)[0]
    err = float(np.abs(ref - got).max())
    print(f"  [{name}] torch vs ORT max abs diff {err:.2e} on {tuple(got.shape)}")
    if not err <= TOL:
        raise AssertionError(f"{name}: ORT differs from torch by {err} > {TOL}")


def ort_accuracy(sess, x, y) -> float:
    logits = sess.run(None, {"input": x})[0]
    return float((logits.argmax(1) == y).mean())


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE, help="output directory (default: models/)")
    ap.add_argument("--bert-layers", type=int, default=2,
                    help="encoder layers of bert_tiny (each adds ~3.2 MB; default 2)")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    t_start = time.time()

    x_tr, x_te, y_tr, y_te = digits_split()
    n_test = len(y_te)
    x_tr_img, x_te_img = x_tr.reshape(-1, 1, 8, 8), x_te.reshape(-1, 1, 8, 8)
    np.savez_compressed(out / "digits_test.npz", input=x_te_img, label=y_te)
    np.savez_compressed(out / "digits_test_mlp.npz", input=x_te, label=y_te)
    # calibration samples for the data-aware path: training digits, never the held-out ones
    np.savez_compressed(out / "digits_calib.npz", input=x_tr_img[:256])
    print(f"digits: {len(y_tr)} train / {n_test} test")

    # ---- MLP
    print("mlp:")
    seed_everything()
    mlp = train_classifier(MLP(), x_tr, y_tr, epochs=60, lr=3e-3, batch=64, name="mlp")
    p = out / "mlp.onnx"
    export(mlp, (torch.from_numpy(x_te[:2]),), p, ["input"], ["logits"],
           {"input": {0: "batch"}, "logits": {0: "batch"}})
    sess = ort_session(p)
    check_close(mlp, sess, {"input": x_te}, "mlp")
    acc_mlp = ort_accuracy(sess, x_te, y_te)
    print(f"  mlp held-out accuracy (ORT) {acc_mlp:.4f}")

    # ---- CNN
    print("cnn_digits:")
    seed_everything()
    cnn = train_classifier(DigitsResNet(), x_tr_img, y_tr, epochs=30, lr=3e-3, batch=64, name="cnn")
    p = out / "cnn_digits.onnx"
    export(cnn, (torch.from_numpy(x_te_img[:2]),), p, ["input"], ["logits"],
           {"input": {0: "batch"}, "logits": {0: "batch"}}, keep_bn=True)
    sess = ort_session(p)
    check_close(cnn, sess, {"input": x_te_img}, "cnn_digits")
    acc_cnn = ort_accuracy(sess, x_te_img, y_te)
    print(f"  cnn_digits held-out accuracy (ORT) {acc_cnn:.4f}")
    if acc_cnn < 0.95:
        raise AssertionError(f"cnn_digits accuracy {acc_cnn} < 0.95")

    # ---- BERT-style encoder (random init, no training)
    print("bert_tiny:")
    seed_everything()
    bert = BertTiny(layers=args.bert_layers).eval()
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, 1000, (2, 16), generator=gen)
    mask = torch.ones(2, 16, dtype=torch.int64)
    p = out / "bert_tiny.onnx"
    export(bert, (ids, mask), p, ["input_ids", "attention_mask"], ["last_hidden_state"],
           {"input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            "last_hidden_state": {0: "batch", 1: "sequence"}})
    sess = ort_session(p)
    for b, s in [(2, 16), (3, 37), (1, 128)]:  # other shapes than the export sample
        ids = torch.randint(0, 1000, (b, s), generator=gen).numpy()
        mask = np.ones((b, s), dtype=np.int64)
        mask[0, s // 2 :] = 0  # some padding
        check_close(bert, sess, {"input_ids": ids, "attention_mask": mask}, f"bert_tiny b={b} s={s}")

    acc = {"cnn_digits": acc_cnn, "mlp": acc_mlp, "n_test": n_test}
    (out / "accuracy.json").write_text(json.dumps(acc, indent=2) + "\n")
    print(f"accuracy.json: {acc}")
    print(f"done in {time.time() - t_start:.1f}s")


if __name__ == "__main__":
    main()
