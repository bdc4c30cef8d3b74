"""Local-step policies: how many local SGD steps each worker does per round.

The paper's key idea is *system-aware* local SGD: work in proportion to compute capacity, so that
slow and fast devices reach the synchronisation point together (the reference code fixes
GPU_interval = 32 and CPU_interval = 1 by hand).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from hetsim.policies.base import NameRef, RoundPlan, Scheduler, WorkerInfo, register


@register("scheduler", "sync")
@dataclass(frozen=True)
class Synchronous(Scheduler):
    """Synchronous data-parallel SGD: one local step, then every replica is averaged.

    With mean aggregation and momentum kept per replica this equals mini-batch SGD on the union of
    all workers' batches (momentum and weight decay are linear in the gradient).

    Example::

        Synchronous().plan(0, workers).local_steps   # (1, 1, ..., 1)
    """

    def plan(self, round: int, workers: Sequence[WorkerInfo]) -> RoundPlan:
        return RoundPlan(tuple(1 for _ in workers))


@register("scheduler", "fixed")
@dataclass(frozen=True)
class FixedSteps(Scheduler):
    """A fixed number of local steps per round, optionally per device kind.

    Args:
        local_steps: steps of every worker whose kind is not listed in `per_kind`.
        per_kind: steps by device kind, e.g. ``{cpu = 1, gpu = 32}`` — the reference code's
            CPU_interval / GPU_interval. Every key must be a kind of the cluster (checked on load).

    Example::

        FixedSteps(local_steps=8).plan(0, workers)                      # plain local SGD, H = 8
        FixedSteps(per_kind={"cpu": 1, "gpu": 32}).plan(0, workers)     # reference intervals
    """

    local_steps: int = 1
    per_kind: Mapping[str, int] = field(default_factory=dict)

    name_refs = {"per_kind": NameRef("kind")}  # a kind the cluster lacks would silently get local_steps

    def __post_init__(self) -> None:
        for kind, steps in {"local_steps": self.local_steps, **self.per_kind}.items():
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"{kind}: expected an integer >= 1, got {steps!r}")

    def plan(self, round: int, workers: Sequence[WorkerInfo]) -> RoundPlan:
        return RoundPlan(tuple(self.per_kind.get(w.kind, self.local_steps) for w in workers))


@register("scheduler", "proportional")
@dataclass(frozen=True)
class Proportional(Scheduler):
    """System-aware local SGD: local steps in proportion to each device's throughput.

    The fastest worker does `max_steps` (H) steps; worker k does round(H · speed_k / speed_max),
    rounded half up and at least `min_steps`, where speed = 1 / mean step time. With a GPU 32x faster
    than a CPU and H = 32 this gives the reference code's 32 : 1.

    Args:
        max_steps: H, the local steps of the fastest worker per round.
        min_steps: floor for slow workers (>= 1).
        source: 'profile' uses the devices' profiled mean step time (fixed plan, as the paper);
            'observed' uses the running mean of the step times each worker actually took, falling back
            to the profile before a worker's first round.

    Example::

        # step times 0.032 s (cpu) and 0.001 s (gpu), H = 32  ->  cpu 1 step, gpu 32 steps
        Proportional(max_steps=32).plan(0, workers)
    """

    max_steps: int = 32
    min_steps: int = 1
    source: str = "profile"

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps: expected an integer >= 1, got {self.max_steps!r}")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"min_steps: expected an integer in [1, max_steps], got {self.min_steps!r}")
        if self.source not in ("profile", "observed"):
            raise ValueError(f"source: expected 'profile' or 'observed', got {self.source!r}")

    def _step_time(self, w: WorkerInfo) -> float:
        if self.source == "observed" and w.observed_step_time_s is not None:
            return w.observed_step_time_s
        return w.profile_step_time_s

    def plan(self, round: int, workers: Sequence[WorkerInfo]) -> RoundPlan:
        times = np.array([self._step_time(w) for w in workers])
        steps = np.maximum(self.min_steps, np.floor(self.max_steps * times.min() / times + 0.5))
        return RoundPlan(tuple(steps.astype(np.int64).tolist()))


@register("scheduler", "time_budget")
@dataclass(frozen=True)
class TimeBudget(Scheduler):
    """Every worker trains for `budget_s` seconds per round, then all synchronise.

    The runner turns the budget into steps as they complete: a worker starts another step while less
    than `budget_s` has elapsed since the round began, so it does at least one step and the last step
    may run past the budget. Needs no profile and adapts to speed changes by construction.

    Example::

        TimeBudget(budget_s=0.05).plan(0, workers).time_budget_s   # 0.05
    """

    budget_s: float = 0.1

    def __post_init__(self) -> None:
        if not self.budget_s > 0:
            raise ValueError(f"budget_s: expected a number of seconds > 0, got {self.budget_s!r}")

    def plan(self, round: int, workers: Sequence[WorkerInfo]) -> RoundPlan:
        return RoundPlan(tuple(None for _ in workers), time_budget_s=self.budget_s)
