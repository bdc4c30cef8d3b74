"""Every policy against hand-computed values."""

import numpy as np
import pytest
import torch

from hetsim.config import PolicySpec
from hetsim.errors import SpecError
from hetsim.policies import Contribution, WorkerInfo, build
from hetsim.policies.aggregation import Biased, FedNova, Mean, SampleWeighted
from hetsim.policies.sampling import EpochStream, LossBiasedTopK, LossScores, Uniform
from hetsim.policies.scheduling import FixedSteps, Proportional, Synchronous, TimeBudget


RNG = np.random.default_rng(0)


def workers(times, kinds=None, observed=None):
    kinds = kinds or ["cpu"] * len(times)
    observed = observed or [None] * len(times)
    return [WorkerInfo(i, k, t, o) for i, (t, k, o) in enumerate(zip(times, kinds, observed))]


# -- scheduling ------------------------------------------------------------------------------

def test_sync_plans_one_step_each():
    assert Synchronous().plan(0, workers([0.1, 0.2, 0.3])).local_steps == (1, 1, 1)


def test_fixed_steps_per_kind_and_default():
    ws = workers([1, 1, 1], ["cpu", "gpu", "tpu"])
    assert FixedSteps(local_steps=4, per_kind={"cpu": 1, "gpu": 32}).plan(0, ws).local_steps == (1, 32, 4)


def test_fixed_steps_rejects_zero():
    with pytest.raises(ValueError, match="gpu"):
        FixedSteps(per_kind={"gpu": 0})


def test_proportional_matches_hand_computation():
    # fastest 0.001 s does H = 32; 0.002 -> 16; 0.0045 -> 32/4.5 = 7.11 -> 7; 0.032 -> 1
    ws = workers([0.032, 0.001, 0.002, 0.0045])
    assert Proportional(max_steps=32).plan(0, ws).local_steps == (1, 32, 16, 7)


def test_proportional_rounds_half_up_and_respects_min_steps():
    ws = workers([1.0, 2.0, 100.0])  # H=5: 5, 2.5 -> 3, 0.05 -> 0 -> min 2
    assert Proportional(max_steps=5, min_steps=2).plan(0, ws).local_steps == (5, 3, 2)


def test_proportional_observed_source_uses_measured_times_when_present():
    ws = [WorkerInfo(0, "cpu", 1.0, 1.0, 1), WorkerInfo(1, "cpu", 1.0, 4.0, 1)]
    observed = Proportional(max_steps=8, source="observed")
    assert observed.plan(0, ws, RNG, observed.init_state(ws))[0].local_steps == (8, 2)
    assert Proportional(max_steps=8, source="profile").plan(0, ws, RNG, None)[0].local_steps == (8, 8)


def test_time_budget_plan():
    plan = TimeBudget(budget_s=0.05).plan(3, workers([1, 2]))
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
        batch = sampler.batch(workers([1])[0], 3, s, scores)
        assert len(set(batch.indices.tolist())) == 3


def test_uniform_takes_the_next_indices_of_the_stream():
    twin = EpochStream(20, np.random.default_rng(5))
    s = EpochStream(20, np.random.default_rng(5))
    batch = Uniform().batch(workers([1])[0], 6, s, LossScores(20))
    assert list(batch.indices) == list(twin.take(6)) and batch.n_biased == 0


def test_loss_topk_keeps_highest_scores_of_the_candidate_pool():
    twin = EpochStream(8, np.random.default_rng(1))
    pool = twin.take(4)  # sample_ratio 2 x batch 2
    scores = LossScores(8)
    scores.values[:] = np.arange(8) * 1.0  # score = index
    s = EpochStream(8, np.random.default_rng(1))
    batch = LossBiasedTopK(sample_ratio=2, kinds=("cpu",)).batch(workers([1])[0], 2, s, scores)
    assert sorted(batch.indices) == sorted(pool)[-2:]
    assert batch.n_biased == 2


def test_loss_topk_prefers_unseen_samples():
    scores = LossScores(8)
    scores.values[:] = 1.0
    scores.values[[2, 5]] = np.inf
    s = EpochStream(8, np.random.default_rng(0))
    batch = LossBiasedTopK(sample_ratio=4, kinds=("*",)).batch(workers([1])[0], 2, s, scores)  # pool = all 8
    assert sorted(batch.indices) == [2, 5]


def test_loss_topk_only_biases_listed_kinds():
    s = EpochStream(8, np.random.default_rng(0))
    gpu = workers([1], ["gpu"])[0]
    batch = LossBiasedTopK(kinds=("cpu",)).batch(gpu, 4, s, LossScores(8))
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


def test_mean_weights_and_combination():
    w = Mean().weights(contribs([1, 1, 3, 3]))
    assert np.allclose(w, 0.25)
    g, used = Mean().combine(torch.zeros(2), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), contribs([1, 1]))
    assert torch.allclose(g, torch.tensor([2.0, 3.0])) and np.allclose(used, 0.5)


def test_sample_weighted():
    assert np.allclose(SampleWeighted().weights(contribs([1, 3], samples=[16, 48])), [0.25, 0.75])


def test_fednova_hand_example():
    # tau = (1, 3), samples (16, 48): p = (.25, .75), tau_eff = 2.5, c = 2.5 * (.25/1, .75/3) = (.625, .625)
    c = contribs([1, 3], samples=[16, 48])
    assert np.allclose(FedNova().weights(c), [0.625, 0.625])
    # x+ = x - tau_eff * sum p_k (x - x_k) / tau_k with x = 0, x_1 = 1, x_2 = 2  ->  1.875
    g, _ = FedNova().combine(torch.zeros(1), torch.tensor([[1.0], [2.0]]), c)
    assert torch.allclose(g, torch.tensor([1.875]))


def test_biased_family():
    c = contribs([1, 3], losses=[2.0, 1.0])
    assert np.allclose(Biased(strength=0).weights(c), [0.5, 0.5])  # zero strength = uniform mean
    assert np.allclose(Biased(strength=1).weights(c), [0.25, 0.75])
    assert np.allclose(Biased(strength=2).weights(c), [0.1, 0.9])
    assert np.allclose(Biased(strength=1, basis="loss").weights(c), [2 / 3, 1 / 3])


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
    policy = build("scheduler", PolicySpec("custom_policy:EveryOther", {"steps": 3}))
    assert policy.plan(0, workers([1, 1, 1])).local_steps == (3, 1, 3)
    with pytest.raises(SpecError, match="cannot import"):
        build("scheduler", PolicySpec("custom_policy:Missing"))
