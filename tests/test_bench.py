"""The benchmarks' verdicts (studies/bench_targets.py): PASS/FAIL per target, non-zero exit on a miss."""

import math
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "studies"))
from bench_targets import Targets  # noqa: E402


def test_every_target_prints_its_verdict_and_a_miss_fails_the_run(capsys):
    t = Targets()
    assert t.check("ratio", 0.4, "<=", 0.5)
    assert not t.check("wall time (s)", 61.0, "<", 60, "(2 cores)")
    assert not t.check("error", None, "<=", 0.1)  # not measured is not met
    assert not t.check("nan", math.nan, ">=", 0.5)
    assert t.summary() == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == ["PASS ratio: 0.4 (target <= 0.5)", "FAIL wall time (s): 61 (target < 60) (2 cores)",
                         "FAIL error: not measured (target <= 0.1)", "FAIL nan: not measured (target >= 0.5)"]
    assert lines[-1] == "3 of 4 targets missed: wall time (s), error, nan"


def test_all_targets_met_exits_zero(capsys):
    t = Targets()
    t.check("events/s ratio", 0.5, ">=", 0.5)
    assert t.summary() == 0
    assert capsys.readouterr().out.splitlines()[-1] == "all 1 targets met"
