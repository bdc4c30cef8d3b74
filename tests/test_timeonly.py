"""The time-only clock is the emulated clock's model, drawn vectorised: the same mean round time on every
shipped example (within 3%), the same times and decisions on constant speeds, time budgets included.

Each comparison runs the emulated clock for a few rounds and the time-only clock (cheap) for many, with
the same seed: the round counts keep the difference's standard error under ~0.9% of the mean (3% is
more than 3.3 standard errors; seeds 0-3 all differ by less than 0.6%).
studies/bench_sim.py prints the same comparison with longer runs.
"""

import functools
from pathlib import Path

import numpy as np
import pytest

from hetsim.cluster import DeviceModel, StepTimeModel
from hetsim.config import Spec, load_spec, replace, spec_from_dict, spec_to_dict
from hetsim.resolve import build_groups
from hetsim.sim import timeonly
from hetsim.sim.engine import simulate
from hetsim.sim.timeonly import VectorClock

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
REL_TOL = 0.03


def rounds_only(spec: Spec, rounds: int, *extra: str) -> Spec:
    """`spec` stopped by rounds alone (no time or epoch budget), decisions logged."""
    return replace(spec, ["stop.max_time_s=0", "stop.max_epochs=0", f"stop.max_rounds={rounds}",
                          "trace.decisions=true", *extra])


def mean_round_s(spec: Spec, fidelity: str, rounds: int) -> tuple[float, list[dict]]:
    r = simulate(rounds_only(spec, rounds, f"sim.fidelity='{fidelity}'"))
    assert r.metrics["round"][-1] == rounds
    return r.metrics["time_s"][-1] / rounds, r.decisions


def clock_twin(spec: Spec) -> Spec:
    """`spec` with the same clock and cheap math: every device group's profile entry inlined (step-time
    distribution, eval time, link) and the workload replaced by a small synthetic task at the same batch
    size. The clock never reads the math (no scheduler here observes losses); only the exchange's model
    size changes, and a smaller model makes the relative comparison stricter, not looser. For the
    examples whose CNN costs seconds per emulated round on this machine."""
    data = spec_to_dict(spec)
    for d, m in zip(data["cluster"]["devices"], build_groups(spec)):
        st = m.step_time
        d["profile"] = ""
        d["step_time"] = ({"dist": "empirical", "samples_s": list(st.samples_s)} if st.dist == "empirical"
                          else {"dist": st.dist, "mean_s": st.mean_s, "std_s": st.std_s})
        d["eval_time_s"] = m.eval_time_s
        if m.bandwidth_Bps is not None:
            d["bandwidth_GBps"] = m.bandwidth_Bps / 1e9
        if m.latency_s is not None:
            d["latency_s"] = m.latency_s
    data["workload"] = {"name": "synthetic", "n_train": 256, "n_test": 64}
    return spec_from_dict(data, source=f"{spec.name} (clock twin)")


# example: emulated rounds, time-only rounds, clock twin, overrides that change only the math's speed (an
# example added later gets DEFAULT_CASE). Per-round cv (from long time-only runs): digits, fashion_mnist,
# paper_cluster ~3%; synthetic ~20% (1 or 2 cpu steps per budget).
CASES = {
    "digits.toml": (24, 2000, False, ()),
    "fashion_mnist.toml": (24, 2000, True, ()),
    "paper_cluster.toml": (24, 2000, False, ("sim.batched=true",)),
    "synthetic.toml": (600, 6000, False, ()),    # time budget with noisy step times
    "validate_cpu2.toml": (20, 2000, True, ()),  # a multiple of eval.every_rounds: the 2 s evaluations weigh the same
    "validate_gpu1.toml": (20, 2000, True, ()),      # (measured H100 profiles; the simulator runs anywhere)
    "validate_cpu_gpu.toml": (20, 2000, True, ()),
    # event-driven: a "round" is an update, and the first updates come faster than the steady rate (every
    # worker starts at 0, the fast ones arrive first), so the emulated run needs enough updates for its mean
    # to settle (at 30 updates async's mean is 9% above the long-run rate: that is the start, not the clock)
    "async.toml": (300, 3000, False, ()),
    "buffered_async.toml": (300, 3000, False, ()),
}
DEFAULT_CASE = (30, 2000, False, ())
EXAMPLE_NAMES = sorted(p.name for p in EXAMPLES.glob("*.toml"))


@functools.cache
def compare(name: str, seed: int | None = None) -> dict[str, tuple[float, list[dict]]]:
    """{fidelity: (mean round time, decisions)} of a shipped example (cached: two tests read synthetic's)."""
    rounds, time_only_rounds, twin, faster = CASES.get(name, DEFAULT_CASE)
    spec = load_spec(EXAMPLES / name, overrides=[] if seed is None else [f"seed={seed}"])
    spec = clock_twin(spec) if twin else replace(spec, ["workload.n_train=512", "workload.n_test=64", *faster])
    return {"emulated": mean_round_s(spec, "emulated", rounds),
            "time_only": mean_round_s(spec, "time_only", time_only_rounds)}


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_time_only_mean_round_time_matches_emulated(name):
    runs = compare(name)
    (emulated, emulated_decisions), (time_only, time_only_decisions) = runs["emulated"], runs["time_only"]
    assert time_only == pytest.approx(emulated, rel=REL_TOL)
    if load_spec(EXAMPLES / name).scheduler.name != "time_budget":  # planned steps: the very same decisions
        assert [d["local_steps"] for d in emulated_decisions] == \
               [d["local_steps"] for d in time_only_decisions[:len(emulated_decisions)]]


def test_time_budget_with_noisy_steps_takes_the_emulated_number_of_steps():
    # synthetic.toml: cpu steps 8 +- 1 ms against a budget of 8 ms: about half the rounds a cpu starts a
    # second step (ceil(budget / mean) = 1 gave every cpu round 1 step and ran 38% fast); gpus 8 or 9 steps
    steps = {fidelity: np.mean([d["local_steps"] for d in decisions], axis=0)  # per worker
             for fidelity, (_, decisions) in compare("synthetic.toml").items()}
    assert all(1.3 < s < 1.7 for s in steps["emulated"][:2])
    assert steps["time_only"] == pytest.approx(steps["emulated"], rel=REL_TOL)


CONSTANT = {
    "name": "constant", "seed": 0,
    "workload": {"name": "synthetic", "n_train": 128, "n_test": 32, "n_features": 8, "n_classes": 3},
    "cluster": {"devices": [
        {"kind": "cpu", "count": 2, "step_time": {"dist": "constant", "mean_s": 0.01}},
        {"kind": "gpu", "count": 3, "step_time": {"dist": "constant", "mean_s": 0.0015}}],
        "network": {"collective": "ring_allreduce", "bandwidth_GBps": 1.0, "latency_s": 1e-4}},
    "sampler": {"name": "uniform"}, "aggregator": {"name": "samples"},
    "optim": {"lr": 0.1, "batch_size": 8},
    "stop": {"max_rounds": 30}, "eval": {"every_rounds": 5, "every_epochs": 0},
}


# scheduler, the steps of a cpu and a gpu in every round, by hand (another step starts while elapsed < budget)
@pytest.mark.parametrize("scheduler, steps", [
    ({"name": "time_budget", "params": {"budget_s": 0.007}}, (1, 5)),   # 5 x 0.0015 = 0.0075
    ({"name": "time_budget", "params": {"budget_s": 0.009}}, (1, 6)),   # a multiple of the gpu step: 6 x 0.0015
    ({"name": "time_budget", "params": {"budget_s": 0.1}}, (10, 67)),   # 66 x 0.0015 = 0.099; long: skipped ahead
    ({"name": "proportional", "params": {"max_steps": 6}}, (1, 6)),
])
def test_constant_speeds_give_identical_times_and_decisions(scheduler, steps):
    base = spec_from_dict({**CONSTANT, "scheduler": scheduler, "stop": {"max_rounds": 5 if steps[1] > 6 else 30}})
    emulated, time_only = [simulate(replace(base, [f"sim.fidelity='{f}'"])) for f in ("emulated", "time_only")]
    assert time_only.metrics["time_s"] == pytest.approx(emulated.metrics["time_s"], rel=0, abs=1e-9)
    for a, b in zip(emulated.decisions, time_only.decisions, strict=True):
        assert (a["workers"], a["local_steps"], a["samples"]) == (b["workers"], b["local_steps"], b["samples"])
    cpu, gpu = steps
    assert all(d["local_steps"] == [cpu, cpu, gpu, gpu, gpu] for d in emulated.decisions)


@pytest.mark.parametrize("fidelity", ["emulated", "time_only"])
def test_budget_a_multiple_of_a_constant_step_gets_exactly_that_many_steps(fidelity):
    # 0.04 + 0.04 < 0.08 is False in floats but the clock's sums drift: without a tolerance some rounds
    # took 3 steps and 200 rounds ended at ~20 s instead of 200 x 2 x 0.04 = 16 s
    spec = spec_from_dict({
        "name": "drift", "seed": 0, "workload": {"name": "synthetic", "n_train": 64, "n_test": 16},
        "cluster": {"devices": [{"kind": "cpu", "count": 1, "step_time": {"dist": "constant", "mean_s": 0.04}}]},
        "scheduler": {"name": "time_budget", "params": {"budget_s": 0.08}},
        "sampler": {"name": "uniform"}, "aggregator": {"name": "mean"}, "optim": {"lr": 0.05, "batch_size": 8},
        "stop": {"max_rounds": 200}, "eval": {"every_rounds": 200, "every_epochs": 0},
        "sim": {"fidelity": fidelity},
    })
    r = simulate(spec)
    assert [d["local_steps"] for d in r.decisions] == [[2]] * 200
    assert r.metrics["time_s"][-1] == pytest.approx(16.0, rel=0, abs=1e-9)


# -- the vectorised draws --------------------------------------------------------------------

def test_vectorised_step_draws_have_the_per_step_distribution():
    rng = np.random.default_rng(0)
    lognormal = StepTimeModel("lognormal", 0.01, 0.004).sample_many(rng, 200_000)
    assert lognormal.mean() == pytest.approx(0.01, rel=0.005) and lognormal.std() == pytest.approx(0.004, rel=0.01)
    empirical = StepTimeModel("empirical", 0.002, float(np.std([0.001, 0.002, 0.003])), (0.001, 0.002, 0.003))
    values, counts = np.unique(empirical.sample_many(rng, (300, 200)), return_counts=True)
    assert values.tolist() == [0.001, 0.002, 0.003] and counts / 60_000 == pytest.approx([1 / 3] * 3, abs=0.01)
    assert (StepTimeModel("constant", 0.005).sample_many(rng, (2, 3)) == 0.005).all()
    # a device at 2x from t = 1, straggling with p = 0.25 by 4x: steps of 0.002 or 0.008 at t = 1.5
    d = DeviceModel("x", StepTimeModel("constant", 0.001), 0.0, None, None, "inline", slowdown=((1.0, 2.0),),
                    straggler_prob=0.25, straggler_factor=4.0)
    steps = d.draw_steps(rng, 100_000, 1.5)
    assert set(np.unique(steps).tolist()) == {0.002, 0.008}
    assert (steps == 0.008).mean() == pytest.approx(0.25, abs=0.005)
    assert d.step_moments(1.5) == pytest.approx((0.002 * 1.75, 0.006 * np.sqrt(0.25 * 0.75)))


def exact_budget_round(values: list[float], budget: float) -> tuple[float, float]:
    """(E[steps], E[duration]) of a device whose steps take each of `values` with equal probability and
    that starts another step while elapsed < budget: every sequence enumerated."""
    def walk(elapsed: float, steps: int, p: float) -> tuple[float, float]:
        if steps and elapsed >= budget:
            return p * steps, p * elapsed
        parts = [walk(elapsed + v, steps + 1, p / len(values)) for v in values]
        return sum(a for a, _ in parts), sum(b for _, b in parts)
    return walk(0.0, 0, 1.0)


@pytest.mark.parametrize("max_draws", [None, 5])  # 5: blocks of a few steps, most devices need several
def test_budget_rounds_follow_the_renewal_rule(monkeypatch, max_draws):
    if max_draws:
        monkeypatch.setattr(timeonly, "MAX_BLOCK_DRAWS", max_draws)
    values = [0.001, 0.003]  # budget 0.0045: 2 to 5 steps
    d = DeviceModel("x", StepTimeModel("empirical", 0.002, 0.001, tuple(values)), 0.0, None, None, "inline")
    n = 20_000
    durations, steps = VectorClock([d], np.zeros(n, dtype=int), np.random.default_rng(1)).round(
        np.arange(n), None, 0.0045, 0.0)
    mean_steps, mean_duration = exact_budget_round(values, 0.0045)
    assert steps.mean() == pytest.approx(mean_steps, rel=0.01)
    assert durations.mean() == pytest.approx(mean_duration, rel=0.01)
    assert set(steps.tolist()) == {2, 3, 4, 5}
    # every duration is a sum of `steps` values whose last step crossed the budget
    assert (durations >= 0.0045 - 1e-12).all() and (durations - 0.003 < 0.0045).all()


@pytest.mark.parametrize("jump", [True, False])
def test_long_budgets_follow_renewal_theory(monkeypatch, jump):
    # steps 1 ms +- 0.3 ms, 2% of them 4x; budget 0.2 s: ~190 steps. Wald: E[duration] = E[step] E[steps];
    # the overshoot past a long budget tends to E[step^2] / (2 E[step])
    if not jump:
        monkeypatch.setattr(timeonly, "JUMP_MIN_STEPS", 10 ** 9)
    d = DeviceModel("x", StepTimeModel("lognormal", 0.001, 0.0003), 0.0, None, None, "inline", straggler_prob=0.02,
                    straggler_factor=4.0)
    mean = 0.001 * (0.98 + 0.02 * 4)
    second = (0.001 ** 2 + 0.0003 ** 2) * (0.98 + 0.02 * 16)
    n = 20_000
    durations, steps = VectorClock([d], np.zeros(n, dtype=int), np.random.default_rng(3)).round(
        np.arange(n), None, 0.2, 0.0)
    assert durations.mean() == pytest.approx(0.2 + second / (2 * mean), rel=0.002)
    assert steps.mean() == pytest.approx(durations.mean() / mean, rel=0.002)
    assert durations.min() >= 0.2 * (1 - 1e-9)


def test_budget_rounds_draw_in_bounded_blocks(monkeypatch):
    monkeypatch.setattr(timeonly, "JUMP_MIN_STEPS", 10 ** 9)  # every step drawn
    shapes = []
    draw = DeviceModel.draw_steps
    monkeypatch.setattr(DeviceModel, "draw_steps", lambda self, rng, shape, t: shapes.append(shape) or
                        draw(self, rng, shape, t))
    d = DeviceModel("x", StepTimeModel("constant", 0.001), 0.0, None, None, "inline")
    durations, steps = VectorClock([d], np.zeros(5000, dtype=int), np.random.default_rng(0)).round(
        np.arange(5000), None, 0.5, 0.0)  # 500 steps each: 2.5 million steps in the round
    assert (steps == 500).all() and durations == pytest.approx(0.5)
    assert max(rows * block for rows, block in shapes) <= timeonly.MAX_BLOCK_DRAWS


def test_fixed_rounds_with_zero_steps_take_no_time():
    d = DeviceModel("x", StepTimeModel("lognormal", 0.01, 0.002), 0.0, None, None, "inline", straggler_prob=0.5,
                    straggler_factor=2.0)
    durations, steps = VectorClock([d], np.zeros(3, dtype=int), np.random.default_rng(0)).round(
        np.arange(3), np.array([0, 3, 0]), None, 0.0)
    assert steps.tolist() == [0, 3, 0] and durations[[0, 2]].tolist() == [0.0, 0.0] and durations[1] > 0
