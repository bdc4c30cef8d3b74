"""The README's Python examples run as written (the first with pandas, the `pandas` extra)."""

import math
import re

import pytest

from conftest import ROOT


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def section(text: str, heading: str) -> str:
    """The README's `## heading` section, up to the next section of the same level."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def run_block(block: str, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)  # its relative paths: examples/ in, runs/ out
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    return scope


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("pandas")
    blocks = python_blocks(section((ROOT / "README.md").read_text(), "From Python"))
    assert len(blocks) == 1, "'From Python' has one Python example; this test runs it"
    scope = run_block(blocks[0], tmp_path, monkeypatch)
    frame = scope["pd"].DataFrame(scope["result"].metrics)
    summary = scope["result"].summary
    assert list(frame["round"]) == list(range(summary["rounds"] + 1))  # round 0 is the initial model
    assert summary["seed"] == 1 and math.isclose(scope["spec"].optim.lr, 0.1)
    assert (tmp_path / "runs" / "digits-s1" / "summary.json").is_file()


def test_the_readme_own_policy_example_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(section((ROOT / "README.md").read_text(), "Write your own policy"))
    scope = run_block(blocks[0], tmp_path, monkeypatch)  # the first block is the complete example
    summary, decisions = scope["result"].summary, scope["result"].decisions
    assert summary["aggregator"] == "server_momentum" and summary["rounds"] >= 2
    assert float(capsys.readouterr().out) == summary["final_test_acc"] > 0.5  # it learns
    # its weights are logged: the mean over the workers that took steps
    assert all(math.isclose(sum(d["weights"]), 1.0) for d in decisions)
