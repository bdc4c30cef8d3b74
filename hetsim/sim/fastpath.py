"""The barrier round of the time-only fidelity on arrays: `SyncProtocol`'s round, step for step, for
10^5 devices.

A time-only round does no math, so what is left of it is bookkeeping per worker; with Python lists and
tuples (the driver's general path) that costs ~0.16 s a round at 10^5 devices. Here the participants
stay one int64 array from the plan to the decisions record:

- the plan of a `static` scheduler (`Scheduler.static`: a function of the workers' profiles alone) is
  made by the driver once per set of online workers and reused while that set is the same (with the
  selector 'all'; any other selector plans every round, as the driver does);
- local work: the clock's vectorised draws (`VectorClock`), the core's tallies and step-time
  observations as columns (`TimeOnlyCore`);
- the combine: the aggregator gets the same `Arrivals`, and the decisions record carries the columns
  as arrays (`encode_decision` writes the same bytes);
- the trace: the driver's own `trace_work` / `trace_comm` over the few workers the trace keeps.

Everything else (stop check, lr, evaluation, rows, checkpoints, summary) is the driver's. The files
equal the general path's byte for byte (tests/test_scale.py compares them).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from hetsim.errors import HetsimError
from hetsim.policies import Arrivals
from hetsim.protocol import POLICY_DOCS, Driver, Protocol, Steps, Work, _Pending, _shape
from hetsim.results import model_digest
from hetsim.training import RoundRecord

if TYPE_CHECKING:
    from hetsim.config import Spec


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


def fast_protocol(spec: "Spec") -> Protocol | None:
    """The array protocol for a time-only spec whose protocol it implements (sync); None otherwise."""
    if spec.sim.fidelity == "time_only" and spec.protocol.name == "sync":
        return TimeOnlySync()
    return None


class TimeOnlySync(Protocol):
    """SyncProtocol on the time-only clock and core (hetsim.sim.engine.TimeOnlyClock, TimeOnlyCore)."""

    name = "sync"

    def __init__(self) -> None:
        self._arrays: tuple[tuple, tuple[np.ndarray, np.ndarray | None, float | None]] | None = None

    def run(self, d: "Driver") -> Steps:
        while True:
            reason, progress = d.stop_check()
            if d.pending is not None:
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
            self._aggregate(d, at, budget, lr, start, start + durations)
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

    def _aggregate(self, d: "Driver", at: np.ndarray, budget: float | None, lr: float, start: float,
                   finish: np.ndarray) -> None:
        """Driver.aggregate under sync (no staleness damping, alpha 1, participation counted at the local
        work) with the participants as one array: its checks and order, the same record."""
        core = d.core
        tallies = core.tallies(at)
        samples = int(tallies.samples.sum())
        weights: np.ndarray = np.zeros(0)
        new_global = None
        pulled = d.pulled[at]
        staleness = d.version - pulled
        if len(at):
            agg = d.aggregator
            rows = core.replicas(at)  # the in-process comm's arrivals source over the core's (empty) replicas
            arrivals = Arrivals(at, d.kinds[at], tallies.steps, tallies.samples, tallies.mean_loss(), staleness,
                                d.round, lr, weighted_sum=lambda w: torch.as_tensor(w, dtype=rows.dtype) @ rows,
                                replicas=None if agg.linear else (lambda: rows))
            previous = core.global_params() if agg.needs_previous_global else None
            out = agg.combine(previous, arrivals, d.aggregator_state)
            if not (type(out) is tuple and len(out) == 3 and isinstance(out[0], torch.Tensor)
                    and np.shape(out[1]) == (len(at),)):
                raise HetsimError(f"aggregator {d.spec.aggregator.name!r}: combine returned {_shape(out)} for "
                                  f"{len(at)} arrivals; expected (new global model, {len(at)} weights, state) "
                                  f"({POLICY_DOCS})")
            new_global, weights, d.aggregator_state = out
            core.install(new_global)
            d.version += 1
            core.merge_scores(tallies.observations)
            core.samples_total += samples
            d.staleness_sum += int(staleness.sum())
            d.arrivals_combined += len(at)
        train_loss = float(tallies.loss_sum.sum()) / samples if samples else float("nan")
        diverged = (new_global is not None and not bool(torch.isfinite(new_global).all())) or \
            (samples > 0 and not math.isfinite(train_loss))
        # the columns as arrays: encode_decision writes the same bytes as from the driver's tuples
        record = RoundRecord(round=d.round, workers=at, local_steps=tallies.steps,  # type: ignore[arg-type]
                             samples=tallies.samples, biased_samples=tallies.biased,
                             weights=np.asarray(weights, dtype=np.float64), train_loss=train_loss,
                             time_budget_s=budget, diverged=diverged, staleness=staleness, pulled=pulled,
                             start_s=np.full(len(at), start), finish_s=finish, version=d.version,
                             digest=model_digest(core.global_params()))
        d.schedule.check_divergence(record)
        if d.writer is not None and d.spec.trace.decisions:
            d.writer.add_decision(record)
        d.pending = _Pending(lr, record)
