"""Time-only fidelity, batched emulation, deterministic event order, changing conditions."""

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch

from hetsim.cluster import DeviceModel, StepTimeModel
from hetsim.results import read_decisions
from hetsim.sim import Simulation, simulate
from hetsim.sim.timeonly import VectorClock

NO_NET = ["cluster.network.latency_s=0", "cluster.network.bandwidth_GBps=1e12"]  # exchange ~ 1e-14 s


# -- time-only fidelity ----------------------------------------------------------------------

def test_time_only_matches_emulated_clock_and_decisions_on_a_constant_cluster(tiny_spec):
    emulated = simulate(tiny_spec("aggregator={name='biased', params={strength=1.0}}",
                                  "sampler={name='loss_topk', params={kinds=['cpu']}}"))
    time_only = simulate(tiny_spec("aggregator={name='biased', params={strength=1.0}}",
                                   "sampler={name='loss_topk', params={kinds=['cpu']}}", "sim.fidelity='time_only'"))
    assert time_only.metrics["time_s"] == pytest.approx(emulated.metrics["time_s"], rel=1e-12)
    for a, b in zip(emulated.decisions, time_only.decisions):
        assert {k: a[k] for k in ("workers", "local_steps", "samples", "biased_samples", "weights")} == \
               {k: b[k] for k in ("workers", "local_steps", "samples", "biased_samples", "weights")}
    assert all(np.isnan(time_only.metrics["test_acc"]))
    assert time_only.summary["time_to_accuracy_s"] is None
    assert "no accuracy" in time_only.summary["fidelity_notes"]


def test_time_only_needs_no_data_files(tiny_spec):
    spec = tiny_spec("workload={name='cifar10', path='/nonexistent'}", "sim.fidelity='time_only'",
                     "cluster.devices.0.step_time.mean_s=0.1")
    r = simulate(spec)
    assert r.summary["model_bytes"] > 1_000_000  # ResNet-20's ~0.27M float32 parameters and BN buffers


def test_vector_clock_sums_match_mean_and_variance():
    d = DeviceModel("x", StepTimeModel("lognormal", 0.01, 0.005), 0.0, None, None, "inline")
    clock = VectorClock([d], np.zeros(20000, dtype=int), np.random.default_rng(0))
    durations, steps = clock.round(np.arange(20000), np.full(20000, 4), None, 0.0)
    assert durations.min() > 0 and set(steps) == {4}
    assert durations.mean() == pytest.approx(0.04, rel=0.01)
    assert durations.std() == pytest.approx(0.005 * 2, rel=0.03)  # sqrt(4) x std


def test_vector_clock_time_budget_and_stragglers():
    # every step straggles: 0.009 s each; 0.009 < 0.01 starts a second step, 0.018 does not start a third
    d = DeviceModel("x", StepTimeModel("constant", 0.003), 0.0, None, None, "inline", straggler_prob=1.0,
                    straggler_factor=3.0)
    durations, steps = VectorClock([d], np.zeros(1, dtype=int), np.random.default_rng(0)).round(
        np.array([0]), None, 0.01, 0.0)
    assert steps[0] == 2 and durations[0] == pytest.approx(2 * 0.003 * 3)


def test_deterministic_event_order_ties_resolve_in_worker_order(tiny_spec):
    # both gpus take exactly the same time: their events tie, and resolve in worker order
    r = simulate(tiny_spec())
    computes = [e for e in r.trace if e.get("name") == "compute" and e["args"]["round"] == 1]
    assert [e["tid"] for e in computes] == [0, 1, 2]
    r2 = simulate(tiny_spec())
    assert json.dumps(r.trace) == json.dumps(r2.trace)


def test_time_only_is_deterministic(tiny_spec, tmp_path):
    args = ("sim.fidelity='time_only'", "cluster.devices.1.step_time={dist='lognormal', mean_s=0.002, std_s=0.001}",
            "cluster.devices.1.straggler_prob=0.2", "cluster.devices.1.straggler_factor=4.0")
    simulate(tiny_spec(*args), tmp_path / "a")
    simulate(tiny_spec(*args), tmp_path / "b")
    assert (tmp_path / "a" / "metrics.csv").read_bytes() == (tmp_path / "b" / "metrics.csv").read_bytes()


# -- batched emulation -----------------------------------------------------------------------

@pytest.mark.parametrize("extra", [
    (),
    ("sampler={name='loss_topk', params={kinds=['*'], sample_ratio=2}}", "aggregator={name='fednova'}"),
    ("scheduler={name='time_budget', params={budget_s=0.007}}", "optim.momentum=0.0", "optim.weight_decay=0.0"),
])
def test_batched_emulation_equals_the_per_replica_loop(tiny_spec, extra):
    loop = Simulation(tiny_spec(*extra, "stop.max_rounds=5"))
    loop.run()
    batched = Simulation(tiny_spec(*extra, "stop.max_rounds=5", "sim.batched=true"))
    result = batched.run()
    assert result.summary["batched"] is True
    assert torch.allclose(loop.core.global_flat.get(), batched.core.global_flat.get(), atol=1e-5)
    assert np.allclose(loop.core.scores.values, batched.core.scores.values, atol=1e-5, equal_nan=True)
    assert loop.writer.decisions == batched.writer.decisions or all(
        a["local_steps"] == b["local_steps"] for a, b in zip(loop.writer.decisions, batched.writer.decisions))


def test_batched_falls_back_to_the_loop_for_batchnorm_models(tiny_spec, tmp_path):
    from tests_support import write_cifar
    path = write_cifar(tmp_path)
    r = simulate(tiny_spec(f"workload={{name='cifar10', path='{path}'}}", "sim.batched=true", "stop.max_rounds=1",
                           "optim.batch_size=4", "scheduler.params.per_kind.gpu=1"))
    assert r.summary["batched"] is False


# -- changing conditions ---------------------------------------------------------------------

def one_device(tiny_spec, *extra):
    return tiny_spec("cluster.devices=[{kind='cpu', count=1, step_time={dist='constant', mean_s=0.01}}]",
                     "scheduler={name='fixed', params={local_steps=1}}", *NO_NET, *extra)


@pytest.mark.parametrize("fidelity", ["emulated", "time_only"])
def test_slowdown_schedule(tiny_spec, fidelity):
    # step 0.01 s; from t = 0.025 every step takes 2x: rounds start at 0, .01, .02, .03 (slow), .05
    r = simulate(one_device(tiny_spec, "cluster.devices.0.slowdown=[[0.025, 2.0]]", "stop.max_rounds=5",
                            f"sim.fidelity='{fidelity}'"))
    assert r.metrics["time_s"] == pytest.approx([0, 0.01, 0.02, 0.03, 0.05, 0.07])


def test_slowdown_trace_file_equals_the_inline_schedule(tiny_spec, tmp_path):
    trace = tmp_path / "speed.csv"
    trace.write_text("time_s,factor\n0.0,1.0\n0.025,2.0\n")
    a = simulate(one_device(tiny_spec, f"cluster.devices.0.slowdown_trace='{trace}'", "stop.max_rounds=5"))
    b = simulate(one_device(tiny_spec, "cluster.devices.0.slowdown=[[0.025, 2.0]]", "stop.max_rounds=5"))
    assert a.metrics["time_s"] == b.metrics["time_s"]


def test_bad_trace_file_is_a_clear_error(tiny_spec, tmp_path):
    from hetsim.errors import SpecError
    trace = tmp_path / "speed.csv"
    trace.write_text("t,speed\n0,1\n")
    with pytest.raises(SpecError, match=r"cluster.devices\[0\].slowdown_trace: .* expected CSV columns time_s,factor"):
        one_device(tiny_spec, f"cluster.devices.0.slowdown_trace='{trace}'")


def test_stragglers(tiny_spec):
    always = simulate(one_device(tiny_spec, "cluster.devices.0.straggler_prob=1.0",
                                 "cluster.devices.0.straggler_factor=5.0", "stop.max_rounds=3"))
    assert always.metrics["time_s"] == pytest.approx([0, 0.05, 0.10, 0.15])
    sometimes = simulate(one_device(tiny_spec, "cluster.devices.0.straggler_prob=0.25",
                                    "cluster.devices.0.straggler_factor=5.0", "stop.max_rounds=2000",
                                    "eval.every_rounds=1000"))
    # mean step = 0.01 x (0.75 + 0.25 x 5) = 0.02
    assert sometimes.metrics["time_s"][-1] / 2000 == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("fidelity", ["emulated", "time_only"])
def test_offline_device_sits_rounds_out_and_rejoins(tiny_spec, fidelity):
    # every round takes 0.01 s; gpu1 is away over [0.015, 0.035): rounds starting at .02 and .03 skip it
    r = simulate(tiny_spec(*NO_NET, "cluster.devices.1.count=1",
                           "cluster.devices=[{kind='cpu', count=1, step_time={dist='constant', mean_s=0.01}}, "
                           "{kind='gpu', count=1, step_time={dist='constant', mean_s=0.002}, offline=[[0.015, 0.035]]}]",
                           "stop.max_rounds=5", f"sim.fidelity='{fidelity}'"))
    assert [d["workers"] for d in r.decisions] == [[0, 1], [0, 1], [0], [0], [0, 1]]
    assert r.summary["rounds_participated"] == {"cpu0": 5, "gpu0": 3}


def test_everyone_offline_waits_for_the_first_return(tiny_spec):
    r = simulate(one_device(tiny_spec, "cluster.devices.0.offline=[[0.0, 0.5]]", "stop.max_rounds=2"))
    assert r.metrics["time_s"] == pytest.approx([0, 0.51, 0.52])


def test_bandwidth_schedule_changes_the_exchange_cost(tiny_spec):
    base = ["cluster.network.latency_s=0", "cluster.network.bandwidth_GBps=1.0", "stop.max_rounds=3"]
    r = simulate(tiny_spec(*base, "cluster.network.bandwidth_schedule=[[0.015, 0.5]]"))
    e1 = 2 * 2 / 3 * r.summary["model_bytes"] / 1e9
    # round 1 exchanges at 1 GB/s (barrier at 0.01); rounds 2-3 at 0.5 GB/s (twice as long)
    assert r.metrics["time_s"] == pytest.approx([0, 0.01 + e1, 0.02 + 3 * e1, 0.03 + 5 * e1])


def test_observed_throughput_reacts_to_a_slowdown(tiny_spec):
    # two gpus; gpu1 becomes 4x slower at t = 0.02: the observed-speed scheduler cuts its steps
    r = simulate(tiny_spec(*NO_NET, "cluster.devices=[{kind='gpu', count=2, step_time={dist='constant', mean_s=0.002}}]",
                           "scheduler={name='proportional', params={max_steps=8, source='observed'}}",
                           "stop.max_rounds=4"))
    assert [d["local_steps"] for d in r.decisions] == [[8, 8]] * 4
    r = simulate(tiny_spec(*NO_NET, "cluster.devices=[{kind='gpu', count=1, step_time={dist='constant', mean_s=0.002}},"
                           "{kind='gpu', count=1, step_time={dist='constant', mean_s=0.002}, slowdown=[[0.02, 4.0]]}]",
                           "scheduler={name='proportional', params={max_steps=8, source='observed'}}",
                           "stop.max_rounds=5"))
    # round 1 (0-0.016) is at full speed; in round 2 gpu1 takes 2 steps of 0.002 then 6 of 0.008 from t = 0.02:
    # observed 0.0065 s per step, a running mean of 0.00425, so round 3 plans round(8 x 0.002 / 0.00425) = 4
    # steps for it; those take 0.008 each: mean (0.002 + 0.0065 + 0.008) / 3 = 0.0055, round 4: 2.9 -> 3
    assert [d["local_steps"] for d in r.decisions][:4] == [[8, 8], [8, 8], [8, 4], [8, 3]]


def test_bad_conditions_are_rejected(tiny_spec):
    from hetsim.errors import SpecError
    with pytest.raises(SpecError, match=r"slowdown: expected strictly increasing times"):
        tiny_spec("cluster.devices.0.slowdown=[[0.5, 2.0], [0.1, 1.0]]")
    with pytest.raises(SpecError, match=r"offline: expected a list of \[start_s, end_s\] windows"):
        tiny_spec("cluster.devices.0.offline=[[0.5, 0.1]]")
    with pytest.raises(SpecError, match=r"straggler_prob: expected a probability"):
        tiny_spec("cluster.devices.0.straggler_prob=1.5")


# -- resume ----------------------------------------------------------------------------------

class Interrupt(Exception):
    pass


@pytest.mark.parametrize("fidelity, scheduler", [
    ("emulated", ()), ("time_only", ()),
    ("time_only", ("scheduler={name='time_budget', params={budget_s=0.007}}",)),  # steps drawn one by one
])
def test_resumed_simulation_equals_an_uninterrupted_one(tiny_spec, tmp_path, fidelity, scheduler):
    args = ("stop.max_rounds=9", "run.checkpoint_every=2", f"sim.fidelity='{fidelity}'", *scheduler,
            "sampler={name='loss_topk', params={kinds=['*']}}", "optim.lr_schedule='cosine'",
            "cluster.devices.1.step_time={dist='lognormal', mean_s=0.002, std_s=0.001}",
            "cluster.devices.1.straggler_prob=0.3", "cluster.devices.1.straggler_factor=3.0")
    simulate(tiny_spec(*args), tmp_path / "whole")

    def crash_at_round_6(row):
        if row["round"] == 6:
            raise Interrupt

    with pytest.raises(Interrupt):
        simulate(tiny_spec(*args), tmp_path / "cut", progress=crash_at_round_6)
    simulate(tiny_spec(*args), tmp_path / "cut", resume=True)  # continues from round 4
    for name in ("metrics.csv", "decisions.bin", "trace.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes(), name


def test_resume_without_a_checkpoint_is_a_clear_error(tiny_spec, tmp_path):
    from hetsim.errors import HetsimError
    simulate(tiny_spec(), tmp_path)
    with pytest.raises(HetsimError, match="no checkpoint to resume from"):
        simulate(tiny_spec(), tmp_path, resume=True)


# -- learning-curve surrogate ----------------------------------------------------------------

def test_learning_curve_fit_predict_and_refusal_to_extrapolate(tiny_spec, tmp_path):
    from hetsim.analysis import load_run
    from hetsim.surrogate import LearningCurve, fit, holdout_error

    for seed in range(3):
        simulate(tiny_spec(f"seed={seed}", "stop.max_rounds=12"), tmp_path / f"s{seed}")
    curve = fit([load_run(tmp_path / "s0"), load_run(tmp_path / "s1")])
    assert 0 <= curve.a <= 1 and curve.b >= 0 and curve.c > 0
    assert curve.epochs_min == 0 and curve.epochs_max == pytest.approx(12 * 88 / 256)
    assert np.isnan(curve.predict(curve.epochs_max * 1.01))  # no silent extrapolation
    report = holdout_error(curve, [load_run(tmp_path / "s2")], 0.5)
    assert report["points"] == 13 and report["accuracy_abs_error_mean"] < 0.15
    curve.save(tmp_path / "curve.json")
    assert LearningCurve.load(tmp_path / "curve.json") == curve

    # a time-only run gets accuracy from the curve within its range, and NaN (noted) beyond
    r = simulate(tiny_spec("sim.fidelity='time_only'", f"sim.surrogate='{tmp_path / 'curve.json'}'",
                           "stop.max_rounds=16"))
    acc = np.array(r.metrics["test_acc"])
    epochs = np.array(r.metrics["epoch"])
    inside = epochs <= curve.epochs_max
    assert np.allclose(acc[inside], curve.predict(epochs[inside]))
    assert np.isnan(acc[~inside]).all() and (~inside).any()
    assert r.summary["surrogate_refused_after_epoch"] == pytest.approx(epochs[~inside][0])
    assert r.summary["time_to_accuracy_s"] is not None


def test_surrogate_needs_time_only_and_a_readable_curve(tiny_spec, tmp_path):
    from hetsim.errors import SpecError
    with pytest.raises(SpecError, match="sim.surrogate: expected fidelity 'time_only'"):
        tiny_spec(f"sim.surrogate='{tmp_path / 'x.json'}'")
    with pytest.raises(SpecError, match="cannot read learning curve"):
        tiny_spec("sim.fidelity='time_only'", f"sim.surrogate='{tmp_path / 'x.json'}'")


# -- the time-only barrier round on arrays (hetsim/sim/fastpath.py) ------------------------------

NOISY = ("sim.fidelity='time_only'", "cluster.devices.1.count=7",
         "cluster.devices.1.step_time={dist='lognormal', mean_s=0.002, std_s=0.001}",
         "cluster.devices.1.straggler_prob=0.2", "cluster.devices.1.straggler_factor=3.0",
         "cluster.network.latency_s=1e-3", "trace.max_devices=3", "trace.max_rounds=6")


def run_files(tiny_spec, out, general: bool, monkeypatch, *args: str) -> dict[str, bytes]:
    """A time-only run's files, by the array round or (general) by the driver's SyncProtocol."""
    from hetsim.protocol import Driver
    from hetsim.sim import engine
    from hetsim.sim.fastpath import TimeOnlyDriver, TimeOnlyEvents, TimeOnlySemiSync, TimeOnlySync
    with monkeypatch.context() as m:
        if general:
            m.setattr(engine, "fast_protocol", lambda protocol: None)
            m.setattr(engine, "TimeOnlyDriver", Driver)
        sim = Simulation(tiny_spec(*NOISY, *args), out)
        assert type(sim.driver) is (Driver if general else TimeOnlyDriver)
        fast = {"sync": TimeOnlySync, "semi_sync": TimeOnlySemiSync, "async": TimeOnlyEvents,
                "buffered_async": TimeOnlyEvents}.get(sim.driver.protocol.name)
        if fast is not None:
            assert (type(sim.driver.protocol) is fast) != general
        r = sim.run()
    assert r.summary["rounds"] > 0
    summary = {k: v for k, v in r.summary.items() if k != "wall_time_s"}
    files = {name: (out / name).read_bytes() for name in ("metrics.csv", "decisions.bin", "trace.json")}
    d = sim.driver  # what a checkpoint would hold: the core's (what the policies know of each worker) and the run's
    state = (sim.core.state_dict(), sim.clock.state_dict(), d.busy_s, d.participation, d.pulled, d.version,
             d.exchange_total_s, d.idle_rounds, d.scheduler_state, d.aggregator_state, d.selector_state)
    return {**files, "summary": json.dumps(summary, sort_keys=True).encode(), "state": as_bytes(state)}


def as_bytes(value) -> bytes:
    """A state's exact contents (types, values, array bytes) as bytes: equal states give equal bytes."""
    if isinstance(value, torch.Tensor):
        value = value.numpy()
    if isinstance(value, np.ndarray):
        return repr((value.dtype.str, value.shape)).encode() + value.tobytes()
    if isinstance(value, dict):
        return b"{" + b",".join(as_bytes(k) + b":" + as_bytes(v) for k, v in value.items()) + b"}"
    if isinstance(value, (list, tuple)):
        return type(value).__name__.encode() + b"[" + b",".join(as_bytes(v) for v in value) + b"]"
    return pickle.dumps(value)


BENCH_POLICIES = ("scheduler={name='proportional', params={max_steps=8}}",
                  "sampler={name='loss_topk', params={kinds=['cpu']}}", "aggregator={name='biased'}",
                  "cluster.devices.1.offline=[[0.02, 0.05]]")


#: each case's metrics.csv + decisions.bin + trace.json (SHA-256, first 16 hex digits) as the code before the
#: array round wrote them (h-proto at fb590e5 and 164d297: decisions /3); the event-driven cases as they
#: are since their exchange goes through the server (a lone arrival pays a push and a pull) and their
#: evaluations are on the trace's server track
@pytest.mark.parametrize("args, before", [
    # the bench's policies; gpu3 away for a while (another online set: planned afresh, then the old plan again)
    (("scheduler={name='proportional', params={max_steps=8}}", "sampler={name='loss_topk', params={kinds=['cpu']}}",
      "aggregator={name='biased'}", "cluster.devices.1.offline=[[0.02, 0.05]]", "stop.max_rounds=30",
      "eval.every_rounds=0", "eval.every_epochs=1.5"), "4e4a87fbe263af02"),
    # time budgets drawn step by step; an aggregator reading the previous global model
    (("scheduler={name='time_budget', params={budget_s=0.007}}", "aggregator={name='fednova'}", "stop.max_rounds=12"),
     "9cfe17ed77cc54fc"),
    # a scheduler that is not static (plans every round from what was observed); a time budget stops the run
    (("scheduler={name='proportional', params={max_steps=8, source='observed', ema_weight=0.5}}",
      "stop.max_rounds=0", "stop.max_time_s=0.3", "optim.lr_schedule='cosine'"), "42281df408a0591d"),
    # event-driven protocols: the driver's own protocols, the static plan reused at every dispatch
    ((*BENCH_POLICIES, "protocol={name='semi_sync', params={k=5, late='keep', staleness='polynomial'}}",
      "stop.max_rounds=30"), "66218d79e4a7fa94"),
    ((*BENCH_POLICIES, "protocol={name='semi_sync', params={k=6, deadline_s=0.012}}", "stop.max_rounds=30"),
     "fea9e59e9e32ad1f"),
    # no deadline, late work dropped (3 workers' every other round): the earliest arrivals up to the k-th fresh one
    ((*BENCH_POLICIES, "protocol={name='semi_sync', params={k=5}}", "stop.max_rounds=40"), "aba6b99c531e6e01"),
    # nobody by a short deadline: the first arrival closes every round (late work dropped)
    ((*BENCH_POLICIES, "protocol={name='semi_sync', params={k=7, deadline_s=0.004}}", "stop.max_rounds=40"),
     "b3ecb6da5dbd1cb0"),
    # the deadline closes rounds with 1-3 of k = 4; late work kept, damped
    ((*BENCH_POLICIES, "protocol={name='semi_sync', params={k=4, deadline_s=0.011, late='keep', staleness='hinge', "
      "a=0.3, b=1}}", "stop.max_rounds=40"), "64e9bcf9f5e3011e"),
    ((*BENCH_POLICIES, "protocol={name='async', params={alpha=0.6, staleness='polynomial', a=0.5}}",
      "stop.max_rounds=60"), "e09b1bbe20914e50"),
    ((*BENCH_POLICIES, "protocol={name='buffered_async', params={k=3, staleness='hinge', a=0.3, b=2}}",
      "stop.max_rounds=40"), "66cd0b00f41844e2"),
])
def test_time_only_array_round_writes_the_general_paths_files(tiny_spec, tmp_path, monkeypatch, args, before):
    fast = run_files(tiny_spec, tmp_path / "fast", False, monkeypatch, *args)
    general = run_files(tiny_spec, tmp_path / "general", True, monkeypatch, *args)
    for name in fast:
        assert fast[name] == general[name], name
    files = fast["metrics.csv"] + fast["decisions.bin"] + fast["trace.json"]
    assert hashlib.sha256(files).hexdigest()[:16] == before


def test_a_static_plan_is_made_once_per_set_of_online_workers(tiny_spec, monkeypatch):
    from hetsim.policies.scheduling import Proportional
    calls = []
    plan = Proportional.plan
    monkeypatch.setattr(Proportional, "plan", lambda self, *a: calls.append(a[0]) or plan(self, *a))
    r = simulate(tiny_spec(*NOISY, "scheduler={name='proportional', params={max_steps=8}}", "stop.max_rounds=30",
                           "cluster.devices.1.offline=[[0.02, 0.05]]"))
    who = [tuple(d["workers"]) for d in r.decisions]
    changes = [i + 1 for i in range(len(who)) if i == 0 or who[i] != who[i - 1]]
    assert len(changes) == 3  # all, the cpu alone while the gpus are away, all again
    assert calls == changes
    calls.clear()
    simulate(tiny_spec(*NOISY, "scheduler={name='proportional', params={max_steps=8, source='observed'}}",
                       "stop.max_rounds=30"))
    assert calls == list(range(1, 31))  # what it observed changes every round: planned every round


def test_schedulers_and_samplers_declare_what_is_static():
    from hetsim.policies.sampling import LossBiasedTopK, Uniform
    from hetsim.policies.scheduling import FixedSteps, Proportional, Synchronous, TimeBudget
    assert Proportional().static and not Proportional(source="observed").static
    assert FixedSteps.static and Synchronous.static and TimeBudget.static
    assert Uniform.static_bias and LossBiasedTopK.static_bias


def test_a_static_bias_is_asked_once_per_worker(tiny_spec, monkeypatch):
    from hetsim.policies.sampling import LossBiasedTopK
    calls = []
    per_step = LossBiasedTopK.biased_per_step
    monkeypatch.setattr(LossBiasedTopK, "biased_per_step", lambda self, w, b: calls.append(w.index) or per_step(self, w, b))
    args = (*NOISY, "sampler={name='loss_topk', params={kinds=['cpu']}}", "stop.max_rounds=5")
    static = simulate(tiny_spec(*args))
    assert calls == list(range(8))
    calls.clear()
    monkeypatch.setattr(LossBiasedTopK, "static_bias", False)
    asked = simulate(tiny_spec(*args))
    assert calls == list(range(8)) * 5
    assert list(static.decisions) == list(asked.decisions)
    assert [d["biased_samples"] for d in static.decisions] == [[8 * 1] + [0] * 7] * 5  # the cpu: 1 step of 8


def test_event_driven_dispatches_reuse_the_static_plan(tiny_spec, monkeypatch):
    from hetsim.policies.scheduling import Proportional
    calls = []
    plan = Proportional.plan
    monkeypatch.setattr(Proportional, "plan", lambda self, *a: calls.append(a[0]) or plan(self, *a))
    r = simulate(tiny_spec(*NOISY, *BENCH_POLICIES, "protocol={name='async', params={alpha=0.5}}",
                           "stop.max_rounds=60"))
    assert r.summary["rounds"] == 60
    # every update re-dispatches a worker from a plan of the whole online set; that set changes twice at
    # most (the gpus leave at 0.02 s and come back at 0.05 s)
    assert 1 <= len(calls) <= 3


def test_time_only_semi_sync_ties_in_time_go_to_the_lower_index(tiny_spec, tmp_path, monkeypatch):
    from hetsim.protocol import Driver
    from hetsim.sim import engine
    # constant speeds: the cpu's 1 step of 0.01 s and each gpu's 5 of 0.002 s all arrive at t = 0.01
    args = ("sim.fidelity='time_only'", "protocol={name='semi_sync', params={k=2}}", "stop.max_rounds=4", *NO_NET)
    fast = simulate(tiny_spec(*args), tmp_path / "fast")
    with monkeypatch.context() as m:
        m.setattr(engine, "fast_protocol", lambda protocol: None)
        m.setattr(engine, "TimeOnlyDriver", Driver)
        simulate(tiny_spec(*args), tmp_path / "general")
    # round 1: all three tie at 0.01, the first two by index close it; gpu1 (2) is still in flight, so round 2
    # dispatches 0 and 1 only, drops 2's late work at once (0.01) and closes at 0.02; round 3 dispatches all
    # three again (tie at 0.03: 0 and 1), round 4 drops 2's work like round 2
    assert [d["workers"] for d in fast.decisions] == [[0, 1], [0, 1], [0, 1], [0, 1]]
    assert [d["dropped"] for d in fast.decisions] == [[], [2], [], [2]]
    for name in ("metrics.csv", "decisions.bin", "trace.json"):
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "general" / name).read_bytes(), name


# -- async and buffered_async as an update loop (hetsim/sim/fastpath.py, TimeOnlyEvents) -----------------

ASYNC_POLICIES = ("scheduler={name='proportional', params={max_steps=8}}",
                  "sampler={name='loss_topk', params={kinds=['cpu']}}", "aggregator={name='biased'}")


def no_general_event_protocols(m) -> None:
    """Make the driver's async and buffered_async protocols fail if they run (the update loop must)."""
    from hetsim.protocols import AsyncProtocol, BufferedAsyncProtocol

    def refuse(self, d):
        raise AssertionError(f"the general {self.name} protocol ran")
        yield

    for cls in (AsyncProtocol, BufferedAsyncProtocol):
        m.setattr(cls, "run", refuse)


@pytest.mark.parametrize("args", [
    # constant staleness; evaluations (charged to the clock: arrivals during them come at once)
    (*ASYNC_POLICIES, "protocol={name='async'}", "stop.max_rounds=300", "eval.every_rounds=37"),
    # polynomial staleness, server mixing; evaluations by epochs; checkpoints every 50 updates
    (*ASYNC_POLICIES, "protocol={name='async', params={alpha=0.6, staleness='polynomial', a=0.5}}",
     "stop.max_rounds=300", "eval.every_rounds=0", "eval.every_epochs=1.5", "run.checkpoint_every=50"),
    # hinge; time budgets drawn step by step; an aggregator reading the previous global model; a time budget stops it
    ("protocol={name='async', params={staleness='hinge', a=0.3, b=2}}",
     "scheduler={name='time_budget', params={budget_s=0.007}}", "aggregator={name='fednova'}", "stop.max_rounds=0",
     "stop.max_time_s=0.4", "optim.lr_schedule='cosine'"),
    # the gpus slow down for a while (the slowdown in force at each dispatch); an epoch budget stops it
    (*ASYNC_POLICIES, "protocol={name='async'}", "cluster.devices.1.slowdown=[[0.05, 2.5], [0.2, 1.0]]",
     "stop.max_rounds=0", "stop.max_epochs=60"),
    # FedBuff: 3 of 8 per update, polynomial; exchanges among the arrivals' groups
    (*ASYNC_POLICIES, "protocol={name='buffered_async', params={k=3, staleness='polynomial', a=0.5}}",
     "stop.max_rounds=300", "eval.every_rounds=25"),
    # all 8 per update, hinge, mixing; checkpoints every 7 updates; the bandwidth halves at 0.1 s
    ("protocol={name='buffered_async', params={k=8, alpha=0.5, staleness='hinge', a=0.3, b=1}}",
     "aggregator={name='samples'}", "stop.max_rounds=100", "run.checkpoint_every=7",
     "cluster.network.bandwidth_schedule=[[0.1, 0.5]]"),
    # 2 per update; the cpu straggles too
    ("protocol={name='buffered_async', params={k=2}}", "optim.lr_schedule='cosine'", "stop.max_rounds=300",
     "cluster.devices.0.straggler_prob=0.3", "cluster.devices.0.straggler_factor=2.0"),
])
def test_time_only_update_loop_writes_the_general_paths_files(tiny_spec, tmp_path, monkeypatch, args):
    with monkeypatch.context() as m:
        no_general_event_protocols(m)
        fast = run_files(tiny_spec, tmp_path / "fast", False, monkeypatch, *args)
    general = run_files(tiny_spec, tmp_path / "general", True, monkeypatch, *args)
    for name in fast:
        assert fast[name] == general[name], name
    assert len(read_decisions_of(tmp_path / "fast")) > 50


def read_decisions_of(run_dir):
    from hetsim.results import read_decisions
    return read_decisions(run_dir / "decisions.bin")


@pytest.mark.filterwarnings("ignore:sim.surrogate")  # a hand-made curve records no fitted_for
def test_time_only_update_loop_stops_at_the_surrogates_target_accuracy(tiny_spec, tmp_path, monkeypatch):
    from hetsim.surrogate import LearningCurve
    curve = tmp_path / "curve.json"
    LearningCurve(a=0.9, b=0.8, c=0.05, epochs_min=0.0, epochs_max=1000.0).save(curve)
    args = (*ASYNC_POLICIES, "protocol={name='async', params={alpha=0.6, staleness='polynomial'}}",
            f"sim.surrogate='{curve}'", "stop.max_rounds=2000", "stop.target_accuracy=0.85", "stop.stop_at_target=true",
            "eval.every_rounds=7")
    with monkeypatch.context() as m:
        no_general_event_protocols(m)
        fast = run_files(tiny_spec, tmp_path / "fast", False, monkeypatch, *args)
    general = run_files(tiny_spec, tmp_path / "general", True, monkeypatch, *args)
    for name in fast:
        assert fast[name] == general[name], name
    summary = json.loads(fast["summary"])
    assert summary["stopped_by"] == "target_accuracy" and 50 < summary["rounds"] < 2000
    # the summary's accuracy fields (kept as the rows came) from metrics.csv's rows
    from hetsim.results import read_metrics_columns
    m = read_metrics_columns(tmp_path / "fast" / "metrics.csv")
    evaluated = [i for i, a in enumerate(m["test_acc"]) if not np.isnan(a)]
    hit = next(i for i in evaluated if m["test_acc"][i] >= 0.85)
    assert 10 < len(evaluated) < len(m["round"]) and hit == evaluated[-1]
    assert (summary["time_to_accuracy_s"], summary["rounds_to_accuracy"], summary["epochs_to_accuracy"]) == \
        (m["time_s"][hit], m["round"][hit], m["epoch"][hit])
    assert summary["final_test_acc"] == m["test_acc"][evaluated[-1]]
    assert summary["best_test_acc"] == max(m["test_acc"][i] for i in evaluated)
    assert summary["final_train_loss"] == m["train_loss"][-1] == 1.0


def test_a_run_with_a_directory_keeps_its_metrics_on_disk_only(tiny_spec, tmp_path):
    from hetsim.results import read_metrics_columns
    args = ("sim.fidelity='time_only'", "protocol={name='async'}", "stop.max_rounds=500", "eval.every_rounds=100")
    r = simulate(tiny_spec(*args), tmp_path / "run")
    in_memory = simulate(tiny_spec(*args))
    assert type(r.metrics) is dict and json.dumps(r.metrics) == json.dumps(in_memory.metrics)
    assert len(r.metrics["round"]) == 501
    assert r.metrics["round"][:3] == [0, 1, 2] and type(r.metrics["samples"][-1]) is int
    assert read_metrics_columns(tmp_path / "run" / "metrics.csv")["time_s"] == r.metrics["time_s"]
    sim = Simulation(tiny_spec(*args), tmp_path / "again")
    sim.run()
    rows = sim.writer.rows
    assert len(rows) == 501 and repr(rows[-1]) == repr({c: in_memory.metrics[c][-1] for c in in_memory.metrics})
    assert not rows.keep and not any(len(col) for col in rows.columns.values())  # nothing per row in memory
    with pytest.raises(IndexError, match="metrics.csv"):
        rows[3]


@pytest.mark.parametrize("protocol", ["async", "buffered_async"])
def test_time_only_update_loop_resumes_as_the_general_path_does(tiny_spec, tmp_path, monkeypatch, protocol):
    from hetsim.protocol import Driver
    from hetsim.sim import engine
    params = "{k=3, staleness='hinge', a=0.3, b=2}" if protocol == "buffered_async" else "{staleness='polynomial'}"
    args = (*NOISY, *ASYNC_POLICIES, f"protocol={{name='{protocol}', params={params}}}", "stop.max_rounds=200",
            "run.checkpoint_every=40")

    def crash_at_update_130(row):
        if row["round"] == 130:
            raise Interrupt

    def crashed_and_resumed(out):
        with pytest.raises(Interrupt):
            simulate(tiny_spec(*args), out, progress=crash_at_update_130)
        simulate(tiny_spec(*args), out, resume=True)  # from update 120: what was in flight is redone
        return {name: (out / name).read_bytes() for name in ("metrics.csv", "decisions.bin", "trace.json")}

    with monkeypatch.context() as m:
        no_general_event_protocols(m)
        fast = crashed_and_resumed(tmp_path / "fast")
    with monkeypatch.context() as m:
        m.setattr(engine, "fast_protocol", lambda protocol: None)
        m.setattr(engine, "TimeOnlyDriver", Driver)
        general = crashed_and_resumed(tmp_path / "general")
    assert fast == general


def test_time_only_update_loop_hands_runs_it_does_not_model_to_the_general_protocol(tiny_spec, tmp_path, monkeypatch):
    from hetsim.sim.fastpath import TimeOnlyEvents
    # offline windows change the plan: the driver's protocol runs (and writes the same files)
    args = (*ASYNC_POLICIES, "protocol={name='async'}", "cluster.devices.1.offline=[[0.02, 0.05]]", "stop.max_rounds=60")
    sim = Simulation(tiny_spec(*NOISY, *args))
    assert type(sim.driver.protocol) is TimeOnlyEvents and not TimeOnlyEvents.applies(sim.driver)
    # a stateful server optimizer, a scheduler that plans from what it observed: the same
    for extra in (("aggregator={name='fedavgm'}",),
                  ("scheduler={name='proportional', params={max_steps=8, source='observed'}}",)):
        sim = Simulation(tiny_spec(*NOISY, *ASYNC_POLICIES, "protocol={name='async'}", *extra))
        assert not TimeOnlyEvents.applies(sim.driver)
    assert TimeOnlyEvents.applies(Simulation(tiny_spec(*NOISY, *ASYNC_POLICIES, "protocol={name='async'}")).driver)


def test_encode_update_writes_encode_decisions_bytes():
    from hetsim.results import encode_arrival, encode_decision, encode_update
    from hetsim.training import RoundRecord
    rng = np.random.default_rng(1)
    for n in (1, 2, 3, 9):
        for top in (200, 60_000, 4_000_000_000, 2 ** 40):
            ints = [rng.integers(0, top, n).tolist() for _ in range(6)]
            floats = [rng.random(n).tolist() for _ in range(3)]
            args = dict(workers=ints[0], local_steps=ints[1], samples=ints[2], biased_samples=ints[3],
                        weights=floats[0], version=int(rng.integers(0, top)), staleness=ints[4], pulled=ints[5],
                        start_s=floats[1], finish_s=floats[2])
            record = RoundRecord(round=int(rng.integers(0, top)), train_loss=1.0, time_budget_s=None, **args)
            assert encode_update(record.round, **args) == encode_decision(record)
            if n == 1:
                one = [args[k][0] if isinstance(args[k], list) else args[k] for k in
                       ("workers", "local_steps", "samples", "biased_samples", "weights", "version", "staleness",
                        "pulled", "start_s", "finish_s")]
                assert encode_arrival(record.round, *one) == encode_decision(record)
    negative = dict(workers=[3], local_steps=[-1], samples=[0], biased_samples=[0], weights=[1.0], version=2,
                    staleness=[0], pulled=[-5], start_s=[0.5], finish_s=[1.5])
    expected = encode_decision(RoundRecord(round=7, train_loss=1.0, time_budget_s=None, **negative))
    assert encode_update(7, **negative) == expected
    assert encode_arrival(7, 3, -1, 0, 0, 1.0, 2, 0, -5, 0.5, 1.5) == expected


def test_the_order_by_time_breaks_ties_by_position():
    from hetsim.sim.timeonly import by_time
    rng = np.random.default_rng(0)
    for times in (rng.random(1000), rng.integers(0, 5, 1000).astype(float), np.zeros(7), np.array([2.0, 1.0]),
                  np.concatenate([rng.random(500), np.full(500, 0.5)])[rng.permutation(1000)], np.zeros(0)):
        order, ordered = by_time(times)
        assert order.tolist() == np.argsort(times, kind="stable").tolist()
        assert ordered.tolist() == times[order].tolist()


@pytest.mark.parametrize("protocol", ["sync", "semi_sync"])
def test_time_only_array_rounds_let_a_stateful_selector_observe_every_update(tiny_spec, tmp_path, monkeypatch,
                                                                             protocol):
    # the utility selector (Oort-like) learns from each combination's arrivals: its choices follow what it saw
    params = "{k=4}" if protocol == "semi_sync" else "{}"
    args = ("selector={name='utility', params={k=5}}", f"protocol={{name='{protocol}', params={params}}}",
            "stop.max_rounds=30")
    fast = run_files(tiny_spec, tmp_path / "fast", False, monkeypatch, *args)
    general = run_files(tiny_spec, tmp_path / "general", True, monkeypatch, *args)
    for name in fast:
        assert fast[name] == general[name], name
    # and it does learn: utility tries every worker once (+inf loss before its first round), epsilon or not
    picked = {k for d in read_decisions(tmp_path / "fast" / "decisions.bin") for k in d["workers"]}
    assert picked == set(range(8))  # NOISY's 8 workers


@pytest.mark.parametrize("protocol", ["{name='async'}", "{name='buffered_async', params={k=2}}"])
def test_time_only_update_loop_ties_in_time_go_to_the_lower_index(tiny_spec, tmp_path, monkeypatch, protocol):
    from hetsim.protocol import Driver
    from hetsim.sim import engine
    # constant speeds: the cpu's 1 step of 0.01 s and each gpu's 5 of 0.002 s all arrive together, every time
    args = ("sim.fidelity='time_only'", f"protocol={protocol}", "stop.max_rounds=40", *NO_NET)
    with monkeypatch.context() as m:
        no_general_event_protocols(m)
        fast = simulate(tiny_spec(*args), tmp_path / "fast")
    with monkeypatch.context() as m:
        m.setattr(engine, "fast_protocol", lambda protocol: None)
        m.setattr(engine, "TimeOnlyDriver", Driver)
        simulate(tiny_spec(*args), tmp_path / "general")
    first = [w for d in fast.decisions[:6] for w in d["workers"]]
    assert first[:6] == [0, 1, 2, 0, 1, 2]  # 0.01 s: 0, 1, 2 by index; 0.02 s: the same
    for name in ("metrics.csv", "decisions.bin", "trace.json"):
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "general" / name).read_bytes(), name


def test_a_wait_lands_on_the_arrival_time_exactly():
    import simpy

    from hetsim.sim.timeonly import timeout_until

    # from this moment SimPy's now + (t - now) is 0.10340850259723561, one ulp short of t (found by the
    # fast and general time-only paths disagreeing in the last digit)
    now, t = 0.03264666608662332, 0.10340850259723562
    assert now + (t - now) != t
    env = simpy.Environment(initial_time=now)
    landed = []

    def wait():
        yield from timeout_until(env, t)
        landed.append(env.now)

    env.process(wait())
    env.run()
    assert landed == [t]
