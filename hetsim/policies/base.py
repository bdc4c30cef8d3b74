"""The three policy contracts and the one registry that lets a config pick a policy by name.

Each round: a Scheduler decides how much local work every worker does, a Sampler picks each local
step's mini-batch, an Aggregator combines the replicas. Policies are small frozen dataclasses: their
fields are the parameters a config sets, they hold no hidden state and know nothing of time sources.
Whatever they remember (loss scores, data streams, throughput estimates) is an explicit object
owned by the runner (see `hetsim.policies.sampling.LossScores`, `EpochStream`).

A user's own policy plugs in exactly like a built-in: subclass the contract, and either decorate
it with `@register("scheduler", "my_name")` or name it in a config as `"my_package.module:MyClass"`.
"""

from __future__ import annotations

import dataclasses
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import numpy as np

from hetsim.errors import SpecError

if TYPE_CHECKING:
    import torch

    from hetsim.config import PolicySpec
    from hetsim.policies.sampling import EpochStream, LossScores


class WorkerInfo(NamedTuple):
    """What a policy may know about a worker: what a real system would know, not the simulator's secrets.

    profile_step_time_s: mean step time from the device's profile (what `hetsim profile` measured).
    observed_step_time_s: the mean step time this worker measured in its most recent round (None before
        its first round).

    (A NamedTuple rather than a dataclass: a 10,000-device run builds millions of them.)
    """

    index: int
    kind: str
    profile_step_time_s: float
    observed_step_time_s: float | None = None


@dataclass(frozen=True)
class RoundPlan:
    """A scheduler's decision for one round.

    local_steps[k]: exact number of local steps of worker k; None when the worker instead runs until
    `time_budget_s` has elapsed since the round started (the step that crosses the budget completes).
    """

    local_steps: tuple[int | None, ...]
    time_budget_s: float | None = None


@dataclass(frozen=True)
class Batch:
    """One local step's sample indices, and how many of them were chosen by loss (biased)."""

    indices: np.ndarray
    n_biased: int = 0


class Contribution(NamedTuple):
    """What a worker did in a round: the aggregator's view of it."""

    worker: int
    kind: str
    local_steps: int
    samples: int
    mean_loss: float


class Contributions(Sequence):
    """A round's contributions as columns (numpy arrays), usable as a Sequence[Contribution].

    Aggregators read the columns (`local_steps`, `samples`, `mean_loss`), which costs nothing per
    worker; iterating yields Contribution tuples for code that prefers them. A 10,000-device run builds
    one of these per round instead of 10,000 tuples.
    """

    def __init__(self, workers: np.ndarray, kinds: np.ndarray, local_steps: np.ndarray, samples: np.ndarray,
                 mean_loss: np.ndarray):
        self.workers, self.kinds = np.asarray(workers), np.asarray(kinds)
        self.local_steps = np.asarray(local_steps, dtype=np.float64)
        self.samples = np.asarray(samples, dtype=np.float64)
        self.mean_loss = np.asarray(mean_loss, dtype=np.float64)

    @classmethod
    def of(cls, contributions: "Sequence[Contribution] | Contributions") -> "Contributions":
        if isinstance(contributions, Contributions):
            return contributions
        c = list(contributions)
        return cls(np.array([x.worker for x in c]), np.array([x.kind for x in c]),
                   np.array([x.local_steps for x in c]), np.array([x.samples for x in c]),
                   np.array([x.mean_loss for x in c]))

    def __len__(self) -> int:
        return len(self.workers)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return Contribution(int(self.workers[i]), str(self.kinds[i]), int(self.local_steps[i]),
                            int(self.samples[i]), float(self.mean_loss[i]))


class Scheduler(ABC):
    """Decides each worker's local work for a round (the paper's per-device 'interval')."""

    @abstractmethod
    def plan(self, round: int, workers: Sequence[WorkerInfo]) -> RoundPlan: ...


class Sampler(ABC):
    """Chooses the samples of one local step of one worker."""

    #: how the loss-score store merges a new observation: 'latest' or the reference code's 'min'.
    score_rule: str = "latest"
    #: whether `batch` reads the loss scores; runners skip keeping them up to date when it does not.
    uses_scores: bool = True

    @abstractmethod
    def batch(self, worker: WorkerInfo, batch_size: int, stream: "EpochStream", scores: "LossScores") -> Batch: ...

    def biased_per_step(self, worker: WorkerInfo, batch_size: int) -> int:
        """How many of a step's samples this sampler picks by loss on `worker`: what the time-only
        fidelity logs, having no losses to rank."""
        return 0


class Aggregator(ABC):
    """Combines replicas (rows of a [workers, parameters] matrix) into the next global model."""

    @abstractmethod
    def weights(self, contributions: Sequence[Contribution]) -> np.ndarray:
        """Weight of each replica in the combination (logged every round)."""

    def coefficients(self, contributions: Sequence[Contribution]) -> tuple[float, np.ndarray]:
        """(a, w) such that the next global model is a·x + Σ_k w_k·x_k, x the current global model.

        Every built-in aggregator is linear in the replicas, so a distributed runner needs only one
        all-reduce of w_k·x_k. Default: a = 0 and w = `weights`. An aggregator that is not linear
        overrides `combine` instead; runners then gather all replicas.
        """
        return 0.0, self.weights(contributions)

    def combine(self, global_params: "torch.Tensor", replicas: "torch.Tensor",
                contributions: Sequence[Contribution]) -> tuple["torch.Tensor", np.ndarray]:
        """Next global parameters and the weights used: a·x + w @ replicas (see `coefficients`)."""
        import torch

        a, w = self.coefficients(contributions)
        combined = torch.as_tensor(w, dtype=replicas.dtype) @ replicas
        return (combined + a * global_params if a else combined), w

    @classmethod
    def is_linear(cls) -> bool:
        """True when `combine` is the linear form given by `coefficients` (not overridden)."""
        return cls.combine is Aggregator.combine


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------

_BASES: dict[str, type] = {"scheduler": Scheduler, "sampler": Sampler, "aggregator": Aggregator}
_REGISTRY: dict[str, dict[str, type]] = {c: {} for c in _BASES}


def register(category: str, name: str) -> Callable[[type], type]:
    """Class decorator: make a policy selectable as `[<category>] name = "<name>"` in a config."""

    def deco(cls: type) -> type:
        if not issubclass(cls, _BASES[category]):
            raise TypeError(f"{cls.__name__} must subclass {_BASES[category].__name__}")
        _REGISTRY[category][name] = cls
        cls.registered_name = name  # type: ignore[attr-defined]
        return cls

    return deco


def names(category: str) -> list[str]:
    return sorted(_REGISTRY[category])


def policy_class(category: str, name: str, where: str) -> type:
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise SpecError(f"{where}.name: cannot import {name!r}: {e}") from None
        if not (isinstance(cls, type) and issubclass(cls, _BASES[category]) and dataclasses.is_dataclass(cls)):
            raise SpecError(f"{where}.name: {name!r} is not a dataclass subclassing {_BASES[category].__name__}")
        return cls
    if name not in _REGISTRY[category]:
        raise SpecError(f"{where}.name: expected one of {names(category)} or 'module:Class', got {name!r}")
    return _REGISTRY[category][name]


def build(category: str, spec: "PolicySpec", where: str | None = None) -> Any:
    """Instantiate the policy a spec names, checking its parameters' names, types and values."""
    from hetsim.config import build_dataclass

    where = where or category
    cls = policy_class(category, spec.name, where)
    return build_dataclass(cls, spec.params, f"{where}.params")
