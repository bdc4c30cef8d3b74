"""The command line and the plots, as a user meets them."""

import json
import re
import shutil
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


@pytest.mark.parametrize("override, message", [
    ("eval.on='gpu7'", r"eval.on: expected 'fastest' or a worker of this cluster \(cpu0, gpu0, gpu1\), got 'gpu7'"),
    ("scheduler.params.per_kind={tpu=2}", r"scheduler.params.per_kind: expected keys that are device kinds"),
])
def test_what_only_resolving_finds_is_one_line_before_any_folder(tiny_file, tmp_path, capsys, override, message):
    assert main(["simulate", str(tiny_file), "--out", str(tmp_path / "r"), "--set", override]) == 2
    assert re.fullmatch(rf"hetsim: error: {re.escape(str(tiny_file))}: {message}.*\n", capsys.readouterr().err)
    assert not (tmp_path / "r").exists()
    # a sweep checks every grid point before running any
    assert main(["sweep", str(tiny_file), "--grid", f"{override.split('=', 1)[0]}={override.split('=', 1)[1]}",
                 "--out", str(tmp_path / "sw")]) == 2
    assert re.fullmatch(rf"hetsim: error: tiny\S*: {message}.*\n", capsys.readouterr().err)
    assert not (tmp_path / "sw" / "runs").exists()


def test_resume_checks_the_runs_config_again(tiny_file, tmp_path, capsys):
    # continuing a run needs what a run needs: its profile must still be there
    profile = tmp_path / "cpu.json"
    shutil.copy(ROOT / "hetsim" / "profiles" / "assumed-cpu.json", profile)
    out = tmp_path / "r"
    assert main(["simulate", str(tiny_file), "--out", str(out), "--quiet", "--set", "optim.batch_size=32", "--set",
                 f"cluster.devices.0={{kind='cpu', profile='{profile}'}}", "--set", "run.checkpoint_every=1"]) == 0
    profile.unlink()
    capsys.readouterr()
    assert main(["simulate", "--resume", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err == (f"hetsim: error: {out / 'config.toml'}: cluster.devices[0].profile: {profile}: "
                                       f"no such profile file\n")


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


def test_speedup_column_says_not_reached_only_for_a_row_that_missed_the_target():
    from hetsim.analysis import SpeedupRow, speedup_markdown

    def row(label, tta, speedup):
        return SpeedupRow(label, 1, int(tta is not None), tta, 0.0 if tta else None, 0.9, 0.0, speedup)

    def speedups(rows, baseline):
        return [line.rsplit("|", 2)[1].strip() for line in speedup_markdown(rows, 0.95, baseline).splitlines()[2:]]

    # no --baseline: no speedups at all, but a row that reached the target is not "not reached"
    assert speedups([row("a", 0.2, None), row("b", None, None)], None) == ["-", "not reached"]
    assert "speedup over - (no --baseline)" in speedup_markdown([row("a", 0.2, None)], 0.95, None)
    # a baseline that missed the target: the rows that reached it have no speedup, for that reason
    assert speedups([row("base", None, None), row("a", 0.2, None)], "base") == ["not reached",
                                                                              "- (baseline not reached)"]
    assert speedups([row("base", 0.4, 1.0), row("a", 0.2, 2.0)], "base") == ["1.00x", "2.00x"]


@pytest.mark.parametrize("text, said", [
    ("", "hetsim: interrupted; completed files are kept in the run directory\n"),  # a plain Ctrl+C
    ("2 of 9 runs finished", "hetsim: interrupted; 2 of 9 runs finished\n"),       # a sweep's account
])
def test_ctrl_c_prints_what_is_kept(monkeypatch, capsys, text, said):
    import hetsim.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt(text) if text else KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_simulate", interrupted)
    assert cli.main(["simulate", "any.toml"]) == 130
    assert capsys.readouterr().err == said


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


def test_time_only_simulate_says_no_accuracy_and_exits_0(tiny_file, tmp_path, capfd):
    out = tmp_path / "run"
    assert main(["simulate", str(tiny_file), "--out", str(out), "--set", "sim.fidelity='time_only'"]) == 0
    err = capfd.readouterr().err
    assert "acc n/a" in err and "no accuracy (time-only run without sim.surrogate)" in err
    assert "Traceback" not in err and json.loads((out / "summary.json").read_text())["final_test_acc"] is None


def test_a_diverged_run_says_so_and_exits_3(tiny_file, tmp_path, capfd):
    out = tmp_path / "run"
    assert main(["simulate", str(tiny_file), "--out", str(out), "--set", "optim.lr=1e6"]) == 3
    err = capfd.readouterr().err
    assert "done: 1 rounds" in err and "diverged at round 1" in err and "final acc" not in err
    assert [line for line in err.splitlines() if line.startswith("hetsim:")] == [
        f"hetsim: the run diverged at round 1: its training loss or model became non-finite; it stopped there "
        f"(try a smaller optim.lr). Files: {out}"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged_at_round"] == 1 and summary["stopped_by"] == "diverged"


def test_force_needs_resume(tiny_file, capsys):
    assert main(["simulate", str(tiny_file), "--force"]) == 2
    assert capsys.readouterr().err.startswith("hetsim: error: --force only applies to --resume RUN_DIR")


def test_resume_of_an_edited_config_is_one_line_until_forced(tiny_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["simulate", str(tiny_file), "--out", str(out), "--quiet", "--set", "run.checkpoint_every=2"]) == 0
    config = out / "config.toml"
    config.write_text(config.read_text().replace("lr = 0.1", "lr = 0.05"))
    capsys.readouterr()
    assert main(["simulate", "--resume", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"hetsim: error: {out / 'checkpoint.pt'}: the config changed")
    assert main(["simulate", "--resume", str(out), "--quiet", "--force"]) == 0
    change = json.loads((out / "summary.json").read_text())["resumed_with_changed_config"]
    assert [(c["round"], c["changed"]) for c in change] == [(4, ["optim.lr"])]


def test_compare_of_runs_without_accuracy_says_n_a(tiny_spec, tmp_path, capsys):
    for name in ("a", "b"):
        simulate(tiny_spec("sim.fidelity='time_only'"), tmp_path / name)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "predicted n/a, measured n/a" in out and "accuracy difference:        n/a" in out
    assert "None" not in out


def test_compare_report_values_line_up(tiny_spec, tmp_path, capsys):
    for name in ("a", "b"):
        simulate(tiny_spec("sim.fidelity='time_only'"), tmp_path / name)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    report = [line for line in capsys.readouterr().out.splitlines() if ":" in line]
    assert any(line.startswith("time to ") for line in report)
    # every label is padded to one column, "rounds compared:" and "time to 95%:" alike
    assert {len(line) - len(line[line.index(":") + 1:].lstrip()) for line in report} == {28}


@pytest.mark.parametrize("flags, message", [
    (["--emulated-slowdown", "-3"], "--emulated-slowdown -3.0: expected a factor >= 1"),
    (["--emulated-slowdown", "0.5"], "--emulated-slowdown 0.5: expected a factor >= 1"),
    (["--threads", "-2"], "--threads -2: expected an integer >= 0 (0 = default)"),
    (["--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
])
def test_profile_rejects_impossible_flags_before_measuring(flags, message, tmp_path, capsys):
    assert main(["profile", *flags, "--out", str(tmp_path / "p.json")]) == 2
    assert capsys.readouterr().err == f"hetsim: error: {message}\n"
    assert not (tmp_path / "p.json").exists()


def test_profiler_rejects_a_slowdown_below_one():
    from backends.torchmp.profiler import profile_device
    from hetsim.errors import SpecError

    with pytest.raises(SpecError, match=r"^emulated slowdown: expected a factor >= 1, got -3$"):
        profile_device("digits", 16, slowdown=-3)


def test_profile_with_a_config_rejects_single_device_flags_it_would_ignore(tiny_file, tmp_path, capsys):
    assert main(["profile", "--config", str(tiny_file), "--emulated-slowdown", "3", "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err.startswith("hetsim: error: --emulated-slowdown: a flag of single-device profiling; "
                                              "with --config set it in the config")


def test_profiling_one_device_keeps_the_runs_sampler_naming_the_other_kinds():
    # profile --config measures each device alone with the run's sampler, checked against the whole cluster
    from backends.torchmp.profiler import _spec

    spec = _spec("synthetic", 8, "cpu", "", kind="gpu", sampler={"name": "loss_topk", "params": {"kinds": ["cpu"]}})
    assert (spec.cluster.devices[0].kind, spec.sampler.name, spec.sampler.params) == ("gpu", "loss_topk", {"kinds": ["cpu"]})


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


def test_a_warning_repeated_in_one_command_is_printed_once(monkeypatch, capsys):
    # a sweep validates one spec per run: a surrogate's warning came once per run plus once for the base
    import warnings

    from hetsim import cli
    from hetsim.errors import HetsimWarning

    def warns_twice(args):
        for _ in range(3):
            warnings.warn("the curve was fitted on another policy", HetsimWarning)
        return 0

    monkeypatch.setattr(cli, "cmd_plot", warns_twice)
    for _ in range(2):  # and again in the next command of the same process
        assert cli.main(["plot", "x"]) == 0
        assert capsys.readouterr().err == "hetsim: warning: the curve was fitted on another policy\n"
