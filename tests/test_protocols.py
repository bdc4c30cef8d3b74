"""The event-driven protocols (hetsim/protocols.py) on a hand-computed cluster.

Three constant-speed workers: w0 takes 1 s a step, w1 2 s, w2 5 s; one local step per job; no evaluation
time; a network so fast that an exchange adds less than a float64 ulp to the clock (so every time below
is exact). Each timeline below is worked out by hand from the protocol's rules in interfaces.md; ties in
time go to the lower worker index.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hetsim.errors import SpecError
from hetsim.policies.sampling import EpochStream
from hetsim.results import CHECKPOINT, load_checkpoint
from hetsim.seeding import derive
from hetsim.sim import Simulation, simulate

CLUSTER = ("cluster.devices=[{kind='cpu', count=1, step_time={dist='constant', mean_s=1.0}, eval_time_s=0.0}, "
           "{kind='gpu', count=1, step_time={dist='constant', mean_s=2.0}, eval_time_s=0.0}, "
           "{kind='gpu', count=1, step_time={dist='constant', mean_s=5.0}, eval_time_s=0.0}]",
           "cluster.network={collective='ring_allreduce', bandwidth_GBps=1e30, latency_s=0.0}",
           "scheduler={name='fixed', params={local_steps=1}}", "optim.momentum=0.0", "optim.weight_decay=0.0")


def three(tiny_spec, protocol, *more):
    return tiny_spec(*CLUSTER, f"protocol={protocol}", *more)


def column(result, key):
    return [d[key] for d in result.decisions]


class Interrupt(Exception):
    pass


# -- async -------------------------------------------------------------------------------------------

# (worker, pulled version, staleness, start, finish) per update: w0 arrives every second, w1 every 2 s, w2 at
# 5 s; each arrival is combined at once and its worker pulls the new version. At t = 2 w0 (pulled 1) and w1
# (pulled 0) tie: w0 first (update 2), then w1 finds version 2 (staleness 2); at t = 4 and t = 5 likewise
# (w0's job pulled 5 at t = 4 arrives after w1's update 6: staleness 1).
ASYNC = [(0, 0, 0, 0, 1), (0, 1, 0, 1, 2), (1, 0, 2, 0, 2), (0, 2, 1, 2, 3), (0, 4, 0, 3, 4), (1, 3, 2, 2, 4),
         (0, 5, 1, 4, 5), (2, 0, 7, 0, 5)]


@pytest.mark.parametrize("fidelity", ["emulated", "time_only"])
def test_async_combines_each_arrival_at_once_with_its_staleness(tiny_spec, fidelity):
    r = simulate(three(tiny_spec, "{name='async', params={alpha=0.5, staleness='polynomial', a=0.5}}",
                       "stop.max_rounds=8", f"sim.fidelity='{fidelity}'", "workload.n_train=256"))
    assert column(r, "workers") == [[k] for k, *_ in ASYNC]
    assert column(r, "pulled") == [[p] for _, p, *_ in ASYNC]
    assert column(r, "staleness") == [[s] for _, _, s, *_ in ASYNC]
    assert column(r, "start_s") == [[float(t)] for *_, t, _ in ASYNC]
    assert column(r, "finish_s") == [[float(t)] for *_, t in ASYNC]
    assert column(r, "version") == list(range(1, 9))
    assert column(r, "weights") == [[1.0]] * 8  # the mean of one arrival; the damping is applied to it
    assert r.metrics["time_s"] == [0.0, 1.0, 2.0, 2.0, 3.0, 4.0, 4.0, 5.0, 5.0]
    assert r.summary["protocol"] == "async" and r.summary["updates"] == 8 and r.summary["dropped"] == 0
    assert r.summary["mean_staleness"] == pytest.approx(13 / 8)
    assert r.summary["time_s"] == 5.0  # w1's job pulled at t = 4 is in flight at the stop: discarded
    assert r.summary["rounds_participated"] == {"cpu0": 5, "gpu0": 2, "gpu1": 1}
    # every worker computed all the time: w1's job in flight since t = 4 counts its second to the end
    assert r.summary["utilization"] == {"cpu0": 1.0, "gpu0": 1.0, "gpu1": 1.0}


def test_async_math_by_hand_is_fedasync_with_polynomial_staleness(tiny_spec):
    """x <- x + alpha s(tau) (x_k - x), s(tau) = (1 + tau)^-a, x_k = one SGD step from the model k pulled."""
    alpha, a = 0.5, 0.5
    sim = Simulation(three(tiny_spec, f"{{name='async', params={{alpha={alpha}, staleness='polynomial', a={a}}}}}",
                           "stop.max_rounds=8"))
    init = sim.core.global_params().clone()
    result = sim.run()
    w = sim.core.workload
    model = w.make_model()
    streams = [EpochStream(w.n_train, np.random.default_rng(derive(sim.spec.seed, "data", k))) for k in range(3)]
    versions = [init.clone()]  # the global model after each update
    for k, pulled, tau, *_ in ASYNC:
        torch.nn.utils.vector_to_parameters(versions[pulled].clone(), model.parameters())  # (it aliases)
        idx = torch.from_numpy(streams[k].take(8))
        model.zero_grad()
        F.cross_entropy(model(w.train_x[idx]), w.train_y[idx]).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        x = versions[-1]
        x_k = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        versions.append(x + alpha * (1 + tau) ** -a * (x_k - x))
    assert torch.allclose(sim.core.global_params(), versions[-1], atol=1e-6)
    assert not torch.equal(versions[-1], init)
    # the decisions carry each update's model digest: the last one is the final model's
    from hetsim.results import model_digest
    assert result.decisions[-1]["digest"] == model_digest(sim.core.global_params())


def test_staleness_functions_are_fedasyncs():
    from hetsim.protocols import Staleness

    tau = np.array([0, 1, 3, 4, 6])
    assert Staleness("constant").weights(tau) is None  # all 1: nothing to damp
    assert Staleness("polynomial", a=0.5).weights(tau) == pytest.approx([1, 2 ** -0.5, 0.5, 5 ** -0.5, 7 ** -0.5])
    # hinge: 1 up to b, then 1 / (a (tau - b) + 1)
    assert Staleness("hinge", a=2.0, b=3.0).weights(tau) == pytest.approx([1, 1, 1, 1 / 3, 1 / 7])


# -- buffered async ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fidelity", ["emulated", "time_only"])
def test_buffered_async_combines_every_k_arrivals_and_redispatches_at_once(tiny_spec, fidelity):
    # k = 2. Every worker is re-dispatched right at its arrival, pulling the version of that moment: w0
    # arrives at 1 (pulled 0), goes again pulling 0 (no combine yet) and arrives at 2, before w1 (tie):
    # update 1 at t = 2 is w0's two jobs. Then w1 (t = 2, pulled 0) and w0 (t = 3, pulled 0 at t = 2,
    # before update 1) -> update 2 at t = 3; w0 and w1 at t = 4, both pulled 1 -> update 3; w0 (pulled 2 at
    # t = 4) and w2 (pulled 0) at t = 5 -> update 4.
    r = simulate(three(tiny_spec, "{name='buffered_async', params={k=2}}", "stop.max_rounds=4",
                       f"sim.fidelity='{fidelity}'", "workload.n_train=256"))
    assert column(r, "workers") == [[0, 0], [1, 0], [0, 1], [0, 2]]
    assert column(r, "pulled") == [[0, 0], [0, 0], [1, 1], [2, 0]]
    assert column(r, "staleness") == [[0, 0], [1, 1], [1, 1], [1, 3]]
    assert column(r, "start_s") == [[0.0, 1.0], [0.0, 2.0], [3.0, 2.0], [4.0, 0.0]]
    assert column(r, "finish_s") == [[1.0, 2.0], [2.0, 3.0], [4.0, 4.0], [5.0, 5.0]]
    assert column(r, "weights") == [[0.5, 0.5]] * 4
    assert r.metrics["time_s"] == [0.0, 2.0, 3.0, 4.0, 5.0]
    assert r.summary["mean_staleness"] == pytest.approx(8 / 8)


def test_buffered_async_keeps_each_arrivals_replica_although_its_worker_runs_on(tiny_spec):
    """Update 1 is the mean of w0's first two jobs, both one SGD step from the initial model (w0 pulled
    version 0 twice): the first replica must survive the second job."""
    sim = Simulation(three(tiny_spec, "{name='buffered_async', params={k=2}}", "stop.max_rounds=1"))
    init = sim.core.global_params().clone()
    sim.run()
    w = sim.core.workload
    model = w.make_model()
    stream = EpochStream(w.n_train, np.random.default_rng(derive(sim.spec.seed, "data", 0)))
    replicas = []
    for _ in range(2):
        torch.nn.utils.vector_to_parameters(init.clone(), model.parameters())  # (it aliases)
        idx = torch.from_numpy(stream.take(8))
        model.zero_grad()
        F.cross_entropy(model(w.train_x[idx]), w.train_y[idx]).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        replicas.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach())
    assert not torch.equal(replicas[0], replicas[1])
    assert torch.allclose(sim.core.global_params(), (replicas[0] + replicas[1]) / 2, atol=1e-6)


# -- semi-sync ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fidelity", ["emulated", "time_only"])
def test_semi_sync_drop_closes_at_the_first_k_and_discards_late_work(tiny_spec, fidelity):
    # k = 2: round 1 closes at t = 2 (w0 at 1, w1 at 2); w2 (pulled 0, due at 5) stays in flight and is not
    # re-dispatched. Round 2: w0, w1 from t = 2 -> 3, 4. Round 3 from t = 4: w0 at 5, then w2 at 5 (late:
    # dropped, does not count), then w1 at 6 closes it. Round 4 from t = 6 (w2 dispatched again): 7, 8.
    r = simulate(three(tiny_spec, "{name='semi_sync', params={k=2, late='drop'}}", "stop.max_rounds=4",
                       f"sim.fidelity='{fidelity}'", "workload.n_train=256"))
    assert column(r, "workers") == [[0, 1]] * 4
    assert column(r, "pulled") == [[0, 0], [1, 1], [2, 2], [3, 3]]
    assert column(r, "staleness") == [[0, 0]] * 4
    assert column(r, "dropped") == [[], [], [2], []]
    assert column(r, "dropped_steps") == [[], [], [1], []]
    assert column(r, "dropped_finish_s") == [[], [], [5.0], []]
    assert r.metrics["time_s"] == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert r.metrics["samples"] == [0, 16, 32, 48, 64]  # the dropped work's samples do not count
    assert r.summary["dropped"] == 1 and r.summary["rounds_participated"]["gpu1"] == 0


@pytest.mark.parametrize("fidelity", ["emulated", "time_only"])
def test_semi_sync_keep_combines_late_work_in_the_round_it_arrives_with_its_staleness(tiny_spec, fidelity):
    # k = 2, late work kept and counted toward k: rounds 1-2 as with drop; round 3 from t = 4 (w0, w1 pull
    # 2): w0 and w2 (pulled 0) at 5 close it; round 4 from t = 5 (w0, w2 pull 3): w0 (6) and w1 (6, pulled 2).
    r = simulate(three(tiny_spec, "{name='semi_sync', params={k=2, late='keep'}}", "stop.max_rounds=4",
                       f"sim.fidelity='{fidelity}'", "workload.n_train=256"))
    assert column(r, "workers") == [[0, 1], [0, 1], [0, 2], [0, 1]]
    assert column(r, "pulled") == [[0, 0], [1, 1], [2, 0], [3, 2]]
    assert column(r, "staleness") == [[0, 0], [0, 0], [0, 2], [0, 1]]
    assert column(r, "dropped") == [[]] * 4
    assert r.metrics["time_s"] == [0.0, 2.0, 4.0, 5.0, 6.0]
    assert r.summary["mean_staleness"] == pytest.approx(3 / 8)


def test_semi_sync_keep_damps_late_work_by_its_staleness(tiny_spec):
    """Round 3 above combines w0 (staleness 0) and w2 (staleness 2) with hinge a = 1, b = 0: s = 1 and 1/3,
    so x3 = mean(x2 + 1 (x_w0 - x2), x2 + (x_w2 - x2) / 3): checked against a run without damping, whose
    update 3 is mean(x_w0, x_w2) from the same x2 (updates 1-2 have staleness 0 in both)."""
    runs = {}
    for staleness in ("constant", "hinge"):
        sim = Simulation(three(tiny_spec, f"{{name='semi_sync', params={{k=2, late='keep', staleness='{staleness}', "
                                          f"a=1.0, b=0.0}}}}", "stop.max_rounds=2"))
        sim.run()
        x2 = sim.core.global_params().clone()
        sim = Simulation(three(tiny_spec, f"{{name='semi_sync', params={{k=2, late='keep', staleness='{staleness}', "
                                          f"a=1.0, b=0.0}}}}", "stop.max_rounds=3"))
        sim.run()
        runs[staleness] = (x2, sim.core.global_params().clone(), sim)
    x2, plain, _ = runs["constant"]
    x2h, damped, sim = runs["hinge"]
    assert torch.equal(x2, x2h)
    # the undamped mean is (x_w0 + x_w2) / 2; the damped one (x_w0 + x2 + (x_w2 - x2) / 3) / 2
    x_w0_plus_w2 = 2 * plain
    x_w2 = sim.core.replicas([2])[0]
    x_w0 = x_w0_plus_w2 - x_w2
    assert torch.allclose(damped, (x_w0 + x2 + (x_w2 - x2) / 3) / 2, atol=1e-6)


@pytest.mark.parametrize("fidelity", ["emulated", "time_only"])
def test_semi_sync_closes_at_the_deadline_with_whoever_arrived(tiny_spec, fidelity):
    # k = 3, deadline 1.5 s after each round's start. Round 1: only w0 (t = 1) by 1.5. Round 2 (from 1.5,
    # w0 pulls 1): w1 (pulled 0) at 2 is late and dropped; w0 at 2.5 is the one possible arrival: closes.
    # Round 3 (from 2.5, w0 and w1 pull 2, w2 still out): deadline 4.0: only w0 (3.5).
    r = simulate(three(tiny_spec, "{name='semi_sync', params={k=3, deadline_s=1.5}}", "stop.max_rounds=3",
                       f"sim.fidelity='{fidelity}'", "workload.n_train=256"))
    assert column(r, "workers") == [[0], [0], [0]]
    assert column(r, "pulled") == [[0], [1], [2]]
    assert column(r, "dropped") == [[], [1], []]
    assert r.metrics["time_s"] == [0.0, 1.5, 2.5, 4.0]


@pytest.mark.parametrize("fidelity", ["emulated", "time_only"])
def test_semi_sync_with_nobody_by_the_deadline_closes_at_the_first_arrival(tiny_spec, fidelity):
    # k = 1, deadline 0.5: round 1 closes at w0's arrival (1); round 2 (from 1): w0 and w1 (late) tie at 2,
    # w0 first; round 3 (from 2): w1's late work (t = 2) is dropped, nobody by 2.5, w0 at 3 closes it.
    r = simulate(three(tiny_spec, "{name='semi_sync', params={k=1, deadline_s=0.5}}", "stop.max_rounds=3",
                       f"sim.fidelity='{fidelity}'", "workload.n_train=256"))
    assert column(r, "workers") == [[0], [0], [0]]
    assert column(r, "dropped") == [[], [], [1]]
    assert column(r, "dropped_finish_s") == [[], [], [2.0]]
    assert r.metrics["time_s"] == [0.0, 1.0, 2.0, 3.0]


# -- time-only equals emulated -------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [
    "{name='sync'}",
    "{name='semi_sync', params={k=2, late='drop'}}",
    "{name='semi_sync', params={k=2, late='keep', staleness='polynomial', a=1.0, deadline_s=0.02}}",
    "{name='async', params={alpha=0.6, staleness='hinge', a=1.0, b=1.0}}",
    "{name='buffered_async', params={k=2, alpha=0.8}}",
])
@pytest.mark.parametrize("scheduler", ["scheduler={name='fixed', params={per_kind={cpu=1, gpu=5}}}",
                                       "scheduler={name='time_budget', params={budget_s=0.25}}"])
def test_time_only_equals_emulated_on_constant_speeds(tiny_spec, protocol, scheduler):
    # step times that are exact in binary (1/4 s, 1/16 s) and a free exchange: the emulated clock's step-by-step
    # sums and time-only's k x step time are then the same numbers, so even ties in time (there are many)
    # resolve alike; with inexact ones the two differ in the last bits and a near-tie may flip
    args = (f"protocol={protocol}", scheduler, "cluster.devices.0.step_time.mean_s=0.25",
            "cluster.devices.1.step_time.mean_s=0.0625", "cluster.devices.0.eval_time_s=0.125", "eval.on='cpu0'",
            "cluster.network={collective='ring_allreduce', bandwidth_GBps=1e30, latency_s=0.0}", "stop.max_rounds=12")
    emulated = simulate(tiny_spec(*args))
    time_only = simulate(tiny_spec(*args, "sim.fidelity='time_only'", "workload.n_train=256"))
    assert time_only.metrics["time_s"] == emulated.metrics["time_s"]
    assert len(emulated.decisions) == 12
    for a, b in zip(emulated.decisions, time_only.decisions, strict=True):
        for key in ("workers", "local_steps", "samples", "weights", "staleness", "pulled", "start_s", "finish_s",
                    "version", "dropped", "dropped_steps", "dropped_finish_s"):
            assert a[key] == b[key], key
        assert b["digest"] == "" and len(a["digest"]) == 16
    assert time_only.summary["utilization"] == emulated.summary["utilization"]


# -- checkpoints ------------------------------------------------------------------------------------

def _crash_at(round_):
    def crash(row):
        if row["round"] == round_:
            raise Interrupt
    return crash


@pytest.mark.parametrize("protocol", ["{name='sync'}", "{name='semi_sync', params={k=3}}"],
                         ids=["sync", "semi_sync-k-equals-n"])
def test_nothing_in_flight_at_checkpoints_resumes_bit_identically(tiny_spec, tmp_path, protocol):
    spec = tiny_spec(f"protocol={protocol}", "stop.max_rounds=6", "run.checkpoint_every=2",
                     "cluster.devices.1.step_time={dist='lognormal', mean_s=0.002, std_s=0.001}")
    whole = Simulation(spec)
    expected = whole.run()
    with pytest.raises(Interrupt):
        Simulation(spec, tmp_path, progress=_crash_at(3)).run()
    resumed = Simulation(spec, tmp_path, resume=True)
    got = resumed.run()
    assert torch.equal(resumed.core.global_params(), whole.core.global_params())
    assert got.metrics["time_s"] == expected.metrics["time_s"]
    assert list(got.decisions) == list(expected.decisions)


def test_a_resumed_async_run_redoes_the_work_in_flight_and_completes(tiny_spec, tmp_path):
    spec = three(tiny_spec, "{name='async', params={alpha=0.5}}", "stop.max_rounds=8", "run.checkpoint_every=4")
    with pytest.raises(Interrupt):
        Simulation(spec, tmp_path, progress=_crash_at(5)).run()
    assert load_checkpoint(tmp_path / CHECKPOINT, "sim", spec).state["round"] == 4
    got = Simulation(spec, tmp_path, resume=True).run()
    assert column(got, "version") == list(range(1, 9))
    assert got.summary["updates"] == 8
    # at the checkpoint (update 4, t = 3) w1 (pulled 3 at t = 2) and w2 (pulled 0) were in flight: after the
    # resume every worker pulls version 4 at t = 3 and works again (w0 at 4, 5; w1 at 5, both tie at 5)
    after = list(got.decisions)[4:]
    assert [d["workers"] for d in after] == [[0], [0], [1], [0]]
    assert [d["pulled"] for d in after] == [[4], [5], [4], [6]]
    assert [d["start_s"] for d in after] == [[3.0], [4.0], [3.0], [5.0]]
    assert got.metrics["time_s"][5:] == [4.0, 5.0, 5.0, 6.0]
    # the run says where it was resumed, and a replay refuses it (its arrivals after update 4 are two runs')
    assert got.summary["resumed_at_updates"] == [4]
    from hetsim.cli import main

    assert main(["simulate", "--replay", str(tmp_path), "--quiet"]) == 2


# -- bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol, message", [
    ("{name='semi_sync', params={k=4}}", "protocol.params.k: expected 1 <= k <= 3 (the cluster's workers), got 4"),
    ("{name='buffered_async', params={k=0}}", "protocol.params.k: expected 1 <= k <= 3 (the cluster's workers), got 0"),
    ("{name='semi_sync', params={k=1.5}}", "protocol.params.k: expected 1 <= k <= 3 (the cluster's workers), got 1.5"),
    ("{name='semi_sync'}", "protocol.params.k: semi_sync needs k (1 <= k <= 3, the cluster's workers)"),
    ("{name='async', params={alpha=0.0}}", "protocol.params.alpha: expected a number in (0, 1], got 0.0"),
    ("{name='async', params={alpha=1.5}}", "protocol.params.alpha: expected a number in (0, 1], got 1.5"),
    ("{name='async', params={staleness='polynomial', a=-0.5}}", "protocol.params.a: expected a number >= 0, got -0.5"),
    ("{name='async', params={staleness='hinge', b=-1}}", "protocol.params.b: expected a number >= 0, got -1"),
    ("{name='async', params={staleness='linear'}}",
     "protocol.params.staleness: expected one of constant, polynomial, hinge, got 'linear'"),
    ("{name='semi_sync', params={k=2, late='carry'}}", "protocol.params.late: expected one of drop, keep, got 'carry'"),
    ("{name='semi_sync', params={k=2, deadline_s=-1.0}}",
     "protocol.params.deadline_s: expected a number of seconds >= 0 (0: no deadline), got -1.0"),
    ("{name='fedasync'}", "protocol.name: expected one of sync, semi_sync, async, buffered_async, got 'fedasync'"),
    ("{name='async', params={k=2}}", "protocol.params.k: not a parameter of 'async' (expected alpha, staleness, a, b)"),
])
def test_bad_protocol_parameters_are_one_line_spec_errors(tiny_spec, protocol, message):
    with pytest.raises(SpecError) as e:
        tiny_spec(f"protocol={protocol}")
    assert str(e.value) == f"tiny: {message}"


# -- replay -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [
    "{name='async', params={alpha=0.6, staleness='polynomial', a=0.5}}",
    "{name='semi_sync', params={k=2, late='drop', deadline_s=0.012}}",
    "{name='buffered_async', params={k=2}}",
    "{name='sync'}",
])
def test_a_replay_of_a_simulated_run_makes_its_decisions_and_models_update_by_update(tiny_spec, tmp_path, protocol):
    from hetsim.sim.replay import replay

    # lognormal step times: the replay must take them from the decisions (its own draws would differ)
    spec = tiny_spec(f"protocol={protocol}", "stop.max_rounds=10",
                     "cluster.devices.1.step_time={dist='lognormal', mean_s=0.002, std_s=0.002}")
    original = simulate(spec, tmp_path / "run")
    assert len({d["finish_s"][0] for d in original.decisions}) > 1
    got = replay(tmp_path / "run", tmp_path / "replay")
    assert got.summary["replay"] == {"run": str(tmp_path / "run"), "updates": 10, "digests_compared": 10,
                                     "digests_matched": 10}
    assert [d["digest"] for d in got.decisions] == [d["digest"] for d in original.decisions]
    assert [d["workers"] for d in got.decisions] == [d["workers"] for d in original.decisions]
    assert got.metrics["test_acc"] == original.metrics["test_acc"]
    assert (tmp_path / "replay" / "decisions.bin").is_file()


def test_a_replay_whose_protocol_decides_otherwise_names_the_first_update_that_differs(tiny_spec, tmp_path):
    from hetsim.errors import HetsimError
    from hetsim.sim.replay import replay

    simulate(three(tiny_spec, "{name='async'}", "stop.max_rounds=8"), tmp_path)
    # the same arrivals under buffered_async with k = 1: w0 is re-dispatched before its update, pulling
    # version 0 again where async's w0 pulled version 1 (update 2)
    config = (tmp_path / "config.toml").read_text()
    assert 'name = "async"' in config
    (tmp_path / "config.toml").write_text(config.replace('name = "async"', 'name = "buffered_async"').replace(
        "[protocol.params]", "[protocol.params]\nk = 1"))
    with pytest.raises(HetsimError, match=r"^replay of .*: update 2 differs from the run's: pulled \[0\] where the "
                                          r"run has \[1\]$"):
        replay(tmp_path)


def test_simulate_replay_on_the_command_line(tiny_spec, tmp_path, capsys):
    from hetsim.cli import main

    simulate(tiny_spec("protocol={name='async'}", "stop.max_rounds=5"), tmp_path / "run")
    assert main(["simulate", "--replay", str(tmp_path / "run"), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == (f"replayed 5 updates of {tmp_path / 'run'}: the same decisions; "
                                               f"model digests 5/5 equal")
    assert main(["simulate", "--replay", str(tmp_path / "run"), "--set", "seed=1"]) == 2
    assert "hetsim: error: --replay RUN runs RUN's own config.toml" in capsys.readouterr().err
    assert simulate(tiny_spec("protocol={name='async'}", "stop.max_rounds=5")).summary["resumed_at_updates"] is None
    # a folder that is not a run is bad input (exit 2), in one line
    assert main(["simulate", "--replay", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"hetsim: error: {tmp_path}: no decisions.bin to replay (not a run directory, or run with " \
                  f"trace.decisions = false)\n"


# -- decisions and trace ---------------------------------------------------------------------------------

def test_a_decisions_file_of_schema_2_is_still_read(tmp_path):
    """A hetsim-decisions/2 record, built here from its documented layout: header, then five columns."""
    import struct
    import zlib

    from hetsim.results import read_decisions

    cols = (np.array([0, 2], "<u1"), np.array([3, 1], "<u1"), np.array([24, 8], "<u1"), np.array([0, 8], "<u1"))
    payload = zlib.compress(b"".join(c.tobytes() for c in cols) + np.array([0.75, 0.25], "<f8").tobytes())
    record = struct.pack("<QqqdI4s", len(payload), 1, 2, math.nan, zlib.crc32(payload), b"BBBB") + payload
    (tmp_path / "decisions.bin").write_bytes(b"hetsim-decisions/2\n" + record)
    assert list(read_decisions(tmp_path / "decisions.bin")) == [
        {"round": 1, "workers": [0, 2], "local_steps": [3, 1], "samples": [24, 8], "biased_samples": [0, 8],
         "weights": [0.75, 0.25], "time_budget_s": None}]


def test_the_trace_shows_each_job_from_pull_to_arrival_and_the_wait_for_the_next_dispatch(tiny_spec, tmp_path):
    # semi_sync drop, k = 2 (the timeline of the drop test above): w0 computes 0-1 and waits for the close at 2;
    # w2 computes 0-5 (dropped in round 3) and waits until round 4 dispatches it at 6
    r = simulate(three(tiny_spec, "{name='semi_sync', params={k=2, late='drop'}}", "stop.max_rounds=4"), tmp_path)
    spans = {}
    for e in r.trace:
        if e["ph"] == "X":
            spans.setdefault(e["tid"], []).append((e["name"], e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6))
    assert sorted(spans[0])[:3] == [("compute", 0.0, 1.0), ("compute", 2.0, 3.0), ("compute", 4.0, 5.0)]
    assert ("idle", 1.0, 2.0) in spans[0] and ("idle", 3.0, 4.0) in spans[0]
    assert sorted(spans[2]) == [("compute", 0.0, 5.0), ("idle", 5.0, 6.0)]  # w2's second job never arrives


from dataclasses import dataclass  # noqa: E402

from hetsim.policies import Aggregator  # noqa: E402


@dataclass(frozen=True)
class RowMean(Aggregator):
    """The mean of the arrivals' replicas, read as rows (a non-linear aggregator's path)."""

    linear = False

    def combine(self, global_params, arrivals, state):
        rows = arrivals.replicas
        return rows.mean(dim=0), np.full(len(arrivals), 1 / len(arrivals)), state


def test_an_aggregator_reading_the_replicas_as_rows_sees_them_damped(tiny_spec):
    protocol = "{name='semi_sync', params={k=2, late='keep', staleness='hinge', a=1.0, b=0.0}}"
    finals = []
    for aggregator in ("{name='mean'}", "{name='test_protocols:RowMean'}"):
        sim = Simulation(three(tiny_spec, protocol, f"aggregator={aggregator}", "stop.max_rounds=4"))
        r = sim.run()
        assert column(r, "staleness")[2] == [0, 2]  # damped by 1 and 1/3 (see the keep tests above)
        finals.append(sim.core.global_params())
    assert torch.allclose(finals[0], finals[1], atol=1e-6)


# With a 0.25 s latency every arrival pays a push and a pull through the server, 2 x 0.25 s (the bytes
# are free at this bandwidth), during which the server is busy and the arriving worker waits; the others
# go on computing. By hand: w0 arrives at 1, the update ends at 1.5 and w0 (pulling 1) runs 1.5-2.5; w1
# arrives at 2 (update 2 ends 2.5; w1 pulls 2 and runs 2.5-4.5); w0 arrives at 2.5 (update 3 ends 3.0; w0
# pulls 3, runs 3.0-4.0); w0 at 4.0 (update 4 ends 4.5); w1 at 4.5 (update 5 ends 5.0); w2 at 5.0 (update 6
# ends 5.5). Before this was charged, a lone arrival's exchange cost nothing.
ASYNC_EXCHANGE = [(0, 0, 0, 0.0, 1.0, 1.5), (1, 0, 1, 0.0, 2.0, 2.5), (0, 1, 1, 1.5, 2.5, 3.0),
                  (0, 3, 0, 3.0, 4.0, 4.5), (1, 2, 2, 2.5, 4.5, 5.0), (2, 0, 5, 0.0, 5.0, 5.5)]


@pytest.mark.parametrize("fidelity", ["emulated", "time_only"])
def test_each_async_arrival_pays_a_push_and_a_pull_through_the_server(tiny_spec, fidelity):
    r = simulate(three(tiny_spec, "{name='async'}", "cluster.network.latency_s=0.25", "stop.max_rounds=6",
                       f"sim.fidelity='{fidelity}'", "workload.n_train=256"))
    assert column(r, "workers") == [[k] for k, *_ in ASYNC_EXCHANGE]
    assert column(r, "pulled") == [[p] for _, p, *_ in ASYNC_EXCHANGE]
    assert column(r, "staleness") == [[s] for _, _, s, *_ in ASYNC_EXCHANGE]
    assert column(r, "start_s") == [[t] for *_, t, _, _ in ASYNC_EXCHANGE]
    assert column(r, "finish_s") == [[t] for *_, t, _ in ASYNC_EXCHANGE]
    assert r.metrics["time_s"] == [0.0] + [t for *_, t in ASYNC_EXCHANGE]


def test_the_exchange_goes_through_the_server_under_event_driven_protocols():
    from hetsim.cluster import exchange_time
    from hetsim.config import NetworkSpec

    class Link:  # what exchange_time reads of a device
        bandwidth_Bps, latency_s = None, None
        overhead_s, overhead_per_arrival_s = 0.0, 0.0

    ring = NetworkSpec(collective="ring_allreduce", bandwidth_GBps=2.0, latency_s=0.001)
    s = 4e9  # bytes: 2 s at 2 GB/s
    assert exchange_time(ring, [Link()], int(s), n=1) == 0.0  # an all-reduce with oneself
    assert exchange_time(ring, [Link()], int(s), n=1, through_server=True) == pytest.approx(2 * 0.001 + 2 * 2.0)
    # n arrivals through the server: the server's link carries n models each way (the parameter-server formula)
    assert exchange_time(ring, [Link()], int(s), n=3, through_server=True) == pytest.approx(2 * 0.001 + 2 * 3 * 2.0)
    assert exchange_time(ring, [Link()], int(s), n=0, through_server=True) == 0.0


def test_every_combine_pays_the_measured_overhead_on_top_of_the_exchange():
    from hetsim.cluster import exchange_time
    from hetsim.config import NetworkSpec

    class Link:
        bandwidth_Bps, latency_s = None, None

        def __init__(self, fixed, per):
            self.overhead_s, self.overhead_per_arrival_s = fixed, per

    ring = NetworkSpec(collective="ring_allreduce", bandwidth_GBps=2.0, latency_s=0.001)
    s = 4e9  # 2 s at 2 GB/s
    a, b = Link(0.005, 0.001), Link(0.002, 0.003)
    # a world of one: no all-reduce, but the round's bookkeeping: 5 ms + 1 x 1 ms
    assert exchange_time(ring, [a], int(s), n=1) == pytest.approx(0.006)
    # ring of 2: 2(n-1)a + 2(n-1)/n S/B, plus the largest fixed part (5 ms) and per-arrival part (3 ms) x 2
    assert exchange_time(ring, [a, b], int(s), n=2) == pytest.approx(2 * 0.001 + 2.0 + 0.005 + 2 * 0.003)
    # through the server, 3 arrivals: 2a + 2 n S/B + overhead
    assert exchange_time(ring, [a], int(s), n=3, through_server=True) == pytest.approx(
        2 * 0.001 + 2 * 3 * 2.0 + 0.005 + 3 * 0.001)
    assert exchange_time(ring, [a], int(s), n=0) == 0.0  # no combine, no overhead


def test_a_simulated_sync_round_is_its_slowest_work_plus_exchange_plus_overhead(tiny_spec):
    # constant steps: round time = max(steps x step) + the ring's exchange + fixed + per-arrival x n (by hand)
    spec = tiny_spec("stop.max_rounds=3", "cluster.devices.0.overhead_s=0.004",
                     "cluster.devices.1.overhead_per_arrival_s=0.0005")
    r = simulate(spec)
    base = simulate(tiny_spec("stop.max_rounds=3"))
    n = len(spec.worker_kinds())
    per_round = 0.004 + 0.0005 * n
    got = np.diff(r.metrics["time_s"]) - np.diff(base.metrics["time_s"])
    assert got == pytest.approx([per_round] * 3, abs=1e-12)
    assert r.summary["combine_overhead_s"] == {"fixed": 0.004, "per_arrival": 0.0005}
    fast = simulate(tiny_spec("stop.max_rounds=3", "cluster.devices.0.overhead_s=0.004", "sim.fidelity='time_only'",
                              "cluster.devices.1.overhead_per_arrival_s=0.0005"))
    assert fast.metrics["time_s"] == pytest.approx(r.metrics["time_s"], abs=1e-12)  # the same charge in time-only


def test_a_negative_overhead_is_a_one_line_error(tiny_spec):
    with pytest.raises(SpecError, match=r"cluster.devices\[0\].overhead_s: expected a number >= 0"):
        tiny_spec("cluster.devices.0.overhead_s=-0.001")


def test_event_driven_evaluations_are_on_the_servers_track(tiny_spec):
    # the server evaluates while the workers compute: its own track (after the workers'), not the evaluator's
    r = simulate(tiny_spec("protocol={name='async'}", "stop.max_rounds=4", "eval.every_rounds=2",
                           "cluster.devices.0.eval_time_s=0.01", "cluster.devices.1.eval_time_s=0.01"))
    names = {e["tid"]: e["args"]["name"] for e in r.trace if e.get("name") == "thread_name"}
    assert names == {0: "cpu0", 1: "gpu0", 2: "gpu1", 3: "server"}
    evals = [e for e in r.trace if e.get("name") == "eval"]
    assert [e["args"]["round"] for e in evals] == [2, 4] and all(e["tid"] == 3 for e in evals)
    assert all(e["dur"] == pytest.approx(0.01 * 1e6) for e in evals)


def test_a_replay_of_a_real_sync_run_whose_digests_differ_says_why(tiny_spec, tmp_path, capsys, monkeypatch):
    import json
    from types import SimpleNamespace

    import hetsim.sim.replay
    from hetsim.cli import main

    # a real sync run (summary engine torchmp) whose replay matched decisions but not digests: the all-reduce
    spec = tiny_spec("stop.max_rounds=3")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"engine": "torchmp"}))
    fake = SimpleNamespace(spec=spec, summary={"rounds": 3, "time_s": 0.1, "wall_time_s": 0.1, "protocol": "sync",
                                               "replay": {"updates": 3, "digests_compared": 3, "digests_matched": 0}})
    monkeypatch.setattr(hetsim.sim.replay, "replay", lambda *a, **k: fake)
    assert main(["simulate", "--replay", str(tmp_path / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "a real sync run sums its replicas with an all-reduce" in err and err.count("\n") == 1
    # a simulated run's differing digests get no such excuse
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"engine": "sim"}))
    assert main(["simulate", "--replay", str(tmp_path / "run"), "--quiet"]) == 1
    assert capsys.readouterr().err == ""
