"""Event-driven protocols on real processes: a server rank and three CPU worker ranks (gloo on loopback),
their decisions, a worker that dies, and replay parity with the simulator (`hetsim simulate --replay`)."""

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from hetsim.config import spec_to_dict, to_toml
from hetsim.errors import HetsimError
from hetsim.resolve import spec_from_dict
from hetsim.results import read_decisions

from backends.torchmp import run
from backends.torchmp.launcher import _watch
from backends.torchmp.server import ALIVE, EXITED, NO_PROGRESS
from backends.torchmp.worker import FAULT_ENV

from conftest import TINY

# three one-thread CPU workers (cpu0, gpu0, gpu1: the kinds only name them), 1 or 5 steps a job; the slow
# kind samples by loss scores, so the score table travels with the jobs and the observations with results
BASE = ["cluster.devices.0.threads=1", "cluster.devices.1.threads=1",
        "sampler={name='loss_topk', params={kinds=['cpu'], sample_ratio=2}}", "stop.max_rounds=6"]
ASYNC = "protocol={name='async', params={alpha=0.6, staleness='polynomial', a=0.5}}"
SEMI_SYNC = "protocol={name='semi_sync', params={k=2, late='keep', staleness='polynomial', a=0.5}}"
SEMI_SYNC_DROP = "protocol={name='semi_sync', params={k=2, late='drop'}}"
BUFFERED = "protocol={name='buffered_async', params={k=2, alpha=0.8, staleness='hinge', a=1.0, b=0.0}}"


def _spec(*overrides: str):
    return spec_from_dict(TINY, source="tiny", overrides=[*BASE, *overrides])


@pytest.fixture(scope="module")
def async_run(tmp_path_factory):
    os.environ.pop(FAULT_ENV, None)
    out = tmp_path_factory.mktemp("async") / "run"
    return out, run(_spec(ASYNC), out)


@pytest.fixture(scope="module")
def semi_sync_run(tmp_path_factory):
    os.environ.pop(FAULT_ENV, None)
    out = tmp_path_factory.mktemp("semi") / "run"
    return out, run(_spec(SEMI_SYNC), out)


@pytest.fixture(scope="module")
def semi_sync_drop_run(tmp_path_factory):
    os.environ.pop(FAULT_ENV, None)
    out = tmp_path_factory.mktemp("drop") / "run"
    return out, run(_spec(SEMI_SYNC_DROP), out)


@pytest.fixture(scope="module")
def buffered_run(tmp_path_factory):
    os.environ.pop(FAULT_ENV, None)
    out = tmp_path_factory.mktemp("buffered") / "run"
    return out, run(_spec(BUFFERED), out)


def _pulls_follow_arrivals(decisions):
    """Every arrival pulled the version made by the update that took the same worker's previous work (0 for
    its first): an arriving worker is idle until the next dispatch, which pulls the version just made."""
    last = {}
    for d in decisions:
        for k, p in zip(d["workers"] + d["dropped"], d["pulled"] + [None] * len(d["dropped"])):
            if p is not None:
                assert p == last.get(k, 0), (d["round"], k, p, last)
        for k in d["workers"] + d["dropped"]:
            last[k] = d["version"]


def test_async_on_real_processes_combines_each_arrival_with_its_staleness(async_run):
    out, result = async_run
    decisions = result.decisions
    assert [d["version"] for d in decisions] == [1, 2, 3, 4, 5, 6]
    assert all(len(d["workers"]) == 1 for d in decisions)            # one update per arrival
    for d in decisions:                                             # staleness = updates since the pull
        assert d["staleness"] == [d["version"] - 1 - p for p in d["pulled"]]
    _pulls_follow_arrivals(decisions)
    assert [d["local_steps"] for d in decisions] == [[1 if d["workers"][0] == 0 else 5] for d in decisions]
    s = result.summary
    assert s["protocol"] == "async" and s["updates"] == 6 and s["failed_workers"] == {}
    assert s["engine"] == "torchmp" and s["server_rank"] == 0 and len(s["threads"]) == 3
    assert all(len(d["digest"]) > 0 for d in decisions)


def test_semi_sync_on_real_processes_closes_rounds_at_k_arrivals(semi_sync_run):
    out, result = semi_sync_run
    decisions = result.decisions
    assert [d["version"] for d in decisions] == [1, 2, 3, 4, 5, 6]
    # k = 2, late work kept: two arrivals per round (the third worker's counts in the round it arrives in)
    assert all(len(d["workers"]) == 2 and len(set(d["workers"])) == 2 for d in decisions)
    for d in decisions:
        assert d["staleness"] == [d["version"] - 1 - p for p in d["pulled"]]
    _pulls_follow_arrivals(decisions)
    assert result.summary["protocol"] == "semi_sync" and result.summary["failed_workers"] == {}


def test_semi_sync_on_real_processes_drops_late_work(semi_sync_drop_run):
    out, result = semi_sync_drop_run
    decisions = result.decisions
    # only work pulled in the round itself is combined: two fresh arrivals per round, staleness 0
    assert all(len(d["workers"]) == 2 and d["staleness"] == [0, 0] for d in decisions)
    assert all(d["pulled"] == [d["version"] - 1] * 2 for d in decisions)
    _pulls_follow_arrivals(decisions)
    assert result.summary["dropped"] == sum(len(d["dropped"]) for d in decisions)


@pytest.mark.parametrize("which", ["async_run", "semi_sync_run", "semi_sync_drop_run", "buffered_run"])
def test_replay_of_a_real_run_gives_the_same_model_after_every_update(which, request, tmp_path):
    from hetsim.cli import main

    out, result = request.getfixturevalue(which)
    assert main(["simulate", "--replay", str(out), "--out", str(tmp_path / "replay"), "--quiet"]) == 0
    replayed = read_decisions(tmp_path / "replay" / "decisions.bin")
    real = read_decisions(out / "decisions.bin")
    assert len(replayed) == len(real) == 6
    if which == "buffered_run":  # FedBuff: every update combines k = 2 arrivals, a worker's replica as it arrived
        assert all(len(d["workers"]) == 2 for d in real)
    for a, b in zip(real, replayed):
        assert (a["version"], a["workers"], a["pulled"], a["local_steps"]) == \
            (b["version"], b["workers"], b["pulled"], b["local_steps"])
        assert a["digest"] == b["digest"], f"update {a['version']}: the parameters differ"


def test_a_worker_that_dies_does_not_stop_the_run(tmp_path, monkeypatch):
    # worker gpu0 (rank 2) crashes at the start of its second job; with k = 3 the second round cannot
    # close until the server has given it up, so what happens next does not depend on timing
    monkeypatch.setenv(FAULT_ENV, "crash:2:2")
    result = run(_spec("protocol={name='semi_sync', params={k=3}}", "stop.max_rounds=4"), tmp_path / "run")
    s = result.summary
    assert list(s["failed_workers"]) == ["gpu0"]
    assert s["failed_workers"]["gpu0"]["cause"] == "its process exited with an error"
    assert s["stopped_by"] == "max_rounds" and s["updates"] == 4
    assert sorted(result.decisions[0]["workers"]) == [0, 1, 2]
    assert [sorted(d["workers"]) for d in result.decisions[1:]] == [[0, 2]] * 3
    assert "injected crash" in (tmp_path / "run" / "logs" / "rank2.log").read_text()


def test_the_launcher_marks_failed_and_hung_workers_for_the_server_and_stops_for_the_server(tmp_path):
    spec = _spec(ASYNC, "run.fault_timeout_s=5")
    names = ["server", "cpu0", "gpu0", "gpu1"]
    now = time.time()
    heartbeat = [3, 1, now,          # the server, waiting for results
                 2, 0, now,          # rank 1: exited with an error (below)
                 5, 0, now - 60,     # rank 2: stuck in its 5th job for a minute
                 4, 1, now - 60]     # rank 3: waiting for its next job as long: idle, not hung
    procs = [SimpleNamespace(exitcode=0), SimpleNamespace(exitcode=1), SimpleNamespace(exitcode=None),
             SimpleNamespace(exitcode=None)]

    def kill():  # the hung rank ends; the idle one then exits too, so the watch can return
        procs[2].exitcode, procs[3].exitcode = -9, 0

    procs[2].kill = kill
    status = [ALIVE] * 4
    _watch(spec, tmp_path, names, procs, heartbeat, {}, 0.0, status)  # no error: the run goes on without them
    assert status == [ALIVE, EXITED, NO_PROGRESS, ALIVE]
    # the server failing ends the run, with its one line
    with pytest.raises(HetsimError, match=r"^device server \(rank 0\) failed in round 0: exited with status 1"):
        _watch(spec, tmp_path, names, [SimpleNamespace(exitcode=1)] + procs[1:], [0.0] * 12, {}, 0.0, [ALIVE] * 4)


def test_checkpoints_are_refused_under_an_event_driven_protocol_before_anything_starts(tmp_path):
    with pytest.raises(HetsimError, match=r"^run.checkpoint_every = 2: the real backend does not checkpoint "
                                          r"protocol 'async' \(only 'sync'\)"):
        run(_spec(ASYNC, "run.checkpoint_every=2"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_torchrun_needs_a_server_rank_under_an_event_driven_protocol(tmp_path, monkeypatch, capsys):
    from hetsim.cli import main

    cfg = tmp_path / "async.toml"
    cfg.write_text(to_toml(spec_to_dict(_spec(ASYNC))))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["run", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == (f"hetsim: error: {cfg}: torchrun started 3 processes for 3 devices under protocol 'async': "
                   f"expected 4 (a server rank and one rank per device)\n")


def test_torchrun_runs_an_async_run_with_n_plus_one_processes(tmp_path):
    cfg = tmp_path / "async.toml"
    cfg.write_text(to_toml(spec_to_dict(_spec(ASYNC, "stop.max_rounds=3"))))
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                           "-m", "hetsim.cli", "run", str(cfg), "--out", str(tmp_path / "tr")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[:3000]
    decisions = read_decisions(tmp_path / "tr" / "decisions.bin")
    assert [d["version"] for d in decisions] == [1, 2, 3] and all(len(d["workers"]) == 1 for d in decisions)


class _OneProcessComm:
    """The world comm's part the server clock's start uses, for one process."""

    def agree(self, values):
        return list(values)

    def barrier(self):
        pass


def test_the_server_raises_instead_of_waiting_forever_when_its_receiver_fails(monkeypatch):
    import backends.torchmp.server as server
    from hetsim.policies import RoundPlan
    from hetsim.protocol import run_to_end
    from hetsim.resolve import resolve

    spec = _spec(ASYNC)
    experiment = resolve(spec)
    core = server.ServerCore(spec, experiment.policies, experiment.workload)
    sent = []
    monkeypatch.setattr(server.dist, "isend", lambda t, dst, tag: sent.append((dst, tag)) or SimpleNamespace())
    clock = server.ServerClock(_OneProcessComm(), core, ["cpu0", "gpu0", "gpu1"], poll_s=0.01)
    clock.start()  # no process group here: the receiver thread's first receive fails
    clock.dispatch([0, 2], RoundPlan((1, 5), None), core.train, core.step)
    # each job: its header, the parameters, the score table (the cpu kind samples by loss scores)
    assert sent == [(1, 10), (1, 11), (1, 12), (3, 10), (3, 11), (3, 12)] and clock.in_flight() == [0, 2]
    with pytest.raises(HetsimError, match="^the server stopped receiving results: ValueError: Default process group"):
        run_to_end(clock.next_arrivals(1, None))
