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

Everything else (stop check, lr, evaluation, rows, checkpoints, summary) is the driver's. async and
buffered_async run the driver's own protocols (with the reused plan). The files equal the general
path's byte for byte (tests/test_scale.py compares them, and with the files h-proto's code wrote).
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from hetsim.errors import HetsimError
from hetsim.policies import Arrivals
from hetsim.protocol import POLICY_DOCS, Driver, Protocol, Steps, SyncProtocol, Work, _damped, _Pending, _shape
from hetsim.protocols import SemiSyncProtocol
from hetsim.results import model_digest
from hetsim.sim.timeonly import timeout_until
from hetsim.training import RoundRecord, Tallies


class TimeOnlyDriver(Driver):
    """The driver with one addition for clusters of 10^4-10^5 workers: the plan of a static scheduler
    (`Scheduler.static`) is made once per set of online workers and handed out again while that set is
    the same and the selector is 'all' (another selector draws its choice every round). A barrier round
    plans once; an event-driven protocol plans the whole online set at every dispatch (10^4 workers'
    plan for one worker's entry)."""

    _planned: list[int] | None = None
    _plan: tuple | None = None

    def plan_round(self, ks: list[int]) -> tuple:
        if self._plan is not None and ks == self._planned:
            self.idle_rounds = 0  # what plan_round does when somebody works (a reused plan has participants)
            return self._plan
        out = super().plan_round(ks)
        reuse = self.scheduler.static and self.spec.selector.name == "all" and len(out[1]) > 0
        self._planned, self._plan = (list(ks), out) if reuse else (None, None)
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
    one (sync, semi_sync); None otherwise (the driver runs `protocol` itself)."""
    if isinstance(protocol, SyncProtocol):
        return TimeOnlySync()
    if isinstance(protocol, SemiSyncProtocol):
        return TimeOnlySemiSync(protocol)
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
            ks = d.clock.online(d.workers)
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
        agg = d.aggregator
        rows = core.replicas(at)  # the in-process comm's arrivals source over the core's (empty) replicas
        weighted_sum: Callable[[np.ndarray], torch.Tensor] = lambda w: torch.as_tensor(w, dtype=rows.dtype) @ rows
        gathered = None if agg.linear else (lambda: rows)
        s, alpha = protocol.staleness_weights(staleness), protocol.alpha
        x = core.global_params() if (s is not None or alpha != 1.0 or agg.needs_previous_global) else None
        if s is not None and x.numel():  # (the time-only core's model is empty: nothing to damp)
            weighted_sum, gathered = _damped(x, s, weighted_sum, gathered)
        arrivals = Arrivals(at, d.kinds[at], tallies.steps, tallies.samples, tallies.mean_loss(), staleness, d.round,
                            lr, weighted_sum=weighted_sum, replicas=gathered)
        out = agg.combine(x if agg.needs_previous_global else None, arrivals, d.aggregator_state)
        if not (type(out) is tuple and len(out) == 3 and isinstance(out[0], torch.Tensor)
                and np.shape(out[1]) == (len(at),)):
            raise HetsimError(f"aggregator {d.spec.aggregator.name!r}: combine returned {_shape(out)} for "
                              f"{len(at)} arrivals; expected (new global model, {len(at)} weights, state) "
                              f"({POLICY_DOCS})")
        new_global, weights, d.aggregator_state = out
        if alpha != 1.0:
            new_global = x + alpha * (new_global - x)
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
                arrived = yield from _arrivals(d, need, None, fresh=d.version)
                at = arrived.workers
                idle = np.concatenate([idle, at])
                late = d.pulled[at] < d.version
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
        out = d.plan_round(d.clock.online(d.workers))
        if self._arrays is None or self._arrays[0] is not out:
            plan, ks, targets = out
            budget = plan.time_budget_s
            self._arrays = (out, (np.asarray(ks, dtype=np.int64),
                                  None if budget is not None else np.asarray(targets, dtype=np.int64).reshape(-1),
                                  budget))
        planned, targets, budget = self._arrays[1]
        want = np.sort(idle)
        pos = np.minimum(np.searchsorted(planned, want), max(len(planned) - 1, 0))
        hit = (planned[pos] == want) if len(planned) else np.zeros(len(want), dtype=bool)
        go = want[hit]
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
            durations, steps = clock.vector.round(go, None if targets is None else targets[pos[hit]], budget, now)
            d.core.train(go, steps)
            clock._launch(go, now, steps, now + durations)
        return want[~hit]

    def _combine(self, d: Driver, taken: list["_Arrivals"], dropped: list["_Arrivals"], lr: float,
                 decisions: DecisionsThread) -> Steps:
        """Driver.combine on arrays: the exchange, the update (`aggregate`), the wait and exchange traced."""
        ks = _ints([a.workers for a in taken])
        close = d.clock.now()
        if len(ks):
            yield from d.clock.exchange(ks, d.core.model_bytes)
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

    def subset(self, mask: np.ndarray) -> "_Arrivals":
        """The arrivals where `mask` holds (hetsim.protocols._subset; the time-only core has no loss
        observations to split)."""
        t = self.tallies
        tallies = Tallies(t.workers[mask], t.steps[mask], t.samples[mask], t.biased[mask], t.loss_sum[mask])
        return _Arrivals(self.workers[mask], self.steps[mask], self.start[mask], self.finish[mask], tallies)


def _arrivals(d: Driver, count: int, deadline: float | None, fresh: int | None = None) -> Steps:
    """TimeOnlyClock.next_arrivals and Driver.arrivals on arrays: the earliest `count` in-flight arrivals
    (ties in time: lower worker index first), up to the deadline; busy time, step times and compute spans
    recorded. fresh: a version; then the earliest arrivals up to the count-th of those that pulled it
    (no deadline). Returns _Arrivals."""
    clock = d.clock
    f = clock._finish
    if fresh is not None:
        flying = np.flatnonzero(np.isfinite(f))
        order = flying[np.argsort(f[flying], kind="stable")]  # by time, ties by index (flying is ascending)
        upto = int(np.searchsorted(np.cumsum(d.pulled[order] == fresh), count))  # the count-th fresh one
        chosen = order[:upto + 1]
    elif count == 1:
        i = int(np.argmin(f))  # the first minimum: the lowest index among ties
        chosen = np.array([i] if np.isfinite(f[i]) else [], dtype=np.int64)
    else:
        m = min(count, int(np.isfinite(f).sum()))
        chosen = np.zeros(0, dtype=np.int64)
        if m:
            v = np.partition(f, m - 1)[m - 1]
            below = np.flatnonzero(f < v)
            chosen = np.concatenate([below, np.flatnonzero(f == v)[:m - len(below)]])
            # by time, ties by index (the clock's lexsort): chosen is in index order within each time
            # (below: ascending; the ties at v, ascending, after them), so a stable sort by time is enough
            chosen = chosen[np.argsort(f[chosen], kind="stable")]
    until = float(f[chosen[-1]]) if len(chosen) else clock.env.now
    if deadline is not None and (not len(chosen) or until > deadline):
        chosen = chosen[f[chosen] <= deadline]
        until = deadline
    if until > clock.env.now:
        yield from timeout_until(clock.env, until)
    arrived = _Arrivals(chosen, clock._steps[chosen], clock._start[chosen], f[chosen].copy(), d.core.tallies(chosen))
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
