"""The README's Python snippets run, from the repository root, as a user would paste them."""

from __future__ import annotations

import re

from conftest import ROOT


def test_readme_python_snippets_run(tmp_path, monkeypatch, capsys):
    snippets = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert snippets
    monkeypatch.chdir(ROOT)
    for code in snippets:
        # outputs go to a temporary folder, not into the checkout
        exec(compile(code.replace('"out.onnx"', repr(str(tmp_path / "out.onnx"))), "README.md", "exec"), {})
    assert (tmp_path / "out.onnx").is_file()
    assert "decomposed" in capsys.readouterr().out
