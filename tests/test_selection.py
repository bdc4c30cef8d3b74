"""Participation (hetsim/policies/selection.py and Driver.select): each selector's choice by hand on a
4-worker cluster, the run-time errors, non-participants sitting the round out exactly like a worker
planned 0 steps, and a resume with a stateful selector."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from hetsim.config import PolicySpec
from hetsim.errors import HetsimError, SpecError
from hetsim.policies import Arrivals, Contribution, RoundPlan, Scheduler, Selector, WorkerInfo, build
from hetsim.policies.selection import All, Speed, Uniform, Utility
from hetsim.results import CHECKPOINT, load_checkpoint
from hetsim.seeding import numpy_rng
from hetsim.sim import Simulation

# four workers: profiled step times 0.01 (a CPU), 0.002, 0.005, 0.004
TIMES = (0.01, 0.002, 0.005, 0.004)


def four(observed=(None, None, None, None)):
    return [WorkerInfo(k, "cpu" if k == 0 else "gpu", t, o, 0 if o is None else 1)
            for k, (t, o) in enumerate(zip(TIMES, observed))]


def seen(selector, losses):
    """The selector's state after every worker with a loss (not None) contributed it once."""
    state = selector.init_state(four())
    ks = [k for k, loss in enumerate(losses) if loss is not None]
    c = [Contribution(k, "x", 2, 16, losses[k]) for k in ks]
    return selector.observe(1, Arrivals.of_replicas(c, torch.zeros(len(ks), 1)), state)


def chosen(selector, workers=None, state=None, rng=None):
    indices, _ = selector.select(1, workers or four(), rng or np.random.default_rng(0), state)
    return sorted(np.asarray(indices).tolist())


# -- each selector by hand on four workers ----------------------------------------------------------

def test_all_picks_every_online_worker():
    assert chosen(All()) == [0, 1, 2, 3]


def test_uniform_picks_k_distinct_workers_from_the_seeded_rng():
    rng = np.random.default_rng(7)
    peer = np.random.default_rng(7)
    for _ in range(5):
        got = chosen(Uniform(k=2), rng=rng)
        assert got == sorted(peer.choice(4, size=2, replace=False).tolist())  # numpy's k of n without replacement


def test_uniform_gives_every_worker_a_k_over_n_share():
    rng = np.random.default_rng(0)
    counts = np.zeros(4)
    for _ in range(4000):
        picked = chosen(Uniform(k=3), rng=rng)
        assert len(picked) == len(set(picked)) == 3
        counts[picked] += 1
    assert np.all(np.abs(counts / 4000 - 0.75) < 0.03)


def test_uniform_with_fewer_online_than_k_picks_all_of_them():
    assert chosen(Uniform(k=3), workers=four()[:2]) == [0, 1]


def test_speed_picks_the_k_lowest_profiled_step_times():
    assert chosen(Speed(k=2)) == [1, 3]          # 0.002, 0.004
    assert chosen(Speed(k=3)) == [1, 2, 3]
    assert chosen(Speed(k=1), workers=four()[::2]) == [1]  # of workers 0 and 2 (online), index 1 of them


def test_speed_observed_uses_the_latest_measured_step_time_and_breaks_ties_by_index():
    # worker 0 measured 0.001 (fastest now); worker 2 measured 0.002, tied with worker 1's profile
    workers = four(observed=(0.001, None, 0.002, None))
    assert chosen(Speed(k=2, source="observed"), workers) == [0, 1]
    assert chosen(Speed(k=3, source="observed"), workers) == [0, 1, 2]
    assert chosen(Speed(k=2, source="profile"), workers) == [1, 3]


def test_utility_by_hand():
    # losses 2, 1, 3, 0.5; T = the 2nd lowest step time = 0.004: worker 0 (0.01) is discounted by
    # (0.004/0.01)^2 = 0.16 -> U = 0.32; worker 2 (0.005) by 0.8^2 = 0.64 -> 1.92; U = (0.32, 1, 1.92, 0.5)
    u = Utility(k=2, alpha=2.0, epsilon=0.0)
    state = seen(u, [2.0, 1.0, 3.0, 0.5])
    np.testing.assert_allclose(u.utilities(four(), state), [0.32, 1.0, 1.92, 0.5])
    assert chosen(u, state=state) == [1, 2]
    # a preferred step time of 0.01 penalises nobody: U = the losses
    assert chosen(Utility(k=2, epsilon=0.0, preferred_s=0.01), state=state) == [0, 2]
    # alpha 0: speed does not matter
    assert chosen(Utility(k=2, alpha=0.0, epsilon=0.0), state=state) == [0, 2]


def test_utility_tries_an_unseen_worker_first_the_fastest_unseen_first():
    u = Utility(k=2, epsilon=0.0)
    assert chosen(u, state=u.init_state(four())) == [1, 3]           # nobody seen: by step time
    assert chosen(u, state=seen(u, [2.0, 1.0, 3.0, None])) == [2, 3]  # worker 3 unseen: +inf; then U2 = 1.92


def test_utility_observes_the_latest_loss_of_the_workers_that_took_steps_without_changing_its_input():
    u = Utility(k=2)
    state = seen(u, [2.0, 1.0, None, None])
    c = [Contribution(0, "x", 3, 48, 0.25), Contribution(2, "x", 0, 0, 0.0)]  # worker 2 sat the round out
    after = u.observe(2, Arrivals.of_replicas(c, torch.zeros(2, 1)), state)
    assert after["loss"].dtype == torch.float64
    assert np.array_equal(after["loss"].numpy(), [0.25, 1.0, np.nan, np.nan], equal_nan=True)
    assert np.array_equal(state["loss"].numpy(), [2.0, 1.0, np.nan, np.nan], equal_nan=True)


def test_utility_exploration_sometimes_picks_the_lowest_utility_worker():
    # worker 0 has the lowest utility (0.32); without exploration it is never picked, with epsilon 0.5 it is
    # picked in some rounds (each explored slot: uniform over the other workers)
    state = seen(Utility(k=2), [2.0, 1.0, 3.0, 0.5])
    rng = np.random.default_rng(0)
    greedy = [chosen(Utility(k=2, epsilon=0.0), state=state, rng=rng) for _ in range(200)]
    explored = [chosen(Utility(k=2, epsilon=0.5), state=state, rng=rng) for _ in range(200)]
    assert all(0 not in c for c in greedy) and 20 < sum(0 in c for c in explored) < 120
    assert all(len(set(c)) == 2 for c in explored)


# -- parameters and spec errors -----------------------------------------------------------------------

@pytest.mark.parametrize("name,params,message", [
    ("uniform", {"k": 0}, r"selector.params.k: expected an integer >= 1, got 0$"),
    ("speed", {"k": -2}, r"selector.params.k: expected an integer >= 1, got -2$"),
    ("speed", {"k": 2, "source": "fast"}, r"selector.params.source: expected 'profile' or 'observed', got 'fast'$"),
    ("utility", {"k": 2, "alpha": -1.0}, r"selector.params.alpha: expected a number >= 0, got -1.0$"),
    ("utility", {"k": 2, "epsilon": 1.5}, r"selector.params.epsilon: expected a number in \[0, 1\], got 1.5$"),
    ("utility", {"k": 2, "preferred_s": -1.0}, r"selector.params.preferred_s: expected a number of seconds > 0"),
    ("nope", {}, r"selector.name: expected one of \['all', 'speed', 'uniform', 'utility'\] or 'module:Class'"),
])
def test_selector_parameters_are_validated_in_one_line(name, params, message):
    with pytest.raises(SpecError, match=message) as e:
        build("selector", PolicySpec(name, params))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("selector", ["uniform", "speed", "utility"])
def test_k_larger_than_the_cluster_is_a_spec_error(tiny_spec, selector):
    with pytest.raises(SpecError, match=r"^tiny: selector.params.k: expected 1 <= k <= 3 \(the cluster's workers\), "
                                        r"got 4$"):
        tiny_spec(f"selector={{name='{selector}', params={{k=4}}}}")


def test_async_protocols_accept_only_the_all_selector(tiny_spec):
    for protocol in ("async", "buffered_async"):
        with pytest.raises(SpecError, match=rf"^tiny: selector.name: expected 'all' under protocol '{protocol}' "
                                            r"\(it has no rounds to select for\), got 'uniform'$"):
            tiny_spec(f"protocol={{name='{protocol}'}}", "selector={name='uniform', params={k=2}}")


@dataclass(frozen=True)
class NoRng(Selector):
    def select(self, round, workers):
        return np.arange(len(workers)), None


def test_a_select_method_of_another_shape_is_a_spec_error_on_load(tiny_spec):
    with pytest.raises(SpecError, match=r"^tiny: selector.name: test_selection:NoRng: NoRng.select\(self, round, "
                                        r"workers\) does not take \(round, workers, rng, state\)$"):
        tiny_spec("selector={name='test_selection:NoRng'}")


def test_a_selector_is_checked_on_load_like_other_policies(tiny_spec):
    assert tiny_spec("selector={name='uniform', params={k=3}}").selector == PolicySpec("uniform", {"k": 3})
    assert isinstance(build("selector", PolicySpec("all")), Selector)


# -- in the driver ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Picks(Selector):
    """Returns `indices` every round (a plug-in that may break the contract)."""

    indices: tuple[int, ...] = ()

    def select(self, round, workers, rng, state):
        return np.array(self.indices, dtype=np.int64), state


@dataclass(frozen=True)
class NotATuple(Selector):
    def select(self, round, workers, rng, state):
        return [0]


@pytest.mark.parametrize("selector,message", [
    ("{name='test_selection:Picks', params={indices=[]}}",
     r"^selector 'test_selection:Picks' picked nobody in round 1 \(3 workers online\): a round needs at least one "
     r"participant$"),
    ("{name='test_selection:Picks', params={indices=[0, 3]}}",
     r"^selector 'test_selection:Picks' chose index 3 in round 1: expected indices 0..2 into the 3 online workers$"),
    ("{name='test_selection:Picks', params={indices=[-1]}}",
     r"^selector 'test_selection:Picks' chose index -1 in round 1"),
    ("{name='test_selection:Picks', params={indices=[1, 1]}}",
     r"^selector 'test_selection:Picks' chose a worker twice in round 1 \(indices \[1, 1\]\): expected distinct"),
    ("{name='test_selection:NotATuple'}",
     r"^selector 'test_selection:NotATuple': select returned a list; expected \(indices, state\)"),
])
def test_a_selector_breaking_the_contract_is_a_one_line_run_error(tiny_spec, selector, message):
    with pytest.raises(HetsimError, match=message) as e:
        Simulation(tiny_spec(f"selector={selector}", "stop.max_rounds=2")).run()
    assert "\n" not in str(e.value)


def test_uniform_runs_k_workers_per_round_as_drawn_from_the_selectors_rng(tiny_spec):
    r = Simulation(tiny_spec("selector={name='uniform', params={k=2}}", "stop.max_rounds=8")).run()
    rng = numpy_rng(0, "selector")  # the run's seed (0) and the selector's stream
    assert [d["workers"] for d in r.decisions] == [sorted(rng.choice(3, size=2, replace=False).tolist())
                                                   for _ in range(8)]
    assert all(len(d["workers"]) == len(d["local_steps"]) == 2 for d in r.decisions)
    # every worker's participation is counted from the rounds it took part in
    names = {0: "cpu0", 1: "gpu0", 2: "gpu1"}
    counts = {names[k]: sum(k in d["workers"] for d in r.decisions) for k in names}
    assert r.summary["rounds_participated"] == counts
    assert r.summary["selector"] == "uniform" and r.summary["protocol"] == "sync"


@dataclass(frozen=True)
class SitsOut(Scheduler):
    """Plans `per_kind` steps, and 0 (sit the round out) for the listed workers."""

    out: tuple[int, ...] = (0,)

    def plan(self, round, workers, rng, state):
        return RoundPlan(tuple(0 if w.index in self.out else (1 if w.kind == "cpu" else 5) for w in workers)), state


def test_a_worker_left_out_sits_the_round_out_exactly_like_one_planned_zero_steps(tiny_spec):
    # speed k = 2 picks the two GPUs (0.002 s) every round; the CPU sits out as if planned 0 steps
    selected = Simulation(tiny_spec("selector={name='speed', params={k=2}}", "stop.max_rounds=4"))
    a = selected.run()
    planned = Simulation(tiny_spec("scheduler={name='test_selection:SitsOut', params={out=[0]}}", "stop.max_rounds=4"))
    b = planned.run()
    assert torch.equal(selected.core.global_params(), planned.core.global_params())
    assert [d["workers"] for d in a.decisions] == [[1, 2]] * 4
    assert a.metrics["time_s"] == b.metrics["time_s"] and a.metrics["test_acc"] == b.metrics["test_acc"]
    assert [(d["local_steps"], d["weights"]) for d in a.decisions] == [(d["local_steps"], d["weights"])
                                                                       for d in b.decisions]


def test_utility_tries_every_worker_once_in_a_run(tiny_spec):
    # k = 1, no exploration: unseen workers first, by step time (gpu0, gpu1 at 0.002, then cpu0 at 0.01)
    r = Simulation(tiny_spec("selector={name='utility', params={k=1, epsilon=0.0}}", "stop.max_rounds=4")).run()
    assert [d["workers"] for d in r.decisions[:3]] == [[1], [2], [0]]


def test_a_time_only_run_selects_too(tiny_spec):
    r = Simulation(tiny_spec("selector={name='uniform', params={k=2}}", "sim.fidelity='time_only'",
                             "stop.max_rounds=5")).run()
    assert all(len(d["workers"]) == 2 for d in r.decisions) and len(r.decisions) == 5


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("selector", ["{name='uniform', params={k=2}}",
                                      "{name='utility', params={k=2, epsilon=0.5}}"])
def test_a_run_with_a_selector_resumes_bit_identically(tiny_spec, tmp_path, selector):
    spec = tiny_spec(f"selector={selector}", "stop.max_rounds=7", "run.checkpoint_every=2")
    whole = Simulation(spec)
    expected = whole.run()

    def crash(row):
        if row["round"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        Simulation(spec, tmp_path, progress=crash).run()
    run_state = load_checkpoint(tmp_path / CHECKPOINT, "sim", spec).state["run"]
    assert run_state["selector_rng"] is not None
    resumed = Simulation(spec, tmp_path, resume=True)
    got = resumed.run()
    assert [d["workers"] for d in got.decisions] == [d["workers"] for d in expected.decisions]
    assert list(got.decisions) == list(expected.decisions)
    assert torch.equal(resumed.core.global_params(), whole.core.global_params())
    if "utility" in selector:  # the losses seen in rounds 1 and 2 were in the checkpoint
        assert not torch.isnan(run_state["selector_state"]["loss"]).all()


@pytest.mark.parametrize("selector", ["uniform", "speed", "utility"])
def test_a_selector_without_k_is_a_one_line_error_not_one_worker(tiny_spec, selector):
    # k has no default: a forgotten k would otherwise quietly train on one worker a round
    with pytest.raises(SpecError, match=rf"^tiny: selector.params.k: required \({selector} has no default for it\)$"):
        tiny_spec(f"selector={{name='{selector}'}}")
