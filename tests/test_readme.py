"""The README's Python example runs as written (with pandas, the `pandas` extra)."""

import math
import re

import pytest

from conftest import ROOT


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("pandas")
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) == 1, "the README has one Python example; this test runs it"
    monkeypatch.chdir(tmp_path)  # its relative paths: examples/ in, runs/ out
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    frame = scope["pd"].DataFrame(scope["result"].metrics)
    summary = scope["result"].summary
    assert list(frame["round"]) == list(range(summary["rounds"] + 1))  # round 0 is the initial model
    assert summary["seed"] == 1 and math.isclose(scope["spec"].optim.lr, 0.1)
    assert (tmp_path / "runs" / "digits-s1" / "summary.json").is_file()
