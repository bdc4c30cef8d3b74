"""Every policy against hand-computed values."""

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from hetsim.config import PolicySpec
from hetsim.errors import HetsimError, HetsimWarning, SpecError
from hetsim.policies import (Aggregator, Arrivals, Batch, Contribution, NameRef, RoundPlan, Sampler, Scheduler,
                             WorkerInfo, build, check_names, names)
from hetsim.policies.aggregation import Biased, FedNova, Mean, Median, SampleWeighted, TrimmedMean
from hetsim.policies.sampling import EpochStream, LossBiasedTopK, LossScores, Uniform
from hetsim.policies.scheduling import FixedSteps, Proportional, Synchronous, TimeBudget
from hetsim.policies.server import OuterSGD
from hetsim.sim import simulate


RNG = np.random.default_rng(0)


def workers(times, kinds=None, observed=None):
    kinds = kinds or ["cpu"] * len(times)
    observed = observed or [None] * len(times)
    return [WorkerInfo(i, k, t, o) for i, (t, k, o) in enumerate(zip(times, kinds, observed))]


# -- scheduling ------------------------------------------------------------------------------

def test_sync_plans_one_step_each():
    assert Synchronous().plan(0, workers([0.1, 0.2, 0.3]), RNG, None)[0].local_steps == (1, 1, 1)


def test_fixed_steps_per_kind_and_default():
    ws = workers([1, 1, 1], ["cpu", "gpu", "tpu"])
    assert FixedSteps(local_steps=4, per_kind={"cpu": 1, "gpu": 32}).plan(0, ws, RNG, None)[0].local_steps == (1, 32, 4)


def test_fixed_steps_rejects_zero():
    with pytest.raises(ValueError, match="gpu"):
        FixedSteps(per_kind={"gpu": 0})


def test_proportional_matches_hand_computation():
    # fastest 0.001 s does H = 32; 0.002 -> 16; 0.0045 -> 32/4.5 = 7.11 -> 7; 0.032 -> 1
    ws = workers([0.032, 0.001, 0.002, 0.0045])
    assert Proportional(max_steps=32).plan(0, ws, RNG, None)[0].local_steps == (1, 32, 16, 7)


def test_proportional_rounds_half_up_and_respects_min_steps():
    ws = workers([1.0, 2.0, 100.0])  # H=5: 5, 2.5 -> 3, 0.05 -> 0 -> min 2
    assert Proportional(max_steps=5, min_steps=2).plan(0, ws, RNG, None)[0].local_steps == (5, 3, 2)


def test_proportional_observed_source_uses_measured_times_when_present():
    ws = [WorkerInfo(0, "cpu", 1.0, 1.0, 1), WorkerInfo(1, "cpu", 1.0, 4.0, 1)]
    observed = Proportional(max_steps=8, source="observed")
    assert observed.plan(0, ws, RNG, observed.init_state(ws))[0].local_steps == (8, 2)
    assert Proportional(max_steps=8, source="profile").plan(0, ws, RNG, None)[0].local_steps == (8, 8)


def test_time_budget_plan():
    plan, _ = TimeBudget(budget_s=0.05).plan(3, workers([1, 2]), RNG, None)
    assert plan.local_steps == (None, None) and plan.time_budget_s == 0.05


# -- sampling --------------------------------------------------------------------------------

def test_epoch_stream_is_without_replacement_within_an_epoch():
    s = EpochStream(10, np.random.default_rng(0))
    first = s.take(4)
    rest = s.take(6)
    assert sorted(np.concatenate([first, rest])) == list(range(10))
    assert s.epoch == 0
    nxt = s.take(10)
    assert s.epoch == 1 and sorted(nxt) == list(range(10))


def test_epoch_stream_state_round_trip():
    a = EpochStream(7, np.random.default_rng(3))
    a.take(5)
    state = a.state_dict()
    b = EpochStream(7, np.random.default_rng(99))
    b.load_state_dict(state)
    assert [a.take(5).tolist() for _ in range(3)] == [b.take(5).tolist() for _ in range(3)]


def test_epoch_stream_never_repeats_an_index_within_a_take():
    # takes of 4 from 10 cross an epoch boundary every 2.5 takes: tail of epoch e + head of epoch e+1
    s = EpochStream(10, np.random.default_rng(0))
    takes = [s.take(4) for _ in range(50)]
    assert all(len(set(t.tolist())) == 4 for t in takes)
    flat = np.concatenate(takes)  # 200 indices = 20 whole epochs, each still a permutation of 0..9
    assert all(sorted(flat[e * 10:(e + 1) * 10]) == list(range(10)) for e in range(20))
    assert s.epoch == 19


def test_epoch_stream_rejects_a_take_larger_than_the_data():
    with pytest.raises(ValueError, match="cannot take 11 distinct indices from a stream of 10"):
        EpochStream(10, np.random.default_rng(0)).take(11)


def test_epoch_stream_resumes_identically_across_an_epoch_boundary():
    a = EpochStream(10, np.random.default_rng(4))
    a.take(4), a.take(4)
    b = EpochStream(10, np.random.default_rng(99))
    b.load_state_dict(a.state_dict())
    assert [a.take(4).tolist() for _ in range(6)] == [b.take(4).tolist() for _ in range(6)]


def test_loss_topk_pool_crossing_an_epoch_has_no_repeated_index():
    # pool = 2 x 3 = 6 of 8 samples: most pools span two epochs; the paper's pool is without replacement
    s = EpochStream(8, np.random.default_rng(2))
    scores = LossScores(8)
    scores.values[:] = np.random.default_rng(3).random(8)
    sampler = LossBiasedTopK(sample_ratio=2, kinds=("*",))
    for _ in range(40):
        batch, _ = sampler.batch(workers([1])[0], 3, s, scores, None)
        assert len(set(batch.indices.tolist())) == 3


def test_uniform_takes_the_next_indices_of_the_stream():
    twin = EpochStream(20, np.random.default_rng(5))
    s = EpochStream(20, np.random.default_rng(5))
    batch, _ = Uniform().batch(workers([1])[0], 6, s, LossScores(20), None)
    assert list(batch.indices) == list(twin.take(6)) and batch.n_biased == 0


def test_loss_topk_keeps_highest_scores_of_the_candidate_pool():
    twin = EpochStream(8, np.random.default_rng(1))
    pool = twin.take(4)  # sample_ratio 2 x batch 2
    scores = LossScores(8)
    scores.values[:] = np.arange(8) * 1.0  # score = index
    s = EpochStream(8, np.random.default_rng(1))
    batch, _ = LossBiasedTopK(sample_ratio=2, kinds=("cpu",)).batch(workers([1])[0], 2, s, scores, None)
    assert sorted(batch.indices) == sorted(pool)[-2:]
    assert batch.n_biased == 2


def test_loss_topk_prefers_unseen_samples():
    scores = LossScores(8)
    scores.values[:] = 1.0
    scores.values[[2, 5]] = np.inf
    s = EpochStream(8, np.random.default_rng(0))
    batch, _ = LossBiasedTopK(sample_ratio=4, kinds=("*",)).batch(workers([1])[0], 2, s, scores, None)  # pool = all 8
    assert sorted(batch.indices) == [2, 5]


def test_loss_topk_only_biases_listed_kinds():
    s = EpochStream(8, np.random.default_rng(0))
    gpu = workers([1], ["gpu"])[0]
    batch, _ = LossBiasedTopK(kinds=("cpu",)).batch(gpu, 4, s, LossScores(8), None)
    assert batch.n_biased == 0 and len(batch.indices) == 4


def test_loss_scores_latest_and_min_rules():
    latest, smallest = LossScores(3, "latest"), LossScores(3, "min")
    for s in (latest, smallest):
        s.merge(np.array([0, 1]), np.array([2.0, 3.0]))
        s.merge(np.array([0, 0]), np.array([5.0, 4.0]))  # a repeated index: the later one is newest
    assert list(latest.values) == [4.0, 3.0, np.inf]
    assert list(smallest.values) == [2.0, 3.0, np.inf]


def test_sampler_parameters_are_validated():
    with pytest.raises(ValueError, match="sample_ratio"):
        LossBiasedTopK(sample_ratio=0.5)
    with pytest.raises(ValueError, match="score_rule"):
        LossBiasedTopK(score_rule="max")


# -- aggregation -----------------------------------------------------------------------------

def contribs(steps, samples=None, losses=None):
    samples = samples or [16 * s for s in steps]
    losses = losses or [1.0] * len(steps)
    return [Contribution(i, "x", t, m, l) for i, (t, m, l) in enumerate(zip(steps, samples, losses))]


def arrivals(replicas, steps, samples=None, losses=None, **kw):
    return Arrivals.of_replicas(contribs(steps, samples, losses), torch.as_tensor(replicas, dtype=torch.float32), **kw)


def test_mean_weights_and_combination():
    w = Mean().weights(arrivals(torch.zeros(4, 1), [1, 1, 3, 3]))
    assert np.allclose(w, 0.25)
    g, used, state = Mean().combine(None, arrivals([[1.0, 2.0], [3.0, 4.0]], [1, 1]), None)
    assert torch.allclose(g, torch.tensor([2.0, 3.0])) and np.allclose(used, 0.5) and state is None


def test_sample_weighted():
    assert np.allclose(SampleWeighted().weights(arrivals(torch.zeros(2, 1), [1, 3], samples=[16, 48])), [0.25, 0.75])


def test_fednova_hand_example():
    # tau = (1, 3), samples (16, 48): p = (.25, .75), tau_eff = 2.5, c = 2.5 * (.25/1, .75/3) = (.625, .625)
    a = arrivals([[1.0], [2.0]], [1, 3], samples=[16, 48])
    assert np.allclose(FedNova().weights(a), [0.625, 0.625])
    # x+ = x - tau_eff * sum p_k (x - x_k) / tau_k with x = 0, x_1 = 1, x_2 = 2  ->  1.875
    g, _, _ = FedNova().combine(torch.zeros(1), a, None)
    assert torch.allclose(g, torch.tensor([1.875]))


def test_biased_family():
    a = arrivals(torch.zeros(2, 1), [1, 3], losses=[2.0, 1.0])
    assert np.allclose(Biased(strength=0).weights(a), [0.5, 0.5])  # zero strength = uniform mean
    assert np.allclose(Biased(strength=1).weights(a), [0.25, 0.75])
    assert np.allclose(Biased(strength=2).weights(a), [0.1, 0.9])
    assert np.allclose(Biased(strength=1, basis="loss").weights(a), [2 / 3, 1 / 3])


# -- registry --------------------------------------------------------------------------------

def test_registry_builds_by_name_and_checks_params():
    assert build("scheduler", PolicySpec("proportional", {"max_steps": 4})) == Proportional(max_steps=4)
    with pytest.raises(SpecError, match=r"scheduler.params.max_step: unknown key"):
        build("scheduler", PolicySpec("proportional", {"max_step": 4}))
    with pytest.raises(SpecError, match=r"scheduler.params.max_steps: expected an integer"):
        build("scheduler", PolicySpec("proportional", {"max_steps": "4"}))
    with pytest.raises(SpecError, match=r"scheduler.name: expected one of"):
        build("scheduler", PolicySpec("nope"))


def test_user_policy_by_import_path():
    policy = build("scheduler", PolicySpec("custom_policy:StepsAtRound", {"steps": 3, "at": 1, "special": 5}))
    assert policy.plan(0, workers([1, 1]), RNG, None)[0].local_steps == (3, 3)
    assert policy.plan(1, workers([1, 1]), RNG, None)[0].local_steps == (5, 5)
    with pytest.raises(SpecError, match="cannot import"):
        build("scheduler", PolicySpec("custom_policy:Missing"))


# -- the contract: declared capabilities and arrivals ------------------------------------------

def test_builtins_declare_their_capabilities_on_the_class():
    assert (Mean.linear, Mean.stateful, Mean.needs_previous_global) == (True, False, False)
    assert (FedNova.linear, FedNova.stateful, FedNova.needs_previous_global) == (True, False, True)
    assert (OuterSGD.linear, OuterSGD.stateful, OuterSGD.needs_previous_global) == (True, True, True)
    assert (Median.linear, Median.stateful, Median.needs_previous_global) == (False, False, False)
    assert (TrimmedMean.linear, TrimmedMean.stateful, TrimmedMean.needs_previous_global) == (False, False, False)
    assert (Proportional.stateful, FixedSteps.stateful, TimeBudget.stateful) == (True, False, False)
    assert (Uniform.uses_scores, Uniform.score_rule, Uniform.stateful) == (False, "latest", False)
    assert (LossBiasedTopK.uses_scores, LossBiasedTopK(score_rule="min").score_rule) == (True, "min")


def test_arrivals_carry_staleness_round_and_lr_and_reach_replicas_by_weighted_sum():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    a = Arrivals([3, 5], ["cpu", "gpu"], [1, 2], [16, 32], [0.5, 0.25], [0, 2], 7, 0.05,
                 weighted_sum=lambda w: torch.as_tensor(w, dtype=x.dtype) @ x)
    assert list(a.staleness) == [0, 2] and a.round == 7 and a.lr == 0.05 and list(a.workers) == [3, 5]
    assert torch.equal(a.weighted_sum(np.array([0.5, 0.25])), torch.tensor([1.25, 2.0]))  # .5·(1,2) + .25·(3,4)
    with pytest.raises(ValueError, match="expected 2 weights"):
        a.weighted_sum(np.ones(3))
    with pytest.raises(RuntimeError, match="must declare `linear = False`"):
        a.replicas


def test_arrivals_gather_the_replicas_once():
    calls = []
    a = Arrivals([0], ["cpu"], [1], [8], [1.0], [0], 1, 0.1,
                 replicas=lambda: calls.append(1) or torch.ones(1, 2))
    assert torch.equal(a.replicas, torch.ones(1, 2)) and torch.equal(a.replicas, torch.ones(1, 2))
    assert calls == [1]


@pytest.mark.parametrize("name,params", [("mean", {}), ("samples", {}), ("fednova", {}), ("biased", {"strength": 2.0}),
                                         ("outer_sgd", {"momentum": 0.9, "nesterov": True}), ("fedavgm", {}),
                                         ("fedadam", {}), ("fedyogi", {"base": "samples"})])
def test_a_linear_aggregator_reaches_the_replicas_only_through_weighted_sum(name, params):
    aggregator = build("aggregator", PolicySpec(name, params))
    assert aggregator.linear
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    # no replicas source: asking for them raises, so combine succeeding proves it never did
    a = Arrivals([0, 1], ["cpu", "gpu"], [1, 3], [16, 48], [1.0, 2.0], [0, 0], 1, 0.1,
                 weighted_sum=lambda w: torch.as_tensor(w, dtype=x.dtype) @ x)
    new, w, _ = aggregator.combine(torch.zeros(2), a, aggregator.init_state(torch.zeros(2)))
    assert new.shape == (2,) and torch.isfinite(new).all() and len(w) == 2


@dataclass(frozen=True)
class KeepsHalfTheGlobal(Aggregator):
    """x⁺ = 0.5·x + 0.5·mean: a coefficients() with a ≠ 0 that forgot to declare needs_previous_global."""

    def coefficients(self, arrivals):
        return 0.5, np.full(len(arrivals), 0.5 / len(arrivals))


def test_an_undeclared_use_of_the_previous_global_model_is_named():
    a = arrivals([[2.0]], [1])
    assert torch.equal(KeepsHalfTheGlobal().combine(torch.tensor([4.0]), a, None)[0], torch.tensor([3.0]))
    with pytest.raises(ValueError, match="KeepsHalfTheGlobal.coefficients gave the previous global model a weight "
                                         "of 0.5, but the class declares needs_previous_global = False"):
        KeepsHalfTheGlobal().combine(None, a, None)


# -- non-participants: a 0-step row has weight 0 -------------------------------------------------

# workers 0 and 2 took 2 and 4 steps; worker 1 sat the round out with a replica far away (100)
IDLE = dict(replicas=[[1.0], [100.0], [3.0]], steps=[2, 0, 4], samples=[32, 0, 64], losses=[1.0, 0.0, 3.0])


@pytest.mark.parametrize("aggregator,weights,new", [
    (Mean(), [0.5, 0, 0.5], 2.0),
    (SampleWeighted(), [1 / 3, 0, 2 / 3], 1 / 3 + 2),
    (Biased(strength=0), [0.5, 0, 0.5], 2.0),                      # 0 ** 0 would be 1: the idle row is masked
    (Biased(strength=1), [1 / 3, 0, 2 / 3], 1 / 3 + 2),
    (Biased(strength=1, basis="loss"), [0.25, 0, 0.75], 0.25 + 2.25),
    # p = (1/3, 0, 2/3), tau_eff = 2/3 + 8/3 = 10/3, c = tau_eff·p/tau = (5/9, 0, 5/9); x = 0: 5/9 + 15/9
    (FedNova(), [5 / 9, 0, 5 / 9], 20 / 9),
    (OuterSGD(), [0.5, 0, 0.5], 2.0),
    # of the participants' values 1 and 3: the median averages both; a trimmed mean of 2 trims nothing
    (Median(), [0.5, 0, 0.5], 2.0),
    (TrimmedMean(beta=0.4), [0.5, 0, 0.5], 2.0),
])
def test_aggregators_average_over_the_workers_that_took_steps(aggregator, weights, new):
    a = arrivals(IDLE["replicas"], IDLE["steps"], IDLE["samples"], IDLE["losses"])
    result, w, _ = aggregator.combine(torch.zeros(1), a, aggregator.init_state(torch.zeros(1)))
    assert np.allclose(w, weights) and np.isfinite(w).all()
    assert torch.allclose(result, torch.tensor([new]))


@pytest.mark.parametrize("aggregator", [Mean(), SampleWeighted(), Biased(), FedNova(), Median(), TrimmedMean()])
def test_aggregators_refuse_arrivals_where_nobody_took_a_step(aggregator):
    with pytest.raises(ValueError, match="no arrival did a local step"):
        aggregator.combine(torch.zeros(1), arrivals([[1.0], [2.0]], [0, 0], [0, 0]), None)


# -- robust aggregation: coordinate-wise median and trimmed mean ---------------------------------

def gathered_only(replicas, steps=None):
    """Arrivals that reach their replicas only by gathering them (as a non-linear aggregator's in a backend)."""
    x = torch.as_tensor(replicas)
    steps = steps or [1] * len(x)
    return Arrivals(list(range(len(x))), ["x"] * len(x), steps, [8 * s for s in steps], [1.0] * len(x),
                    [0] * len(x), 1, 0.1, replicas=lambda: x)


@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_median_is_numpys_coordinate_median(n):
    x = torch.randn(n, 1000, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    new, w, state = Median().combine(None, gathered_only(x), None)
    np.testing.assert_allclose(new.numpy(), np.median(x.numpy(), axis=0), rtol=0, atol=1e-15)
    assert state is None and math.isclose(w.sum(), 1.0)


@pytest.mark.parametrize("n,beta", [(5, 0.0), (5, 0.2), (10, 0.1), (10, 0.25), (7, 0.49)])
def test_trimmed_mean_is_scipys(n, beta):
    stats = pytest.importorskip("scipy.stats")
    x = torch.randn(n, 1000, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    new, w, _ = TrimmedMean(beta=beta).combine(None, gathered_only(x), None)
    np.testing.assert_allclose(new.numpy(), stats.trim_mean(x.numpy(), beta, axis=0), rtol=0, atol=1e-12)
    assert math.isclose(w.sum(), 1.0)


def test_trimmed_mean_by_hand_drops_the_extremes_of_each_coordinate():
    # beta 0.25 of 4 values: one trimmed per side. Coordinate 0: 1, 2, 3, 100 -> mean(2, 3) = 2.5;
    # coordinate 1: -50, 0, 4, 8 -> mean(0, 4) = 2
    x = [[1.0, 8.0], [2.0, 0.0], [100.0, -50.0], [3.0, 4.0]]
    new, w, _ = TrimmedMean(beta=0.25).combine(None, gathered_only(x), None)
    assert torch.equal(new, torch.tensor([2.5, 2.0]))
    # the kept values: worker 1 in both coordinates, worker 3 in both: 2 of the 4 kept values each
    assert np.array_equal(w, [0.0, 0.5, 0.0, 0.5])


def test_median_weights_are_the_share_of_coordinates_each_replica_supplies():
    # odd: coordinate 0's median is worker 1's value, coordinate 1's is worker 2's
    new, w, _ = Median().combine(None, gathered_only([[0.0, 10.0], [1.0, 20.0], [5.0, 15.0]]), None)
    assert torch.equal(new, torch.tensor([1.0, 15.0])) and np.array_equal(w, [0.0, 0.5, 0.5])
    # even: the two middle values of the one coordinate (2 of worker 2, 3 of worker 3), half each
    new, w, _ = Median().combine(None, gathered_only([[1.0], [4.0], [2.0], [3.0]]), None)
    assert torch.equal(new, torch.tensor([2.5])) and np.array_equal(w, [0.0, 0.0, 0.5, 0.5])


@pytest.mark.parametrize("aggregator", ["{name='median'}", "{name='trimmed_mean', params={beta=0.2}}"])
def test_robust_aggregators_in_time_only_give_every_participant_an_equal_share(tiny_spec, aggregator):
    # the time-only model has no coordinates: a share of none is 0/0, so by symmetry 1/n each, with no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = simulate(tiny_spec(f"aggregator={aggregator}", "sim.fidelity='time_only'", "stop.max_rounds=3"))
    assert [d["weights"] for d in r.decisions] == [[1 / len(d["workers"])] * len(d["workers"]) for d in r.decisions]


def test_median_ignores_a_far_away_replica_that_the_mean_follows():
    x = [[1.0], [2.0], [1e6]]
    assert torch.equal(Median().combine(None, gathered_only(x), None)[0], torch.tensor([2.0]))


def test_robust_aggregators_sort_in_slices_with_the_same_result(monkeypatch):
    from hetsim.policies import aggregation

    x = torch.randn(5, 997, generator=torch.Generator().manual_seed(1))
    whole = [a.combine(None, gathered_only(x), None) for a in (Median(), TrimmedMean(beta=0.2))]
    monkeypatch.setattr(aggregation, "SORT_ELEMENTS", 5 * 64)  # slices of 64 coordinates, the last one short
    sliced = [a.combine(None, gathered_only(x), None) for a in (Median(), TrimmedMean(beta=0.2))]
    for (new, w, _), (new_s, w_s, _) in zip(whole, sliced):
        assert torch.equal(new, new_s) and np.allclose(w, w_s)


@pytest.mark.parametrize("aggregator,statistic", [
    ("{name='median'}", lambda x: np.median(x, axis=0)),
    ("{name='trimmed_mean', params={beta=0.2}}", lambda x: x.mean(axis=0)),  # 0.2 of 3 workers trims nothing
])
def test_robust_aggregators_combine_the_simulators_replicas(tiny_spec, aggregator, statistic):
    from hetsim.sim import Simulation

    sim = Simulation(tiny_spec(f"aggregator={aggregator}", "stop.max_rounds=2"))
    r = sim.run()
    # after the last round the replicas still hold their trained values (they pull at the next round's start)
    replicas = sim.core.replicas([0, 1, 2]).numpy()
    np.testing.assert_allclose(sim.core.global_params().numpy(), statistic(replicas), rtol=0, atol=1e-6)
    assert all(math.isclose(sum(d["weights"]), 1.0) for d in r.decisions)


@pytest.mark.parametrize("beta", [0.5, -0.1, 0.7])
def test_trimmed_mean_refuses_beta_outside_0_to_one_half_in_one_line(beta):
    with pytest.raises(SpecError, match=rf"^aggregator.params.beta: expected a number in \[0, 0.5\) \(the fraction "
                                        rf"trimmed from each side\), got {beta}$"):
        build("aggregator", PolicySpec("trimmed_mean", {"beta": beta}))


# -- server optimizers ---------------------------------------------------------------------------

def rounds_of_replicas(n_rounds, n_workers=3, size=500, seed=0):
    """Replicas near a moving point, as local SGD leaves them (independent of the global model)."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(size, generator=g) * 0.1
    out = []
    for _ in range(n_rounds):
        centre = centre + 0.01 * torch.randn(size, generator=g)
        out.append(centre + 0.01 * torch.randn(n_workers, size, generator=g))
    return out


@pytest.mark.parametrize("base,base_params", [("mean", {}), ("fednova", {}), ("biased", {"strength": 2.0})])
def test_outer_sgd_at_lr_1_without_momentum_is_its_base_aggregator(base, base_params):
    outer = build("aggregator", PolicySpec("outer_sgd", {"base": base, "base_params": base_params}))
    inner = build("aggregator", PolicySpec(base, base_params))
    x = rounds_of_replicas(1)[0][0].clone()
    state = outer.init_state(x)
    for r, replicas in enumerate(rounds_of_replicas(4, seed=1), start=1):
        a = arrivals(replicas, [1, 2, 4], **{"round": r})
        ours, w, state = outer.combine(x, a, state)
        theirs, w_base, _ = inner.combine(x, a, None)
        torch.testing.assert_close(ours, theirs, atol=1e-7, rtol=0)
        assert np.array_equal(w, w_base)
        x = theirs


@pytest.mark.parametrize("nesterov", [False, True])
def test_outer_sgd_with_momentum_is_torch_sgd_on_the_pseudo_gradient(nesterov):
    outer = OuterSGD(outer_lr=0.7, momentum=0.9, nesterov=nesterov)
    x0 = rounds_of_replicas(1)[0][0]
    peer = x0.clone()
    optimizer = torch.optim.SGD([peer], lr=0.7, momentum=0.9, nesterov=nesterov)
    x, state = x0.clone(), outer.init_state(x0)
    for replicas in rounds_of_replicas(5, seed=2):
        x, _, state = outer.combine(x, arrivals(replicas, [2, 2, 2]), state)
        peer.grad = peer.detach() - replicas.mean(0)  # the pseudo-gradient, by hand
        optimizer.step()
        torch.testing.assert_close(x, peer.detach(), atol=1e-6, rtol=0)


def test_outer_sgd_nesterov_by_hand():
    # mu = 0.5, lr = 1, x0 = 0. Round 1, replicas at 1: g = -1, v = -1, step g + mu·v = -1.5 -> x = 1.5.
    # Round 2, replicas at 2: g = -0.5, v = 0.5·(-1) - 0.5 = -1, step -0.5 - 0.5 = -1 -> x = 2.5.
    outer = OuterSGD(outer_lr=1.0, momentum=0.5, nesterov=True)
    state = outer.init_state(torch.zeros(1))
    x, _, state = outer.combine(torch.zeros(1), arrivals([[1.0], [1.0]], [1, 1]), state)
    assert torch.allclose(x, torch.tensor([1.5]))
    x, _, state = outer.combine(x, arrivals([[2.0], [2.0]], [1, 1]), state)
    assert torch.allclose(x, torch.tensor([2.5]))


def test_outer_sgd_state_loads_without_unpickling_code_and_resumes_bit_identically(tmp_path):
    outer = OuterSGD(outer_lr=0.7, momentum=0.9, nesterov=True, base="fednova")
    rounds = rounds_of_replicas(6, seed=3)
    x0 = rounds[0][0].clone()

    def run(x, state, replicas):
        for r in replicas:
            x, _, state = outer.combine(x, arrivals(r, [1, 2, 3]), state)
        return x, state

    straight, _ = run(x0, outer.init_state(x0), rounds)
    x, state = run(x0, outer.init_state(x0), rounds[:3])
    torch.save({"x": x, "state": state}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed, _ = run(loaded["x"], loaded["state"], rounds[3:])
    assert torch.equal(resumed, straight)


@pytest.mark.parametrize("params,message", [
    ({"outer_lr": 0.0}, r"aggregator.params.outer_lr: expected a number > 0, got 0.0$"),
    ({"momentum": 1.0}, r"aggregator.params.momentum: expected a number in \[0, 1\), got 1.0$"),
    ({"nesterov": True}, r"aggregator.params.nesterov: needs momentum > 0, got momentum 0.0$"),
    ({"base": "nope"}, r"aggregator.params.base: expected one of \[.*'mean'.*\] or 'module:Class', got 'nope'$"),
    ({"base": "median"}, r"aggregator.params.base: expected an aggregator that is linear .* got 'median'$"),
    ({"base": "outer_sgd"}, r"aggregator.params.base: expected an aggregator that is linear .* got 'outer_sgd'$"),
    ({"base": "test_policies:LegacyMedian"}, r"aggregator.params.base: expected an aggregator that is linear "),
    ({"base": "biased", "base_params": {"strength": -1}}, r"base_params.strength: expected a number >= 0, got -1"),
])
def test_outer_sgd_parameters_are_validated_in_one_line(params, message):
    with pytest.raises(SpecError, match=message) as e:
        build("aggregator", PolicySpec("outer_sgd", params))
    assert "\n" not in str(e.value)


# -- proportional, observed: a running mean of the measured step times --------------------------

def observe(times, rounds, profile=(1.0, 0.5)):
    return [WorkerInfo(k, "cpu", p, t, n) for k, (p, t, n) in enumerate(zip(profile, times, rounds))]


# (observed step time, observed_rounds) of workers 0 and 1 before each of four rounds: worker 1 sits
# round 2 out (its observation does not change, and must not count twice)
OBSERVATIONS = [((None, None), (0, 0)), ((2.0, 0.5), (1, 1)), ((1.0, 0.5), (2, 1)), ((0.6, 1.5), (3, 2))]


@pytest.mark.parametrize("ema_weight,expected", [
    # profile (1, 0.5) -> (4, 8); running means (2, .5) -> 8·.5/2 = 2; (1.5, .5) -> 2.67 -> 3;
    # (3.6/3, 2/2) = (1.2, 1) -> 8·1/1.2 = 6.67 -> 7
    (0.0, [(4, 8), (2, 8), (3, 8), (7, 8)]),
    # EMA, newest weighted .25: worker 0: 2 -> 1.75 -> 1.4625, worker 1: .5 -> .75;
    # round 3: 8·.5/1.75 = 2.29 -> 2, round 4: 8·.75/1.4625 = 4.1 -> 4
    (0.25, [(4, 8), (2, 8), (2, 8), (4, 8)]),
    # weight 1 = the last round only: round 4 (.6, 1.5) -> (8, 3.2 -> 3)
    (1.0, [(4, 8), (2, 8), (4, 8), (8, 3)]),
])
def test_proportional_observed_plans_from_the_running_mean(ema_weight, expected):
    scheduler = Proportional(max_steps=8, source="observed", ema_weight=ema_weight)
    state = scheduler.init_state(observe((None, None), (0, 0)))
    plans = []
    for (times, rounds) in OBSERVATIONS:
        plan, state = scheduler.plan(len(plans) + 1, observe(times, rounds), RNG, state)
        plans.append(plan.local_steps)
    assert plans == expected
    assert state["count"].tolist() == [3, 2] and state["seen_rounds"].tolist() == [3, 2]


def test_proportional_observed_counts_an_observation_once_when_planned_again():
    scheduler = Proportional(max_steps=8, source="observed")
    ws = observe((2.0, 0.5), (1, 1))
    _, state = scheduler.plan(1, ws, RNG, scheduler.init_state(ws))
    _, state = scheduler.plan(2, observe((1.0, 0.5), (2, 1)), RNG, state)
    _, state = scheduler.plan(3, observe((1.0, 0.5), (2, 1)), RNG, state)  # nothing new: planned again
    assert state["mean_step_s"].tolist() == [1.5, 0.5] and state["count"].tolist() == [2, 1]


def test_proportional_observed_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    scheduler = Proportional(max_steps=8, source="observed")
    ws = observe((2.0, 0.5), (1, 1))
    _, state = scheduler.plan(1, ws, RNG, scheduler.init_state(ws))
    torch.save(state, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    nxt = observe((1.0, 0.25), (2, 2))
    assert scheduler.plan(2, nxt, RNG, loaded)[0] == scheduler.plan(2, nxt, RNG, state)[0]


def test_proportional_parameters_are_validated():
    with pytest.raises(ValueError, match=r"ema_weight: expected a number in \[0, 1\]"):
        Proportional(source="observed", ema_weight=1.5)
    with pytest.raises(ValueError, match="ema_weight: only meaningful with source 'observed'"):
        Proportional(ema_weight=0.5)


def test_every_builtins_initial_state_loads_weights_only(tmp_path):
    ws = workers([1.0, 0.5])
    params = {"scheduler:proportional": {"source": "observed"}, "selector:uniform": {"k": 1},
              "selector:speed": {"k": 1}, "selector:utility": {"k": 1}}
    states = {f"{c}:{n}": build(c, PolicySpec(n, params.get(f"{c}:{n}", {})))
              for c in ("scheduler", "sampler", "aggregator", "selector") for n in names(c)}
    for key, policy in states.items():
        category = key.split(":")[0]
        arg = {"scheduler": ws, "sampler": ws[0], "aggregator": torch.zeros(3), "selector": ws}[category]
        torch.save(policy.init_state(arg), tmp_path / "s.pt")
        torch.load(tmp_path / "s.pt", weights_only=True)  # raises on anything but tensors and plain data


# -- the old contract, adapted --------------------------------------------------------------------

@dataclass(frozen=True)
class LegacyKinds(Scheduler):
    """An old-contract scheduler whose parameter names device kinds."""

    kinds: tuple[str, ...] = ("cpu",)
    name_refs = {"kinds": NameRef("kind")}

    def plan(self, round, workers):
        return RoundPlan(tuple(2 if w.kind in self.kinds else 1 for w in workers))


@dataclass(frozen=True)
class LegacyFirst(Sampler):
    """An old-contract sampler: batch(worker, batch_size, stream, scores) -> Batch."""

    uses_scores = False

    def batch(self, worker, batch_size, stream, scores):
        return Batch(stream.take(batch_size), 0)


@dataclass(frozen=True)
class LegacyMedian(Aggregator):
    """An old-contract aggregator overriding combine(global, replicas, contributions) -> (new, weights)."""

    def combine(self, global_params, replicas, contributions):
        return replicas.median(dim=0).values, np.full(len(contributions), 1.0 / len(contributions))


def build_warned(category, name, params=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy = build(category, PolicySpec(name, params or {}))
    return policy, [w for w in caught if issubclass(w.category, HetsimWarning)]


def test_an_old_contract_scheduler_runs_through_the_adapter_with_one_warning():
    policy, caught = build_warned("scheduler", "custom_policy:EveryOther", {"steps": 3})
    assert len(caught) == 1
    assert "custom_policy:EveryOther" in str(caught[0].message)
    assert "'Write your own policy' > 'Migrating from the old contract'" in str(caught[0].message)
    assert policy.plan(0, workers([1, 1, 1]), RNG, None) == (RoundPlan((3, 1, 3)), None)
    assert policy.steps == 3 and not policy.stateful


def test_the_old_contract_warning_shows_once_under_the_clis_filter():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default", HetsimWarning)  # what cli.main installs
        for _ in range(3):
            build("scheduler", PolicySpec("custom_policy:EveryOther"))
    assert len(caught) == 1


def test_an_adapted_policy_keeps_its_name_checks():
    policy, _ = build_warned("scheduler", "test_policies:LegacyKinds", {"kinds": ["tpu"]})
    with pytest.raises(SpecError, match=r"scheduler.params.kinds: expected device kinds of this cluster \('cpu'\), "
                                        r"got 'tpu'"):
        check_names(policy, "scheduler.params", ["cpu"], ["cpu"], 2)


def test_an_old_contract_sampler_runs_through_the_adapter():
    sampler, caught = build_warned("sampler", "test_policies:LegacyFirst")
    twin = EpochStream(10, np.random.default_rng(1))
    batch, state = sampler.batch(workers([1])[0], 4, EpochStream(10, np.random.default_rng(1)), LossScores(10), None)
    assert len(caught) == 1 and list(batch.indices) == list(twin.take(4)) and state is None
    assert sampler.uses_scores is False


def test_an_old_contract_combine_is_adapted_as_a_nonlinear_aggregator():
    aggregator, caught = build_warned("aggregator", "test_policies:LegacyMedian")
    assert len(caught) == 1 and not aggregator.linear and aggregator.needs_previous_global
    new, w, state = aggregator.combine(torch.zeros(1), arrivals([[1.0], [5.0], [2.0]], [1, 1, 1]), None)
    assert torch.equal(new, torch.tensor([2.0])) and np.allclose(w, 1 / 3) and state is None


def test_an_old_contract_aggregator_that_only_gives_weights_needs_no_adapter():
    aggregator, caught = build_warned("aggregator", "custom_policy:NanWhenSteps")
    assert caught == [] and type(aggregator).__name__ == "NanWhenSteps"
    new, w, _ = aggregator.combine(None, arrivals([[1.0], [3.0]], [1, 1]), None)
    assert torch.equal(new, torch.tensor([2.0]))


def test_the_sit_out_plug_ins_give_a_worker_zero_steps():
    ws = workers([1.0, 1.0, 1.0])
    sit_out = build("scheduler", PolicySpec("custom_policy:SitOut", {"worker": 1, "every": 2}))
    assert [sit_out.plan(r, ws, RNG, None)[0].local_steps for r in (1, 2)] == [(2, 2, 2), (2, 0, 2)]
    random = build("scheduler", PolicySpec("custom_policy:RandomSitOut"))
    twin = np.random.default_rng(5)
    draws = [int(twin.integers(3)) for _ in range(4)]  # the same draws, by hand
    rng, state = np.random.default_rng(5), random.init_state(ws)
    for r, out in enumerate(draws, start=1):
        plan, state = random.plan(r, ws, rng, state)
        assert plan.local_steps == tuple(0 if k == out else 2 for k in range(3))
    assert state["sat_out"] == np.bincount(draws, minlength=3).tolist()


# -- review: old-contract detection by what a call can bind, not by counting parameters ----------

@dataclass(frozen=True)
class LegacyKeywordOnly(Scheduler):
    """Old contract, plus a keyword-only option: plan(round, workers, *, steps)."""

    def plan(self, round, workers, *, steps=2):
        return RoundPlan(tuple(steps for _ in workers))


@dataclass(frozen=True)
class LegacyWithDefault(Scheduler):
    """Old contract, plus an optional positional parameter: it cannot take (round, workers, rng, state)."""

    def plan(self, round, workers, steps=3):
        return RoundPlan(tuple(steps for _ in workers))


@dataclass(frozen=True)
class NewWithDefaults(Scheduler):
    """New contract whose rng and state have defaults: it takes the new call, so no adapter."""

    def plan(self, round, workers, rng=None, state=None):
        return RoundPlan(tuple(4 for _ in workers)), state


@dataclass(frozen=True)
class LegacyCombineStarArgs(Aggregator):
    """Old-contract combine(global, replicas, contributions, *extra): no `state` parameter."""

    def combine(self, global_params, replicas, contributions, *extra):
        return replicas.max(dim=0).values, np.full(len(contributions), 1.0 / len(contributions))


@dataclass(frozen=True)
class NeitherShape(Scheduler):
    """plan(round) takes neither the contract's call nor the old one."""

    def plan(self, round):
        return RoundPlan(())


@pytest.mark.parametrize("name,steps", [("LegacyKeywordOnly", 2), ("LegacyWithDefault", 3)])
def test_an_old_contract_plan_with_extra_optional_parameters_is_adapted(name, steps):
    policy, caught = build_warned("scheduler", f"test_policies:{name}")
    assert len(caught) == 1  # adapted: the new call (round, workers, rng, state) would not bind
    assert policy.plan(1, workers([1, 1]), RNG, None) == (RoundPlan((steps, steps)), None)


def test_a_new_contract_plan_whose_rng_and_state_have_defaults_is_not_adapted():
    policy, caught = build_warned("scheduler", "test_policies:NewWithDefaults")
    assert caught == [] and type(policy) is NewWithDefaults
    assert policy.plan(1, workers([1]), RNG, "s") == (RoundPlan((4,)), "s")


def test_an_old_contract_combine_with_star_args_is_adapted():
    aggregator, caught = build_warned("aggregator", "test_policies:LegacyCombineStarArgs")
    assert len(caught) == 1 and not aggregator.linear
    new, _, _ = aggregator.combine(torch.zeros(1), arrivals([[1.0], [5.0]], [1, 1]), None)
    assert torch.equal(new, torch.tensor([5.0]))


def test_a_policy_method_taking_neither_call_shape_is_one_spec_error_on_build():
    with pytest.raises(SpecError, match=r"^scheduler.name: test_policies:NeitherShape: NeitherShape.plan\(self, round\) "
                                        r"takes neither \(round, workers, rng, state\) nor the old contract's "
                                        r"\(round, workers\)$"):
        build("scheduler", PolicySpec("test_policies:NeitherShape"))


# -- review: a server optimizer's combine is a function of its inputs --------------------------------

def test_outer_sgd_combine_leaves_the_state_it_was_given_unchanged():
    # torch.optim's load_state_dict keeps the given tensors (same dtype and device): a step would then
    # update the caller's momentum buffer in place, and replaying a saved state would not repeat the run
    outer = OuterSGD(outer_lr=0.7, momentum=0.9)
    x0 = torch.zeros(3)
    a1, a2 = arrivals(torch.ones(2, 3), [1, 1]), arrivals(torch.full((2, 3), 2.0), [1, 1])
    x1, _, s1 = outer.combine(x0, a1, outer.init_state(x0))
    buffer = s1["optimizer"]["state"][0]["momentum_buffer"].clone()  # g = 0 - 1 = -1: v = -1
    first, _, _ = outer.combine(x1, a2, s1)
    again, _, _ = outer.combine(x1, a2, s1)
    assert torch.equal(s1["optimizer"]["state"][0]["momentum_buffer"], buffer)
    # by hand: x1 = 0.7; g = 0.7 - 2 = -1.3, v = 0.9·(-1) - 1.3 = -2.2, x2 = 0.7 + 0.7·2.2 = 2.24
    assert torch.equal(first, again) and torch.allclose(first, torch.full((3,), 2.24))


def test_outer_sgd_steps_with_its_own_hyperparameters_not_those_saved_in_the_state():
    # a state saved by outer_lr 0.1 (a resumed run whose config changed, --force) must not bring its lr back
    x0 = torch.zeros(1)
    _, _, saved = OuterSGD(outer_lr=0.1, momentum=0.5).combine(x0, arrivals([[1.0]], [1]), OuterSGD(
        outer_lr=0.1, momentum=0.5).init_state(x0))  # v = g = -1
    x, _, _ = OuterSGD(outer_lr=1.0, momentum=0.5).combine(x0, arrivals([[1.0]], [1]), saved)
    # g = -1, v = 0.5·(-1) - 1 = -1.5, x = 0 - 1.0·(-1.5) = 1.5 (lr 0.1 would give 0.15)
    assert torch.allclose(x, torch.tensor([1.5]))


# -- review: arrivals whose columns disagree are refused when built ------------------------------------

@pytest.mark.parametrize("column,bad", [("kinds", ["cpu"]), ("local_steps", [1]), ("samples", [16, 16, 16]),
                                        ("mean_loss", [[0.5, 0.5]])])
def test_arrivals_refuse_a_column_of_another_length(column, bad):
    columns = dict(workers=[0, 1], kinds=["cpu", "gpu"], local_steps=[1, 2], samples=[16, 32],
                   mean_loss=[0.5, 0.25], staleness=[0, 0])
    columns[column] = bad
    with pytest.raises(ValueError, match=rf"^{column}: expected 2 values \(one per arrival\), got shape "):
        Arrivals(**columns, round=1, lr=0.1)


def test_arrivals_of_replicas_refuse_a_flat_tensor():
    # a [P] vector with P == n would otherwise pass the row check and be read as n one-parameter replicas
    with pytest.raises(ValueError, match=r"replicas: expected a \[2, P\] tensor \(one row per contribution\), "
                                         r"got shape \(2,\)"):
        Arrivals.of_replicas(contribs([1, 1]), torch.ones(2))


# -- review: proportional's observed state belongs to one cluster ---------------------------------------

def test_proportional_observed_refuses_a_state_of_another_cluster():
    # a checkpoint of [cpu, gpu] resumed on [gpu, gpu] (a changed config, --force): worker 0's running mean
    # is a cpu's; planning the new gpu from it would silently give it a cpu's share of the steps
    scheduler = Proportional(max_steps=8, source="observed")
    old = [WorkerInfo(0, "cpu", 1.0, 1.0, 1), WorkerInfo(1, "gpu", 0.1, 0.1, 1)]
    _, state = scheduler.plan(1, old, RNG, scheduler.init_state(old))
    new = [WorkerInfo(0, "gpu", 0.1, None, 0), WorkerInfo(1, "gpu", 0.1, None, 0)]
    with pytest.raises(HetsimError, match=r"^proportional: worker 0 is a 'gpu', but the scheduler's state holds a "
                                          r"'cpu' there \(a checkpoint of another cluster\?\); start the run afresh$"):
        scheduler.plan(2, new, RNG, state)


def test_proportional_observed_refuses_a_state_it_did_not_make():
    # e.g. a checkpoint of source 'profile' (state None) resumed with source 'observed'
    with pytest.raises(HetsimError, match=r"^proportional: expected the state of source 'observed' \(a table of "
                                          r"mean_step_s, count, seen_rounds, kinds\), got None"):
        Proportional(source="observed").plan(1, workers([1.0]), RNG, None)


def test_outer_sgd_keeps_the_global_models_dtype_when_the_replicas_have_another():
    # float32 global, float64 replicas: assigning a float64 pseudo-gradient to a float32 parameter raised
    outer = OuterSGD(outer_lr=0.5)
    x = torch.zeros(2)
    new, _, _ = outer.combine(x, Arrivals.of_replicas(contribs([1, 1]), torch.ones(2, 2, dtype=torch.float64)),
                              outer.init_state(x))
    assert new.dtype == torch.float32 and torch.equal(new, torch.full((2,), 0.5))  # 0 - 0.5·(0 - 1)


@pytest.mark.parametrize("base_params,message", [
    ({"strength": 1}, r"^aggregator.params.base_params.strength: unknown key \(mean takes no parameters\)$"),
])
def test_outer_sgd_base_params_errors_name_the_full_key(base_params, message):
    with pytest.raises(SpecError, match=message):
        build("aggregator", PolicySpec("outer_sgd", {"base_params": base_params}))
    with pytest.raises(SpecError, match=r"^aggregator.params.base_params.strength: expected a number >= 0, got -1"):
        build("aggregator", PolicySpec("outer_sgd", {"base": "biased", "base_params": {"strength": -1}}))


def test_proportional_observed_state_loads_weights_only_when_kinds_come_from_numpy(tmp_path):
    # a runner may hand kinds as numpy strings (np.str_ is a str); pickled as such they need unpickling code
    scheduler = Proportional(max_steps=8, source="observed")
    ws = [WorkerInfo(k, np.str_(kind), 1.0, 1.0, 1) for k, kind in enumerate(["cpu", "gpu"])]
    _, state = scheduler.plan(1, ws, RNG, scheduler.init_state(ws))
    torch.save(state, tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True)["kinds"] == ["cpu", "gpu"]


# -- review: a server optimizer's base aggregator has its names checked too ------------------------------

@dataclass(frozen=True)
class KindMean(Aggregator):
    """The mean over the workers of the listed kinds (a linear aggregator whose parameter names kinds)."""

    kinds: tuple[str, ...] = ("cpu",)
    name_refs = {"kinds": NameRef("kind")}

    def weights(self, arrivals):
        b = np.isin(arrivals.kinds, self.kinds) & arrivals.active
        return b / b.sum()


def test_outer_sgd_checks_the_names_its_base_aggregators_parameters_give(tiny_spec):
    # a kind the cluster lacks would make the base weight nobody: refused on load, as for the base alone
    with pytest.raises(SpecError, match=r"^tiny: aggregator.params.base_params.kinds: expected device kinds of this "
                                        r"cluster \('cpu', 'gpu'\), got 'tpu'$"):
        tiny_spec("aggregator={name='outer_sgd', params={base='test_policies:KindMean', base_params={kinds=['tpu']}}}")
    assert tiny_spec("aggregator={name='outer_sgd', params={base='test_policies:KindMean', "
                     "base_params={kinds=['gpu']}}}").aggregator.params["base_params"] == {"kinds": ["gpu"]}


@dataclass(frozen=True)
class FileWeighted(Aggregator):
    """The mean, with a parameter naming a file (relative to the config's folder, like any policy's)."""

    weights_file: str = ""
    name_refs = {"weights_file": NameRef("file")}

    def weights(self, arrivals):
        return arrivals.active / arrivals.active.sum()


def test_outer_sgd_base_params_naming_a_file_are_relative_to_the_config(tmp_path, monkeypatch):
    from hetsim.config import to_toml
    from hetsim.resolve import load_spec
    from conftest import TINY

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "w.txt").write_text("1\n")
    config = tmp_path / "cfg" / "run.toml"
    config.write_text(to_toml({**TINY, "aggregator": {"name": "outer_sgd", "params": {
        "base": "test_policies:FileWeighted", "base_params": {"weights_file": "w.txt"}}}}))
    monkeypatch.chdir(tmp_path)  # not the config's folder: w.txt is not here
    spec = load_spec(config)
    assert spec.aggregator.params["base_params"]["weights_file"] == str(tmp_path / "cfg" / "w.txt")


# -- review: @register never silently replaces another policy ------------------------------------------

def test_register_refuses_a_name_another_policy_holds():
    from hetsim.policies import register

    @dataclass(frozen=True)
    class MyMean(Aggregator):
        def weights(self, arrivals):
            return np.full(len(arrivals), 1.0 / len(arrivals))

    # else every config naming 'mean' (and outer_sgd's default base) would silently run this one
    with pytest.raises(ValueError, match=r"^register: aggregator 'mean' is already hetsim.policies.aggregation.Mean; "
                                         r"choose another name for test_policies.*MyMean$"):
        register("aggregator", "mean")(MyMean)
    assert names("aggregator").count("mean") == 1 and build("aggregator", PolicySpec("mean")) == Mean()


def test_register_again_of_the_same_class_replaces_it():
    # a notebook cell or a module run twice defines the class anew: registering it again is no conflict
    from hetsim.policies import register
    from hetsim.policies.base import policy_class

    made = []
    for _ in range(2):
        @dataclass(frozen=True)
        class Twice(Aggregator):
            def weights(self, arrivals):
                return np.full(len(arrivals), 1.0 / len(arrivals))
        made.append(register("aggregator", "review_twice")(Twice))
    assert policy_class("aggregator", "review_twice", "aggregator") is made[1]
