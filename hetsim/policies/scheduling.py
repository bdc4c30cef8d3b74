"""Local-step policies: how many local SGD steps each worker does per round.

The paper's key idea is *system-aware* local SGD: work in proportion to compute capacity, so that
slow and fast devices reach the synchronisation point together (the reference code fixes
GPU_interval = 32 and CPU_interval = 1 by hand).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from hetsim.errors import HetsimError
from hetsim.policies.base import NameRef, RoundPlan, Scheduler, WorkerInfo, register

#: the keys of Proportional's state with source 'observed'
_OBSERVED_STATE = ("mean_step_s", "count", "seen_rounds", "kinds")


@register("scheduler", "sync")
@dataclass(frozen=True)
class Synchronous(Scheduler):
    """Synchronous data-parallel SGD: one local step, then every replica is averaged.

    With mean aggregation and momentum kept per replica this equals mini-batch SGD on the union of
    all workers' batches (momentum and weight decay are linear in the gradient).

    Example::

        Synchronous().plan(0, workers, rng, None)[0].local_steps   # (1, 1, ..., 1)
    """

    static = True

    def plan(self, round: int, workers: Sequence[WorkerInfo], rng: np.random.Generator,
             state: None) -> tuple[RoundPlan, None]:
        return RoundPlan(tuple(1 for _ in workers)), state


@register("scheduler", "fixed")
@dataclass(frozen=True)
class FixedSteps(Scheduler):
    """A fixed number of local steps per round, optionally per device kind.

    Args:
        local_steps: steps of every worker whose kind is not listed in `per_kind`.
        per_kind: steps by device kind, e.g. ``{cpu = 1, gpu = 32}`` — the reference code's
            CPU_interval / GPU_interval. Every key must be a kind of the cluster (checked on load).

    Example::

        FixedSteps(local_steps=8).plan(0, workers, rng, None)                   # plain local SGD, H = 8
        FixedSteps(per_kind={"cpu": 1, "gpu": 32}).plan(0, workers, rng, None)  # reference intervals
    """

    local_steps: int = 1
    per_kind: Mapping[str, int] = field(default_factory=dict)

    name_refs = {"per_kind": NameRef("kind")}  # a kind the cluster lacks would silently get local_steps
    static = True

    def __post_init__(self) -> None:
        for kind, steps in {"local_steps": self.local_steps, **self.per_kind}.items():
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"{kind}: expected an integer >= 1, got {steps!r}")

    def plan(self, round: int, workers: Sequence[WorkerInfo], rng: np.random.Generator,
             state: None) -> tuple[RoundPlan, None]:
        return RoundPlan(tuple(self.per_kind.get(w.kind, self.local_steps) for w in workers)), state


@register("scheduler", "proportional")
@dataclass(frozen=True)
class Proportional(Scheduler):
    """System-aware local SGD: local steps in proportion to each device's throughput.

    The fastest planned worker does `max_steps` (H) steps; worker k does round(H · speed_k / speed_max),
    rounded half up and at least `min_steps`, where speed = 1 / mean step time. With a GPU 32x faster
    than a CPU and H = 32 this gives the reference code's 32 : 1.

    Args:
        max_steps: H, the local steps of the fastest worker per round.
        min_steps: floor for slow workers (>= 1).
        source: 'profile' uses the devices' profiled mean step time (a fixed plan, as the paper);
            'observed' uses what the workers measured: the running mean of each worker's per-round mean
            step times, one term per round it took part in (a round it sat out adds nothing), and its
            profile until its first observation.
        ema_weight: with source 'observed', 0 (default) keeps the plain running mean, which settles
            on the long-run speed; a weight in (0, 1] replaces it by an exponential moving average
            that gives the newest round this weight (1 = the last round only), which follows a device
            whose speed changes (`slowdown`, stragglers) at the price of noisier plans.

    State (source 'observed'): tensors indexed by worker — `mean_step_s` (NaN before the first
    observation), `count` (observations folded in) and `seen_rounds` (the worker's `observed_rounds`
    when last folded in, so an observation is counted once) — and `kinds`, each worker's device kind
    (a state planned with another device at an index, e.g. a checkpoint of another cluster, is an error).

    Example::

        # step times 0.032 s (cpu) and 0.001 s (gpu), H = 32  ->  cpu 1 step, gpu 32 steps
        Proportional(max_steps=32).plan(0, workers, rng, None)[0].local_steps
    """

    max_steps: int = 32
    min_steps: int = 1
    source: str = "profile"
    ema_weight: float = 0.0

    stateful = True  # with source 'observed': the running means (None with 'profile')

    @property
    def static(self) -> bool:  # type: ignore[override]
        """With source 'profile' the plan depends on the profiles alone (see Scheduler.static)."""
        return self.source == "profile"

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps: expected an integer >= 1, got {self.max_steps!r}")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"min_steps: expected an integer in [1, max_steps], got {self.min_steps!r}")
        if self.source not in ("profile", "observed"):
            raise ValueError(f"source: expected 'profile' or 'observed', got {self.source!r}")
        if not 0 <= self.ema_weight <= 1:
            raise ValueError(f"ema_weight: expected a number in [0, 1] (0 = running mean), got {self.ema_weight!r}")
        if self.ema_weight and self.source != "observed":
            raise ValueError(f"ema_weight: only meaningful with source 'observed', got source {self.source!r}")

    def init_state(self, workers: Sequence[WorkerInfo]) -> dict[str, Any] | None:
        if self.source != "observed":
            return None
        n = max((w.index for w in workers), default=-1) + 1
        kinds = [""] * n  # "": a worker not given (it is recorded when first planned)
        for w in workers:
            kinds[w.index] = str(w.kind)  # a plain str: an np.str_ would not load weights_only
        return {"mean_step_s": torch.full((n,), float("nan"), dtype=torch.float64),
                "count": torch.zeros(n, dtype=torch.int64), "seen_rounds": torch.zeros(n, dtype=torch.int64),
                "kinds": kinds}

    def _fold_in(self, idx: np.ndarray, kinds: list[str], observed: np.ndarray, rounds: np.ndarray,
                 state: dict[str, Any]) -> dict[str, Any]:
        """The state with every new observation folded in (new tensors; `state` is untouched). Row i:
        worker idx[i], a `kinds[i]`, measured `observed[i]` s per step (NaN: never), its `rounds[i]`-th
        observation."""
        if not (isinstance(state, Mapping) and all(key in state for key in _OBSERVED_STATE)):
            raise HetsimError(f"proportional: expected the state of source 'observed' (a table of "
                              f"{', '.join(_OBSERVED_STATE)}), got {state!r:.80}")
        # a worker init_state was not given (a runner that plans only the workers online) starts unobserved
        grow = max(0, int(idx.max(initial=-1)) + 1 - len(state["count"]))
        known = list(state["kinds"]) + [""] * grow
        for k, kind in zip(idx.tolist(), kinds):
            if known[k] != kind:
                if known[k]:  # a running mean of another device would plan this one silently wrong
                    raise HetsimError(f"proportional: worker {k} is a {kind!r}, but the scheduler's state holds a "
                                      f"{known[k]!r} there (a checkpoint of another cluster?); start the run afresh")
                known[k] = str(kind)
        mean = np.concatenate([state["mean_step_s"].numpy(), np.full(grow, np.nan)])
        count = np.concatenate([state["count"].numpy(), np.zeros(grow, np.int64)])
        seen = np.concatenate([state["seen_rounds"].numpy(), np.zeros(grow, np.int64)])
        new = (rounds > seen[idx]) & ~np.isnan(observed)
        k, t = idx[new], observed[new]
        count[k] += 1
        weight = self.ema_weight if self.ema_weight else 1.0 / count[k]
        mean[k] = np.where(count[k] == 1, t, mean[k] + weight * (t - mean[k]))  # the first observation starts it
        seen[k] = rounds[new]
        return {"mean_step_s": torch.from_numpy(mean), "count": torch.from_numpy(count),
                "seen_rounds": torch.from_numpy(seen), "kinds": known}

    def plan(self, round: int, workers: Sequence[WorkerInfo], rng: np.random.Generator,
             state: dict[str, Any] | None) -> tuple[RoundPlan, dict[str, Any] | None]:
        if self.source == "observed":
            # one pass over the workers: (index, profile, observed or NaN, observed_rounds) per row
            rows = np.array([(w[0], w[2], np.nan if w[3] is None else w[3], w[4]) for w in workers],
                            dtype=np.float64).reshape(-1, 4)
            idx, rounds = rows[:, 0].astype(np.int64), rows[:, 3].astype(np.int64)
            state = self._fold_in(idx, [w[1] for w in workers], rows[:, 2], rounds, state)
            running = state["mean_step_s"].numpy()[idx]
            times = np.where(np.isnan(running), rows[:, 1], running)  # the profile until a worker's first observation
        else:
            times = np.array([w.profile_step_time_s for w in workers], dtype=np.float64)
        steps = np.maximum(self.min_steps, np.floor(self.max_steps * times.min() / times + 0.5))
        return RoundPlan(tuple(steps.astype(np.int64).tolist())), state


@register("scheduler", "time_budget")
@dataclass(frozen=True)
class TimeBudget(Scheduler):
    """Every worker trains for `budget_s` seconds per round, then all synchronise.

    The runner turns the budget into steps as they complete: a worker starts another step while less
    than `budget_s` has elapsed since the round began, so it does at least one step and the last step
    may run past the budget. Needs no profile and adapts to speed changes by construction.

    Example::

        TimeBudget(budget_s=0.05).plan(0, workers, rng, None)[0].time_budget_s   # 0.05
    """

    budget_s: float = 0.1

    static = True

    def __post_init__(self) -> None:
        if not self.budget_s > 0:
            raise ValueError(f"budget_s: expected a number of seconds > 0, got {self.budget_s!r}")

    def plan(self, round: int, workers: Sequence[WorkerInfo], rng: np.random.Generator,
             state: None) -> tuple[RoundPlan, None]:
        return RoundPlan(tuple(None for _ in workers), time_budget_s=self.budget_s), state
