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
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, NamedTuple

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
    observed_rounds: how many rounds' step times have been observed so far (a scheduler that keeps a
        running mean adds `observed_step_time_s` when this count grows).

    (A NamedTuple rather than a dataclass: a 10,000-device run builds millions of them.)
    """

    index: int
    kind: str
    profile_step_time_s: float
    observed_step_time_s: float | None = None
    observed_rounds: int = 0


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


REF_TARGETS = ("kind", "device", "worker", "file")


@dataclass(frozen=True)
class NameRef:
    """Declares that a policy parameter names things of the cluster, so that the spec check at load
    (`check_names`) rejects a name the cluster does not have instead of the policy silently doing nothing.

    to: 'kind' (a device kind, `cluster.devices[].kind`), 'device' (a torch device of a group,
        `cluster.devices[].device`, e.g. 'cuda:0'), 'worker' (a worker index, 0..n-1 in the order of
        `cluster.devices`) or 'file' (an existing file, '' = none; a relative path is relative to the
        config's folder).
    wildcard: '*' stands for all of them (say so in the policy's docstring).

    The parameter may hold one name, a list of names, or a table keyed by names (e.g. `per_kind`).

    Example::

        @dataclass(frozen=True)
        class MySampler(Sampler):
            kinds: tuple[str, ...] = ("cpu",)
            name_refs = {"kinds": NameRef("kind", wildcard=True)}
    """

    to: str
    wildcard: bool = False

    def __post_init__(self) -> None:
        if self.to not in REF_TARGETS:
            raise ValueError(f"NameRef.to: expected one of {list(REF_TARGETS)}, got {self.to!r}")


class Policy(ABC):
    """What every policy declares: which of its parameters name kinds, devices, workers or files."""

    #: parameter name -> what it names; checked against the cluster when a spec is loaded
    name_refs: ClassVar[Mapping[str, NameRef]] = {}


class Scheduler(Policy):
    """Decides each worker's local work for a round (the paper's per-device 'interval')."""

    @abstractmethod
    def plan(self, round: int, workers: Sequence[WorkerInfo]) -> RoundPlan: ...


class Sampler(Policy):
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


class Aggregator(Policy):
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


def _names_in(value: Any) -> list[Any]:
    """The names a parameter holds: itself, the items of a list, or the keys of a table."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return list(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)
    return [value]


def check_names(policy: Any, where: str, kinds: Collection[str], devices: Collection[str], n_workers: int) -> None:
    """Check every parameter that `type(policy).name_refs` declares against the cluster: kinds and devices
    it has, worker indices below n_workers, files that exist. `where` prefixes the key ('sampler.params')."""
    cls = type(policy)
    params = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    for field, ref in cls.name_refs.items():
        if field not in params:
            raise SpecError(f"{where}: {cls.__name__}.name_refs declares {field!r}, which is not one of its "
                            f"parameters ({', '.join(sorted(params)) or 'none'})")
        value = getattr(policy, field)
        what = "keys that are " if isinstance(value, Mapping) else ""
        for name in _names_in(value):
            if (ref.wildcard and name == "*") or (ref.to == "file" and name == ""):
                continue
            if ref.to in ("kind", "device"):
                known = kinds if ref.to == "kind" else devices
                if not (isinstance(name, str) and name in known):
                    star = " or '*'" if ref.wildcard else ""
                    label = "device kinds" if ref.to == "kind" else "devices"
                    raise SpecError(f"{where}.{field}: expected {what}{label} of this cluster "
                                    f"({', '.join(map(repr, known))}){star}, got {name!r}")
            elif ref.to == "worker":
                if isinstance(name, bool) or not isinstance(name, int) or not 0 <= name < n_workers:
                    raise SpecError(f"{where}.{field}: expected {what}worker indices 0..{n_workers - 1} of this "
                                    f"cluster, got {name!r}")
            elif not (isinstance(name, str) and Path(name).expanduser().is_file()):
                raise SpecError(f"{where}.{field}: expected {what}an existing file, got {name!r}")
