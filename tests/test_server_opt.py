"""Server optimizers (hetsim/policies/server.py): FedAvgM, FedAdam and FedYogi against independent
computations (torch.optim stepped by hand on the pseudo-gradient; Yogi by a numpy loop), their
parameter errors, and their state across a crash and resume of the simulator."""

import math

import numpy as np
import pytest
import torch

from hetsim.config import PolicySpec
from hetsim.errors import SpecError
from hetsim.policies import Arrivals, Contribution, build
from hetsim.policies.server import FedAdam, FedAvgM, FedYogi, Yogi
from hetsim.results import CHECKPOINT, load_checkpoint
from hetsim.sim import Simulation


def arrivals(replicas, steps):
    c = [Contribution(i, "x", s, 16 * s, 1.0) for i, s in enumerate(steps)]
    return Arrivals.of_replicas(c, torch.as_tensor(replicas, dtype=torch.float32))


def rounds_of_replicas(n_rounds, n_workers=3, size=300, seed=0):
    """Replicas near a moving point whose steps shrink and change sign (so Yogi's v both grows and shrinks)."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(size, generator=g) * 0.1
    out = []
    for r in range(n_rounds):
        centre = centre + 0.05 / (1 + r) * torch.randn(size, generator=g)
        out.append(centre + 0.01 * torch.randn(n_workers, size, generator=g))
    return out


def run_policy(policy, x0, rounds, steps=(1, 2, 3)):
    x, state = x0.clone(), policy.init_state(x0)
    for replicas in rounds:
        x, _, state = policy.combine(x, arrivals(replicas, list(steps)), state)
    return x, state


# -- against torch.optim stepped by hand ---------------------------------------------------------

@pytest.mark.parametrize("policy,make_peer", [
    (FedAvgM(server_lr=0.8, momentum=0.9), lambda p: torch.optim.SGD([p], lr=0.8, momentum=0.9)),
    (FedAdam(server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3),
     lambda p: torch.optim.Adam([p], lr=0.01, betas=(0.9, 0.99), eps=1e-3)),
    (FedAdam(server_lr=0.05, beta1=0.5, beta2=0.9, tau=1e-2),
     lambda p: torch.optim.Adam([p], lr=0.05, betas=(0.5, 0.9), eps=1e-2)),
], ids=["fedavgm", "fedadam", "fedadam-other-hyperparameters"])
def test_server_optimizer_is_torch_optim_on_the_mean_pseudo_gradient(policy, make_peer):
    rounds = rounds_of_replicas(6, seed=1)
    x0 = rounds[0][0].clone()
    peer = x0.clone()
    optimizer = make_peer(peer)
    x, state = x0.clone(), policy.init_state(x0)
    for replicas in rounds:
        x, w, state = policy.combine(x, arrivals(replicas, [1, 2, 3]), state)
        peer.grad = peer.detach() - replicas.mean(0)  # g = x − mean of the replicas
        optimizer.step()
        torch.testing.assert_close(x, peer.detach(), atol=1e-6, rtol=0)
        assert np.allclose(w, 1 / 3)  # the base aggregator's weights are logged


def test_fedavgm_by_hand():
    # lr 1, momentum 0.5, x0 = 0. Round 1, replicas at 1: g = -1, v = -1 -> x = 1.
    # Round 2, replicas at 3: g = -2, v = 0.5·(-1) - 2 = -2.5 -> x = 3.5.
    policy = FedAvgM(server_lr=1.0, momentum=0.5)
    state = policy.init_state(torch.zeros(1))
    x, _, state = policy.combine(torch.zeros(1), arrivals([[1.0], [1.0]], [1, 1]), state)
    assert torch.allclose(x, torch.tensor([1.0]))
    x, _, state = policy.combine(x, arrivals([[3.0], [3.0]], [1, 1]), state)
    assert torch.allclose(x, torch.tensor([3.5]))


def test_fedadam_first_update_by_hand():
    # t = 1: m̂ = g, v̂ = g² (bias-corrected), so x1 = x0 − η·g/(|g| + τ). x0 = 0, replicas at c = (2, −0.5):
    # g = −c, x1 = η·c/(|c| + τ)
    policy = FedAdam(server_lr=0.1, tau=1e-3)
    c = torch.tensor([2.0, -0.5])
    x, _, state = policy.combine(torch.zeros(2), arrivals([c.tolist(), c.tolist()], [1, 1]),
                                 policy.init_state(torch.zeros(2)))
    torch.testing.assert_close(x, 0.1 * c / (c.abs() + 1e-3), atol=1e-7, rtol=0)
    assert int(state["optimizer"]["state"][0]["step"]) == 1


def test_fedadam_with_another_base_aggregator_steps_on_its_combination():
    # base 'samples': the pseudo-gradient is x − Σ (m_k/Σm) x_k with samples 16, 32, 48
    rounds = rounds_of_replicas(4, seed=4)
    x0 = rounds[0][0].clone()
    peer = x0.clone()
    optimizer = torch.optim.Adam([peer], lr=0.01, betas=(0.9, 0.99), eps=1e-3)
    x, _ = run_policy(FedAdam(base="samples"), x0, rounds)
    w = torch.tensor([1 / 6, 2 / 6, 3 / 6])
    for replicas in rounds:
        peer.grad = peer.detach() - w @ replicas
        optimizer.step()
    torch.testing.assert_close(x, peer.detach(), atol=1e-6, rtol=0)


# -- Yogi against a numpy loop -------------------------------------------------------------------

def yogi_by_hand(x0, rounds, lr, beta1, beta2, eps):
    """Zaheer et al. 2018's Yogi in torch.optim.Adam's form (bias-corrected, eps added to √v̂), float64."""
    x = x0.astype(np.float64)
    m, v = np.zeros_like(x), np.zeros_like(x)
    for t, replicas in enumerate(rounds, start=1):
        g = x - replicas.astype(np.float64).mean(axis=0)
        m = beta1 * m + (1 - beta1) * g
        v = v - (1 - beta2) * g * g * np.sign(v - g * g)
        m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
        x = x - lr * m_hat / (np.sqrt(v_hat) + eps)
    return x, m, v


@pytest.mark.parametrize("lr,beta1,beta2,eps", [(0.01, 0.9, 0.99, 1e-3), (0.1, 0.5, 0.9, 1e-2)])
def test_fedyogi_is_yogi_by_hand(lr, beta1, beta2, eps):
    rounds = rounds_of_replicas(8, seed=2)
    x0 = rounds[0][0].clone()
    x, state = run_policy(FedYogi(server_lr=lr, beta1=beta1, beta2=beta2, tau=eps), x0, rounds)
    expected, m, v = yogi_by_hand(x0.numpy(), [r.numpy() for r in rounds], lr, beta1, beta2, eps)
    np.testing.assert_allclose(x.numpy(), expected, rtol=0, atol=1e-6)
    saved = state["optimizer"]["state"][0]
    np.testing.assert_allclose(saved["exp_avg_sq"].numpy(), v, rtol=1e-4, atol=1e-9)
    assert saved["step"] == len(rounds)


def test_yogi_second_moment_shrinks_additively_where_adams_decays():
    # g1 = 1, g2 = 0.1 (beta2 0.9): Adam's v = 0.9·0.1 + 0.1·0.01 = 0.091; Yogi's v = 0.1 − 0.1·0.01·sign(0.1 − 0.01)
    # = 0.099 (it shrinks by at most (1 − beta2)·g²)
    p = torch.zeros(1)
    yogi = Yogi([p], lr=0.01, betas=(0.9, 0.9), eps=1e-3)
    for g in (1.0, 0.1):
        p.grad = torch.tensor([g])
        yogi.step()
    assert math.isclose(float(yogi.state[p]["exp_avg_sq"]), 0.099, rel_tol=1e-6)
    # and grows by (1 − beta2)·g² when g² > v: v = 0.099 + 0.1·4 (Adam's: by (1 − beta2)·(g² − v))
    p.grad = torch.tensor([2.0])
    yogi.step()
    assert math.isclose(float(yogi.state[p]["exp_avg_sq"]), 0.099 + 0.1 * 4, rel_tol=1e-6)


def test_fedadam_and_fedyogi_differ_only_in_the_second_moment():
    # the first update is the same (v starts at 0: Yogi's v = (1 − β₂)g² as Adam's); later ones differ
    rounds = rounds_of_replicas(3, seed=5)
    x0 = rounds[0][0].clone()
    one_adam, _ = run_policy(FedAdam(), x0, rounds[:1])
    one_yogi, _ = run_policy(FedYogi(), x0, rounds[:1])
    torch.testing.assert_close(one_adam, one_yogi, atol=1e-7, rtol=0)
    assert not torch.allclose(run_policy(FedAdam(), x0, rounds)[0], run_policy(FedYogi(), x0, rounds)[0],
                              atol=1e-7, rtol=0)


# -- state: saved without code, resumed bit-identically ---------------------------------------------

@pytest.mark.parametrize("policy", [FedAvgM(), FedAdam(), FedYogi(base="fednova")],
                         ids=["fedavgm", "fedadam", "fedyogi"])
def test_server_optimizer_state_loads_weights_only_and_continues_bit_identically(tmp_path, policy):
    rounds = rounds_of_replicas(6, seed=3)
    x0 = rounds[0][0].clone()
    straight, _ = run_policy(policy, x0, rounds)
    x, state = run_policy(policy, x0, rounds[:3])
    torch.save({"x": x, "state": state}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # raises on anything but tensors and plain data
    resumed, s = loaded["x"], loaded["state"]
    for replicas in rounds[3:]:
        resumed, _, s = policy.combine(resumed, arrivals(replicas, [1, 2, 3]), s)
    assert torch.equal(resumed, straight)


def test_server_optimizer_combine_leaves_the_state_it_was_given_unchanged():
    policy = FedYogi()
    rounds = rounds_of_replicas(2, seed=6)
    x, state = run_policy(policy, rounds[0][0], rounds[:1])
    kept = {k: v.clone() for k, v in state["optimizer"]["state"][0].items() if isinstance(v, torch.Tensor)}
    policy.combine(x, arrivals(rounds[1], [1, 2, 3]), state)
    assert all(torch.equal(state["optimizer"]["state"][0][k], v) for k, v in kept.items())
    assert state["optimizer"]["state"][0]["step"] == 1


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("aggregator", [
    "{name='fedavgm', params={server_lr=0.9, momentum=0.9}}",
    "{name='fedadam', params={server_lr=0.01}}",
    "{name='fedyogi', params={server_lr=0.01, base='samples'}}",
])
def test_server_optimizer_state_resumes_bit_identically_in_the_simulator(tiny_spec, tmp_path, aggregator):
    spec = tiny_spec(f"aggregator={aggregator}", "stop.max_rounds=6", "run.checkpoint_every=2")
    whole = Simulation(spec)
    expected = whole.run()

    def crash(row):
        if row["round"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        Simulation(spec, tmp_path, progress=crash).run()
    state = load_checkpoint(tmp_path / CHECKPOINT, "sim", spec).state
    assert state["round"] == 2
    # the checkpoint holds the optimizer's moments after 2 updates, not a fresh state
    assert state["run"]["aggregator_state"]["optimizer"]["state"]
    resumed = Simulation(spec, tmp_path, resume=True)
    got = resumed.run()
    assert torch.equal(resumed.core.global_params(), whole.core.global_params())
    assert list(got.decisions) == list(expected.decisions)
    assert np.array_equal(np.asarray(got.metrics["test_acc"], dtype=float),
                          np.asarray(expected.metrics["test_acc"], dtype=float), equal_nan=True)


# -- parameters -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params,message", [
    ("fedavgm", {"server_lr": 0.0}, r"aggregator.params.server_lr: expected a number > 0, got 0.0$"),
    ("fedavgm", {"momentum": 1.0}, r"aggregator.params.momentum: expected a number in \[0, 1\), got 1.0$"),
    ("fedadam", {"server_lr": -1.0}, r"aggregator.params.server_lr: expected a number > 0, got -1.0$"),
    ("fedadam", {"beta1": 1.0}, r"aggregator.params.beta1: expected a number in \[0, 1\), got 1.0$"),
    ("fedadam", {"beta2": -0.1}, r"aggregator.params.beta2: expected a number in \[0, 1\), got -0.1$"),
    ("fedadam", {"tau": 0.0}, r"aggregator.params.tau: expected a number > 0, got 0.0$"),
    ("fedyogi", {"tau": -1e-3}, r"aggregator.params.tau: expected a number > 0, got -0.001$"),
    ("fedyogi", {"beta2": 1.5}, r"aggregator.params.beta2: expected a number in \[0, 1\), got 1.5$"),
    ("fedyogi", {"base": "median"}, r"aggregator.params.base: expected an aggregator that is linear .* got 'median'$"),
])
def test_server_optimizer_parameters_are_validated_in_one_line(name, params, message):
    with pytest.raises(SpecError, match=message) as e:
        build("aggregator", PolicySpec(name, params))
    assert "\n" not in str(e.value)


def test_defaults_are_the_papers():
    assert (FedAdam().beta1, FedAdam().beta2, FedAdam().tau) == (0.9, 0.99, 1e-3)   # Reddi et al. 2021
    assert (FedYogi().beta1, FedYogi().beta2, FedYogi().tau) == (0.9, 0.99, 1e-3)
    assert FedAvgM().momentum == 0.9                                                  # Hsu et al. 2019
    assert all(cls.stateful and cls.linear and cls.needs_previous_global for cls in (FedAvgM, FedAdam, FedYogi))
