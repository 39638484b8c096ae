"""benchmarks/gpu_check.py --cpu runs and writes its one JSON (the GPU figures need a CUDA machine)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_mode_writes_its_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["device"] in ("cpu", "numpy")
    rows = result["matrix_layers"]
    assert {r["rank_multiple"] for r in rows} == {8, 16, 32, 64}
    assert all(r["rank"] % r["rank_multiple"] == 0 and r["dense_ms"] > 0 and r["factorized_ms"] > 0 for r in rows)
    assert result["whole_model"] and result["whole_model"][0]["provider"] == "cpu"
    assert result["whole_model"][0]["speedup"] > 0
