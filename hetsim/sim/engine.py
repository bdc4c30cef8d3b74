"""The simulator's ports: clocks on SimPy and an in-process comm, under the one driver (hetsim.protocol).

The emulated clock reads like the protocol it models::

    device k:  repeat: yield env.timeout(one step's time: profile x slowdown x straggler)
    barrier:   wait for all devices (the fast ones are idle meanwhile)
    math:      every device's real SGD steps of the round (loop or batched), run at the barrier
    exchange:  yield env.timeout(collective cost: latency + bytes / bandwidth at that time)
    evaluate:  yield env.timeout(the evaluator's eval time)

The math of a round depends only on how many steps each device took, never on event order (workers
sample from the loss scores as of the round's start), so it runs at the barrier, and the same seed
gives the same run, bit for bit. Simultaneous events resolve in the order they were scheduled, which
is worker-index order (SimPy breaks time ties by insertion order).

The time-only clock (fidelity 'time_only', hetsim/sim/timeonly.py) advances each round by one event,
the slowest device's drawn sum of step times, and the time-only core runs no math.
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import simpy
import torch

from hetsim.cluster import DeviceModel, exchange_time, within_budget
from hetsim.config import Spec, worker_names
from hetsim.policies import RoundPlan
from hetsim.protocol import Arrived, Clock, Driver, InProcessComm, ProgressFn, Steps, Work
from hetsim.protocols import event_driven
from hetsim.resolve import Experiment, resolve
from hetsim.results import RunResult
from hetsim.seeding import numpy_rng
from hetsim.sim.fastpath import TimeOnlyDriver, fast_protocol
from hetsim.sim.timeonly import FIDELITY_NOTES, TimeOnlyCore, VectorClock, earliest, timeout_until
from hetsim.training import FlatParams, Tallies, TrainingCore
from hetsim.workloads import Workload, build_model


@contextlib.contextmanager
def _fewer_gc_passes(threshold: int = 50_000):
    """Python's cyclic GC walks the young objects every 700 allocations, and older generations with
    everything alive; a large run allocates millions of short-lived, acyclic event tuples. Freezing
    what exists at the start and collecting every 50,000 allocations makes 10,000-device time-only
    runs 2.9x faster (measured: 6.6 s -> 2.3 s per million device-rounds). Cycles are still collected."""
    old = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(threshold, old[1], old[2])
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


class SimClock(Clock):
    """What both simulated clocks share: a SimPy environment, the devices' time models, offline windows,
    the exchange and evaluation costs."""

    fidelity_notes: str  # what the clock's fidelity replaces (summary.json)

    def __init__(self, spec: Spec, groups: Sequence[DeviceModel], group_of: np.ndarray,
                 tallies: Callable[[Sequence[int]], Tallies] | None = None):
        """tallies(ks): the core's tallies of workers ks (what `next_arrivals` reports with their arrival;
        needed by event-driven protocols only)."""
        self.spec = spec
        self.groups = list(groups)
        self.group_of = group_of
        self.devices = [self.groups[g] for g in group_of]
        self.n = len(self.devices)
        self.env = simpy.Environment()
        self._always_online = all(not d.offline for d in self.devices)
        self.tallies = tallies
        self._through_server = event_driven(spec.protocol.name)  # the models go through the server
        # the work in flight (event-driven protocols), as arrays: arrival time (inf: not in flight), start, steps
        self._finish = np.full(self.n, np.inf)
        self._start = np.zeros(self.n)
        self._steps = np.zeros(self.n, dtype=np.int64)
        self._flying = 0

    def _launch(self, ks: Sequence[int], start: float, steps: Sequence[int], finish: np.ndarray) -> None:
        at = np.asarray(ks, dtype=np.int64)
        self._start[at] = start
        self._steps[at] = steps
        self._finish[at] = finish
        self._flying += len(at)

    def in_flight(self) -> list[int]:
        return np.flatnonzero(np.isfinite(self._finish)).tolist()

    def in_flight_count(self) -> int:
        return self._flying

    def in_flight_since(self) -> dict[int, float]:
        return {k: float(self._start[k]) for k in self.in_flight()}

    def next_arrivals(self, count: int, deadline: float | None) -> Steps:
        """The earliest `count` arrivals (ties in time: lower worker index first), by one partition of the
        in-flight arrival times; the clock advances to the last of them, or to the deadline if it comes
        first. One event per call, however many workers are in flight."""
        f = self._finish
        chosen, until = earliest(f, count, deadline, self.env.now)
        if until > self.env.now:
            yield from timeout_until(self.env, until)
        ks = chosen.tolist()
        work = Work(self._steps[chosen].tolist(), self._start[chosen], f[chosen].copy())
        f[chosen] = np.inf
        self._flying -= len(ks)
        return Arrived(ks, work, self.tallies(ks))

    def now(self) -> float:
        return self.env.now

    def online(self, ks: Sequence[int]) -> list[int]:
        if self._always_online:
            return list(ks)
        t = self.env.now
        return [k for k in ks if self.devices[k].online_at(t)]

    def until_online(self) -> Steps:
        yield self.env.timeout(min(d.back_online(self.env.now) for d in self.devices) - self.env.now)

    def exchange(self, ks: Sequence[int], nbytes: int) -> Steps:
        groups = self.groups if len(ks) == self.n else [self.groups[g] for g in np.unique(self.group_of[ks])]
        exchange_s = exchange_time(self.spec.cluster.network, groups, nbytes, self.env.now, n=len(ks),
                                   through_server=self._through_server)
        if exchange_s > 0:
            yield self.env.timeout(exchange_s)

    def evaluation(self, evaluator: int) -> Steps:
        eval_s = self.devices[evaluator].eval_time_s
        if eval_s > 0:
            yield self.env.timeout(eval_s)

    def drive(self, steps: Steps) -> None:
        self.env.process(steps)
        with _fewer_gc_passes():
            self.env.run()

    def summary_fields(self) -> dict[str, Any]:
        names = worker_names(self.spec.worker_kinds())
        return {"fidelity": self.spec.sim.fidelity, "fidelity_notes": self.fidelity_notes,
                "device_sources": {name: d.source for name, d in zip(names, self.devices)},
                # what every combine is charged beyond the alpha-beta exchange (cluster.combine_overhead)
                "combine_overhead_s": {"fixed": max(g.overhead_s for g in self.groups),
                                       "per_arrival": max(g.overhead_per_arrival_s for g in self.groups)}}


class EmulatedClock(SimClock):
    """One SimPy process per working device, one timeout per local step; the math at the end."""

    fidelity_notes = "emulated: real SGD math for every worker"

    def __init__(self, spec: Spec, groups: Sequence[DeviceModel], group_of: np.ndarray,
                 tallies: Callable[[Sequence[int]], Tallies] | None = None):
        super().__init__(spec, groups, group_of, tallies)
        self.rngs = [numpy_rng(spec.seed, "clock", k) for k in range(self.n)]

    def dispatch(self, ks: Sequence[int], plan: RoundPlan, train: Callable[[list[int], list[int]], None],
                 step: Callable[[int], None]) -> None:
        """Each worker's steps drawn one by one from its own generator, as `device` does (the same times,
        bit for bit: each step ends at the previous end + its draw), then all their math at once."""
        start = self.env.now
        budget = plan.time_budget_s
        steps, finish = [], np.empty(len(ks))
        for i, (k, target) in enumerate(zip(ks, plan.local_steps)):
            device, rng = self.devices[k], self.rngs[k]
            n, t = 0, start
            while (n < target) if target is not None else (n == 0 or within_budget(t - start, budget)):
                t = t + device.draw_step(rng, t)
                n += 1
            steps.append(n)
            finish[i] = t
        train(list(ks), steps)
        self._launch(ks, start, steps, finish)

    def device(self, k: int, target: int | None, budget_s: float | None, start: float, steps_done: dict):
        """Device k's local work: each step takes a drawn step time."""
        steps = 0
        env, device, rng = self.env, self.devices[k], self.rngs[k]
        while (steps < target) if target is not None else (steps == 0 or within_budget(env.now - start, budget_s)):
            yield env.timeout(device.draw_step(rng, env.now))
            steps += 1
        steps_done[k] = steps

    def local_work(self, ks: Sequence[int], plan: RoundPlan, train: Callable[[list[int], list[int]], None],
                   step: Callable[[int], None]) -> Steps:
        start = self.env.now
        steps_done: dict[int, int] = {}
        finish = np.empty(len(ks))
        procs = [self.env.process(self.device(k, target, plan.time_budget_s, start, steps_done))
                 for k, target in zip(ks, plan.local_steps)]
        for i, p in enumerate(procs):
            p.callbacks.append(lambda _, i=i: finish.__setitem__(i, self.env.now))
        yield self.env.all_of(procs)
        steps = [steps_done[k] for k in ks]
        train(list(ks), steps)  # the real math, at the barrier
        return Work(steps, np.full(len(ks), start), finish)

    def state_dict(self) -> dict[str, Any]:
        return {"now": self.env.now, "rngs": [r.bit_generator.state for r in self.rngs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.env = simpy.Environment(initial_time=state["now"])
        for rng, st in zip(self.rngs, state["rngs"], strict=True):
            rng.bit_generator.state = st


class TimeOnlyClock(SimClock):
    """Each device's local work drawn at once (VectorClock); a barrier round is ONE event, the slowest
    device's finish."""

    fidelity_notes = FIDELITY_NOTES

    def __init__(self, spec: Spec, groups: Sequence[DeviceModel], group_of: np.ndarray,
                 tallies: Callable[[Sequence[int]], Tallies] | None = None):
        super().__init__(spec, groups, group_of, tallies)
        self.vector = VectorClock(self.groups, group_of, numpy_rng(spec.seed, "clock-vector"))

    def dispatch(self, ks: Sequence[int], plan: RoundPlan, train: Callable[[list[int], list[int]], None],
                 step: Callable[[int], None]) -> None:
        """The dispatched workers' durations drawn at once (VectorClock), their arrivals kept as arrays."""
        start = self.env.now
        budget = plan.time_budget_s
        targets = None if budget is not None else np.array(plan.local_steps, dtype=np.int64)
        durations, steps = self.vector.round(np.asarray(ks, dtype=np.int64), targets, budget, start)
        steps_list = steps.tolist()
        train(list(ks), steps_list)
        self._launch(ks, start, steps_list, start + durations)

    def local_work(self, ks: Sequence[int], plan: RoundPlan, train: Callable[[list[int], list[int]], None],
                   step: Callable[[int], None]) -> Steps:
        start = self.env.now
        budget = plan.time_budget_s
        targets = None if budget is not None else np.array(plan.local_steps, dtype=np.int64)
        durations, steps = self.vector.round(np.asarray(ks, dtype=np.int64), targets, budget, start)
        if len(durations):
            yield self.env.timeout(float(durations.max()))
        steps_list = steps.tolist()
        train(list(ks), steps_list)
        return Work(steps_list, np.full(len(ks), start), start + durations)

    def state_dict(self) -> dict[str, Any]:
        return {"now": self.env.now, "rng": self.vector.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.env = simpy.Environment(initial_time=state["now"])
        self.vector.rng.bit_generator.state = state["rng"]


class Simulation:
    """A spec on the simulator: the cores and ports of its fidelity, run by the driver."""

    def __init__(self, spec: Spec, run_dir=None, progress: ProgressFn | None = None,
                 workload: Workload | None = None, resume: bool = False, force: bool = False,
                 experiment: Experiment | None = None, make_clock: Callable[..., "SimClock"] | None = None):
        """resume: continue from `run_dir`'s checkpoint (written every run.checkpoint_every rounds);
        the result equals an uninterrupted run's. force: resume even if the config changed since the
        checkpoint (summary.json records it as resumed_with_changed_config). experiment: `spec` already
        resolved (`hetsim.resolve.resolve`; checked and built once), else it is resolved here.
        make_clock(spec, groups, group_of, tallies): another clock than the fidelity's (a replay's)."""
        self.spec = spec
        exp = experiment if experiment is not None else resolve(spec)
        groups = list(exp.groups)
        group_of = np.repeat(np.arange(len(groups)), [d.count for d in spec.cluster.devices])
        mean_times = [d.step_time.mean_s for d in exp.devices]
        if spec.sim.fidelity == "time_only":
            self.core: Any = TimeOnlyCore(spec, exp.policies, mean_times, FlatParams(build_model(spec.workload)).nbytes)
            self.clock: SimClock = TimeOnlyClock(spec, groups, group_of, self.core.tallies)
        else:
            self.core = TrainingCore(spec, exp.policies, workload or exp.workload, mean_times)
            self.clock = EmulatedClock(spec, groups, group_of, self.core.tallies)
        if make_clock is not None:
            self.clock = make_clock(spec, groups, group_of, self.core.tallies)
        self.comm = InProcessComm(len(group_of))
        # the time-only clock and core: the plan reused, sync and semi_sync rounds on arrays (hetsim/sim/fastpath.py)
        fast = type(self.clock) is TimeOnlyClock
        driver, protocol = (TimeOnlyDriver, fast_protocol(exp.protocol)) if fast else (Driver, None)
        self.driver = driver(exp, self.core, self.clock, self.comm, engine="sim", run_dir=run_dir,
                             resume=resume, force=force, progress=progress, protocol=protocol)
        self.writer = self.driver.writer

    def run(self) -> RunResult:
        return self.driver.run()


def simulate(spec: Spec, out: str | Path | None = None, progress: ProgressFn | None = None,
             resume: bool = False, force: bool = False, overwrite: bool = False) -> RunResult:
    """Run `spec` in the simulator; with `out`, write the run directory there. `out` must be new, empty
    or hold a run of the same config; overwrite: replace another run's files there (see
    hetsim.rundir.claim_run_dir). resume: continue from the folder's checkpoint; force: even if the
    config changed since (summary.json records it).

    A run whose training loss or parameters become non-finite returns normally, with
    `result.summary["diverged_at_round"]` set (and, with stop.on_divergence = "stop", stopped there).
    resume / force: see `Simulation`.

    Example::

        result = simulate(load_spec("examples/digits.toml"), out="runs/digits")
        result.summary["time_to_accuracy_s"]

    Torch runs with `spec.sim.threads` threads (0: one) for the run, recorded as summary.json's
    torch_threads; the caller's setting is restored afterwards.
    """
    experiment = resolve(spec)  # every check before anything is written
    if out is not None:
        from hetsim.rundir import claim_run_dir

        claim_run_dir(out, spec, "sim", overwrite=overwrite, resume=resume)
    with _torch_threads(spec.sim.threads or 1):
        return Simulation(spec, out, progress, resume=resume, force=force, experiment=experiment).run()


@contextlib.contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
