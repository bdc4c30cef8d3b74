"""The policy contracts, the arrivals an aggregator combines, and the one registry that lets a config
pick a policy by name.

Each round: a Selector picks who takes part, a Scheduler decides how much local work every
participant does, a Sampler picks each local step's mini-batch, an Aggregator turns what arrives
into the next global model. Policies are small frozen dataclasses: their fields are the parameters a
config sets. Whatever a policy remembers between calls is an explicit *state* value (optax's
`init`/`update` shape): `init_state` makes it, every call takes it and returns the next one, the
driver keeps it, checkpoints it and restores it on resume. State is tensors, numpy arrays or plain
data (ints, floats, str, lists, dicts, None), so a checkpoint loads with
`torch.load(weights_only=True)` (numpy arrays need the driver's help there; the built-ins keep
tensors and plain data). Objects the runner owns and checkpoints itself (the loss-score store, data
streams: `hetsim.policies.sampling.LossScores`, `EpochStream`) are passed in.

Capabilities are class attributes that a policy *declares*; the driver reads them and never probes:

| contract   | attribute               | default  | meaning                                                   |
|------------|-------------------------|----------|-----------------------------------------------------------|
| Scheduler  | `stateful`              | False    | `plan` keeps state (`init_state(workers)`)                |
| Scheduler  | `static`                | False    | `plan` reads only the workers' index, kind and profile    |
|            |                         |          | step time, draws nothing from `rng` and returns `state`   |
|            |                         |          | unchanged: a runner may reuse a plan for the same workers |
|            |                         |          | (a field-dependent property where it depends on one)      |
| Sampler    | `uses_scores`           | True     | `batch` reads the loss-score store (else it is not kept)  |
| Sampler    | `score_rule`            | 'latest' | how that store merges a new loss: 'latest' or 'min'       |
|            |                         |          | (a field or a class attribute; always present)            |
| Sampler    | `stateful`              | False    | `batch` keeps per-worker state (`init_state(worker)`)     |
| Sampler    | `static_bias`           | False    | `biased_per_step` reads only the worker's index, kind and |
|            |                         |          | profile step time (the time-only fidelity asks it once    |
|            |                         |          | per worker, not every round)                              |
| Aggregator | `linear`                | True     | `combine` reaches the replicas only through               |
|            |                         |          | `arrivals.weighted_sum(w)` (a backend: one all_reduce);   |
|            |                         |          | False: it reads `arrivals.replicas` (an all_gather)       |
| Aggregator | `stateful`              | False    | `combine` keeps state (`init_state(global_params)`)       |
| Aggregator | `needs_previous_global` | False    | `combine` reads `global_params`; False: it may be None    |
| Aggregator | `work_weights`          | False    | the weights depend only on the arrivals' kinds, local     |
|            |                         |          | steps, samples and mean losses (not on worker indices,    |
|            |                         |          | staleness, round, lr, state or replica values): the       |
|            |                         |          | time-only fidelity computes them once per distinct update |
| Selector   | `stateful`              | False    | `select` keeps state (`init_state(workers)`); `observe`   |
|            |                         |          | adds each combination's arrivals to it                    |

A worker planned 0 local steps sits the round out: it is not among the arrivals. Aggregators must
still be safe with a 0-step row (the built-ins give it weight 0); with no arrivals at all the driver
does not call `combine` and the global model stays.

A user's own policy plugs in exactly like a built-in: subclass the contract, and either decorate it
with `@register("scheduler", "my_name")` or name it in a config as `"my_package.module:MyClass"`.
Policies written against the contract before explicit state (`plan(round, workers)`,
`batch(worker, batch_size, stream, scores)`, `combine(global_params, replicas, contributions)`) are
wrapped by `build` and keep working, with one HetsimWarning that points at the README's migration note.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, NamedTuple

import numpy as np

from hetsim.errors import HetsimWarning, SpecError

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

    local_steps[k]: exact number of local steps of the k-th planned worker (the order of the `workers`
    the scheduler was given); 0 = that worker sits the round out (it trains nothing, is not among the
    arrivals and its replica gets the new global model); None = it runs until `time_budget_s` has
    elapsed since the round started (the step that crosses the budget completes; at least one step).
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

    @property
    def active(self) -> np.ndarray:
        """Which rows did at least one local step (a 0-step row is a worker that sat the round out)."""
        return self.local_steps > 0

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


class Arrivals(Contributions):
    """What the aggregator combines: the arriving workers' contributions as columns, plus how to reach
    their replicas.

    Columns (numpy arrays, one row per arrival, in arrival order): `workers`, `kinds`, `local_steps`,
    `samples`, `mean_loss` (as `Contributions`) and `staleness` (how many global updates happened
    since the worker got the model it trained from; 0 under a synchronous protocol). `round` is the
    round (or update) being combined, `lr` the local learning rate of that round.

    The replicas are reached through the Comm that built the arrivals, so that nothing travels before
    an aggregator asks:

    - `weighted_sum(w)`: Σ_k w_k x_k as one flat tensor (a distributed backend: one all_reduce);
    - `replicas`: all replicas as a [n, P] tensor (a backend: an all_gather). Only an aggregator that
      declares `linear = False` gets them; for a linear one the Comm supplies none and asking raises.

    Example::

        a = Arrivals.of_replicas([Contribution(0, "cpu", 2, 32, 0.5)], torch.ones(1, 3))
        a.weighted_sum(np.array([0.5]))   # tensor([0.5, 0.5, 0.5])
    """

    def __init__(self, workers: np.ndarray, kinds: np.ndarray, local_steps: np.ndarray, samples: np.ndarray,
                 mean_loss: np.ndarray, staleness: np.ndarray, round: int, lr: float, *,
                 weighted_sum: "Callable[[np.ndarray], torch.Tensor] | None" = None,
                 replicas: "Callable[[], torch.Tensor] | None" = None):
        super().__init__(workers, kinds, local_steps, samples, mean_loss)
        self.staleness = np.asarray(staleness, dtype=np.int64)
        n = len(self.workers)
        for name in ("kinds", "local_steps", "samples", "mean_loss", "staleness"):
            # a short column would surface later as a weight vector of the wrong length, far from its cause
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name}: expected {n} values (one per arrival), got shape {getattr(self, name).shape}")
        self.round, self.lr = int(round), float(lr)
        self._weighted_sum, self._replicas, self._gathered = weighted_sum, replicas, None

    @classmethod
    def of_replicas(cls, contributions: "Sequence[Contribution] | Contributions", replicas: "torch.Tensor",
                    staleness: np.ndarray | None = None, round: int = 0, lr: float = float("nan")) -> "Arrivals":
        """Arrivals whose replicas are rows of one in-memory [n, P] tensor (the in-process Comm, tests)."""
        import torch

        c = Contributions.of(contributions)
        if replicas.dim() != 2 or replicas.shape[0] != len(c):
            raise ValueError(f"replicas: expected a [{len(c)}, P] tensor (one row per contribution), "
                             f"got shape {tuple(replicas.shape)}")

        def weighted_sum(w: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(w, dtype=replicas.dtype, device=replicas.device) @ replicas

        return cls(c.workers, c.kinds, c.local_steps, c.samples, c.mean_loss,
                   np.zeros(len(c), dtype=np.int64) if staleness is None else staleness, round, lr,
                   weighted_sum=weighted_sum, replicas=lambda: replicas)

    def weighted_sum(self, w: np.ndarray) -> "torch.Tensor":
        """Σ_k w_k x_k over the arrivals' replicas, as one flat tensor."""
        w = np.asarray(w, dtype=np.float64)
        if w.shape != (len(self),):
            raise ValueError(f"weighted_sum: expected {len(self)} weights (one per arrival), got shape {w.shape}")
        if self._weighted_sum is None:
            raise RuntimeError("these arrivals carry no replicas (built without a weighted_sum source)")
        return self._weighted_sum(w)

    @property
    def replicas(self) -> "torch.Tensor":
        """All arriving replicas as a [n, P] tensor (gathered once, on first use)."""
        if self._replicas is None:
            raise RuntimeError("arrivals.replicas: the replicas were not gathered; an aggregator that reads them "
                               "must declare `linear = False` (a linear one uses arrivals.weighted_sum(w))")
        if self._gathered is None:
            self._gathered = self._replicas()
        return self._gathered


class Policy(ABC):
    """What every policy declares: which of its parameters name kinds, devices, workers or files."""

    #: parameter name -> what it names; checked against the cluster when a spec is loaded
    name_refs: ClassVar[Mapping[str, NameRef]] = {}


class Scheduler(Policy):
    """Decides each worker's local work for a round (the paper's per-device 'interval').

    `plan(round, workers, rng, state) -> (RoundPlan, state)`: one entry of `RoundPlan.local_steps` per
    worker of `workers`, in that order (the workers planned now: all of them under a barrier, one at a
    time under an asynchronous protocol). `rng` is a seeded numpy Generator the driver owns and
    checkpoints: the only randomness a scheduler may use.
    """

    #: `plan` keeps state between calls (see the module's table)
    stateful: ClassVar[bool] = False
    #: `plan` is a function of the workers' index, kind and profile step time alone (no round, no rng, no
    #: state change): the time-only fidelity plans a set of workers once and reuses the plan
    static: ClassVar[bool] = False

    def init_state(self, workers: Sequence[WorkerInfo]) -> Any:
        """The state before the first round, given all the run's workers."""
        return None

    @abstractmethod
    def plan(self, round: int, workers: Sequence[WorkerInfo], rng: np.random.Generator,
             state: Any) -> tuple[RoundPlan, Any]: ...


class Sampler(Policy):
    """Chooses the samples of one local step of one worker.

    `batch(worker, batch_size, stream, scores, state) -> (Batch, state)`, with `state` this worker's
    (`init_state(worker)`; None for a stateless sampler).
    """

    #: how the loss-score store merges a new observation: 'latest' or the reference code's 'min'.
    score_rule: str = "latest"
    #: whether `batch` reads the loss scores; runners skip keeping them up to date when it does not.
    uses_scores: ClassVar[bool] = True
    #: `batch` keeps per-worker state between calls
    stateful: ClassVar[bool] = False
    #: `biased_per_step` reads only the worker's index, kind and profile step time, never what it observed
    static_bias: ClassVar[bool] = False

    def init_state(self, worker: WorkerInfo) -> Any:
        """Worker `worker`'s state before its first step."""
        return None

    @abstractmethod
    def batch(self, worker: WorkerInfo, batch_size: int, stream: "EpochStream", scores: "LossScores",
              state: Any) -> tuple[Batch, Any]: ...

    def biased_per_step(self, worker: WorkerInfo, batch_size: int) -> int:
        """How many of a step's samples this sampler picks by loss on `worker`: what the time-only
        fidelity logs, having no losses to rank."""
        return 0


class Aggregator(Policy):
    """Turns the arrivals into the next global model.

    `combine(global_params, arrivals, state) -> (new_global, weights, state)`; `weights` (one per
    arrival) is what the decisions log records. A linear aggregator implements `weights` (or
    `coefficients`, when the previous global model takes part) and inherits `combine`; any other
    aggregator overrides `combine` and declares what it reads (see the module's table).
    """

    #: `combine` reads the replicas only through `arrivals.weighted_sum(w)`
    linear: ClassVar[bool] = True
    #: `combine` keeps state between calls
    stateful: ClassVar[bool] = False
    #: `combine` reads `global_params` (else the driver may pass None)
    needs_previous_global: ClassVar[bool] = False
    #: `combine`'s weights are a function of the arrivals' kinds, local_steps, samples and mean_loss alone
    work_weights: ClassVar[bool] = False

    def init_state(self, global_params: "torch.Tensor") -> Any:
        """The state before the first combination, given the initial global model."""
        return None

    def weights(self, arrivals: Arrivals) -> np.ndarray:
        """Weight w_k of each arriving replica in the next global model Σ_k w_k x_k."""
        raise NotImplementedError(f"{type(self).__name__}: a linear aggregator implements weights() or "
                                  "coefficients(); any other overrides combine() and declares linear = False")

    def coefficients(self, arrivals: Arrivals) -> tuple[float, np.ndarray]:
        """(a, w) such that the next global model is a·x + Σ_k w_k·x_k, x the current global model.

        Default: a = 0 and w = `weights`. An aggregator returning a ≠ 0 declares
        `needs_previous_global = True`.
        """
        return 0.0, self.weights(arrivals)

    def combine(self, global_params: "torch.Tensor | None", arrivals: Arrivals,
                state: Any) -> tuple["torch.Tensor", np.ndarray, Any]:
        """The linear form: a·x + arrivals.weighted_sum(w), with (a, w) from `coefficients`."""
        a, w = self.coefficients(arrivals)
        combined = arrivals.weighted_sum(w)
        if not a:
            return combined, w, state
        if global_params is None:
            raise ValueError(f"{type(self).__name__}.coefficients gave the previous global model a weight of "
                             f"{a}, but the class declares needs_previous_global = False (so the driver passed None)")
        return combined + a * global_params, w, state


class Selector(Policy):
    """Picks the workers that take part in a round (client selection, "participation").

    `select(round, workers, rng, state) -> (indices, state)`: `indices` (integers into `workers`, the
    online workers in worker order; any order, no repeats) are the round's participants; the others sit
    the round out exactly like a worker its scheduler planned 0 steps (no work, no arrival, the new
    global model on return). The scheduler then plans the participants only. Picking nobody is a run
    failure (a one-line HetsimError naming the selector): a round without anyone would make no progress.
    `rng` is a seeded numpy Generator the driver owns and checkpoints (`numpy_rng(seed, "selector")`).

    A stateful selector also learns from what arrives: after every combination the driver calls
    `observe(round, arrivals, state) -> state` with the arrivals' columns (`workers`, `local_steps`,
    `samples`, `mean_loss`, ...; never the replicas). Called under every protocol that combines, so
    the state reflects each worker's latest contribution.
    """

    #: `select` keeps state between calls (see the module's table)
    stateful: ClassVar[bool] = False

    def init_state(self, workers: Sequence[WorkerInfo]) -> Any:
        """The state before the first round, given all the run's workers."""
        return None

    @abstractmethod
    def select(self, round: int, workers: Sequence[WorkerInfo], rng: np.random.Generator,
               state: Any) -> tuple[np.ndarray, Any]: ...

    def observe(self, round: int, arrivals: Contributions, state: Any) -> Any:
        """The state after a combination of `arrivals` (a stateless selector keeps None)."""
        return state

    def check_workers(self, n_workers: int) -> None:
        """A ValueError ("param: expected ..., got ...") when this selector's parameters cannot apply to a
        cluster of n_workers workers (checked when a spec is loaded)."""


# ------------------------------------------------------------------------------------------------
# The old contract (before explicit state), adapted
# ------------------------------------------------------------------------------------------------

MIGRATION_NOTE = "README.md, 'Write your own policy' > 'Migrating from the old contract'"

#: method -> the arguments (after self) of its call under the contract, and under the old contract
_CALLS = {"plan": (("round", "workers", "rng", "state"), ("round", "workers")),
          "batch": (("worker", "batch_size", "stream", "scores", "state"), ("worker", "batch_size", "stream", "scores")),
          "combine": (("global_params", "arrivals", "state"), ("global_params", "replicas", "contributions"))}


def _params(f: Callable) -> list[inspect.Parameter]:
    return list(inspect.signature(f).parameters.values())[1:]  # after self


def _takes(params: list[inspect.Parameter], n: int) -> bool:
    """Whether a method with these parameters accepts a call with n positional arguments (and no keywords):
    what decides the shape, not the parameter count (a keyword-only option or a default must not)."""
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if any(p.kind == p.KEYWORD_ONLY and p.default is p.empty for p in params):
        return False
    return len(required) <= n and (n <= len(positional) or any(p.kind == p.VAR_POSITIONAL for p in params))


def _legacy_signature(method: str, f: Callable) -> bool:
    """Whether `f` (a class's `method`) has the old contract's signature."""
    params = _params(f)
    new, old = (len(c) for c in _CALLS[method])
    if method == "combine":
        # both shapes pass 3 arguments: the new one names its third `state` (the README's migration note)
        named = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        return _takes(params, old) and len(named) >= 3 and named[2] != "state"
    return _takes(params, old) and not _takes(params, new)


def _takes_neither(method: str, f: Callable) -> str | None:
    """A one-line problem when `f` can be called neither as the contract's `method` nor as the old one."""
    params = _params(f)
    new, old = _CALLS[method]
    if _takes(params, len(new)) or _takes(params, len(old)):
        return None
    shown = ", ".join(["self"] + [str(p) for p in params])
    return (f"{f.__qualname__}({shown}) takes neither ({', '.join(new)}) nor the old contract's "
            f"({', '.join(old)})")


#: contracts that never had an old form: (method, its arguments after self)
_CALLS_WITHOUT_ADAPTER = {"selector": ("select", ("round", "workers", "rng", "state"))}


def _takes_only(call: tuple[str, tuple[str, ...]], f: Callable) -> str | None:
    """A one-line problem when `f` cannot be called as the contract's method `call` describes."""
    params = _params(f)
    if _takes(params, len(call[1])):
        return None
    shown = ", ".join(["self"] + [str(p) for p in params])
    return f"{f.__qualname__}({shown}) does not take ({', '.join(call[1])})"


class _LegacyScheduler(Scheduler):
    """Runs an old-contract scheduler's `plan(round, workers)`: no state, no rng."""

    stateful = False

    def plan(self, round, workers, rng, state):
        return super().plan(round, workers), state


class _LegacySampler(Sampler):
    """Runs an old-contract sampler's `batch(worker, batch_size, stream, scores)`: no state."""

    stateful = False

    def batch(self, worker, batch_size, stream, scores, state):
        return super().batch(worker, batch_size, stream, scores), state


class _LegacyAggregator(Aggregator):
    """Runs an old-contract aggregator's `combine(global_params, replicas, contributions) -> (new, w)`:
    it reads all replicas and the previous global model."""

    linear = False
    stateful = False
    needs_previous_global = True

    def combine(self, global_params, arrivals, state):
        new, w = super().combine(global_params, arrivals.replicas, Contributions.of(arrivals))
        return new, np.asarray(w), state


#: what `init_state` is given, per contract
_INIT_ARG = {"scheduler": "workers", "sampler": "worker", "aggregator": "global_params", "selector": "workers"}

_ADAPTERS = {"scheduler": ("plan", _LegacyScheduler), "sampler": ("batch", _LegacySampler),
             "aggregator": ("combine", _LegacyAggregator)}


def legacy_adapter(category: str, cls: type) -> type | None:
    """The adapted class of an old-contract plug-in `cls` (None when `cls` follows the contract).

    The adapted class subclasses `cls`, so its fields, `name_refs` (see `check_names`) and docstring
    are the plug-in's own; only the one old method is called through the new shape.
    """
    if category not in _ADAPTERS:  # a contract without an old form (the selector)
        return None
    method, adapter = _ADAPTERS[category]
    if not _legacy_signature(method, getattr(cls, method)):
        return None
    return type(cls.__name__, (adapter, cls), {"__module__": cls.__module__, "__doc__": cls.__doc__,
                                               "__qualname__": cls.__qualname__})


def _warn_legacy(cls: type, category: str) -> None:
    # one fixed location, so that Python's 'default' filter (the CLI's) shows it once per plug-in
    warnings.warn(f"{category} {cls.__module__}:{cls.__qualname__} is written against the old policy contract "
                  f"(no explicit state); it runs through an adapter. See {MIGRATION_NOTE}", HetsimWarning)


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------

_BASES: dict[str, type] = {"scheduler": Scheduler, "sampler": Sampler, "aggregator": Aggregator,
                           "selector": Selector}
_REGISTRY: dict[str, dict[str, type]] = {c: {} for c in _BASES}


def register(category: str, name: str) -> Callable[[type], type]:
    """Class decorator: make a policy selectable as `[<category>] name = "<name>"` in a config."""

    def deco(cls: type) -> type:
        if not issubclass(cls, _BASES[category]):
            raise TypeError(f"{cls.__name__} must subclass {_BASES[category].__name__}")
        held = _REGISTRY[category].get(name)
        # the same class defined again (a module or notebook cell run twice) replaces itself; another would
        # silently take over every config that names this policy
        if held is not None and _path(held) != _path(cls):
            raise ValueError(f"register: {category} {name!r} is already {_path(held)}; choose another name for "
                             f"{_path(cls)}")
        _REGISTRY[category][name] = cls
        cls.registered_name = name  # type: ignore[attr-defined]
        return cls

    return deco


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


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
    """Instantiate the policy a spec names, checking its parameters' names, types and values. A plug-in
    written against the old contract comes back adapted (see `legacy_adapter`), with a HetsimWarning."""
    from hetsim.config import build_dataclass

    where = where or category
    cls = policy_class(category, spec.name, where)
    if category in _ADAPTERS:
        problem = _takes_neither(_ADAPTERS[category][0], getattr(cls, _ADAPTERS[category][0]))
    else:
        problem = _takes_only(_CALLS_WITHOUT_ADAPTER[category], getattr(cls, _CALLS_WITHOUT_ADAPTER[category][0]))
    if problem:  # else the first round would fail with a TypeError deep in the run
        raise SpecError(f"{where}.name: {spec.name}: {problem}")
    init = cls.init_state
    if not _takes(_params(init), 1):  # else the run would stop with a TypeError after claiming its folder
        shown = ", ".join(["self"] + [str(p) for p in _params(init)])
        raise SpecError(f"{where}.name: {spec.name}: {init.__qualname__}({shown}) must take one argument "
                        f"({_INIT_ARG[category]})")
    adapted = legacy_adapter(category, cls)
    if adapted is not None:
        _warn_legacy(cls, category)
        cls = adapted
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
