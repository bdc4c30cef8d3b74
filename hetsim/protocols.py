"""The protocols: when the server combines, and what happens to late work (spec key `protocol`).

    protocol = {name = "sync"}                                               # the barrier (default)
    protocol = {name = "semi_sync", params = {k = 8, deadline_s = 0.0, late = "drop"}}   # or late = "keep"
    protocol = {name = "async", params = {alpha = 0.6, staleness = "polynomial", a = 0.5}}
    protocol = {name = "buffered_async", params = {k = 4, alpha = 1.0, staleness = "constant"}}

Every protocol applies arrivals by one rule (`hetsim.protocol.Driver.aggregate`): with x the global model,
arrival i is damped to x + s(tau_i)(x_i - x), tau_i = the updates since it pulled; the aggregator combines
the damped replicas; the server mixes x + alpha (x_agg - x). async + mean is FedAsync (Xie et al. 2019,
"Asynchronous Federated Optimization", eq. 1 with the staleness functions of its section 5.2);
buffered_async + mean is FedBuff (Nguyen et al. 2022) with server learning rate alpha.

Staleness weights s(tau) (FedAsync): constant 1; polynomial (1 + tau)^-a; hinge 1 if tau <= b else
1 / (a (tau - b) + 1).

Checkpoints are taken every run.checkpoint_every updates under every protocol. Work in flight at a
checkpoint is not saved: after a resume every worker is idle and is dispatched again from the
checkpoint's global model (its work is redone). A run is therefore resumed bit-identically when nothing
is in flight at its checkpoints (sync; semi_sync with k = n), otherwise it continues correctly but not
as the uninterrupted run would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from hetsim.config import Spec, _require
from hetsim.errors import SpecError
from hetsim.protocol import Arrived, ArrivalBuffer, Driver, Protocol, Steps, SyncProtocol, Work
from hetsim.training import Tallies

STALENESS = ("constant", "polynomial", "hinge")
LATE = ("drop", "keep")


@dataclass(frozen=True)
class Staleness:
    """s(tau), FedAsync's staleness functions: constant; polynomial (1 + tau)^-a; hinge 1 for tau <= b, else
    1 / (a (tau - b) + 1)."""

    kind: str = "constant"
    a: float = 0.5
    b: float = 4.0

    def weights(self, tau: np.ndarray) -> np.ndarray | None:
        """s(tau) per arrival; None for constant (all 1: nothing to damp)."""
        if self.kind == "constant":
            return None
        tau = np.asarray(tau, dtype=np.float64)
        if self.kind == "polynomial":
            return (1.0 + tau) ** -self.a
        s = np.ones(len(tau))
        late = tau > self.b
        s[late] = 1.0 / (self.a * (tau[late] - self.b) + 1.0)
        return s


class EventProtocol(Protocol):
    """What the event-driven protocols share: a staleness function, idle workers waiting for dispatch,
    and the wait when nobody can work."""

    event_driven = True
    staleness: Staleness = Staleness()

    def staleness_weights(self, staleness: np.ndarray) -> np.ndarray | None:
        return self.staleness.weights(staleness)

    def _nobody_can_work(self, d: Driver, idle: list[int]) -> bool:
        return not d.clock.in_flight_count() and not d.clock.online(idle)


@dataclass
class SemiSyncProtocol(EventProtocol):
    """Rounds that close when the first k of the round's expected arrivals have come, or at the deadline
    (deadline_s after the round starts; 0 = none), whichever is first; if nobody arrived by the deadline,
    at the first arrival. Idle online workers are dispatched at the round start; a worker still in flight
    from an earlier round is not. late = "drop": work arriving after its round closed is discarded
    (recorded as dropped); "keep": it is combined in the round it arrives in, with its staleness (rounds
    since it pulled, damped by `staleness`), and counts toward k. Fewer than k possible: the round closes
    when all possible have come."""

    k: int
    deadline_s: float = 0.0
    late: str = "drop"
    staleness: Staleness = Staleness()
    name: ClassVar[str] = "semi_sync"

    def run(self, d: Driver) -> Steps:
        idle = list(d.workers)  # a fresh or resumed run: nothing in flight
        while True:
            reason, progress = d.stop_check()
            if d.pending is not None and (yield from d.end_round(reason)):
                continue
            if reason:
                return reason
            if self._nobody_can_work(d, idle):
                yield from d.clock.until_online()
                continue
            lr = d.begin_round(progress)
            idle = d.dispatch_idle(idle)
            flying = np.asarray(d.clock.in_flight(), dtype=np.int64)
            fresh = int((d.pulled[flying] == d.version).sum())  # dispatched this round
            need = min(self.k, fresh if self.late == "drop" else len(flying))
            deadline = d.clock.now() + self.deadline_s if self.deadline_s > 0 else None
            buffer, dropped = ArrivalBuffer(), ArrivalBuffer()
            while len(buffer) < need:
                arrived = yield from d.arrivals(need - len(buffer), deadline)
                idle += arrived.workers
                if self.late == "drop":
                    late = d.pulled[np.asarray(arrived.workers, dtype=np.int64)] < d.version
                    if late.any():
                        d.take(dropped, _subset(arrived, late))
                        arrived = _subset(arrived, ~late)
                d.take(buffer, arrived)
                if not d.clock.in_flight():
                    break  # nobody left who could come (a worker failed in flight, on real processes)
                if deadline is not None and d.clock.now() >= deadline and len(buffer) < need:
                    if len(buffer):
                        break
                    need, deadline = 1, None  # nobody by the deadline: the first arrival closes the round
            idle.sort()
            yield from d.combine(buffer, lr, dropped)


@dataclass
class AsyncProtocol(EventProtocol):
    """Every online worker is dispatched at the start; each arrival is combined at once (one update per
    arrival), damped by its staleness and mixed in with rate alpha; then that worker pulls the new version
    and is dispatched again."""

    alpha: float = 1.0
    staleness: Staleness = Staleness()
    name: ClassVar[str] = "async"

    def run(self, d: Driver) -> Steps:
        idle = list(d.workers)
        while True:
            reason, progress = d.stop_check()
            if d.pending is not None and (yield from d.end_round(reason)):
                continue
            if reason:
                return reason
            if self._nobody_can_work(d, idle):
                yield from d.clock.until_online()
                continue
            lr = d.begin_round(progress)
            idle = d.dispatch_idle(idle)
            buffer = ArrivalBuffer()
            if d.clock.in_flight_count():
                arrived = yield from d.arrivals(1)
                d.take(buffer, arrived)
                idle = sorted(idle + arrived.workers)
            yield from d.combine(buffer, lr)


@dataclass
class BufferedAsyncProtocol(EventProtocol):
    """FedBuff: workers run on their own; each is re-dispatched right after its arrival (pulling the current
    version) and the server combines every k arrivals, damped by staleness, mixed in with rate alpha. If
    fewer than k arrivals are possible (nobody left in flight), the update combines those it has."""

    k: int
    alpha: float = 1.0
    staleness: Staleness = Staleness()
    name: ClassVar[str] = "buffered_async"

    def run(self, d: Driver) -> Steps:
        idle = list(d.workers)
        while True:
            reason, progress = d.stop_check()
            if d.pending is not None and (yield from d.end_round(reason)):
                continue
            if reason:
                return reason
            if self._nobody_can_work(d, idle):
                yield from d.clock.until_online()
                continue
            lr = d.begin_round(progress)
            idle = d.dispatch_idle(idle)
            buffer = ArrivalBuffer()
            while len(buffer) < self.k and d.clock.in_flight_count():
                arrived = yield from d.arrivals(1)
                # the snapshot: the worker's replica is overwritten when it is re-dispatched below
                d.take(buffer, arrived, snapshot=True)
                idle = d.dispatch_idle(sorted(idle + arrived.workers))
            yield from d.combine(buffer, lr)


def _subset(arrived: Arrived, mask: np.ndarray) -> Arrived:
    """The arrivals where `mask` holds. Loss observations come one per step, worker by worker (as
    TrainingCore.record makes them), so each worker's are the next steps[i] of the list."""
    i = np.flatnonzero(mask)
    t = arrived.tallies
    obs = t.observations
    if obs:
        if len(obs) != int(t.steps.sum()):
            raise ValueError(f"{len(obs)} loss observations for {int(t.steps.sum())} steps: expected one per step")
        ends = np.cumsum(t.steps)
        obs = [o for j in i.tolist() for o in obs[ends[j] - t.steps[j]:ends[j]]]
    tallies = Tallies(t.workers[i], t.steps[i], t.samples[i], t.biased[i], t.loss_sum[i], obs)
    w = arrived.work
    work = Work([w.steps[j] for j in i.tolist()], w.start[i], w.finish[i])
    return Arrived([arrived.workers[j] for j in i.tolist()], work, tallies, arrived.replicas)


# -- the spec's protocol, checked and built --------------------------------------------------------

#: name -> (parameters it takes, with their defaults)
PARAMS: dict[str, dict[str, Any]] = {
    "sync": {},
    "semi_sync": {"k": None, "deadline_s": 0.0, "late": "drop", "staleness": "constant", "a": 0.5, "b": 4.0},
    "async": {"alpha": 1.0, "staleness": "constant", "a": 0.5, "b": 4.0},
    "buffered_async": {"k": None, "alpha": 1.0, "staleness": "constant", "a": 0.5, "b": 4.0},
}


def event_driven(protocol_name: str) -> bool:
    """Whether a protocol runs with a server that holds the global model (everything but the barrier):
    the real backend's rank 0, and in the simulator's time model the models go through it."""
    return protocol_name != "sync"


def build_protocol(spec: Spec) -> Protocol:
    """The spec's protocol, its parameters checked (one-line SpecErrors naming the key)."""
    p = spec.protocol
    _require(p.name in PARAMS, "protocol.name", f"one of {', '.join(PARAMS)}", p.name)
    known = PARAMS[p.name]
    for key in p.params:
        if key not in known:
            raise SpecError(f"protocol.params.{key}: not a parameter of {p.name!r} (expected "
                            f"{', '.join(known) or 'none'})")
    v = {**known, **dict(p.params)}
    if p.name == "sync":
        return SyncProtocol()
    n = spec.n_workers
    if "k" in known:
        k = v["k"]
        if k is None:
            raise SpecError(f"protocol.params.k: {p.name} needs k (1 <= k <= {n}, the cluster's workers)")
        _require(_is_int(k) and 1 <= k <= n, "protocol.params.k", f"1 <= k <= {n} (the cluster's workers)", k)
    if "alpha" in known:
        _require(_is_number(v["alpha"]) and 0 < v["alpha"] <= 1, "protocol.params.alpha",
                 "a number in (0, 1]", v["alpha"])
    _require(v["staleness"] in STALENESS, "protocol.params.staleness", f"one of {', '.join(STALENESS)}",
             v["staleness"])
    for key in ("a", "b"):
        _require(_is_number(v[key]) and v[key] >= 0, f"protocol.params.{key}", "a number >= 0", v[key])
    staleness = Staleness(v["staleness"], float(v["a"]), float(v["b"]))
    if p.name == "semi_sync":
        _require(v["late"] in LATE, "protocol.params.late", f"one of {', '.join(LATE)}", v["late"])
        _require(_is_number(v["deadline_s"]) and v["deadline_s"] >= 0, "protocol.params.deadline_s",
                 "a number of seconds >= 0 (0: no deadline)", v["deadline_s"])
        return SemiSyncProtocol(int(v["k"]), float(v["deadline_s"]), v["late"], staleness)
    if p.name == "async":
        return AsyncProtocol(float(v["alpha"]), staleness)
    return BufferedAsyncProtocol(int(v["k"]), float(v["alpha"]), staleness)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
