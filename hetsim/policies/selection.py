"""Participation: which online workers take part in a round (client selection).

The selector runs at the top of every round of a barrier or semi-synchronous protocol, before the
scheduler; the workers it leaves out sit the round out (no work, no arrival). Every built-in takes
`k`, the number of participants per round: 1 <= k <= the cluster's workers (checked on load). When
fewer than k workers are online in a round, all of the online ones take part.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hetsim.policies.base import Contributions, Selector, WorkerInfo, register


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an integer >= 1, got {k!r}")


def _check_k_of(k: int, n_workers: int) -> None:
    if k > n_workers:
        raise ValueError(f"k: expected 1 <= k <= {n_workers} (the cluster's workers), got {k}")


def step_times(workers: Sequence[WorkerInfo], source: str) -> np.ndarray:
    """Each worker's step time: its profile's mean, or (source 'observed') the mean it measured in its
    latest round, the profile's before its first."""
    if source == "profile":
        return np.array([w.profile_step_time_s for w in workers], dtype=np.float64)
    return np.array([w.profile_step_time_s if w.observed_step_time_s is None else w.observed_step_time_s
                     for w in workers], dtype=np.float64)


def _check_source(source: str) -> None:
    if source not in ("profile", "observed"):
        raise ValueError(f"source: expected 'profile' or 'observed', got {source!r}")


@register("selector", "all")
@dataclass(frozen=True)
class All(Selector):
    """Every online worker takes part (the default: today's barrier round)."""

    def select(self, round: int, workers: Sequence[WorkerInfo], rng: np.random.Generator,
               state: Any) -> tuple[np.ndarray, Any]:
        return np.arange(len(workers)), state


@register("selector", "uniform")
@dataclass(frozen=True)
class Uniform(Selector):
    """k of the n online workers, uniformly at random without replacement (FedAvg's client sampling,
    McMahan et al. 2017, Alg. 1: "S_t ← random set of m clients"), drawn from the driver's seeded RNG.

    Args:
        k: participants per round (1 <= k <= the cluster's workers).

    Example::

        # selector = {name = "uniform", params = {k = 4}}
        Uniform(k=4).select(1, workers, np.random.default_rng(0), None)[0]   # 4 distinct indices
    """

    k: int

    def __post_init__(self) -> None:
        _check_k(self.k)

    def check_workers(self, n_workers: int) -> None:
        _check_k_of(self.k, n_workers)

    def select(self, round: int, workers: Sequence[WorkerInfo], rng: np.random.Generator,
               state: Any) -> tuple[np.ndarray, Any]:
        n = len(workers)
        if self.k >= n:
            return np.arange(n), state
        return np.sort(rng.choice(n, size=self.k, replace=False)), state


@register("selector", "speed")
@dataclass(frozen=True)
class Speed(Selector):
    """The k fastest online workers: the lowest step times (ties: the lower worker index).

    Deterministic: under `source = "profile"` the same k workers take part every round (drop the
    stragglers, e.g. "the GPUs alone"); under "observed" a worker's latest measured step time replaces
    its profile's once it has taken part (a worker that is never picked keeps its profile's).

    Args:
        k: participants per round (1 <= k <= the cluster's workers).
        source: 'profile' (the profile's mean step time) or 'observed' (the latest measured one).

    Example::

        # selector = {name = "speed", params = {k = 8}}
        Speed(k=2).select(1, workers, rng, None)[0]   # step times [0.01, 0.002, 0.005, 0.002] -> [1, 3]
    """

    k: int
    source: str = "profile"

    def __post_init__(self) -> None:
        _check_k(self.k)
        _check_source(self.source)

    def check_workers(self, n_workers: int) -> None:
        _check_k_of(self.k, n_workers)

    def select(self, round: int, workers: Sequence[WorkerInfo], rng: np.random.Generator,
               state: Any) -> tuple[np.ndarray, Any]:
        t = step_times(workers, self.source)
        return np.sort(np.argsort(t, kind="stable")[:self.k]), state


@register("selector", "utility")
@dataclass(frozen=True)
class Utility(Selector):
    """Guided participant selection in the spirit of Oort (Lai et al., OSDI'21, §4.2, eq. 2): the k
    workers of highest utility, some slots explored at random.

    Utility of worker i:  U_i = L_i · (T / t_i)^(1(t_i > T) · alpha)
      - L_i, statistical utility: the mean training loss of i's latest contribution (Oort uses
        |B_i|·sqrt(mean of its samples' squared losses); hetsim keeps each worker's mean loss). A worker
        that has never contributed has U_i = +inf, so every worker is tried once (the unseen in order of
        speed, then index);
      - t_i, i's step time (measured in its latest round, else its profile's): under the fixed and
        sync schedulers a round's duration is proportional to it; T, the preferred step time
        (`preferred_s`; 0: the k-th lowest step time among the online workers this round, so the k
        fastest carry no penalty); a worker slower than T is discounted by (T/t_i)^alpha.
    Exploration (Oort's ε-greedy): each of the k slots is, with probability epsilon, given to a worker
    drawn uniformly from those not already picked; the others go to the highest utilities (ties: lower
    step time, then lower index). Oort decays ε from 0.9 to 0.2; here it is fixed, and Oort's
    staleness bonus and pacer are not modelled. Time-only runs have no losses (every worker reports the
    same stand-in loss), so there the choice is by the system factor.

    State: each worker's latest mean loss, a float64 tensor (NaN: not seen yet).

    Args:
        k: participants per round (1 <= k <= the cluster's workers).
        alpha: the straggler penalty exponent (>= 0; 0: speed does not matter). Oort's default is 2.
        epsilon: the share of slots explored at random, in [0, 1].
        preferred_s: the preferred step time T in seconds (> 0), or 0 (the k-th lowest, each round).

    Example::

        # selector = {name = "utility", params = {k = 4, alpha = 2.0, epsilon = 0.1}}
        Utility(k=4, alpha=2.0, epsilon=0.1)
    """

    k: int
    alpha: float = 2.0
    epsilon: float = 0.1
    preferred_s: float = 0.0

    stateful = True

    def __post_init__(self) -> None:
        _check_k(self.k)
        if not self.alpha >= 0:
            raise ValueError(f"alpha: expected a number >= 0, got {self.alpha!r}")
        if not 0 <= self.epsilon <= 1:
            raise ValueError(f"epsilon: expected a number in [0, 1], got {self.epsilon!r}")
        if not (self.preferred_s >= 0 and math.isfinite(self.preferred_s)):
            raise ValueError(f"preferred_s: expected a number of seconds > 0, or 0 (the k-th lowest step "
                             f"time), got {self.preferred_s!r}")

    def check_workers(self, n_workers: int) -> None:
        _check_k_of(self.k, n_workers)

    def init_state(self, workers: Sequence[WorkerInfo]) -> dict[str, torch.Tensor]:
        return {"loss": torch.full((len(workers),), math.nan, dtype=torch.float64)}

    def observe(self, round: int, arrivals: Contributions, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = Contributions.of(arrivals)
        active = c.active  # a 0-step row trained nothing: its loss says nothing
        loss = state["loss"].clone()  # not in place: the caller's state (a kept checkpoint) stays as it was
        loss[torch.as_tensor(c.workers[active], dtype=torch.int64)] = torch.as_tensor(c.mean_loss[active],
                                                                                       dtype=torch.float64)
        return {"loss": loss}

    def utilities(self, workers: Sequence[WorkerInfo], state: dict[str, torch.Tensor]) -> np.ndarray:
        """U_i of each of `workers` (+inf for a worker not seen yet)."""
        t = step_times(workers, "observed")
        k = min(self.k, len(workers))
        preferred = self.preferred_s or float(np.partition(t, k - 1)[k - 1])
        system = np.where(t > preferred, (preferred / t) ** self.alpha, 1.0)
        loss = state["loss"].numpy()[np.array([w.index for w in workers], dtype=np.int64)]
        return np.where(np.isnan(loss), np.inf, loss * system)

    def select(self, round: int, workers: Sequence[WorkerInfo], rng: np.random.Generator,
               state: dict[str, torch.Tensor]) -> tuple[np.ndarray, Any]:
        n = len(workers)
        if self.k >= n:
            return np.arange(n), state
        u, t = self.utilities(workers, state), step_times(workers, "observed")
        ranked = np.lexsort((np.arange(n), t, -u))  # the last key sorts first: utility, step time, index
        explore = int(rng.binomial(self.k, self.epsilon)) if self.epsilon > 0 else 0
        chosen = ranked[:self.k - explore]
        if explore:
            rest = np.setdiff1d(np.arange(n), chosen)
            chosen = np.concatenate([chosen, rng.choice(rest, size=explore, replace=False)])
        return np.sort(chosen), state
