"""Test setup shared by every test module.

The repository root goes on sys.path so tests can build sample models with `models.synthetic`
(a folder of scripts, not part of the installed package), and tests/ so every module can import
the one shared helper as `import helpers`.
"""

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for path in (str(ROOT), str(TESTS)):
    if path not in sys.path:
        sys.path.insert(0, path)

# helpers.py asserts on behalf of the tests: let pytest explain its failures as it does theirs
pytest.register_assert_rewrite("helpers")

# optimize measures candidate layers in ONNX Runtime by default; on the tiny layers of tests that
# decision (keep dense when not measurably faster) depends on the machine's load. Tests use the
# FLOP model unless they pass measure=True with their own fake or cached latency. Set before any
# Options exists, and inherited by the console-script subprocesses.
os.environ.setdefault("ONNX_LOWRANK_MEASURE", "0")

# Property tests run SVDs and ORT sessions: a few dozen examples find shape bugs, and wall-clock
# deadlines only make such tests flaky on a loaded 2-core machine.
settings.register_profile("onnx-lowrank", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("onnx-lowrank")
