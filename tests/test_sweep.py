"""hetsim sweep: grid expansion, parallel runs, cache by config hash, resume after an interrupt."""

import csv

import pytest

from hetsim.cli import main
from hetsim.config import spec_to_dict, to_toml
from hetsim.errors import SpecError
from hetsim.sweep import parse_grid, sweep


@pytest.fixture
def base(tiny_spec, tmp_path):
    p = tmp_path / "base.toml"
    p.write_text(to_toml(spec_to_dict(tiny_spec("stop.max_rounds=3"))))
    return p


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_parse_grid():
    assert parse_grid(["optim.lr=0.1,0.2", "scheduler={name='sync'}|{name='fixed', params={local_steps=2}}"]) == {
        "optim.lr": ["0.1", "0.2"], "scheduler": ["{name='sync'}", "{name='fixed', params={local_steps=2}}"]}
    with pytest.raises(SpecError, match="expected KEY=V1,V2"):
        parse_grid(["optim.lr"])


def test_sweep_runs_the_grid_in_parallel_and_caches(base, tmp_path):
    out = tmp_path / "sw"
    table = sweep(base, ["optim.lr=0.05,0.1"], 2, out, workers=2)
    rows = read(table)
    assert len(rows) == 4
    assert {(r["optim.lr"], r["seed"]) for r in rows} == {("0.05", "0"), ("0.05", "1"), ("0.1", "0"), ("0.1", "1")}
    assert {r["name"] for r in rows} == {"tiny[optim.lr=0.05]", "tiny[optim.lr=0.1]"}
    assert all(r["final_test_acc"] for r in rows)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    # a second call finds everything cached; deleting one summary re-runs exactly that run
    sweep(base, ["optim.lr=0.05,0.1"], 2, out, workers=2)
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")} == stamps
    victim = sorted(stamps)[0]
    victim.unlink()
    sweep(base, ["optim.lr=0.05,0.1"], 2, out, workers=2)
    after = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    assert victim in after and all(after[p] == t for p, t in stamps.items() if p != victim)


def test_sweep_results_equal_single_runs(base, tmp_path, tiny_spec):
    from hetsim.sim import simulate

    table = sweep(base, ["optim.lr=0.1"], 1, tmp_path / "sw", workers=1)
    row = read(table)[0]
    direct = simulate(tiny_spec("stop.max_rounds=3", "optim.lr=0.1"))
    assert float(row["final_test_acc"]) == direct.summary["final_test_acc"]


def test_sweep_cli_and_bad_key(base, tmp_path, capsys):
    assert main(["sweep", str(base), "--grid", "optim.lr=0.1", "--out", str(tmp_path / "a"), "--workers", "1"]) == 0
    assert (tmp_path / "a" / "sweep.csv").is_file()
    assert main(["sweep", str(base), "--grid", "optim.lrr=0.1", "--out", str(tmp_path / "b")]) == 2
    assert "optim.lrr: unknown key" in capsys.readouterr().err


def test_sweep_on_a_local_ray_instance_equals_the_process_pool(base, tmp_path):
    pytest.importorskip("ray")
    pool = read(sweep(base, ["optim.lr=0.05,0.1"], 1, tmp_path / "pool", workers=2))
    on_ray = read(sweep(base, ["optim.lr=0.05,0.1"], 1, tmp_path / "ray", workers=2, ray_address="local"))
    key = lambda r: (r["optim.lr"], r["seed"])  # noqa: E731
    assert sorted((key(r), r["final_test_acc"], r["time_s"]) for r in pool) == \
           sorted((key(r), r["final_test_acc"], r["time_s"]) for r in on_ray)
    # finished Ray runs are cached like any other
    again = sweep(base, ["optim.lr=0.05,0.1"], 1, tmp_path / "ray", workers=2, ray_address="local")
    assert len(read(again)) == 2


def test_compare_methods_plots_only_the_current_configs_runs(base, tmp_path):
    from hetsim.analysis import load_runs
    from hetsim.sweep import compare_methods, table_runs

    methods = {"sync": ("{name='sync'}", "{name='uniform'}", "{name='mean'}"),
               "local": ("{name='fixed', params={local_steps=2}}", "{name='uniform'}", "{name='mean'}")}
    compare_methods(base, methods, 1, tmp_path, workers=1, baseline="sync")
    # a changed config leaves the old runs in the folder; the comparison must not count them
    figures = compare_methods(base, methods, 1, tmp_path, workers=1, overrides=["optim.lr=0.07"], baseline="sync")
    assert len(list((tmp_path / "sync" / "runs").iterdir())) == 2
    assert len(table_runs(tmp_path / "sync" / "sweep.csv")) == 1
    assert "| sync | 1/1 |" in (figures / "speedups.md").read_text()
    assert len(load_runs([tmp_path / "sync"])) == 1  # a sweep folder loads its sweep.csv's runs
    assert {r.spec.optim.lr for r in (x.as_result() for x in load_runs(table_runs(tmp_path / "local" / "sweep.csv")))} \
        == {0.07}


def test_two_sweeps_into_one_folder_keep_each_others_runs(base, tmp_path):
    out = tmp_path / "sw"
    sweep(base, ["optim.lr=0.05"], 1, out, workers=1)
    sweep(base, ["optim.momentum=0.5"], 1, out, workers=1)
    rows = read(out / "sweep.csv")
    assert sorted(r["name"] for r in rows) == ["tiny[optim.lr=0.05]", "tiny[optim.momentum=0.5]"]
    by_name = {r["name"]: r for r in rows}
    lr = by_name["tiny[optim.lr=0.05]"]
    assert (lr["optim.lr"], lr["optim.momentum"]) == ("0.05", "")
    assert by_name["tiny[optim.momentum=0.5]"]["optim.momentum"] == "0.5"
    # the same label re-run with another config replaces its rows; the other label's row stays
    sweep(base, ["optim.lr=0.05"], 1, out, workers=1, overrides=["optim.weight_decay=0.0"])
    rows = read(out / "sweep.csv")
    assert len(rows) == 2 and len(list((out / "runs").iterdir())) == 3
    lr_row = next(r for r in rows if r["name"] == "tiny[optim.lr=0.05]")
    assert "weight_decay = 0.0" in (out / lr_row["run_dir"] / "config.toml").read_text()


def test_sweep_csv_is_merged_under_the_lock(base, tmp_path):
    """A writer waits for the lock that another sweep holds, then merges into what that one wrote."""
    import fcntl
    import threading

    from hetsim.config import load_spec
    from hetsim.sim import simulate
    from hetsim.sweep import expand, write_table

    out = tmp_path / "sw"
    sweep(base, ["optim.lr=0.05"], 1, out, workers=1)
    inode = (out / "sweep.csv").stat().st_ino
    runs = expand(load_spec(base), {"optim.lr": ["0.07"]}, 1, out)
    simulate(runs[0].spec, runs[0].run_dir)
    with open(out / ".sweep.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        t = threading.Thread(target=write_table, args=(runs, out))
        t.start()
        t.join(1.0)
        assert t.is_alive() and (out / "sweep.csv").stat().st_ino == inode  # blocked: nothing written yet
    t.join(60)
    assert not t.is_alive()
    assert sorted(r["name"] for r in read(out / "sweep.csv")) == ["tiny[optim.lr=0.05]", "tiny[optim.lr=0.07]"]


def test_concurrent_sweeps_into_one_folder_keep_both(base, tmp_path):
    """Two sweep processes finish their runs while a third party holds the table's lock, so both
    reach read-merge-write at the same time; both labels must end up in sweep.csv."""
    import fcntl
    import os
    import subprocess
    import sys
    import time

    from conftest import ROOT

    out = tmp_path / "sw"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(out / ".sweep.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        procs = [subprocess.Popen([sys.executable, "-m", "hetsim.cli", "sweep", str(base), "--grid", grid, "--out",
                                   str(out), "--workers", "1"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                 for grid in ("optim.lr=0.05", "optim.lr=0.07")]
        deadline = time.monotonic() + 300
        while len(list(out.glob("runs/*/summary.json"))) < 2 and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.2)
        assert not (out / "sweep.csv").exists()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(r["name"] for r in read(out / "sweep.csv")) == ["tiny[optim.lr=0.05]", "tiny[optim.lr=0.07]"]


def test_ctrl_c_cancels_queued_runs_and_keeps_finished_ones(base, tmp_path):
    """Ctrl+C (SIGINT to the whole process group, as a terminal sends it) during a 1-worker sweep of 6
    runs: the queued runs never start, the finished ones are listed, the exit is 130 with one line."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    out = tmp_path / "sw"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hetsim.cli", "sweep", str(base), "--seeds", "6", "--out", str(out),
                             "--workers", "1", "--set", "stop.max_rounds=400"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("runs/*")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    started = len(list(out.glob("runs/*")))
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("hetsim: interrupted; ") and "Traceback" not in err
    dirs = list(out.glob("runs/*"))
    assert len(dirs) <= started + 1 < 6  # at most the run that was starting as the signal came
    finished = sorted(str(p.parent.relative_to(out)) for p in out.glob("runs/*/summary.json"))
    assert sorted(r["run_dir"] for r in read(out / "sweep.csv")) == finished
    assert f"{len(finished)} of 6 runs finished" in err


def test_negative_workers_is_a_one_line_error(base, tmp_path, capsys):
    assert main(["sweep", str(base), "--out", str(tmp_path / "a"), "--workers", "-1"]) == 2
    assert capsys.readouterr().err == ("hetsim: error: --workers -1: expected 0 (one per core) or a positive "
                                       "number of parallel runs\n")
    assert not (tmp_path / "a").exists()


def test_out_that_is_a_file_is_a_one_line_error_before_any_run(base, tmp_path, capsys):
    out = tmp_path / "afile"
    out.write_text("mine\n")
    assert main(["sweep", str(base), "--out", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err == f"hetsim: error: {out}: exists and is not a folder; the sweep folder must be a folder\n"
    assert out.read_text() == "mine\n"


def test_a_foreign_sweep_csv_is_refused_before_any_run(base, tmp_path, capsys):
    out = tmp_path / "own"
    out.mkdir()
    (out / "sweep.csv").write_text("a,b\n1,2\n")
    assert main(["sweep", str(base), "--out", str(out), "--workers", "1"]) == 1
    assert capsys.readouterr().err.startswith(f"hetsim: error: {out / 'sweep.csv'}: not a sweep table")
    assert not (out / "runs").exists()  # nothing ran
    assert (out / "sweep.csv").read_text() == "a,b\n1,2\n"


def test_a_diverged_run_is_a_row_not_a_failure(base, tmp_path):
    """A diverged run (summary written by hand here: this branch's simulator cannot diverge) is cached
    like any finished run and listed with the round it diverged at."""
    import json

    from hetsim.config import load_spec
    from hetsim.sweep import _status, expand

    out = tmp_path / "sw"
    (run,) = expand(load_spec(base), {"optim.lr": ["9.0"]}, 1, out)
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "config.toml").write_text(to_toml(spec_to_dict(run.spec)))
    summary = {"time_to_accuracy_s": None, "final_test_acc": None, "best_test_acc": 0.3, "rounds": 7,
               "time_s": 0.5, "epochs": 0.2, "stopped_by": "diverged", "diverged_at_round": 7, "wall_time_s": 0.1}
    (run.run_dir / "summary.json").write_text(json.dumps(summary))
    (row,) = read(sweep(base, ["optim.lr=9.0"], 1, out, workers=1))
    assert (row["diverged_at_round"], row["stopped_by"], row["final_test_acc"]) == ("7", "diverged", "")
    assert json.loads((run.run_dir / "summary.json").read_text()) == summary  # cached: not re-run
    assert _status(summary) == "diverged at round 7"
    assert _status({**summary, "diverged_at_round": None, "final_test_acc": 0.5}) == "final acc 0.500, tta -"
