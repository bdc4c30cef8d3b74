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
