"""The run directory's files: appended round by round, bounded at any scale, honest about NaN, versioned."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hetsim.analysis import load_run
from hetsim.config import spec_from_dict
from hetsim.errors import HetsimError
from hetsim.results import CHECKPOINT, encode_decision, read_decisions, read_metrics_columns, read_trace, strict_json
from hetsim.sim import Simulation, simulate
from hetsim.training import RoundRecord

ROOT = Path(__file__).resolve().parents[1]
OLD_RUN = ROOT / "studies/ablations/out/score_rule/latest/runs/4f38a0f78099"  # written before run schema 2


def _reject_constant(name):
    raise ValueError(f"not strict JSON: {name}")


def strict_load(path: Path):
    return json.loads(path.read_text(), parse_constant=_reject_constant)


# -- item 10: every finished round is on disk -----------------------------------------------------

def test_a_killed_run_keeps_every_finished_round(tmp_path):
    # SIGKILL at round 3's progress callback (after the row is handed to the writer): no handler runs,
    # so only what was already written survives
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
from conftest import TINY
from hetsim.config import spec_from_dict
from hetsim.sim import simulate
def kill(row):
    if row["round"] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
simulate(spec_from_dict(TINY, overrides=["stop.max_rounds=8"]), {str(tmp_path)!r}, progress=kill)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert read_metrics_columns(tmp_path / "metrics.csv")["round"] == [0, 1, 2, 3]
    assert [d["round"] for d in read_decisions(tmp_path / "decisions.bin")] == [1, 2, 3]
    assert {e["args"]["round"] for e in read_trace(tmp_path / "trace.json") if e["ph"] == "X"} == {1, 2, 3}


def test_readers_drop_a_partial_last_line_or_record(tiny_spec, tmp_path):
    simulate(tiny_spec(), tmp_path)
    before = load_run(tmp_path)
    n_events = len(before.trace())
    record = encode_decision(RoundRecord(5, (0, 1, 2), (1, 5, 5), (8, 40, 40), (0, 0, 0), (0.2, 0.4, 0.4), 1.0, None))
    # what a kill mid-write leaves: the start of a line or of a record
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("5,0.0123,")
    with open(tmp_path / "trace.json", "a") as f:
        f.write('{"name": "compute", "ph": "X", "pi')
    with open(tmp_path / "decisions.bin", "ab") as f:
        f.write(record[:len(record) - 3])
    after = load_run(tmp_path)
    assert list(after.metrics["round"]) == [0, 1, 2, 3, 4]
    assert len(after.decisions) == 4 and after.decisions[-1]["round"] == 4
    assert len(after.trace()) == n_events


# -- item 2 (files): NaN is not "not evaluated", and JSON is strict -------------------------------

def test_strict_json_writes_null_for_nan_and_infinities():
    assert strict_json({"a": [math.nan, math.inf, -math.inf, 1.5], "b": {"c": float("nan")}}) == \
        '{"a": [null, null, null, 1.5], "b": {"c": null}}'


def test_computed_nan_is_written_nan_and_not_evaluated_is_empty(tiny_spec, tmp_path):
    # lr 1e30 blows the weights up: the training loss is computed and not finite; eval every 2 rounds
    # leaves round 1 not evaluated
    simulate(tiny_spec("optim.lr=1e30", "optim.momentum=0.0", "eval.every_rounds=2",
                      "stop.on_divergence='continue'"), tmp_path)
    lines = [l.split(",") for l in (tmp_path / "metrics.csv").read_text().splitlines()]
    header, rows = lines[0], lines[1:]
    col = {name: i for i, name in enumerate(header)}
    assert rows[0][col["train_loss"]] == ""          # round 0: no training yet
    assert rows[1][col["test_acc"]] == ""            # round 1: not evaluated
    assert rows[2][col["test_acc"]] != ""            # round 2: evaluated
    losses = [r[col["train_loss"]] for r in rows[1:]]
    assert set(losses) & {"nan", "inf"}, losses      # computed and not finite: said so, not left empty
    summary = strict_load(tmp_path / "summary.json")  # no bare NaN
    assert summary["final_train_loss"] is None
    cols = read_metrics_columns(tmp_path / "metrics.csv")
    assert math.isnan(cols["test_acc"][1]) and not math.isfinite(cols["train_loss"][-1])


# -- item 17: schema version ------------------------------------------------------------------------

def test_current_runs_carry_the_schema_version(tiny_spec, tmp_path):
    r = simulate(tiny_spec(), tmp_path)
    assert strict_load(tmp_path / "summary.json")["schema_version"] == 2 == r.summary["schema_version"]


def test_old_run_folders_load_through_the_compatibility_path():
    run = load_run(OLD_RUN)
    assert "schema_version" not in run.summary
    rounds = len(run.metrics["round"]) - 1
    assert len(run.decisions) == rounds and run.decisions[0]["local_steps"] == [1, 1, 8, 8, 8, 8, 8, 8, 8, 8]
    assert {e["name"] for e in run.trace() if e["ph"] == "X"} >= {"compute", "comm"}
    assert run.as_result().decisions[0]["round"] == 1


@pytest.mark.parametrize("version, message", [(3, "run schema 3, newer than this hetsim reads"),
                                              ("2", "schema_version: expected an integer >= 1, got '2'")])
def test_newer_or_malformed_schema_versions_are_refused_in_one_line(tiny_spec, tmp_path, version, message):
    simulate(tiny_spec(), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "schema_version": version}))
    with pytest.raises(HetsimError, match=message) as e:
        load_run(tmp_path)
    assert "\n" not in str(e.value)


def test_resume_from_an_old_checkpoint_is_refused_in_one_line(tiny_spec, tmp_path):
    simulate(tiny_spec(), tmp_path)
    torch.save({"round": 2, "now": 0.1, "rows": [], "decisions": [], "trace": []}, tmp_path / CHECKPOINT)
    with pytest.raises(HetsimError, match="checkpoint was written by an older hetsim"):
        simulate(tiny_spec(), tmp_path, resume=True)


# -- item 12: bounded files and memory --------------------------------------------------------------

def test_checkpoints_hold_file_lengths_not_contents(tiny_spec, tmp_path):
    args = ("run.checkpoint_every=1", "trace.max_rounds=0", "sim.fidelity='time_only'")
    sizes = {}
    for rounds in (4, 40):
        simulate(tiny_spec(*args, f"stop.max_rounds={rounds}"), tmp_path / str(rounds))
        sizes[rounds] = (tmp_path / str(rounds) / CHECKPOINT).stat().st_size
        state = torch.load(tmp_path / str(rounds) / CHECKPOINT, weights_only=False)
        assert not {"rows", "decisions", "trace"} & set(state)
    # the same few numbers whatever the round (an embedded trace would add ~1.3 kB a round here)
    assert abs(sizes[40] - sizes[4]) < 256


def _scale_spec(devices: int, rounds: int):
    cpus = devices // 5
    return spec_from_dict({
        "name": "scale", "seed": 0, "workload": {"name": "digits"},
        "cluster": {"devices": [
            {"kind": "cpu", "count": cpus, "step_time": {"dist": "lognormal", "mean_s": 0.01, "std_s": 0.002}},
            {"kind": "gpu", "count": devices - cpus, "step_time": {"dist": "lognormal", "mean_s": 0.002, "std_s": 0.0005}}]},
        "scheduler": {"name": "proportional", "params": {"max_steps": 8}},
        "sampler": {"name": "loss_topk", "params": {"kinds": ["cpu"]}}, "aggregator": {"name": "biased"},
        "optim": {"batch_size": 16}, "stop": {"max_rounds": rounds}, "eval": {"every_rounds": 10},
        "sim": {"fidelity": "time_only"}})  # [trace] left at its defaults


def test_default_settings_keep_trace_bounded_and_decisions_complete(tmp_path):
    devices = 2000
    sims = {}
    for rounds in (20, 200):
        sims[rounds] = sim = Simulation(_scale_spec(devices, rounds), tmp_path / str(rounds))
        sim.run()
    run = load_run(tmp_path / "200")
    # the decisions are complete: every round, every worker
    assert len(run.decisions) == 200 and [d["round"] for d in run.decisions] == list(range(1, 201))
    assert all(len(d["workers"]) == devices == len(d["weights"]) for d in run.decisions)
    assert run.decisions[0]["local_steps"][0] < run.decisions[0]["local_steps"][-1]  # cpus do fewer steps
    # ... at a bounded size per round: 10x the rounds, about 10x the bytes
    size = {r: (tmp_path / str(r) / "decisions.bin").stat().st_size for r in (20, 200)}
    assert 8 * size[20] < size[200] < 12 * size[20]
    assert size[200] < 200 * devices * 8  # compressed: under 8 bytes a worker and round
    # the trace: the first 100 rounds, 32 devices spread evenly plus the evaluator (the first gpu, 400)
    events = run.trace()
    timed = [e for e in events if e["ph"] == "X"]
    assert {e["args"]["round"] for e in timed} == set(range(1, 101))
    kept = {round(i * (devices - 1) / 31) for i in range(32)} | {400}
    assert {e["tid"] for e in timed} == kept
    assert {e["tid"] for e in events if e.get("name") == "thread_name"} == kept
    assert len(timed) <= 100 * len(kept) * 3 + 10 * len(kept)  # compute, idle, comm; eval rounds
    # memory: nothing kept per round but the 8-number metrics rows and an offset per decisions record
    w = sims[200].writer
    assert len(w.rows) == 201 and not w._events and not w._pending
    assert len(w.decisions) == 200


def test_in_memory_results_equal_the_files(tiny_spec, tmp_path):
    spec = tiny_spec("stop.max_rounds=3")
    mem = simulate(spec)
    simulate(spec, tmp_path)
    disk = load_run(tmp_path)
    assert list(mem.decisions) == list(disk.decisions) and mem.decisions == disk.decisions
    d = mem.decisions[1]
    assert {k: v for k, v in d.items() if k not in ("weights", "start_s", "finish_s", "digest")} == {
        "round": 2, "workers": [0, 1, 2], "local_steps": [1, 5, 5], "samples": [8, 40, 40],
        "biased_samples": [0, 0, 0], "time_budget_s": None, "staleness": [0, 0, 0], "pulled": [1, 1, 1],
        "version": 2, "dropped": [], "dropped_steps": [], "dropped_finish_s": []}
    assert d["weights"] == pytest.approx([1 / 3] * 3)
    assert [e for e in disk.trace() if e["ph"] == "X"] == [e for e in mem.trace if e["ph"] == "X"]
    assert isinstance(strict_load(tmp_path / "trace.json"), list)  # a finished trace is a closed JSON array


def test_a_fresh_run_drops_the_summary_and_checkpoint_of_the_files_it_replaces(tiny_spec, tmp_path):
    simulate(tiny_spec("run.checkpoint_every=2"), tmp_path)
    assert (tmp_path / CHECKPOINT).is_file()

    def look(row):
        if row["round"] == 1:  # mid-run: the old summary would call these new files finished
            assert not (tmp_path / "summary.json").exists()

    simulate(tiny_spec(), tmp_path, progress=look)
    assert not (tmp_path / CHECKPOINT).exists()
    with pytest.raises(HetsimError, match="no checkpoint to resume from"):
        simulate(tiny_spec(), tmp_path, resume=True)


def test_decision_records_round_trip_any_integer_and_exact_weights():
    big = 1 << 40
    rec = RoundRecord(7, (3, 9), (1, 70_000), (big, 0), (-1, 255), (0.1, 1 / 3), 2.0, 0.25)
    path_bytes = b"hetsim-decisions/2\n" + encode_decision(rec)
    from hetsim.results import Decisions

    (d,) = Decisions(bytearray(path_bytes), [len(b"hetsim-decisions/2\n")])
    assert d == {"round": 7, "workers": [3, 9], "local_steps": [1, 70_000], "samples": [big, 0],
                 "biased_samples": [-1, 255], "weights": [0.1, 1 / 3], "time_budget_s": 0.25}


def test_timeline_draws_a_row_for_each_sampled_device(tiny_spec, tmp_path, monkeypatch):
    import hetsim.plots as plots

    # 6 devices, 2 sampled evenly (0 and 5) plus the evaluator (the first gpu, 1): tracks 0, 1, 5
    simulate(tiny_spec("cluster.devices.1.count=5", "trace.max_devices=2"), tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert {e["tid"] for e in run.trace() if e["ph"] == "X"} == {0, 1, 5}
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, out, name: figures.append(fig) or [])
    plots.plot_timeline([run], tmp_path / "fig", rounds=(1, 1))
    ax = figures[0].axes[0]
    row_of = {t.get_text(): y for y, t in zip(ax.get_yticks(), ax.get_yticklabels())}
    assert row_of == {"cpu0": 2, "gpu0": 1, "gpu4": 0}  # cpu0 on top
    rows_with_bars = {round(float(np.mean(p.vertices[:, 1]))) for c in ax.collections for p in c.get_paths()}
    assert rows_with_bars == {2, 1, 0}  # every sampled device's row has its bars (gpu4's too)
