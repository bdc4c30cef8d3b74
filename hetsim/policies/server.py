"""Server optimizers: the server treats the change the workers propose as a gradient.

Each combination, a base aggregator turns the arrivals into a combined model c (e.g. their mean);
the server optimizer then takes one step of a torch.optim optimizer on the global parameters x
with the *pseudo-gradient* g = x − c (Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 1;
DiLoCo, Douillard et al. 2023, Alg. 1, the "outer optimizer"). With plain SGD at learning rate 1
the step lands exactly on c: the base aggregator alone.

The optimizer runs on the flat vector the workers exchange: every floating-point parameter and
buffer (BatchNorm statistics included), as the base aggregator averages them.
"""

from __future__ import annotations

import copy
import math
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hetsim.errors import SpecError
from hetsim.policies.base import Aggregator, Arrivals, legacy_adapter, policy_class, register


@dataclass(frozen=True)
class ServerOptimizer(Aggregator):
    """One step of `make_optimizer`'s optimizer per combination, on g = x − base.combine(arrivals).

    A subclass gives the optimizer (`make_optimizer`) and validates its own parameters. The state is
    {'optimizer': optimizer.state_dict(), 'base': the base aggregator's state}: tensors and plain data.

    Args:
        base: the aggregator that combines the arrivals (default 'mean'): a registered name or
            'module:Class'; it must be linear.
        base_params: its parameters, e.g. ``{strength = 1.0}`` for base 'biased'.

    The logged weights are the base aggregator's. Linear in the replicas: they are reached only
    through the base aggregator's `arrivals.weighted_sum(w)` (one all_reduce in a backend).
    """

    base: str = "mean"
    base_params: Mapping[str, Any] = field(default_factory=dict)

    linear = True
    stateful = True
    needs_previous_global = True

    def __post_init__(self) -> None:
        try:
            cls = policy_class("aggregator", self.base, "base")
        except SpecError as e:  # "base.name: expected ..." -> "base: expected ...", joined to this policy's key
            raise ValueError(f"base: {str(e).split(': ', 1)[1]}") from None
        # an old-contract combine reads all replicas (its adapter is linear = False)
        if not cls.linear or issubclass(cls, ServerOptimizer) or legacy_adapter("aggregator", cls) is not None:
            raise ValueError(f"base: expected an aggregator that is linear in the replicas and not itself a server "
                             f"optimizer, got {self.base!r}")
        from hetsim.config import build_dataclass

        try:
            inner = build_dataclass(cls, self.base_params, "base_params")
        except SpecError as e:  # "base_params.strength: ..." is the key path below this policy's params
            raise ValueError(str(e)) from None
        object.__setattr__(self, "_base", inner)  # derived from the fields, so equal specs give equal policies

    @property
    def base_aggregator(self) -> Aggregator:
        """The aggregator named by `base` and `base_params`."""
        return self._base  # type: ignore[attr-defined]

    @abstractmethod
    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """A fresh optimizer over `params` (one flat tensor), with this policy's hyperparameters."""

    def init_state(self, global_params: torch.Tensor) -> dict[str, Any]:
        x = global_params.detach().clone()
        return {"optimizer": self.make_optimizer([x]).state_dict(),
                "base": self.base_aggregator.init_state(global_params)}

    def weights(self, arrivals: Arrivals) -> np.ndarray:
        """The base aggregator's weights (what the decisions log shows)."""
        return self.base_aggregator.coefficients(arrivals)[1]

    def coefficients(self, arrivals: Arrivals) -> tuple[float, np.ndarray]:
        raise TypeError(f"{type(self).__name__} is not a fixed linear combination of the replicas: call combine()")

    def combine(self, global_params: torch.Tensor, arrivals: Arrivals,
                state: dict[str, Any]) -> tuple[torch.Tensor, np.ndarray, dict[str, Any]]:
        combined, w, base_state = self.base_aggregator.combine(global_params, arrivals, state["base"])
        x = global_params.detach().clone()
        # the pseudo-gradient: a step against it moves x toward the combined model. On x's device and in
        # its dtype: a gloo backend sums on the CPU while a GPU rank's global model lives on its GPU, and a
        # gradient of another dtype cannot be assigned
        x.grad = x - combined.to(device=x.device, dtype=x.dtype)
        optimizer = self.make_optimizer([x])
        # the saved buffers, copied: load_state_dict keeps the given tensors and step() updates them in
        # place, which would change the caller's state (a replay or a kept checkpoint would not repeat the
        # run); the hyperparameters are this policy's fields, not the ones the state was saved with
        optimizer.load_state_dict({"state": copy.deepcopy(state["optimizer"]["state"]),
                                   "param_groups": optimizer.state_dict()["param_groups"]})
        optimizer.step()
        return x.detach(), w, {"optimizer": optimizer.state_dict(), "base": base_state}


@register("aggregator", "outer_sgd")
@dataclass(frozen=True)
class OuterSGD(ServerOptimizer):
    """DiLoCo's outer step: SGD (with optional Nesterov momentum) on the pseudo-gradient.

    x⁺ = x − outer_lr · v,  v = momentum · v + g  (Nesterov: x⁺ = x − outer_lr · (g + momentum · v)),
    g = x − c, c the base aggregator's combination; torch.optim.SGD's update, dampening 0. DiLoCo uses
    outer_lr 0.7, momentum 0.9, Nesterov. outer_lr 1 and momentum 0 is the base aggregator itself.

    Args:
        outer_lr: the server's learning rate (> 0).
        momentum: the server's momentum in [0, 1) (0: none).
        nesterov: Nesterov momentum (needs momentum > 0).
        base, base_params: see `ServerOptimizer`.

    Example::

        # [aggregator] name = "outer_sgd", params = {outer_lr = 0.7, momentum = 0.9, nesterov = true}
        OuterSGD(outer_lr=0.7, momentum=0.9, nesterov=True, base="mean")
    """

    outer_lr: float = 1.0
    momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        if not self.outer_lr > 0:
            raise ValueError(f"outer_lr: expected a number > 0, got {self.outer_lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: expected a number in [0, 1), got {self.momentum!r}")
        if self.nesterov and not self.momentum > 0:
            raise ValueError(f"nesterov: needs momentum > 0, got momentum {self.momentum!r}")
        super().__post_init__()

    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.outer_lr, momentum=self.momentum, nesterov=self.nesterov)


def _check_server_lr(server_lr: float) -> None:
    if not (server_lr > 0 and math.isfinite(server_lr)):
        raise ValueError(f"server_lr: expected a number > 0, got {server_lr!r}")


def _check_betas(beta1: float, beta2: float) -> None:
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0 <= beta < 1:
            raise ValueError(f"{name}: expected a number in [0, 1), got {beta!r}")


@register("aggregator", "fedavgm")
@dataclass(frozen=True)
class FedAvgM(ServerOptimizer):
    """FedAvgM, server momentum (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data
    Distribution", §3): v = momentum · v + g,  x⁺ = x − server_lr · v,  g = x − c, c the base
    aggregator's combination; torch.optim.SGD's update (dampening 0, no Nesterov: `outer_sgd` has it).
    momentum 0 and server_lr 1 is the base aggregator itself.

    Args:
        server_lr: the server's learning rate (> 0; the paper's effective rate is server_lr/(1−momentum)).
        momentum: the server's momentum β in [0, 1) (the paper uses 0.9 and up).
        base, base_params: see `ServerOptimizer`.

    Example::

        # aggregator = {name = "fedavgm", params = {server_lr = 1.0, momentum = 0.9}}
        FedAvgM(server_lr=1.0, momentum=0.9)
    """

    server_lr: float = 1.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        _check_server_lr(self.server_lr)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: expected a number in [0, 1), got {self.momentum!r}")
        super().__post_init__()

    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.server_lr, momentum=self.momentum)


@register("aggregator", "fedadam")
@dataclass(frozen=True)
class FedAdam(ServerOptimizer):
    """FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 2): Adam on the
    pseudo-gradient g = x − c, with torch.optim.Adam's update (eps = tau):

        m = β₁m + (1−β₁)g,  v = β₂v + (1−β₂)g²,  x⁺ = x − η · m̂ / (√v̂ + τ),
        m̂ = m/(1−β₁ᵗ),  v̂ = v/(1−β₂ᵗ)   (t = this server's step count, from 1).

    The paper's Alg. 2 has no bias correction and adds τ to √v: x⁺ = x − η · m / (√v + τ). torch's
    step equals the paper's with η_t = η·√(1−β₂ᵗ)/(1−β₁ᵗ) and τ_t = τ·√(1−β₂ᵗ); both tend to the
    paper's as t grows (at β₂ = 0.99, within 1% after 390 updates). We follow torch, as the issue asks
    for torch.optim where it fits; the first updates are ≈ η·sign(g) in both when |g| ≫ τ.

    Args:
        server_lr: η (> 0). The paper tunes it per task over 10^-3 .. 10^1 (0.01 is a common best);
            each coordinate moves at most about η per update.
        beta1, beta2: the moments' decay rates in [0, 1) (the paper: 0.9, 0.99).
        tau: the adaptivity τ (> 0; the paper: 1e-3). Smaller is more adaptive.
        base, base_params: see `ServerOptimizer`.

    Example::

        # aggregator = {name = "fedadam", params = {server_lr = 0.01}}
        FedAdam(server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    """

    server_lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        _check_server_lr(self.server_lr)
        _check_betas(self.beta1, self.beta2)
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise ValueError(f"tau: expected a number > 0, got {self.tau!r}")
        super().__post_init__()

    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.server_lr, betas=(self.beta1, self.beta2), eps=self.tau)


class Yogi(torch.optim.Optimizer):
    """Yogi (Zaheer et al. 2018, "Adaptive Methods for Nonconvex Optimization", Alg. 2): Adam with an
    additive second moment, v = v − (1−β₂) · g² · sign(v − g²), so that v grows as fast as Adam's but
    shrinks at most by (1−β₂)g² a step. Written in torch.optim.Adam's form (bias-corrected moments, eps
    added to √v̂), so that `FedYogi` and `FedAdam` differ only in the second moment, as in Reddi et al.
    Alg. 2. torch has no Yogi; this is its `step`, the state is Adam's (`step`, `exp_avg`, `exp_avg_sq`).

    Example::

        x = torch.zeros(3, requires_grad=True)
        opt = Yogi([x], lr=0.01, betas=(0.9, 0.99), eps=1e-3)
        x.grad = torch.ones(3); opt.step()
    """

    def __init__(self, params: Any, lr: float, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-3):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("Yogi.step: a closure is not supported (the server steps on a given gradient)")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if not state:
                    # a plain int step (not Adam's tensor): a checkpoint stores it as plain data
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                g2 = g * g
                v.addcmul_(torch.sign(v - g2), g2, value=-(1 - beta2))
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1 ** t))


@register("aggregator", "fedyogi")
@dataclass(frozen=True)
class FedYogi(FedAdam):
    """FedYogi (Reddi et al. 2021, Alg. 2): `FedAdam` with Yogi's second moment (see `Yogi`),
    v = v − (1−β₂) · g² · sign(v − g²), which keeps the effective rate from growing fast when
    pseudo-gradients shrink. In torch.optim.Adam's form, as `FedAdam` (see there for the paper's).

    Args:
        server_lr: η (> 0). beta1, beta2: in [0, 1) (the paper: 0.9, 0.99). tau: τ (> 0; the paper: 1e-3).
        base, base_params: see `ServerOptimizer`.

    Example::

        # aggregator = {name = "fedyogi", params = {server_lr = 0.01}}
        FedYogi(server_lr=0.01)
    """

    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return Yogi(params, lr=self.server_lr, betas=(self.beta1, self.beta2), eps=self.tau)
