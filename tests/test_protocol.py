"""The driver (hetsim/protocol.py): an event loop that a protocol drives, non-participants, stateful
policies across a resume, evaluation placement, and the simulator's two clocks agreeing."""

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hetsim.policies import Aggregator, Batch, RoundPlan, Sampler, Scheduler
from hetsim.policies.sampling import EpochStream
from hetsim.protocol import Protocol
from hetsim.results import CHECKPOINT, load_checkpoint
from hetsim.seeding import derive
from hetsim.sim import Simulation, simulate


def exchange(model_bytes, n, latency=1e-4, bw=1e9):
    """TINY's ring all-reduce among n workers."""
    return 2 * (n - 1) * latency + 2 * (n - 1) / n * model_bytes / bw


def same(a, b):
    """Equal, NaN (a cell that was not computed) equal to NaN."""
    return np.array_equal(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), equal_nan=True)


def two_devices(cpu_s=0.01, gpu_s=0.002):
    return (f"cluster.devices=[{{kind='cpu', count=1, step_time={{dist='constant', mean_s={cpu_s}}}}}, "
            f"{{kind='gpu', count=1, step_time={{dist='constant', mean_s={gpu_s}}}}}]")


# -- policies defined here, in the contract's terms ----------------------------------------------

@dataclass(frozen=True)
class OnlyWorkers(Scheduler):
    """`steps` local steps for the listed workers, 0 (sit the round out) for the others."""

    workers: tuple[int, ...] = (0,)
    steps: int = 3

    def plan(self, round, workers, rng, state):
        return RoundPlan(tuple(self.steps if w.index in self.workers else 0 for w in workers)), state


@dataclass(frozen=True)
class RandomSteps(Scheduler):
    """Each worker draws 1..max_steps local steps from the driver's seeded RNG; the state counts plans
    (so a resume that lost the RNG or the state would plan differently)."""

    max_steps: int = 4
    stateful = True

    def init_state(self, workers):
        return {"plans": 0}

    def plan(self, round, workers, rng, state):
        steps = rng.integers(1, self.max_steps + 1, size=len(workers)) + state["plans"] % 2
        return RoundPlan(tuple(steps.tolist())), {"plans": state["plans"] + 1}


@dataclass(frozen=True)
class SkipsAhead(Sampler):
    """Uniform batches, except that a worker's step n first skips n mod 3 samples of its stream: the
    worker's state (its step count) decides the data, so a resume must restore it per worker (at the
    round-2 checkpoint the counts are 2 and 10, neither a multiple of 3)."""

    uses_scores = False
    stateful = True

    def init_state(self, worker):
        return 0

    def batch(self, worker, batch_size, stream, scores, state):
        return Batch(stream.take(batch_size + state % 3)[state % 3:], 0), state + 1


@dataclass(frozen=True)
class ServerMomentum(Aggregator):
    """x ← x − v, v ← beta·v + (x − mean of the replicas): server momentum over the pseudo-gradient."""

    beta: float = 0.9
    stateful = True
    needs_previous_global = True

    def init_state(self, global_params):
        return {"v": torch.zeros_like(global_params)}

    def combine(self, global_params, arrivals, state):
        w = np.full(len(arrivals), 1.0 / len(arrivals))
        v = self.beta * state["v"] + (global_params - arrivals.weighted_sum(w))
        return global_params - v, w, {"v": v}


@dataclass(frozen=True)
class StaleMix(Aggregator):
    """FedAsync-style: x ← (1 − a) x + a x_k with a = alpha / (1 + staleness), one arrival at a time. Its
    state logs (worker, staleness) of every arrival, which the test reads back."""

    alpha: float = 0.5
    stateful = True
    needs_previous_global = True

    def init_state(self, global_params):
        return []

    def combine(self, global_params, arrivals, state):
        a = self.alpha / (1 + arrivals.staleness.astype(np.float64))
        new = arrivals.weighted_sum(a) + (1 - a.sum()) * global_params
        return new, a, state + [[int(k), int(s)] for k, s in zip(arrivals.workers, arrivals.staleness)]


SERVER = 0  # the worker whose process combines (the leader's)


class OneArrivalAtATime(Protocol):
    """A test-only asynchronous protocol on the driver's building blocks: every worker is planned and
    trains on its own; its replica travels by comm.send/recv; each arrival is combined at once, with
    staleness = the updates since that worker pulled; then the worker pulls and goes on. Runs on the
    emulated clock's SimPy environment (concurrent work is the simulator's)."""

    def run(self, d):
        env = d.clock.env

        def work(k):
            plan, ks, targets = d.plan_round([k])
            _, tallies = yield from d.local_work(ks, RoundPlan(targets, plan.time_budget_s))
            d.comm.send(d.core.replicas([k])[0], src=k, dst=SERVER)
            return k, tallies

        running = {k: env.process(work(k)) for k in d.workers}
        while True:
            reason, progress = d.stop_check()
            if d.pending is not None and (yield from d.end_round(reason)):
                continue
            if reason:
                return reason
            fired = list((yield env.any_of(list(running.values()))).values())
            assert len(fired) == 1, "the timelines below have no ties"
            k, tallies = fired[0]
            received = d.comm.recv(torch.empty_like(d.core.global_params()), src=k, dst=SERVER)
            lr = d.begin_round(progress)
            d.aggregate([k], tallies, None, lr, replicas=lambda ks: received.unsqueeze(0))
            running[k] = env.process(work(k))


def test_an_asynchronous_protocol_combines_arrival_by_arrival_with_staleness(tiny_spec):
    # worker 0 steps in 1 s, worker 1 in 2.5 s, one step per update: arrivals at t = 1 (w0), 2 (w0),
    # 2.5 (w1, which pulled version 0 and finds version 2: staleness 2), 3 (w0, pulled version 2 at t = 2,
    # finds 3: staleness 1), 4 (w0, pulled 4 at t = 3: staleness 0)
    spec = tiny_spec(two_devices(1.0, 2.5), "scheduler={name='fixed', params={local_steps=1}}",
                     "aggregator={name='test_protocol:StaleMix', params={alpha=0.5}}",
                     "optim.momentum=0.0", "optim.weight_decay=0.0", "stop.max_rounds=5")
    sim = Simulation(spec)
    sim.driver.protocol = OneArrivalAtATime()
    init = sim.core.global_params().clone()
    result = sim.run()
    timeline = [(0, 0), (0, 0), (1, 2), (0, 1), (0, 0)]  # (worker, staleness) per arrival
    assert result.metrics["time_s"] == pytest.approx([0, 1, 2, 2.5, 3, 4], abs=1e-12)
    assert [d["workers"] for d in result.decisions] == [[k] for k, _ in timeline]
    assert sim.driver.aggregator_state == [list(t) for t in timeline]
    assert result.decisions[2]["weights"] == pytest.approx([0.5 / 3])
    # the math, replayed by hand: each worker trains one SGD step from the model it pulled
    w = sim.core.workload
    model = w.make_model()
    streams = [EpochStream(w.n_train, np.random.default_rng(derive(spec.seed, "data", k))) for k in range(2)]
    x, pulled = init.clone(), {0: init.clone(), 1: init.clone()}
    for k, s in timeline:
        torch.nn.utils.vector_to_parameters(pulled[k], model.parameters())
        idx = torch.from_numpy(streams[k].take(8))
        model.zero_grad()
        F.cross_entropy(model(w.train_x[idx]), w.train_y[idx]).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        a = 0.5 / (1 + s)
        x = (1 - a) * x + a * torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        pulled[k] = x.clone()
    assert torch.allclose(sim.core.global_params(), x, atol=1e-6)


# -- non-participants ------------------------------------------------------------------------------

@pytest.mark.parametrize("aggregator", ["{name='mean'}", "{name='biased', params={strength=1.0}}", "{name='fednova'}",
                                        "{name='outer_sgd', params={outer_lr=0.7, momentum=0.9}}"])
def test_a_worker_planned_zero_steps_sits_out_and_the_run_equals_one_without_it(tiny_spec, aggregator):
    common = ("scheduler={name='test_protocol:OnlyWorkers', params={workers=[0], steps=3}}",
              f"aggregator={aggregator}", "eval.on='cpu0'", "cluster.devices.0.eval_time_s=0.004")
    with_idle = Simulation(tiny_spec(two_devices(), *common))
    a = with_idle.run()
    alone_spec = tiny_spec("cluster.devices=[{kind='cpu', count=1, step_time={dist='constant', mean_s=0.01}, "
                           "eval_time_s=0.004}]", *common[:3])
    alone = Simulation(alone_spec)
    b = alone.run()
    assert torch.equal(with_idle.core.global_params(), alone.core.global_params())
    for column in ("time_s", "train_loss", "test_loss", "test_acc", "samples"):
        assert same(a.metrics[column], b.metrics[column]), column
    assert all(math.isfinite(x) for x in a.metrics["test_acc"])
    assert [d["workers"] for d in a.decisions] == [[0]] * 4
    assert [d["weights"] for d in a.decisions] == [d["weights"] for d in b.decisions]
    assert a.summary["rounds_participated"] == {"cpu0": 4, "gpu0": 0}
    assert a.summary["utilization"]["gpu0"] == 0.0
    # the idle worker was never observed: no NaN step time reaches what policies see
    info = with_idle.core.infos[1]
    assert info.observed_step_time_s is None and info.observed_rounds == 0
    assert with_idle.core.infos[0].observed_step_time_s == pytest.approx(0.01)
    assert with_idle.core.infos[0].observed_rounds == 4


@dataclass(frozen=True)
class ForgetsOne(Scheduler):
    """Plans one worker fewer than it was given: a broken policy."""

    def plan(self, round, workers, rng, state):
        return RoundPlan(tuple(1 for _ in workers[1:])), state


def test_a_plan_for_the_wrong_number_of_workers_is_a_one_line_error(tiny_spec):
    from hetsim.errors import HetsimError

    with pytest.raises(HetsimError, match=r"^scheduler 'test_protocol:ForgetsOne' planned 2 workers in round 1, "
                                          r"3 were online$"):
        simulate(tiny_spec("scheduler={name='test_protocol:ForgetsOne'}"))


@dataclass(frozen=True)
class PlansValue(Scheduler):
    """Plans `value` local steps for worker 0 and 1 for the others: a possibly broken policy."""

    value: Any = -1

    def plan(self, round, workers, rng, state):
        return RoundPlan(tuple(self.value if w.index == 0 else 1 for w in workers)), state


@pytest.mark.parametrize("value, shown", [(-1, "-1"), (1.5, "1.5"), ("2", "'2'"), (None, "None")])
def test_a_plan_of_negative_or_non_integer_steps_is_a_one_line_error(tiny_spec, value, shown):
    from hetsim.errors import HetsimError

    params = "{}" if value is None else f"{{value={value!r}}}".replace("'", '"')
    spec = tiny_spec(f"scheduler={{name='test_protocol:PlansValue', params={params}}}")
    if value is None:
        spec = tiny_spec("scheduler={name='test_protocol:PlansNone'}")
    with pytest.raises(HetsimError, match=rf"^scheduler '[^']+' planned {re.escape(shown)} local steps in round 1: "
                                          r"expected integers >= 0$"):
        simulate(spec)


@dataclass(frozen=True)
class PlansNone(Scheduler):
    """None (run for the budget) without a time budget."""

    def plan(self, round, workers, rng, state):
        return RoundPlan(tuple(None for _ in workers)), state


def test_a_scheduler_that_sits_everyone_out_for_good_stops_the_run_instead_of_spinning(tiny_spec):
    from hetsim.errors import HetsimError
    from hetsim.protocol import MAX_IDLE_ROUNDS

    # only a time budget: without the guard no round would advance the clock, and the run would never end
    spec = tiny_spec("scheduler={name='test_protocol:OnlyWorkers', params={workers=[]}}", "stop.max_rounds=0",
                     "stop.max_time_s=1.0")
    with pytest.raises(HetsimError, match=rf"planned 0 local steps for every online worker in {MAX_IDLE_ROUNDS} "
                                          rf"rounds in a row \(up to round {MAX_IDLE_ROUNDS}\)"):
        simulate(spec)


def test_a_round_where_nobody_works_keeps_the_global_model(tiny_spec):
    sim = Simulation(tiny_spec("scheduler={name='test_protocol:OnlyWorkers', params={workers=[]}}",
                               "stop.max_rounds=2"))
    init = sim.core.global_params().clone()
    r = sim.run()
    assert torch.equal(sim.core.global_params(), init)
    assert r.metrics["time_s"] == [0.0, 0.0, 0.0] and [d["workers"] for d in r.decisions] == [[], []]
    assert r.metrics["test_acc"][0] == r.metrics["test_acc"][-1]


# -- stateful policies across a resume ------------------------------------------------------------

class Interrupt(Exception):
    pass


@pytest.mark.parametrize("policies", [
    ("aggregator={name='test_protocol:ServerMomentum', params={beta=0.9}}",),
    ("aggregator={name='outer_sgd', params={outer_lr=0.7, momentum=0.9, nesterov=true}}",),
    ("scheduler={name='proportional', params={max_steps=8, source='observed'}}",
     "cluster.devices.1.step_time={dist='lognormal', mean_s=0.002, std_s=0.001}"),
    ("scheduler={name='test_protocol:RandomSteps', params={max_steps=4}}",),
    ("sampler={name='test_protocol:SkipsAhead'}",),
], ids=["server-momentum", "outer_sgd", "proportional-observed", "random-steps", "sampler"])
def test_stateful_policies_resume_bit_identically(tiny_spec, tmp_path, policies):
    spec = tiny_spec(*policies, "stop.max_rounds=6", "run.checkpoint_every=2")
    whole = Simulation(spec)
    expected = whole.run()

    def crash(row):
        if row["round"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        Simulation(spec, tmp_path, progress=crash).run()
    state = load_checkpoint(tmp_path / CHECKPOINT, "sim", spec).state
    assert state["round"] == 2
    resumed = Simulation(spec, tmp_path, resume=True)
    got = resumed.run()
    assert torch.equal(resumed.core.global_params(), whole.core.global_params())
    assert got.metrics.keys() == expected.metrics.keys()
    assert all(same(got.metrics[c], expected.metrics[c]) for c in got.metrics)
    assert list(got.decisions) == list(expected.decisions)
    if "aggregator" in policies[0]:
        # the checkpoint held the server optimizer's state (not a fresh one): a resume could not equal
        # the uninterrupted run otherwise
        assert state["run"]["aggregator_state"] is not None
    if "sampler" in policies[0]:  # each worker's sampler state, with the worker: steps taken by round 2
        assert [w["sampler"] for w in state["rank"]["core"]["workers"].values()] == [2, 10, 10]


def test_hooks_see_every_round_start_its_work_and_the_end(tiny_spec):
    from hetsim.protocol import Hooks

    seen = []

    class Recording(Hooks):
        def round_started(self, round):
            seen.append(("started", round))

        def work_done(self, round):
            seen.append(("work done", round))

        def evaluating(self, round):
            seen.append(("evaluating", round))

        def evaluated(self, round):
            seen.append(("evaluated", round))

        def finished(self, round):
            seen.append(("finished", round))

    # evaluations after round 2 only (and of the initial model, which is not announced)
    sim = Simulation(tiny_spec("stop.max_rounds=3", "eval.every_rounds=2", "eval.every_epochs=0"))
    sim.driver.hooks = Recording()
    sim.run()
    assert seen == [("started", 1), ("work done", 1), ("started", 2), ("work done", 2), ("evaluating", 2),
                    ("evaluated", 2), ("started", 3), ("work done", 3), ("evaluating", 3), ("evaluated", 3),
                    ("finished", 3)]


# -- evaluation placement ---------------------------------------------------------------------------

@pytest.mark.parametrize("on, evaluator, eval_s", [("cpu0", 0, 0.005), ("gpu1", 2, 0.003), ("fastest", 1, 0.002)])
def test_eval_on_places_and_charges_the_evaluation(tiny_spec, on, evaluator, eval_s):
    # eval times: cpu0 0.005, gpu0 0.002, gpu1 0.003 (TINY's gpus are one group: gpu1's is set per group,
    # so use a third group for it)
    r = simulate(tiny_spec(
        "cluster.devices=[{kind='cpu', count=1, step_time={dist='constant', mean_s=0.01}, eval_time_s=0.005}, "
        "{kind='gpu', count=1, step_time={dist='constant', mean_s=0.002}, eval_time_s=0.002}, "
        "{kind='gpu', count=1, step_time={dist='constant', mean_s=0.002}, eval_time_s=0.003}]",
        f"eval.on='{on}'", "eval.every_rounds=2"))
    e = r.summary["exchange_s"]
    assert r.metrics["time_s"] == pytest.approx([0, 0.01 + e, 2 * (0.01 + e) + eval_s, 3 * (0.01 + e) + eval_s,
                                                 4 * (0.01 + e) + 2 * eval_s])
    evals = [ev for ev in r.trace if ev.get("name") == "eval"]
    assert {ev["tid"] for ev in evals} == {evaluator} and len(evals) == 2
    assert all(ev["dur"] == pytest.approx(eval_s * 1e6) for ev in evals)
    idle_while_evaluating = [ev for ev in r.trace if ev.get("name") == "idle" and ev["ts"] == evals[0]["ts"]]
    assert {ev["tid"] for ev in idle_while_evaluating} == {0, 1, 2} - {evaluator}
    assert r.summary["evaluator"] == ["cpu0", "gpu0", "gpu1"][evaluator]


# -- the two simulated clocks -----------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", [
    "scheduler={name='fixed', params={per_kind={cpu=1, gpu=5}}}",
    "scheduler={name='time_budget', params={budget_s=0.01}}",
    "scheduler={name='test_protocol:OnlyWorkers', params={workers=[0, 2], steps=2}}",
])
def test_emulated_and_time_only_clocks_agree_exactly_on_constant_speeds(tiny_spec, scheduler):
    args = (scheduler, "cluster.devices.1.step_time.mean_s=0.003", "cluster.devices.0.eval_time_s=0.004",
            "eval.on='cpu0'", "eval.every_rounds=2", "stop.max_rounds=5")
    emulated = simulate(tiny_spec(*args))
    time_only = simulate(tiny_spec(*args, "sim.fidelity='time_only'"))
    # exact up to float summation order (steps one by one vs k x the step time)
    assert time_only.metrics["time_s"] == pytest.approx(emulated.metrics["time_s"], rel=1e-12)
    for a, b in zip(emulated.decisions, time_only.decisions, strict=True):
        assert (a["workers"], a["local_steps"], a["weights"]) == (b["workers"], b["local_steps"], b["weights"])
    assert time_only.summary["utilization"] == pytest.approx(emulated.summary["utilization"], rel=1e-12)


def test_several_processes_checkpoint_per_rank_and_resume_from_the_latest_round(tiny_spec, tmp_path, monkeypatch):
    from hetsim.sim import engine

    class RankZeroOfTwo(engine.InProcessComm):
        """The in-process comm posing as the leader of two processes (it still holds every worker)."""

        def __init__(self, n):
            super().__init__(n)
            self.world = 2

    spec = tiny_spec("aggregator={name='test_protocol:ServerMomentum'}", "stop.max_rounds=6", "run.checkpoint_every=2")
    expected = simulate(spec)
    monkeypatch.setattr(engine, "InProcessComm", RankZeroOfTwo)

    def crash(row):
        if row["round"] == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        Simulation(spec, tmp_path, progress=crash).run()
    # this rank's state of round 4, the run's state pointing at it; round 2's files are gone
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "checkpoints").rglob("*")) == [
        "checkpoints/round4", "checkpoints/round4/rank0.pt"]
    run_state = load_checkpoint(tmp_path / CHECKPOINT, "sim", spec).state
    assert run_state["round"] == 4 and "rank" not in run_state
    assert "core" in load_checkpoint(tmp_path / "checkpoints/round4/rank0.pt", "sim", spec).state["rank"]
    got = Simulation(spec, tmp_path, resume=True).run()
    assert all(same(got.metrics[c], expected.metrics[c]) for c in got.metrics)
    assert list(got.decisions) == list(expected.decisions)


# -- a clock without an event loop ------------------------------------------------------------------

def test_the_driver_runs_without_simpy_on_a_clock_that_never_yields(tiny_spec):
    """A wall-clock-like port: local work runs step(k) per step and advances a counter by the device's
    constant step time; nothing yields, run_to_end drives the driver. Same decisions and the same math as
    the emulated clock (which runs the same steps worker by worker at the barrier)."""
    from hetsim.cluster import within_budget
    from hetsim.protocol import Clock, Work, run_to_end

    class TickClock(Clock):
        def __init__(self, step_s):
            self.t, self.step_s, self.started = 0.0, step_s, 0

        def now(self):
            return self.t

        def online(self, ks):
            return list(ks)

        def until_online(self):
            raise AssertionError("always online")
            yield

        def local_work(self, ks, plan, train, step):
            start, steps, finish = self.t, [], []
            for k, target in zip(ks, plan.local_steps):
                n, t = 0, start
                while (n < target) if target is not None else (n == 0 or within_budget(t - start, plan.time_budget_s)):
                    step(k)
                    n, t = n + 1, t + self.step_s[k]
                steps.append(n)
                finish.append(t)
            self.t = max(finish, default=start)
            return Work(steps, np.full(len(ks), start), np.array(finish))
            yield

        def exchange(self, ks, nbytes):
            return
            yield

        def evaluation(self, evaluator):
            return
            yield

        def start(self):
            self.started += 1

        def drive(self, steps):
            run_to_end(steps)

        def summary_fields(self):
            return {"fidelity": "ticks"}

        def state_dict(self):
            return {"t": self.t}

        def load_state_dict(self, state):
            self.t = state["t"]

    spec = tiny_spec("scheduler={name='time_budget', params={budget_s=0.01}}",
                     "cluster.devices.1.step_time.mean_s=0.003")
    emulated = Simulation(spec)
    expected = emulated.run()
    ticking = Simulation(spec)
    ticking.driver.clock = clock = TickClock([0.01, 0.003, 0.003])
    got = ticking.run()
    assert clock.started == 1 and got.summary["fidelity"] == "ticks"
    # rounds of max(1 x 0.01, 4 x 0.003) = 0.012 s; this clock charges no exchange
    assert got.metrics["time_s"] == pytest.approx([0, 0.012, 0.024, 0.036, 0.048], abs=1e-12)
    assert [d["local_steps"] for d in got.decisions] == [[1, 4, 4]] * 4
    untimed = [[{k: v for k, v in d.items() if k not in ("start_s", "finish_s")} for d in run.decisions]
               for run in (got, expected)]  # (the times differ by the exchange this clock does not charge)
    assert untimed[0] == untimed[1]
    assert torch.equal(ticking.core.global_params(), emulated.core.global_params())
    assert same(got.metrics["test_acc"], expected.metrics["test_acc"])


def test_run_to_end_refuses_a_clock_that_yields():
    from hetsim.protocol import run_to_end

    def returns():
        return 7
        yield

    def yields():
        yield "an event"

    assert run_to_end(returns()) == 7
    with pytest.raises(RuntimeError, match="a clock without an event loop yielded 'an event'"):
        run_to_end(yields())


@pytest.mark.parametrize("budget, agreed", [("stop.max_rounds=3", 0), ("stop.max_time_s=10", 7)])
def test_the_stop_check_is_broadcast_only_when_a_time_budget_reads_the_leaders_clock(tiny_spec, budget, agreed):
    # rounds, epochs and the shared accuracy are the same in every process: each decides alone (no collective
    # a round); a time budget reads the leader's clock: the leader decides and broadcasts (3 rounds + the stop)
    spec = tiny_spec(budget, "stop.max_rounds=3", "stop.target_accuracy=1.0")
    sim = Simulation(spec)
    calls = []
    agree = sim.driver.comm.agree
    sim.driver.comm.agree = lambda values: calls.append(list(values)) or agree(values)
    r = sim.run()
    assert len(r.metrics["round"]) == 4 and r.summary["stopped_by"] == "max_rounds"
    assert len(calls) == agreed
