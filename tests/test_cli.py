"""The command line and the plots, as a user meets them."""

import json
import subprocess
import sys

import pytest

from hetsim.analysis import group_by_label, load_runs, speedup_table
from hetsim.cli import main
from hetsim.config import spec_to_dict, to_toml
from hetsim.sim import simulate

from conftest import ROOT


@pytest.fixture
def tiny_file(tiny_spec, tmp_path):
    p = tmp_path / "tiny.toml"
    p.write_text(to_toml(spec_to_dict(tiny_spec())))
    return p


def test_simulate_writes_the_run_directory(tiny_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["simulate", str(tiny_file), "--out", str(out), "--set", "seed=4", "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["seed"] == 4
    assert str(out) in capsys.readouterr().out


def test_bad_config_is_one_line_and_exit_2(tiny_file, tmp_path, capsys):
    assert main(["simulate", str(tiny_file), "--out", str(tmp_path / "r"), "--set", "optim.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert err == f"hetsim: error: {tiny_file}: optim.lr: expected a number > 0, got -1.0\n"
    assert not (tmp_path / "r").exists()


def test_console_script_has_no_traceback_on_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster]\ndevices = []\n")
    proc = subprocess.run([sys.executable, "-m", "hetsim.cli", "simulate", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"hetsim: error: {bad}: cluster.devices: expected at least one device group, got []"


def test_plot_makes_figures_and_speedup_table(tiny_spec, tmp_path):
    for label, sched in (("sync-sgd", "{name='sync'}"), ("local", "{name='fixed', params={local_steps=4}}")):
        for seed in (0, 1):
            simulate(tiny_spec(f"name='{label}'", f"seed={seed}", f"scheduler={sched}", "stop.max_rounds=8"),
                     tmp_path / "runs" / f"{label}-s{seed}")
    assert main(["plot", str(tmp_path / "runs"), "--out", str(tmp_path / "fig"), "--baseline", "sync-sgd",
                 "--rounds", "1:2"]) == 0
    for name in ("accuracy", "time_to_accuracy", "timeline"):
        for ext in ("pdf", "png"):
            assert (tmp_path / "fig" / f"{name}.{ext}").stat().st_size > 1000
    md = (tmp_path / "fig" / "speedups.md").read_text()
    assert "| sync-sgd | 2/2 |" in md and "| local |" in md


def test_plot_rejects_a_folder_without_runs(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 1
    assert "holds no run directories" in capsys.readouterr().err


def test_speedup_table_hand_computed(tiny_spec, tmp_path):
    runs = []
    for label, sched in (("slow", "{name='sync'}"), ("fast", "{name='fixed', params={local_steps=5}}")):
        simulate(tiny_spec(f"name='{label}'", f"scheduler={sched}", "stop.max_rounds=12"), tmp_path / label)
        runs += load_runs([tmp_path / label])
    rows = {r.label: r for r in speedup_table(group_by_label(runs), 0.5, "slow")}
    slow, fast = (runs[0].time_to_accuracy(0.5), runs[1].time_to_accuracy(0.5))
    assert rows["slow"].speedup == pytest.approx(1.0)
    assert rows["fast"].speedup == pytest.approx(slow / fast)


def test_quickstart_runs_five_named_policies_and_plots(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path), "--seeds", "1", "--set", "stop.max_time_s=0.02"]) == 0
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(names) == 5
    assert any(n.startswith("sync") for n in names) and sum("biased" in n for n in names) == 2
    assert (tmp_path / "figures" / "accuracy.png").is_file()
    assert "speedup over sync-sgd" in capsys.readouterr().out


def test_help_lists_the_commands():
    proc = subprocess.run([sys.executable, "-m", "hetsim.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0
    for cmd in ("quickstart", "simulate", "plot"):
        assert cmd in proc.stdout


def test_ablation_plot(tmp_path):
    from hetsim.plots import plot_ablation

    paths = plot_ablation("sample_ratio", "pool / k", ["1", "4"], {"1": [0.2, 0.25], "4": [0.18]}, 2, tmp_path)
    assert all(p.stat().st_size > 1000 for p in paths)


def test_quickstart_is_cached_and_resumable(tmp_path, capsys):
    """An interrupted quickstart loses nothing: the next call runs only the missing runs."""
    args = ["quickstart", "--out", str(tmp_path), "--seeds", "1", "--set", "stop.max_time_s=0.02"]
    assert main(args) == 0
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/summary.json")}
    assert len(stamps) == 5
    victim = sorted(stamps)[0]
    victim.unlink()  # as if the run was interrupted
    capsys.readouterr()
    assert main(args) == 0
    assert "5 runs (4 cached)" in capsys.readouterr().err
    after = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/summary.json")}
    assert victim in after and all(after[p] == t for p, t in stamps.items() if p != victim)
    # another config runs anew, and the figures count only its runs (one seed per policy)
    assert main([*args, "--set", "optim.lr=0.04"]) == 0
    assert len(list(tmp_path.glob("runs/*/summary.json"))) == 10
    assert "| sync-sgd | 0/1 |" in (tmp_path / "figures" / "speedups.md").read_text()  # one run, not two


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0"], "--seeds 0: expected at least 1"),
    (["--workers", "-1"], "--workers -1: expected 0 (one per core) or a positive number of parallel runs"),
])
def test_quickstart_bad_counts_are_one_line_errors(tmp_path, capsys, args, message):
    assert main(["quickstart", "--out", str(tmp_path / "q"), *args]) == 2
    assert capsys.readouterr().err == f"hetsim: error: {message}\n"
    assert not (tmp_path / "q").exists()
