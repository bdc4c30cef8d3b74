"""INTERIM, deleted when h-policies is merged: the policy contract of issue 10 (interfaces.md) over
today's policies, so that the driver can be written against the new contract before it lands.

`Arrivals` and the adapters below follow interfaces.md; once `hetsim.policies` exports `Arrivals` and
`policies.build` applies its own legacy adapter, the driver imports `Arrivals` from there and drops
`adapt`.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from hetsim.policies import Contributions, RoundPlan, WorkerInfo


class Arrivals(Contributions):
    """The contributions an aggregator combines, with staleness, the round and the lr, and two ways to
    reach the replicas (supplied by the Comm, so that nothing is communicated before it is asked for)."""

    def __init__(self, workers: np.ndarray, kinds: np.ndarray, local_steps: np.ndarray, samples: np.ndarray,
                 mean_loss: np.ndarray, staleness: np.ndarray, round: int, lr: float,
                 weighted_sum: Callable[[np.ndarray], Any], replicas: Callable[[], Any] | None = None):
        super().__init__(workers, kinds, local_steps, samples, mean_loss)
        self.staleness = np.asarray(staleness, dtype=np.int64)
        self.round, self.lr = round, lr
        self._weighted_sum, self._replicas = weighted_sum, replicas

    def weighted_sum(self, w: np.ndarray) -> Any:
        """Σ_k w_k x_k over the arrived replicas."""
        return self._weighted_sum(w)

    @property
    def replicas(self) -> Any:
        """All arrived replicas as rows [n, P]; only for aggregators that declared `linear = False`."""
        if self._replicas is None:
            raise RuntimeError("arrivals.replicas: only available to an aggregator that declares linear = False")
        return self._replicas()


class _Scheduler:
    stateful: ClassVar[bool] = False

    def __init__(self, legacy: Any):
        self.legacy = legacy

    def init_state(self, workers: Sequence[WorkerInfo]) -> Any:
        return None

    def plan(self, round: int, workers: Sequence[WorkerInfo], rng: np.random.Generator,
             state: Any) -> tuple[RoundPlan, Any]:
        return self.legacy.plan(round, workers), state


class _Sampler:
    stateful: ClassVar[bool] = False

    def __init__(self, legacy: Any):
        self.legacy = legacy
        self.uses_scores = legacy.uses_scores
        self.score_rule = legacy.score_rule

    def init_state(self, worker: WorkerInfo) -> Any:
        return None

    def batch(self, worker, batch_size, stream, scores, state):
        return self.legacy.batch(worker, batch_size, stream, scores), state

    def biased_per_step(self, worker: WorkerInfo, batch_size: int) -> int:
        return self.legacy.biased_per_step(worker, batch_size)


class _Aggregator:
    stateful: ClassVar[bool] = False
    needs_previous_global: ClassVar[bool] = True  # a legacy aggregator may use it (fednova's a·x)

    def __init__(self, legacy: Any):
        self.legacy = legacy
        self.linear = type(legacy).is_linear()

    def init_state(self, global_params: Any) -> Any:
        return None

    def combine(self, global_params, arrivals: Arrivals, state: Any):
        if self.linear:
            a, w = self.legacy.coefficients(arrivals)
            combined = arrivals.weighted_sum(w)
            return (combined + a * global_params if a else combined), np.asarray(w), state
        new, w = self.legacy.combine(global_params, arrivals.replicas, arrivals)
        return new, np.asarray(w), state


def adapt(policies: Any) -> Any:
    """The three legacy policy objects wrapped in the new contract (a `resolve.Policies`)."""
    return type(policies)(_Scheduler(policies.scheduler), _Sampler(policies.sampler),
                          _Aggregator(policies.aggregator))
