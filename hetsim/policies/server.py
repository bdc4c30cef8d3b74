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
        x.grad = x - combined  # the pseudo-gradient: a step against it moves x toward the combined model
        optimizer = self.make_optimizer([x])
        optimizer.load_state_dict(state["optimizer"])
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
