"""The time-only fidelity's rounds on arrays: the driver's protocols, step for step, for 10^5 devices.

A time-only round does no math, so what is left of it is bookkeeping per worker; with Python lists and
tuples (the driver's general path) that costs ~0.16 s a round at 10^5 devices (sync) and more under
semi_sync. Here the workers of a round stay int64 arrays from the plan to the decisions record:

- `TimeOnlyDriver`: the plan of a static scheduler (`Scheduler.static`: a function of the workers'
  profiles alone) is made once per set of online workers and reused while that set is the same (with the
  selector 'all'), at every barrier and at every dispatch of the event-driven protocols;
- `TimeOnlySync`, `TimeOnlySemiSync`: SyncProtocol's and SemiSyncProtocol's rounds with the clock's
  vectorised draws (`VectorClock`), the arrivals picked from the in-flight times as arrays, the core's
  tallies and step-time observations as columns (`TimeOnlyCore`), and one `aggregate` that builds the
  driver's `Arrivals` and its record with array columns (`encode_decision` writes the same bytes);
- `DecisionsThread`: the record (~3 MB to compress at 10^5 arrivals) is written on a second thread while
  the next round runs.

- `TimeOnlyEvents`: async and buffered_async as a loop over updates with a heap of arrivals instead of a
  SimPy event and array operations per update (10^6 updates of 10^4 workers), where the run's plan and
  speeds allow it (static plan, always online; see the class); otherwise the driver's own protocols.

Everything else (stop check, lr, evaluation, rows, checkpoints, summary) is the driver's. The files equal
the general path's byte for byte (tests/test_scale.py compares them, and with the files h-proto's code
wrote).
"""

from __future__ import annotations

import heapq
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from hetsim.cluster import exchange_time
from hetsim.policies import WorkerInfo
from hetsim.protocol import ArrivalBuffer, Driver, Hooks, Protocol, Steps, SyncProtocol, Work, _Pending
from hetsim.protocols import AsyncProtocol, BufferedAsyncProtocol, SemiSyncProtocol
from hetsim.results import _cell, encode_arrival, encode_update, model_digest
from hetsim.sim.timeonly import STAND_IN_LOSS, TimeOnlyCore, by_time, earliest, timeout_until
from hetsim.training import RoundRecord, Tallies, lr_at


class TimeOnlyDriver(Driver):
    """The driver with one addition for clusters of 10^4-10^5 workers: the plan of a static scheduler
    (`Scheduler.static`) is made once per set of online workers and handed out again while that set is
    the same and the selector is 'all' (another selector draws its choice every round). A barrier round
    plans once; an event-driven protocol plans the whole online set at every dispatch (10^4 workers'
    plan for one worker's entry)."""

    _planned: list[int] | None = None
    _plan: tuple | None = None

    def online_workers(self) -> list[int]:
        """clock.online(self.workers); `workers` itself while nobody can be away (its plan found by identity)."""
        return self.workers if self.clock._always_online else self.clock.online(self.workers)

    def plan_round(self, ks: list[int]) -> tuple:
        if self._plan is not None and (ks is self.workers is self._planned or ks == self._planned):
            self.idle_rounds = 0  # what plan_round does when somebody works (a reused plan has participants)
            return self._plan
        out = super().plan_round(ks)
        reuse = self.scheduler.static and self.spec.selector.name == "all" and len(out[1]) > 0
        self._planned, self._plan = ((ks if ks is self.workers else list(ks)), out) if reuse else (None, None)
        return out


class DecisionsThread:
    """Hands each update's decisions record to the run writer on a second thread: at 10^5 arrivals a record
    is ~3 MB to compress (zlib releases the GIL), as long as the rest of a time-only round, so it overlaps
    the next round's work on a second core. One record at a time, in order; `wait` returns when the last
    one is written (before a checkpoint records the files' lengths, and at the end). The record of update
    u therefore reaches the OS during update u + 1: a kill can lose the last finished update's record
    (a resume from a checkpoint loses nothing)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._last: Future | None = None

    def add(self, d: Driver, record: RoundRecord) -> None:
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="hetsim-decisions")
        self._last = self._pool.submit(d.writer.add_decision, record)

    def wait(self) -> None:
        last, self._last = self._last, None
        if last is not None:
            last.result()  # its error, if writing failed

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    def before_row(self, d: Driver) -> None:
        """Before the driver writes the pending update's row: wait for the record if a checkpoint follows."""
        every = d.spec.run.checkpoint_every
        if every and d.round % every == 0:
            self.wait()


def fast_protocol(protocol: Protocol) -> Protocol | None:
    """The array protocol for `protocol` (the spec's, built) on the time-only clock and core, where there is
    one (sync, semi_sync; async and buffered_async as an update loop that hands runs it does not model to
    `protocol`); None otherwise (the driver runs `protocol` itself)."""
    if isinstance(protocol, SyncProtocol):
        return TimeOnlySync()
    if isinstance(protocol, SemiSyncProtocol):
        return TimeOnlySemiSync(protocol)
    if isinstance(protocol, (AsyncProtocol, BufferedAsyncProtocol)):
        return TimeOnlyEvents(protocol)
    return None


class TimeOnlySync(Protocol):
    """SyncProtocol on the time-only clock and core (hetsim.sim.engine.TimeOnlyClock, TimeOnlyCore)."""

    name = "sync"

    def __init__(self) -> None:
        self._arrays: tuple[tuple, tuple[np.ndarray, np.ndarray | None, float | None]] | None = None

    def run(self, d: "Driver") -> Steps:
        decisions = DecisionsThread()
        try:
            return (yield from self._rounds(d, decisions))
        finally:
            decisions.close()

    def _rounds(self, d: Driver, decisions: DecisionsThread) -> Steps:
        while True:
            reason, progress = d.stop_check()
            if d.pending is not None:
                decisions.before_row(d)
                if (yield from d.end_round(reason)):
                    continue  # evaluated: the accuracy may have reached the target, the time the budget
            if reason:
                return reason
            ks = d.online_workers()
            if not ks:  # everyone is away: wait for the first device to return
                yield from d.clock.until_online()
                continue
            lr = d.begin_round(progress)
            at, targets, budget = self._plan_round(d, ks)
            start = d.clock.now()
            durations, steps = yield from self._local_work(d, at, targets, budget, start)
            barrier = d.clock.now()
            kept = self._traced(d, at)
            if len(kept):
                d.trace_work(at[kept].tolist(), Work(steps[kept].tolist(), np.full(len(kept), start),
                                                     start + durations[kept]), barrier)
            yield from d.clock.exchange(at, d.core.model_bytes)
            aggregate(d, d.core.tallies(at), budget, lr, d.pulled[at], np.full(len(at), start), start + durations,
                      write=lambda record: decisions.add(d, record))
            d.trace_comm(at[kept].tolist(), barrier)  # it also counts the exchange time

    def _plan_round(self, d: "Driver", ks: list[int]) -> tuple[np.ndarray, np.ndarray | None, float | None]:
        """(participants, their targets or None under a time budget, the budget) of the driver's plan, as
        arrays (converted once per plan: a TimeOnlyDriver hands out the same plan while it is reused)."""
        out = d.plan_round(ks)
        if self._arrays is None or self._arrays[0] is not out:
            plan, participants, targets = out
            budget = plan.time_budget_s
            # the clock's rule: under a time budget every participant runs for it
            self._arrays = (out, (np.asarray(participants, dtype=np.int64),
                                  None if budget is not None else np.asarray(targets, dtype=np.int64).reshape(-1),
                                  budget))
        return self._arrays[1]

    def _local_work(self, d: "Driver", at: np.ndarray, targets: np.ndarray | None, budget: float | None,
                    start: float) -> Steps:
        """Driver.local_work with TimeOnlyClock.local_work: pull, draw, advance to the slowest, tally,
        observe. Returns (durations, steps)."""
        d.pulled[at] = d.version
        d.core.pull(at)
        durations, steps = d.clock.vector.round(at, targets, budget, start)
        if len(durations):
            yield d.clock.env.timeout(float(durations.max()))
        d.core.train(at, steps)
        d.hooks.work_done(d.round)
        busy = (start + durations) - np.full(len(at), start)  # Work.finish - Work.start, as the driver computes
        d.busy_s[at] += busy
        d.participation[at] += 1
        d.core.observe_step_times(at, busy / steps)
        return durations, steps

    @staticmethod
    def _traced(d: "Driver", at: np.ndarray) -> np.ndarray:
        """Positions in `at` of the workers whose events of this round the trace keeps."""
        if d.writer is None:
            return np.zeros(0, dtype=np.int64)
        return np.asarray(d.writer.trace_positions(d.round, at), dtype=np.int64)


def aggregate(d: Driver, tallies: Tallies, budget: float | None, lr: float, pulled: np.ndarray, start_s: np.ndarray,
              finish_s: np.ndarray, dropped: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
              write: Callable[[RoundRecord], None] | None = None) -> None:
    """Driver.aggregate with the arrivals as arrays (tallies.workers, in arrival order): the same checks in the
    same order, staleness damping and alpha mixing, and the same record with array columns (encode_decision
    writes the same bytes as from the driver's tuples). dropped: (workers, steps, finish times) of late work
    discarded in this update (semi_sync). write(record): how the record reaches the writer (default: now)."""
    core, protocol = d.core, d.protocol
    at = tallies.workers
    samples = int(tallies.samples.sum())
    weights: np.ndarray = np.zeros(0)
    new_global = None
    staleness = d.version - pulled
    if len(at):
        rows = core.replicas(at)  # the in-process comm's arrivals source over the core's (empty) replicas
        weighted_sum: Callable[[np.ndarray], torch.Tensor] = lambda w: torch.as_tensor(w, dtype=rows.dtype) @ rows
        gathered = None if d.aggregator.linear else (lambda: rows)
        new_global, weights, d.aggregator_state, arrivals = d.combine_arrivals(at, tallies, staleness, lr,
                                                                               weighted_sum, gathered)
        d.selector_state = d.selector.observe(d.round, arrivals, d.selector_state)
        core.install(new_global)
        d.version += 1
        core.merge_scores(tallies.observations)
        core.samples_total += samples
        if protocol.event_driven:  # (sync counts its participants at their local work)
            d.participation[at] += 1
        d.staleness_sum += int(staleness.sum())
        d.arrivals_combined += len(at)
    train_loss = float(tallies.loss_sum.sum()) / samples if samples else float("nan")
    diverged = (new_global is not None and not bool(torch.isfinite(new_global).all())) or \
        (samples > 0 and not math.isfinite(train_loss))
    if dropped is not None:
        d.dropped_total += len(dropped[0])
    none = np.zeros(0, dtype=np.int64)
    record = RoundRecord(round=d.round, workers=at, local_steps=tallies.steps,  # type: ignore[arg-type]
                         samples=tallies.samples, biased_samples=tallies.biased,
                         weights=np.asarray(weights, dtype=np.float64), train_loss=train_loss,
                         time_budget_s=budget, diverged=diverged, staleness=staleness, pulled=pulled,
                         start_s=start_s, finish_s=finish_s, version=d.version,
                         dropped=dropped[0] if dropped is not None else none,
                         dropped_steps=dropped[1] if dropped is not None else none,
                         dropped_finish_s=dropped[2] if dropped is not None else np.zeros(0),
                         digest=model_digest(core.global_params()))
    d.schedule.check_divergence(record)
    if d.writer is not None and d.spec.trace.decisions:
        (write or d.writer.add_decision)(record)
    d.pending = _Pending(lr, record)


class TimeOnlySemiSync(Protocol):
    """SemiSyncProtocol (hetsim.protocols) on the time-only clock and core, with the idle workers, the
    dispatches and the update's arrivals as arrays; its rules, order and files are the driver's."""

    event_driven = True
    name = "semi_sync"

    def __init__(self, semi: "SemiSyncProtocol"):
        self.k, self.deadline_s, self.late, self.staleness = semi.k, semi.deadline_s, semi.late, semi.staleness
        self._arrays: tuple[tuple, tuple[np.ndarray, np.ndarray | None, float | None]] | None = None

    def staleness_weights(self, staleness: np.ndarray) -> np.ndarray | None:
        return self.staleness.weights(staleness)

    def run(self, d: Driver) -> Steps:
        decisions = DecisionsThread()
        try:
            return (yield from self._rounds(d, decisions))
        finally:
            decisions.close()

    def _rounds(self, d: Driver, decisions: DecisionsThread) -> Steps:
        idle = np.arange(d.n)  # a fresh or resumed run: nothing in flight
        while True:
            reason, progress = d.stop_check()
            if d.pending is not None:
                decisions.before_row(d)
                if (yield from d.end_round(reason)):
                    continue
            if reason:
                return reason
            if not d.clock.in_flight_count() and not d.clock.online(idle.tolist()):
                yield from d.clock.until_online()
                continue
            lr = d.begin_round(progress)
            idle = self._dispatch_idle(d, idle)
            flying = np.flatnonzero(np.isfinite(d.clock._finish))  # TimeOnlyClock.in_flight, as an array
            fresh = int((d.pulled[flying] == d.version).sum())  # dispatched this round
            need = min(self.k, fresh if self.late == "drop" else len(flying))
            deadline = d.clock.now() + self.deadline_s if self.deadline_s > 0 else None
            taken: list[_Arrivals] = []
            dropped: list[_Arrivals] = []
            have = 0
            if self.late == "drop" and deadline is None and need > 0:
                # the loop below asks again for as many as were late, until `need` fresh ones came: together
                # its calls take the earliest arrivals up to the need-th fresh one, which one call takes here
                arrived = yield from _arrivals(d, need, None, fresh=d.version, flying=flying)
                at = arrived.workers
                idle = np.concatenate([idle, at])
                late = arrived.late
                if late.any():
                    dropped.append(arrived.subset(late))
                    arrived = arrived.subset(~late)
                taken.append(arrived)
                have = len(arrived.workers)
            while have < need:
                arrived = yield from _arrivals(d, need - have, deadline)
                at = arrived.workers
                idle = np.concatenate([idle, at])
                if self.late == "drop":
                    late = d.pulled[at] < d.version
                    if late.any():
                        dropped.append(arrived.subset(late))
                        arrived = arrived.subset(~late)
                taken.append(arrived)
                have += len(arrived.workers)
                if deadline is not None and d.clock.now() >= deadline and have < need:
                    if have:
                        break
                    need, deadline = 1, None  # nobody by the deadline: the first arrival closes the round
            idle = np.sort(idle)
            yield from self._combine(d, taken, dropped, lr, decisions)

    def _dispatch_idle(self, d: Driver, idle: np.ndarray) -> np.ndarray:
        """Driver.dispatch_idle on arrays: the plan of the whole online set; the idle workers it plans take
        their entries (pull, trace their idle time, start). Returns the idle workers left, sorted."""
        if not len(idle):
            return idle
        out = d.plan_round(d.online_workers())
        if self._arrays is None or self._arrays[0] is not out:
            plan, ks, targets = out
            budget = plan.time_budget_s
            self._arrays = (out, (np.asarray(ks, dtype=np.int64),
                                  None if budget is not None else np.asarray(targets, dtype=np.int64).reshape(-1),
                                  budget))
        planned, targets, budget = self._arrays[1]
        want = idle  # (sorted: the round's end sorts it)
        if len(planned) == d.n:  # everyone planned (planned = 0..n-1): every idle worker goes, at its own index
            go = targets_at = want
            left = want[:0]
        else:
            pos = np.minimum(np.searchsorted(planned, want), max(len(planned) - 1, 0))
            hit = (planned[pos] == want) if len(planned) else np.zeros(len(want), dtype=bool)
            go, targets_at, left = want[hit], pos[hit], want[~hit]
        if len(go):
            d.pulled[go] = d.version
            d.core.pull(go)
            now = d.clock.now()
            if d.writer is not None:
                for i in d.writer.trace_positions(d.round, go):
                    k = int(go[i])
                    d._trace("idle", k, float(d.ready_at[k]), now)
            # TimeOnlyClock.dispatch: the durations drawn at once, the math (tallies) at once, the arrivals kept
            clock = d.clock
            durations, steps = clock.vector.round(go, None if targets is None else targets[targets_at], budget, now)
            d.core.train(go, steps)
            clock._launch(go, now, steps, now + durations)
        return left

    def _combine(self, d: Driver, taken: list["_Arrivals"], dropped: list["_Arrivals"], lr: float,
                 decisions: DecisionsThread) -> Steps:
        """Driver.combine on arrays: the exchange, the update (`aggregate`), the wait and exchange traced."""
        ks = _ints([a.workers for a in taken])
        close = d.clock.now()
        if len(ks):
            yield from _exchange(d, ks)
        tallies = _concat([a.tallies for a in taken])
        start = _cat([a.start for a in taken])
        finish = _cat([a.finish for a in taken])
        lost = (_ints([a.workers for a in dropped]), _ints([a.steps for a in dropped]), _cat([a.finish for a in dropped]))
        aggregate(d, tallies, None, lr, d.pulled[ks], start, finish, lost, write=lambda record: decisions.add(d, record))
        end = d.clock.now()
        d.exchange_total_s += end - close
        if len(ks):
            d.ready_at[ks] = end
        if d.writer is not None:
            for i in d.writer.trace_positions(d.round, ks):
                k = int(ks[i])
                d._trace("idle", k, float(finish[i]), close)
                d._trace("comm", k, close, end, bytes=d.core.model_bytes)


def _exchange(d: Driver, ks: np.ndarray) -> Steps:
    """SimClock.exchange among workers ks, their device groups found by counting (np.unique hashes 10^5
    indices; the groups come in the same, ascending order)."""
    clock = d.clock
    if len(ks) == clock.n:
        groups = clock.groups
    else:
        present = np.flatnonzero(np.bincount(clock.group_of[ks], minlength=len(clock.groups)))
        groups = [clock.groups[g] for g in present.tolist()]
    exchange_s = exchange_time(d.spec.cluster.network, groups, d.core.model_bytes, clock.env.now, n=len(ks),
                               through_server=clock._through_server)
    if exchange_s > 0:
        yield clock.env.timeout(exchange_s)


def _concat(parts: list[Tallies]) -> Tallies:
    """ArrivalBuffer.tallies: the parts' columns one after the other."""
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return Tallies(*(np.zeros(0, dtype=np.int64) for _ in range(4)), np.zeros(0))
    return Tallies(*(np.concatenate([getattr(t, f) for t in parts]) for f in ("workers", "steps", "samples", "biased",
                                                                             "loss_sum")),
                   [o for t in parts for o in t.observations])


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts]) if parts else np.zeros(0)


def _ints(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, dtype=np.int64)


@dataclass
class _Arrivals:
    """Some in-flight workers' arrivals, in arrival order: `Arrived` with arrays."""

    workers: np.ndarray
    steps: np.ndarray
    start: np.ndarray
    finish: np.ndarray
    tallies: Tallies
    late: np.ndarray | None = None  # where known (`_arrivals` with fresh): which pulled an earlier version

    def subset(self, mask: np.ndarray) -> "_Arrivals":
        """The arrivals where `mask` holds (hetsim.protocols._subset; the time-only core has no loss
        observations to split)."""
        t, i = self.tallies, np.flatnonzero(mask)
        workers = self.workers[i]
        tallies = Tallies(workers if t.workers is self.workers else t.workers[i], t.steps[i], t.samples[i],
                          t.biased[i], t.loss_sum[i])
        return _Arrivals(workers, self.steps[i], self.start[i], self.finish[i], tallies)


def _arrivals(d: Driver, count: int, deadline: float | None, fresh: int | None = None,
              flying: np.ndarray | None = None) -> Steps:
    """TimeOnlyClock.next_arrivals and Driver.arrivals on arrays: the earliest `count` in-flight arrivals
    (ties in time: lower worker index first), up to the deadline; busy time, step times and compute spans
    recorded. fresh: a version; then the earliest arrivals up to the count-th of those that pulled it
    (no deadline; flying: the workers in flight, if known), with `late` set (those that pulled an earlier
    version). Returns _Arrivals."""
    clock = d.clock
    f = clock._finish
    if fresh is not None:
        if flying is None:
            flying = np.flatnonzero(np.isfinite(f))
        order_of, ordered = by_time(f[flying])
        order = flying[order_of]  # by time, ties by index (flying is ascending)
        is_fresh = d.pulled[order] == fresh
        upto = int(np.searchsorted(np.cumsum(is_fresh), count))  # the count-th fresh one
        chosen = order[:upto + 1]
        finish = ordered[:upto + 1]
        late = ~is_fresh[:upto + 1]
        until = float(finish[-1]) if len(chosen) else clock.env.now
    else:
        chosen, until = earliest(f, count, deadline, clock.env.now)
    if until > clock.env.now:
        yield from timeout_until(clock.env, until)
    if fresh is None:
        finish = f[chosen]  # (a copy: f is changed below)
    arrived = _Arrivals(chosen, clock._steps[chosen], clock._start[chosen], finish, d.core.tallies(chosen))
    if fresh is not None:
        arrived.late = late
    f[chosen] = np.inf
    clock._flying -= len(chosen)
    if len(chosen):
        busy = arrived.finish - arrived.start
        d.busy_s[chosen] += busy
        d.ready_at[chosen] = arrived.finish
        d.core.observe_step_times(chosen, busy / arrived.steps)
        if d.writer is not None:
            for i in d.writer.trace_positions(d.round, chosen):
                d._trace("compute", int(chosen[i]), float(arrived.start[i]), float(arrived.finish[i]),
                         steps=int(arrived.steps[i]))
    return arrived


#: metrics rows and decisions records an update loop holds before writing them in one go
WRITE_EVERY = 4096


class TimeOnlyEvents(Protocol):
    """AsyncProtocol and BufferedAsyncProtocol (hetsim.protocols) on the time-only clock and core, without a
    SimPy event or an array operation per update: 10^6 updates of 10^4 workers.

    Each worker re-dispatches at its arrival, from the same reused plan, so what is in flight is a heap of
    (arrival time, worker): popping it is the clock's `next_arrivals(1)` (ties in time: the lower index
    first). A dispatch draws the worker's duration from the clock's generator as `VectorClock.round` does
    for one worker (the same draws in the same order: the lognormal sum, then the stragglers), with the
    lognormal's parameters computed once per (device group, planned steps, slowdown factor). The
    aggregator's weights are computed once per distinct update (its kinds and local steps: the
    aggregator declares `work_weights`); the clock's time is set, not advanced by events, to the same
    floats as the events' (the arrival time itself, as `timeout_until`; t + exchange). Stop check, lr, rows, records,
    checkpoints and summary are the driver's, in its order: the files equal the general path's byte for
    byte (tests/test_scale.py). Rows and records are written WRITE_EVERY updates at a time (and before a
    checkpoint, before each call of the run's progress function and at the end): a kill loses up to that
    many finished updates' rows (a resume from a checkpoint loses nothing).

    Runs whose plan or speeds change in ways this does not model go to the general protocol: offline
    windows, a scheduler that is not static, a selector other than 'all', a sampler without a static bias,
    an aggregator that is stateful or does not declare work_weights, or a plan without participants."""

    event_driven = True

    def __init__(self, protocol: "AsyncProtocol | BufferedAsyncProtocol"):
        self.general = protocol
        self.name = protocol.name  # type: ignore[misc]
        self.alpha = protocol.alpha
        self.staleness = protocol.staleness
        self.buffered = isinstance(protocol, BufferedAsyncProtocol)
        self.k = protocol.k if isinstance(protocol, BufferedAsyncProtocol) else 1

    def staleness_weights(self, staleness: np.ndarray) -> np.ndarray | None:
        return self.staleness.weights(staleness)

    @staticmethod
    def applies(d: Driver) -> bool:
        """Whether the run fits the update loop (see the class docstring)."""
        agg = d.aggregator
        return (d.comm.world == 1 and isinstance(d.core, TimeOnlyCore) and d.clock._always_online
                and d.scheduler.static and d.spec.selector.name == "all" and d.core._bias_per_step is not None
                and agg.work_weights and not agg.stateful and type(d.hooks) is Hooks)

    def run(self, d: Driver) -> Steps:
        if not self.applies(d):
            return (yield from self.general.run(d))
        loop = _UpdateLoop(d, self)
        try:
            return (yield from loop.run())
        finally:
            loop.close()


class _UpdateLoop:
    """The state of one TimeOnlyEvents run: the heap in flight, the dispatch parameters, the held rows."""

    def __init__(self, d: Driver, protocol: TimeOnlyEvents):
        self.d, self.protocol = d, protocol
        self.heap: list[tuple[float, int]] = []
        self.start = [0.0] * d.n
        self.steps = [0] * d.n
        self.records: list[bytes] = []
        self.rows: list[dict] = []
        self.lines: list[str] = []
        self.write_decisions = d.writer is not None and d.spec.trace.decisions
        self._params: dict[tuple, tuple] = {}
        self._weights: dict[tuple, list[float]] = {}
        self._single: dict[tuple, float] = {}
        self._exchange_one: dict[int, float] = {}
        self.batch = d.spec.optim.batch_size
        self._lr_cell: tuple[float, str] | None = None
        self.group_of = d.clock.group_of.tolist()
        self.kind_of = d.kinds.tolist()
        self.target: dict[int, int | None] = {}
        self.budget: float | None = None

    # -- writing ---------------------------------------------------------------------------------------

    def line(self, row: dict) -> str:
        """metrics_line(row) (the same cells: no cell of a row needs quoting), with the lr's cell kept."""
        lr = row["lr"]
        if self._lr_cell is None or self._lr_cell[0] != lr or type(self._lr_cell[0]) is not type(lr):
            self._lr_cell = (lr, _cell(lr))
        t, e, loss, tl, ta = row["time_s"], row["epoch"], row["train_loss"], row["test_loss"], row["test_acc"]
        return (f"{row['round']},{repr(t) if type(t) is float else _cell(t)},"
                f"{repr(e) if type(e) is float else _cell(e)},{row['samples']},{self._lr_cell[1]},"
                f"{repr(loss) if type(loss) is float else _cell(loss)},{_cell(tl)},{_cell(ta)}\n")

    def flush(self) -> None:
        w = self.d.writer
        if w is None:
            return
        if self.records:
            w.add_decision_records(self.records)
            self.records.clear()
        if self.rows:
            w.add_rows(self.rows, self.lines)
            self.rows.clear()
            self.lines.clear()

    def close(self) -> None:
        """Write what is held; hand what is in flight back to the clock's arrays."""
        self.flush()
        clock = self.d.clock
        for f, k in self.heap:
            clock._launch([k], self.start[k], [self.steps[k]], np.array([f]))
        self.heap.clear()

    # -- dispatch --------------------------------------------------------------------------------------

    def _adopt(self, plan_out: tuple) -> None:
        """The reused plan's targets per worker, and what the clock put in flight at the first dispatch."""
        plan, ks, targets = plan_out
        self.budget = plan.time_budget_s
        self.target = dict(zip(ks, targets))
        clock = self.d.clock
        flying = np.flatnonzero(np.isfinite(clock._finish))
        finish = clock._finish[flying].tolist()
        for k, f, s, n in zip(flying.tolist(), finish, clock._start[flying].tolist(),
                              clock._steps[flying].tolist()):
            self.start[k], self.steps[k] = s, n
            self.heap.append((f, k))
        heapq.heapify(self.heap)
        clock._finish[flying] = np.inf
        clock._flying -= len(flying)

    def _fixed(self, g: int, target: int, factor: float) -> tuple:
        """VectorClock._fixed_round's constants for one device of group g planned `target` steps at slowdown
        `factor`, computed as it computes them (on a one-element array): (sum without noise, lognormal
        mean, lognormal sigma or None, straggler probability, straggler factor - 1, mean step)."""
        m = self.d.clock.vector.models[g]
        mean = m.step_time.mean_s * factor
        std = m.step_time.std_s * factor
        k = np.array([target], dtype=np.int64)
        total = float((k * mean)[0])
        mu = sigma = None
        if std > 0 and target > 0:
            sigma2 = np.log1p(std ** 2 / (k * mean ** 2))
            mu, sigma = float((np.log(k * mean) - sigma2 / 2)[0]), float(np.sqrt(sigma2)[0])
        return total, mu, sigma, m.straggler_prob, m.straggler_factor - 1, mean

    def dispatch(self, k: int, now: float, round_: int, trace: bool) -> None:
        """Driver.dispatch_idle for worker k alone (planned: it was dispatched before) and
        TimeOnlyClock.dispatch: pull, trace its idle time, draw its work, put it in flight."""
        d = self.d
        d.pulled[k] = d.version
        if trace and d.writer.trace_positions(round_, [k]):
            d._trace("idle", k, float(d.ready_at[k]), now)
        target = self.target[k]
        if target is None:  # a time budget: the clock's own draw, steps one by one
            durations, steps = d.clock.vector.round(np.array([k], dtype=np.int64), None, self.budget, now)
            duration, n = float(durations[0]), int(steps[0])
        else:
            g = self.group_of[k]
            m = d.clock.vector.models[g]
            factor = m.slowdown_at(now) if m.slowdown else 1.0
            key = (g, target, factor)
            p = self._params.get(key)
            if p is None:
                p = self._params[key] = self._fixed(g, target, factor)
            total, mu, sigma, straggle, extra, mean = p
            rng = d.clock.vector.rng
            duration = rng.lognormal(mu, sigma) if mu is not None else total
            if straggle > 0:
                duration = duration + rng.binomial(target, straggle) * extra * mean
            n = target
        core = d.core
        core._steps[k] = n
        core._biased[k] = n * core._bias_per_step[k]
        self.start[k], self.steps[k] = now, n
        heapq.heappush(self.heap, (now + duration, k))

    # -- arrival and update ----------------------------------------------------------------------------

    def arrive(self, now: float, round_: int, trace: bool) -> tuple[float, int, float]:
        """Driver.arrivals(1): the earliest in flight; the clock goes to its arrival (if later than now); its
        busy time and step time recorded. Returns (now, worker, its arrival time)."""
        d = self.d
        f, k = heapq.heappop(self.heap)
        if f > now:
            now = f  # as the clock's wait (timeout_until): exactly the arrival time
            d.clock.env._now = now
        start, n = self.start[k], self.steps[k]
        busy = f - start
        d.busy_s[k] += busy
        d.ready_at[k] = f
        core = d.core  # TimeOnlyCore.observe_step_times for one worker
        core._observed[k] = busy / n
        core._has_observed[k] = True
        core._rounds[k] += 1
        infos = core._infos
        if infos is not None and 8 <= len(infos):
            i = infos[k]
            infos[k] = tuple.__new__(WorkerInfo, (i[0], i[1], i[2], float(core._observed[k]), int(core._rounds[k])))
        else:
            core._infos = None
        if trace and d.writer.trace_positions(round_, [k]):
            d._trace("compute", k, start, f, steps=n)
        return now, k, f

    def weights(self, ks: list[int], steps: list[int], staleness: list[int], lr: float) -> list[float]:
        """The aggregator's weights for these arrivals, computed by its combine once per (kinds, local steps)
        (it declares work_weights: nothing else changes them; samples and mean losses follow from the steps
        in time-only)."""
        key = (tuple(self.kind_of[k] for k in ks), tuple(steps))
        w = self._weights.get(key)
        if w is not None:
            return w
        d = self.d
        at = np.asarray(ks, dtype=np.int64)
        rows = d.core.replicas(at)
        weighted_sum: Callable[[np.ndarray], torch.Tensor] = lambda w: torch.as_tensor(w, dtype=rows.dtype) @ rows
        gathered = None if d.aggregator.linear else (lambda: rows)
        # (the aggregator is stateless here: the state it returns is the one it was given)
        _, weights, _, _ = d.combine_arrivals(at, d.core.tallies(at), np.asarray(staleness, dtype=np.int64), lr,
                                              weighted_sum, gathered)
        w = self._weights[key] = np.asarray(weights, dtype=np.float64).tolist()
        return w

    def combine(self, arrived: list[tuple[int, int, float, float, int]], now: float, lr: float, round_: int,
                trace: bool) -> tuple[float, float]:
        """Driver.combine of the arrivals (worker, steps, start, finish, pulled), in arrival order: the
        exchange, `aggregate`'s bookkeeping and record, the wait and exchange traced. Returns (now, the
        update's training loss)."""
        d, core = self.d, self.d.core
        close = now
        ks = [a[0] for a in arrived]
        if ks:  # through the server (SimClock.exchange under an event-driven protocol)
            clock = d.clock
            groups = clock.groups if len(ks) == d.n else [clock.groups[g] for g in sorted({self.group_of[k] for k in ks})]
            exchange_s = exchange_time(d.spec.cluster.network, groups, core.model_bytes, now, n=len(ks),
                                       through_server=True)
            if exchange_s > 0:
                now = now + exchange_s
                clock.env._now = now
        batch = d.spec.optim.batch_size
        steps = [a[1] for a in arrived]
        samples = [n * batch for n in steps]
        total = sum(samples)
        version = d.version
        staleness = [version - a[4] for a in arrived]
        weights: list[float] = []
        if ks:
            weights = self.weights(ks, steps, staleness, lr)
            d.version = version = version + 1
            core.samples_total += total
            for k in (ks if len(ks) == 1 else set(ks)):  # an update counts once for a worker that arrived twice
                d.participation[k] += 1
            d.staleness_sum += sum(staleness)
            d.arrivals_combined += len(ks)
        # float(tallies.loss_sum.sum()) / samples: the stand-in loss per sample
        train_loss = float(sum(float(m * STAND_IN_LOSS) for m in samples)) / total if total else math.nan
        if self.write_decisions:
            self.records.append(encode_update(round_, ks, steps, samples, [int(core._biased[k]) for k in ks], weights,
                                              version, staleness, [a[4] for a in arrived], [a[2] for a in arrived],
                                              [a[3] for a in arrived]))
        d.exchange_total_s += now - close
        for k in ks:
            d.ready_at[k] = now
        if trace:
            for i in d.writer.trace_positions(round_, ks):
                k = ks[i]
                d._trace("idle", k, arrived[i][3], close)
                d._trace("comm", k, close, now, bytes=core.model_bytes)
        return now, train_loss

    def exchange_one(self, k: int, now: float) -> float:
        """One arrival's push and pull through the server (SimClock.exchange of [k]), per device group while
        the network's bandwidth is constant."""
        g = self.group_of[k]
        t = self._exchange_one.get(g)
        if t is None:
            clock = self.d.clock
            t = exchange_time(self.d.spec.cluster.network, [clock.groups[g]], self.d.core.model_bytes, now, n=1,
                              through_server=True)
            if not self.d.spec.cluster.network.bandwidth_schedule:
                self._exchange_one[g] = t
        return t

    def combine_one(self, k: int, finish: float, now: float, lr: float, round_: int,
                    trace: bool) -> tuple[float, float]:
        """`combine` of one arrival (async), with fewer Python objects per update. Returns (now, the training
        loss)."""
        d, core = self.d, self.d.core
        close = now
        exchange_s = self.exchange_one(k, now)
        if exchange_s > 0:
            now = now + exchange_s
            d.clock.env._now = now
        n = self.steps[k]
        samples = n * self.batch
        pulled = int(d.pulled[k])
        version = d.version
        tau = version - pulled
        key = (self.kind_of[k], n)
        w = self._single.get(key)
        if w is None:
            w = self._single[key] = self.weights([k], [n], [tau], lr)[0]
        d.version = version = version + 1
        core.samples_total += samples
        d.participation[k] += 1
        d.staleness_sum += tau
        d.arrivals_combined += 1
        if self.write_decisions:
            self.records.append(encode_arrival(round_, k, n, samples, int(core._biased[k]), w, version, tau, pulled,
                                               self.start[k], finish))
        d.exchange_total_s += now - close
        d.ready_at[k] = now
        if trace:
            for _ in d.writer.trace_positions(round_, [k]):
                d._trace("idle", k, finish, close)
                d._trace("comm", k, close, now, bytes=core.model_bytes)
        return now, float(samples * STAND_IN_LOSS) / samples

    # -- the run ---------------------------------------------------------------------------------------

    def run(self) -> Steps:
        d, protocol = self.d, self.protocol
        env, core, schedule, writer = d.clock.env, d.core, d.schedule, d.writer
        stop, optim, every = d.spec.stop, d.spec.optim, d.spec.run.checkpoint_every
        trace_rounds = writer.sample.max_rounds if writer is not None else 0
        n_train, k_buffer, buffered = core.n_train, protocol.k, protocol.buffered
        idle = list(d.workers)  # a fresh or resumed run: nothing in flight
        first, last = True, -1  # last: the worker that arrived in the previous update (async)
        pending: tuple[float, float] | None = None  # (lr, training loss) of the update whose row is not written
        now = env.now
        while True:
            epochs = core.samples_total / n_train  # Driver.stop_check, with the in-process comm
            reason = schedule.stop_reason(d.round, now, epochs, d.last_acc >= stop.target_accuracy)
            if not reason and d.max_updates and d.round >= d.max_updates:
                reason = "replayed"
            progress = schedule.progress(d.round, now, epochs)
            if pending is not None:  # Driver.end_round
                lr, train_loss = pending
                pending = None
                due = schedule.eval_due(d.round, epochs) or bool(reason)
                test_loss = test_acc = None
                if due:
                    loss_acc = yield from d._evaluate(charged=True)
                    test_loss, test_acc = loss_acc
                    d.last_acc = math.nan if test_acc is None else test_acc
                    now = env.now
                if writer is not None:
                    row = {"round": d.round, "time_s": now, "epoch": core.epochs, "samples": core.samples_total,
                           "lr": lr, "train_loss": train_loss, "test_loss": test_loss, "test_acc": test_acc}
                    self.rows.append(row)
                    self.lines.append(self.line(row))
                    if d.progress:
                        self.flush()
                        d.progress(writer.rows[-1])
                    if every and d.round % every == 0:
                        self.flush()
                        d._checkpoint()
                    elif len(self.rows) >= WRITE_EVERY:
                        self.flush()
                if due:
                    continue
            if reason:
                return reason
            lr = lr_at(optim, progress)  # Driver.begin_round (TimeOnlyCore.set_lr keeps it)
            d.round += 1
            round_ = d.round
            trace = writer is not None and (not trace_rounds or round_ <= trace_rounds)
            if first:
                idle = d.dispatch_idle(idle)  # everyone: the driver's own dispatch, and the plan made
                first = False
                if d._plan is None or not d.clock.in_flight_count():  # nobody planned: the general protocol's rounds
                    yield from d.combine(ArrivalBuffer(), lr)
                    return (yield from protocol.general.run(d))
                self._adopt(d._plan)
            elif last >= 0:
                self.dispatch(last, now, round_, trace)
            if not buffered and self.heap:  # async: one arrival
                now, k, finish = self.arrive(now, round_, trace)
                last = k
                now, train_loss = self.combine_one(k, finish, now, lr, round_, trace)
                pending = (lr, train_loss)
                continue
            arrived = []
            while len(arrived) < k_buffer and self.heap:
                now, k, finish = self.arrive(now, round_, trace)
                arrived.append((k, self.steps[k], self.start[k], finish, int(d.pulled[k])))
                if buffered:
                    self.dispatch(k, now, round_, trace)
                else:
                    last = k
            now, train_loss = self.combine(arrived, now, lr, round_, trace)
            pending = (lr, train_loss)
