"""Replay a run in the simulator: `hetsim simulate --replay RUN [--out DIR]`.

The simulator runs RUN's config.toml (same policies, seeds and data streams) on a `ReplayClock`, which
takes every job's steps and arrival time from RUN's decisions instead of drawing them: each worker's
jobs, in the order it ran them, are the arrivals its decisions record (combined or dropped). The
protocol decides again, and its decisions must come out as RUN's (workers in arrival order, steps,
samples, pulled versions, staleness, version, dropped work; weights within 1e-9): otherwise a one-line
HetsimError names the first update that differs. Each update's model digest is compared with RUN's;
summary.json's `replay` says how many matched (all, when the math is reproduced bit for bit).

Arrival times are RUN's; the exchange and evaluation the replay charges are the simulator's (the
config's network and eval times). Decisions that depend on the clock (a semi_sync deadline, a time
budget for the lr schedule or the stop) are therefore reproduced exactly from a simulated RUN, and from
a real one only as far as its exchange and evaluation times agree with the simulator's.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from hetsim.cluster import DeviceModel
from hetsim.config import Spec, worker_names
from hetsim.errors import HetsimError, SpecError
from hetsim.policies import RoundPlan
from hetsim.protocol import Driver, Hooks, ProgressFn, Steps, Work
from hetsim.protocols import event_driven
from hetsim.resolve import load_spec, resolve
from hetsim.results import Decisions, RunResult, read_decisions
from hetsim.sim.engine import SimClock, Simulation, _torch_threads
from hetsim.training import Tallies

#: the decision columns a replay must reproduce exactly (weights: within WEIGHT_TOLERANCE)
SAME = ("workers", "local_steps", "samples", "biased_samples", "pulled", "staleness", "version", "dropped",
        "dropped_steps")
WEIGHT_TOLERANCE = 1e-9
#: the arrival time of a job the recorded run never finished: in flight to the end, never arriving
NEVER = 1e300


def recorded_jobs(decisions: Sequence[dict[str, Any]], n: int, where: str) -> list[deque[tuple[int, float]]]:
    """Each worker's jobs as (steps, arrival time), in the order it ran them: a worker's jobs never
    overlap, so that is the order of their arrival times (ties: the order of the updates)."""
    jobs: list[list[tuple[float, int, int]]] = [[] for _ in range(n)]
    for u, d in enumerate(decisions):
        if "finish_s" not in d or len(d["finish_s"]) != len(d["workers"]):
            raise HetsimError(f"{where}: update {d['round']} has no arrival times (decisions written by an older "
                              f"hetsim, or by a protocol that does not record them): it cannot be replayed")
        for ks, steps, finish in ((d["workers"], d["local_steps"], d["finish_s"]),
                                  (d["dropped"], d["dropped_steps"], d["dropped_finish_s"])):
            for k, s, f in zip(ks, steps, finish):
                if not 0 <= k < n or not math.isfinite(f):
                    raise HetsimError(f"{where}: update {d['round']} records worker {k} arriving at {f}: "
                                      f"not a job of this cluster's {n} workers")
                jobs[k].append((f, u, s))
    return [deque((s, f) for f, _, s in sorted(js)) for js in jobs]


class ReplayClock(SimClock):
    """A simulated clock whose jobs take the steps and arrival times a run recorded (see the module
    docstring); a job the run never finished (in flight at its end) never arrives."""

    fidelity_notes = "replay: steps and arrival times from a recorded run; real SGD math"

    def __init__(self, spec: Spec, groups: Sequence[DeviceModel], group_of: np.ndarray,
                 tallies: Callable[[Sequence[int]], Tallies], jobs: list[deque[tuple[int, float]]], run: str):
        super().__init__(spec, groups, group_of, tallies)
        self.jobs = jobs
        self.run = run
        self.names = worker_names(spec.worker_kinds())
        self.check: ReplayCheck | None = None

    def _take(self, ks: Sequence[int], plan: RoundPlan) -> tuple[list[int], np.ndarray]:
        steps, finish = [], np.empty(len(ks))
        for i, (k, target) in enumerate(zip(ks, plan.local_steps)):
            if self.jobs[k]:
                s, f = self.jobs[k].popleft()
                if target is not None and target != s:
                    raise HetsimError(f"replay of {self.run}: update {self._update()}: worker {self.names[k]} was "
                                      f"planned {target} local steps where the run took {s}")
            else:  # in flight when the run ended: it does its planned work and never arrives (in flight till then)
                s, f = (target if target is not None else 1), NEVER
            steps.append(int(s))
            finish[i] = max(f, self.env.now)  # (a real run's arrival can precede the replay's simulated exchange)
        return steps, finish

    def _update(self) -> int:
        return self.check.driver.round if self.check is not None else 0

    def dispatch(self, ks: Sequence[int], plan: RoundPlan, train: Callable[[list[int], list[int]], None],
                 step: Callable[[int], None]) -> None:
        steps, finish = self._take(ks, plan)
        train(list(ks), steps)
        self._launch(ks, self.env.now, steps, finish)

    def next_arrivals(self, count: int, deadline: float | None) -> Steps:
        flying = self._finish[np.isfinite(self._finish)]
        m = min(count, len(flying))
        if m and np.partition(flying, m - 1)[m - 1] >= NEVER and (deadline is None or deadline >= NEVER):
            raise HetsimError(f"replay of {self.run}: update {self._update()} waits for an arrival the run never "
                              f"recorded: the protocol's decisions differ from the run's")
        return (yield from super().next_arrivals(count, deadline))

    def local_work(self, ks: Sequence[int], plan: RoundPlan, train: Callable[[list[int], list[int]], None],
                   step: Callable[[int], None]) -> Steps:
        start = self.env.now
        steps, finish = self._take(ks, plan)
        if len(finish) and finish.max() >= NEVER:
            raise HetsimError(f"replay of {self.run}: round {self._update()} has work the run never recorded: "
                              f"the protocol's decisions differ from the run's")
        if len(finish) and finish.max() > start:
            yield self.env.timeout(float(finish.max()) - start)
        train(list(ks), steps)
        return Work(steps, np.full(len(ks), start), finish)

    def summary_fields(self) -> dict[str, Any]:
        fields = super().summary_fields()
        if self.check is not None:
            fields["replay"] = {"run": self.run, "updates": self.check.compared,
                                "digests_compared": self.check.digests_compared,
                                "digests_matched": self.check.digests_matched}
        return fields

    def state_dict(self) -> dict[str, Any]:
        raise HetsimError("a replay takes no checkpoints")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise HetsimError("a replay takes no checkpoints")


class ReplayCheck(Hooks):
    """Compares each update's decisions with the recorded run's as soon as the update is written."""

    def __init__(self, recorded: Decisions, run: str):
        self.recorded = recorded
        self.run = run
        self.driver: Driver | None = None
        self.compared = self.digests_compared = self.digests_matched = 0

    def round_started(self, round: int) -> None:
        self._compare_up_to(round - 1)

    def finished(self, round: int) -> None:
        self._compare_up_to(round)

    def _compare_up_to(self, updates: int) -> None:
        mine = self.driver.writer.decisions
        while self.compared < min(updates, len(mine)):
            u = self.compared
            got, want = mine[u], self.recorded[u]
            for key in SAME:
                if got[key] != want[key]:
                    raise HetsimError(f"replay of {self.run}: update {u + 1} differs from the run's: {key} "
                                      f"{got[key]} where the run has {want[key]}")
            if not np.allclose(got["weights"], want["weights"], rtol=0, atol=WEIGHT_TOLERANCE):
                raise HetsimError(f"replay of {self.run}: update {u + 1} differs from the run's: weights "
                                  f"{got['weights']} where the run has {want['weights']}")
            if got["digest"] and want["digest"]:
                self.digests_compared += 1
                self.digests_matched += got["digest"] == want["digest"]
            self.compared += 1


def replay(run: str | Path, out: str | Path | None = None, progress: ProgressFn | None = None,
           overwrite: bool = False) -> RunResult:
    """Replay run directory `run` in the simulator (see the module docstring); with `out`, write the
    replay's run directory there. Raises a one-line HetsimError at the first update whose decisions
    differ; the result's summary["replay"] counts the digests compared and matched."""
    run = Path(run)
    where = str(run)
    if not (run / "decisions.bin").is_file():
        raise SpecError(f"{run}: no decisions.bin to replay (not a run directory, or run with trace.decisions "
                        f"= false)")
    spec = load_spec(run / "config.toml")
    recorded = read_decisions(run / "decisions.bin")
    if not len(recorded):
        raise SpecError(f"{run}: its decisions hold no update to replay")
    if not spec.trace.decisions:
        raise SpecError(f"{run}: its config has trace.decisions = false: a replay compares decisions")
    summary = run / "summary.json"
    resumed = json.loads(summary.read_text()).get("resumed_at_updates") if summary.is_file() else None
    if resumed and event_driven(spec.protocol.name):
        raise SpecError(f"{run}: resumed at update {resumed[0]} with its work in flight redone (protocol "
                        f"{spec.protocol.name!r}), so its arrivals after that are not one run's to replay; "
                        f"replay a run that was not resumed")
    # a replay checkpoints nothing (run.* does not change what a run decides)
    spec = dataclasses.replace(spec, run=dataclasses.replace(spec.run, checkpoint_every=0))
    experiment = resolve(spec)
    jobs = recorded_jobs(recorded, spec.n_workers, where)
    check = ReplayCheck(recorded, where)

    def make_clock(spec, groups, group_of, tallies):
        clock = ReplayClock(spec, groups, group_of, tallies, jobs, where)
        clock.check = check
        return clock

    if out is not None:
        from hetsim.rundir import claim_run_dir

        claim_run_dir(out, spec, "sim", overwrite=overwrite)
    with _torch_threads(spec.sim.threads or 1):
        sim = Simulation(spec, out, progress, experiment=experiment, make_clock=make_clock)
        sim.driver.hooks = check
        sim.driver.max_updates = len(recorded)
        check.driver = sim.driver
        result = sim.run()
    if check.compared != len(recorded):
        raise HetsimError(f"replay of {where}: it made {check.compared} updates, the run {len(recorded)}")
    return result
