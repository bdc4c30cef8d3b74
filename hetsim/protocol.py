"""The driver: the one place where a run's protocol is written, for every engine.

A run is a sequence of updates to a global model. The `Driver` owns everything the run decides and
writes — stop check, lr, plan, local work, tallies, arrivals, combine, divergence, evaluation, metrics
rows, decisions, trace, checkpoints, summary — and talks to two ports for what differs by engine:

- `Clock`: where durations and event order come from (SimPy emulated or time-only in hetsim.sim; the
  wall clock in backends/torchmp);
- `Comm`: how control values, tallies and replicas travel (in-process in hetsim.sim; torch.distributed
  in backends/torchmp).

A third port, `Protocol`, decides when the server combines. `SyncProtocol` is the barrier round::

    stop check (the leader's clock and accuracy, agreed by every process)
    lr; plan for the online workers (scheduler + its state + its seeded RNG)
    participants = online workers planned > 0 steps (or a time budget); they pull the global model
    local work through the clock (this process's participants); tallies gathered through the comm
    exchange (the clock charges it); combine (the aggregator + its state) over the arrivals
    install the new global model, merge loss scores in worker order, check divergence
    evaluate when due (on `eval.on`, charged by the clock), write the row, checkpoint

The event-driven protocols (hetsim/protocols.py: semi_sync, async, buffered_async) are written with
`dispatch_idle` (plan the online set; idle workers pull and start), `arrivals` (the clock's next
arrivals) and `combine` (exchange, then `aggregate`: arrivals damped by staleness, mixed by alpha).
Checkpoints are taken every run.checkpoint_every updates under every protocol; work in flight at a
checkpoint is not saved, so after a resume it is redone, dispatched again from the checkpoint's global
model.

The driver is a generator: a simulated clock's methods `yield` SimPy events, the wall clock's never
yield, and `run_to_end` drives it without SimPy. This module imports no port implementation.
"""

from __future__ import annotations

import math
import shutil
import time
from abc import ABC, abstractmethod
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Generator, Sequence

import numpy as np
import torch

from hetsim.config import worker_names
from hetsim.errors import HetsimError
from hetsim.policies import Arrivals, RoundPlan
from hetsim.results import (CHECKPOINT, RunResult, RunWriter, load_checkpoint, model_digest, restoring, run_summary,
                            save_checkpoint, trace_event, unsavable)
from hetsim.seeding import numpy_rng
from hetsim.training import RoundRecord, RunSchedule, Tallies, lr_at

if TYPE_CHECKING:
    from hetsim.resolve import Experiment

ProgressFn = Callable[[dict], None]
Steps = Generator[Any, Any, Any]  # what the driver and the clocks' methods are: generators (SimPy events or none)

#: every stop reason, by the index the leader's decision travels as (comm.agree carries numbers)
STOP_REASONS = ("", "diverged", "target_accuracy", "max_rounds", "max_time_s", "max_epochs", "replayed")


@dataclass
class Work:
    """What a clock reports of some workers' local work: steps taken, start and finish time of each."""

    steps: list[int]
    start: np.ndarray
    finish: np.ndarray


@dataclass
class Arrived:
    """What `Clock.next_arrivals` returns: the workers that arrived, in arrival order (ties in time: lower
    worker index first), their Work (steps; start = when they pulled, finish = when they arrived), their
    tallies, and where their replicas are: replicas(ks) -> rows, or None when the core holds them
    (`core.replicas`, the simulator)."""

    workers: list[int]
    work: Work
    tallies: Tallies
    replicas: Callable[[list[int]], torch.Tensor] | None = None


class Clock(ABC):
    """Where durations and event order come from. Methods that take time are generators: a simulated
    clock yields its events, the wall clock yields nothing (the time passes while the code runs).

    Barrier rounds (sync) use `local_work`; event-driven protocols (semi_sync, async, buffered_async) use
    `dispatch`, `next_arrivals` and `in_flight`."""

    @abstractmethod
    def now(self) -> float:
        """Seconds on the run's timeline (a resumed run continues its checkpoint's time)."""

    @abstractmethod
    def online(self, ks: Sequence[int]) -> list[int]:
        """The workers of ks available now, in order."""

    @abstractmethod
    def until_online(self) -> Steps:
        """Wait until some worker is back (called when none is online)."""

    @abstractmethod
    def local_work(self, ks: Sequence[int], plan: RoundPlan, train: Callable[[list[int], list[int]], None],
                   step: Callable[[int], None]) -> Steps:
        """Advance through the local work of workers ks (this process's; plan.local_steps[i] is ks[i]'s
        target, None = until plan.time_budget_s, see hetsim.cluster.within_budget), run its math — all of
        it with train(ks, steps) (simulated clocks), or step(k) per step, timed (the wall clock) — and
        return Work for ks."""

    def dispatch(self, ks: Sequence[int], plan: RoundPlan, train: Callable[[list[int], list[int]], None],
                 step: Callable[[int], None]) -> None:
        """Workers ks (not in flight; the driver has made them pull) start their work now: plan.local_steps[i]
        is ks[i]'s target (None = until plan.time_budget_s). A simulated clock draws their durations, runs
        their math at once with train(ks, steps) (it depends only on what they pulled) and schedules their
        arrivals; the wall clock sends them their jobs."""
        raise NotImplementedError(f"{type(self).__name__} does not run event-driven protocols (semi_sync, async, "
                                  f"buffered_async): it has no dispatch")

    def next_arrivals(self, count: int, deadline: float | None) -> Steps:
        """Wait until `count` in-flight workers have arrived (at most as many as are in flight) or the clock
        reaches `deadline` (absolute s; None = no deadline), whichever is first; returns the `Arrived` up to
        then, in arrival order (possibly none at a deadline). Work that arrived while the clock was busy
        elsewhere (an evaluation, an exchange) is returned at once."""
        raise NotImplementedError(f"{type(self).__name__} does not run event-driven protocols (semi_sync, async, "
                                  f"buffered_async): it has no next_arrivals")

    def in_flight(self) -> list[int]:
        """The workers dispatched and not arrived yet, in index order."""
        raise NotImplementedError(f"{type(self).__name__} does not run event-driven protocols (semi_sync, async, "
                                  f"buffered_async): it has no in_flight")

    def in_flight_count(self) -> int:
        """How many workers are in flight (a clock that counts them answers without building the list)."""
        return len(self.in_flight())

    def in_flight_since(self) -> dict[int, float]:
        """The workers in flight and when each was dispatched (the run's end counts their busy time so far)."""
        raise NotImplementedError(f"{type(self).__name__} does not run event-driven protocols: it has no in_flight")

    @abstractmethod
    def exchange(self, ks: Sequence[int], nbytes: int) -> Steps:
        """Charge exchanging nbytes among the workers ks (a simulated clock; the wall clock's comm takes
        its own time)."""

    @abstractmethod
    def evaluation(self, evaluator: int) -> Steps:
        """Charge one evaluation of the global model on worker `evaluator`."""

    def start(self) -> None:
        """Called once, right before the first round of this attempt: where a wall clock sets the common
        zero (a barrier every process passes). Simulated clocks are ready at construction."""

    @abstractmethod
    def drive(self, steps: Steps) -> None:
        """Run the driver's generator to its end (SimPy's event loop, or `run_to_end`)."""

    @abstractmethod
    def summary_fields(self) -> dict[str, Any]:
        """Engine-specific summary.json fields (fidelity, its notes, where device times came from)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """What this process's clock needs to continue (its time, its random generators)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Comm(ABC):
    """How control values, tallies and replicas travel between the processes of a run.

    rank / world: this process and how many there are; leader (rank 0) writes the run folder;
    local: the workers whose replicas live in this process.
    """

    rank: int
    world: int
    leader: bool
    local: list[int]

    @abstractmethod
    def agree(self, values: Sequence[float]) -> list[float]:
        """The leader's values, in every process."""

    @abstractmethod
    def share(self, worker: int, values: Sequence[float]) -> list[float]:
        """The values of the process that holds `worker`, in every process (evaluation results)."""

    @abstractmethod
    def gather_tallies(self, ks: Sequence[int], tallies: Tallies, work: Work) -> tuple[Tallies, Work]:
        """Every worker of ks's tally and times, in ks order, in every process; `tallies` and `work` hold
        this process's workers of ks (in ks order)."""

    @abstractmethod
    def arrivals_source(self, ks: Sequence[int], replicas: Callable[[list[int]], torch.Tensor],
                        linear: bool) -> tuple[Callable[[np.ndarray], torch.Tensor], Callable[[], torch.Tensor] | None]:
        """The two callables `Arrivals` takes, over the replicas of ks: weighted_sum(w) = Σ w_i x_{ks[i]}
        and, unless `linear`, replicas() = all of them as rows. `replicas(local_ks)` returns this
        process's replicas as rows; nothing is communicated before a callable is called."""

    @abstractmethod
    def barrier(self) -> None: ...

    @abstractmethod
    def send(self, tensor: torch.Tensor, src: int, dst: int) -> None:
        """Point-to-point, addressed by workers: `tensor` of worker src (local here) to the process that
        holds worker dst."""

    @abstractmethod
    def recv(self, tensor: torch.Tensor, src: int, dst: int) -> torch.Tensor:
        """Point-to-point: the next tensor worker src sent to worker dst (local here), into `tensor`."""

    @abstractmethod
    def summary_fields(self) -> dict[str, Any]:
        """Engine-specific summary.json fields (the torch backend's name, ...)."""


class InProcessComm(Comm):
    """One process holds every worker: agreement and sharing are the identity, the arrivals are the
    core's own replicas, and point-to-point messages go through a mailbox per (source, destination)."""

    def __init__(self, n: int):
        self.rank, self.world, self.leader = 0, 1, True
        self.local = list(range(n))
        self._mail: dict[tuple[int, int], deque[torch.Tensor]] = defaultdict(deque)

    def agree(self, values: Sequence[float]) -> list[float]:
        return list(values)

    def share(self, worker: int, values: Sequence[float]) -> list[float]:
        return list(values)

    def gather_tallies(self, ks: Sequence[int], tallies: Tallies, work: Work) -> tuple[Tallies, Work]:
        return tallies, work

    def arrivals_source(self, ks, replicas, linear):
        ks = list(ks)
        cache: list[torch.Tensor] = []

        def rows() -> torch.Tensor:
            if not cache:
                cache.append(replicas(ks))
            return cache[0]

        def weighted_sum(w: np.ndarray) -> torch.Tensor:
            x = rows()
            return torch.as_tensor(w, dtype=x.dtype) @ x

        return weighted_sum, (None if linear else rows)

    def barrier(self) -> None:
        pass  # one process runs the Driver

    def send(self, tensor: torch.Tensor, src: int, dst: int) -> None:
        self._mail[(src, dst)].append(tensor.detach().clone())

    def recv(self, tensor: torch.Tensor, src: int, dst: int) -> torch.Tensor:
        box = self._mail[(src, dst)]
        if not box:
            raise RuntimeError(f"recv: worker {src} sent nothing to worker {dst}")
        tensor.copy_(box.popleft())
        return tensor

    def summary_fields(self) -> dict[str, Any]:
        return {}


class Hooks:
    """Where an engine plugs into the run without a loop of its own (heartbeats, fault injection).
    Every method is a no-op here."""

    def round_started(self, round: int) -> None: ...

    def work_done(self, round: int) -> None: ...

    def evaluating(self, round: int) -> None:
        """This process starts evaluating the global model after `round` (it holds the evaluator; the
        initial model's evaluation, before round 1, is not announced)."""

    def evaluated(self, round: int) -> None: ...

    def finished(self, round: int) -> None: ...


class Protocol(ABC):
    """Decides when the server combines and what happens to late work, using the driver's steps.

    name: as in the spec (summary.json's `protocol`); event_driven: it uses the clock's dispatch /
    next_arrivals (the driver then traces each job at its arrival); alpha: the server's mixing rate
    x <- x + alpha (x_agg - x) (1: the combination itself)."""

    name: ClassVar[str] = ""
    event_driven: ClassVar[bool] = False
    alpha: float = 1.0

    def staleness_weights(self, staleness: np.ndarray) -> np.ndarray | None:
        """s(tau) per arrival, with which arrival i is damped to x + s_i (x_i - x); None: all 1 (nothing to
        compute)."""
        return None

    @abstractmethod
    def run(self, driver: "Driver") -> Steps:
        """Run until the driver's stop check says stop; return the stop reason."""


class SyncProtocol(Protocol):
    """Every round, all online workers do their planned work and the server combines at a barrier."""

    name = "sync"

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
            plan, ks, targets = d.plan_round(ks)
            work, tallies = yield from d.local_work(ks, RoundPlan(targets, plan.time_budget_s))
            barrier = d.clock.now()
            d.trace_work(ks, work, barrier)
            yield from d.clock.exchange(ks, d.core.model_bytes)
            d.aggregate(ks, tallies, plan.time_budget_s, lr, work=work)
            d.trace_comm(ks, barrier)


class ArrivalBuffer:
    """The arrivals an update combines, gathered over one or more `next_arrivals`: their tallies, times,
    pulled versions and replicas, in arrival order. snapshot: copy the replicas at arrival (a worker that is
    re-dispatched before the combine, under buffered_async, overwrites its replica)."""

    def __init__(self) -> None:
        self.workers: list[int] = []
        self._tallies: list[Tallies] = []
        self._steps: list[int] = []
        self._start: list[np.ndarray] = []
        self._finish: list[np.ndarray] = []
        self._pulled: list[np.ndarray] = []
        self._rows: list[Callable[[], torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self.workers)

    def add(self, arrived: Arrived, pulled: np.ndarray, replicas: Callable[[list[int]], torch.Tensor],
            snapshot: bool) -> None:
        """arrived's workers (or some of them: `arrived` already restricted), with the versions they pulled;
        replicas: where their replicas are (arrived.replicas or the core's)."""
        ks = list(arrived.workers)
        if not ks:
            return
        self.workers += ks
        self._tallies.append(arrived.tallies)
        self._steps += list(arrived.work.steps)
        self._start.append(np.asarray(arrived.work.start, dtype=np.float64))
        self._finish.append(np.asarray(arrived.work.finish, dtype=np.float64))
        self._pulled.append(np.asarray(pulled, dtype=np.int64))
        if snapshot:
            rows = replicas(ks)
            self._rows.append(lambda: rows)
        else:
            self._rows.append(lambda: replicas(ks))

    def tallies(self) -> Tallies:
        t = self._tallies
        if len(t) == 1:
            return t[0]
        if not t:
            return Tallies(*(np.zeros(0, dtype=np.int64) for _ in range(4)), np.zeros(0))
        return Tallies(*(np.concatenate([getattr(x, f) for x in t]) for f in ("workers", "steps", "samples", "biased",
                                                                             "loss_sum")),
                       [o for x in t for o in x.observations])

    def work(self) -> Work:
        return Work(self._steps, _cat(self._start), _cat(self._finish))

    def pulled(self) -> np.ndarray:
        return np.concatenate(self._pulled) if self._pulled else np.zeros(0, dtype=np.int64)

    def replicas(self, ks: list[int]) -> torch.Tensor:
        """The replicas of ks (= the buffer's workers, as the comm asks for them) as rows."""
        if list(ks) != self.workers:
            raise ValueError(f"the buffer holds workers {self.workers}, asked for {list(ks)}")
        parts = [rows() for rows in self._rows]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0)


@dataclass
class _Pending:
    """A finished round whose row is not written yet; record None: the initial model (round 0), whose
    accuracy anchors the curves and whose evaluation is not charged to the clock."""

    lr: float
    record: RoundRecord | None = None


#: consecutive rounds in which nobody works before the run is stopped as making no progress
MAX_IDLE_ROUNDS = 1000


def _valid_target(t: Any, budget_s: float | None) -> bool:
    if t is None:
        return budget_s is not None
    return isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0


def _valid_targets(targets: Sequence[Any], budget_s: float | None) -> bool:
    """Whether a plan's local steps are integers >= 0 (None = the time budget, when there is one); one
    vectorised pass for the common all-integer plan of 10^4 workers."""
    if budget_s is None:
        a = np.asarray(targets)
        if a.dtype.kind in "iu":
            return a.size == 0 or a.min() >= 0
    return all(_valid_target(t, budget_s) for t in targets)


class Driver:
    """Owns a run: its decisions, its policy states and RNG, what it writes, its checkpoints.

    experiment: the resolved spec (`hetsim.resolve.resolve`: its policies, built once and shared with the
    core, which holds the sampler; the evaluator `eval.on` names); core: a training core
    (hetsim.training.TrainingCore, or the time-only core) holding this process's replicas;
    clock / comm: the engine's ports; engine: "sim" or "torchmp" (checkpoints and summary.json say which).
    run_dir: where the leader writes the run (None: in memory); resume: continue from its checkpoint
    (force: even if the config changed); progress: called with every metrics row (on the leader).
    """

    def __init__(self, experiment: Experiment, core: Any, clock: Clock, comm: Comm, *, engine: str,
                 run_dir: str | Path | None = None, resume: bool = False, force: bool = False,
                 progress: ProgressFn | None = None, hooks: Hooks | None = None, protocol: Protocol | None = None):
        spec = experiment.spec
        self.spec, self.core, self.clock, self.comm = spec, core, clock, comm
        self.scheduler, self.aggregator = experiment.policies.scheduler, experiment.policies.aggregator
        self.engine = engine
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress = progress
        self.hooks = hooks or Hooks()
        self.protocol = protocol or experiment.protocol
        self.n = len(core.infos)
        self.workers = list(range(self.n))
        self.names = worker_names(spec.worker_kinds())
        self.kinds = np.array(spec.worker_kinds())
        self.evaluator = experiment.evaluator
        self.schedule = RunSchedule(spec)
        self.scheduler_rng = numpy_rng(spec.seed, "scheduler")
        self.selector = experiment.policies.selector
        self.selector_rng = numpy_rng(spec.seed, "selector")
        self.round = 0
        self.version = 0                                      # combines so far (= rounds under sync)
        self.pulled = np.zeros(self.n, dtype=np.int64)        # the version each worker last pulled
        self.busy_s = np.zeros(self.n)
        self.participation = np.zeros(self.n, dtype=np.int64)
        self.exchange_total_s = 0.0
        self.last_acc = math.nan                              # the latest evaluated accuracy
        self.stopped_by = ""
        self.end_time = 0.0
        self.config_changes: list[dict] = []
        self.pending: _Pending | None = None
        self.idle_rounds = 0                                  # consecutive rounds in which nobody worked
        self.max_updates = 0                                  # stop after this many updates (0: no limit; replays)
        self.staleness_sum = 0                                # over the combined arrivals (summary's mean)
        self.arrivals_combined = 0
        self.dropped_total = 0                                # late work discarded (semi_sync, late = "drop")
        # when each worker last became free (event-driven protocols trace its idle time until the next dispatch)
        self.ready_at = np.zeros(self.n)
        self.resumed_at: list[int] = []  # the updates a resume continued from (summary.json, and replay refuses)
        checkpoint = None
        if resume:  # read and checked before anything is written: a refused resume changes nothing
            if self.run_dir is None:
                raise HetsimError("resume needs the run directory to continue")
            checkpoint = load_checkpoint(self.run_dir / CHECKPOINT, engine, spec, force)
        if checkpoint is None:  # the policies' first states, checked before anything is written
            self.scheduler_state = self.scheduler.init_state(core.infos)
            self.aggregator_state = self.aggregator.init_state(core.global_params())
            self.selector_state = self.selector.init_state(core.infos)
            self._check_savable(core.state_dict)
        self.writer = RunWriter(self.run_dir, spec, self.names, always_traced=[self.evaluator], resume=resume,
                                server_lane=self.protocol.event_driven) if comm.leader else None
        if checkpoint is not None:
            self.config_changes = checkpoint.config_changes
            self._restore(checkpoint.state)
        else:
            self.pending = _Pending(core.set_lr(lr_at(spec.optim, 0.0)))

    # -- the protocol's building blocks ------------------------------------------------------------

    def stop_check(self) -> tuple[str, float]:
        """(stop reason or "", share of the budget used): the leader's, on its clock, in every process.

        Only a time budget (stop.max_time_s) reads a clock, and the processes' clocks differ: then the
        leader decides and one broadcast tells the others. Without one, the rule reads only what every
        process holds alike (rounds, epochs, the shared accuracy, divergence of the shared model), so
        each decides for itself and the round saves a collective."""
        index, progress = 0.0, 0.0
        local = not self.spec.stop.max_time_s
        if self.comm.leader or local:
            reached = self.last_acc >= self.spec.stop.target_accuracy  # NaN: False
            now, epochs = self.clock.now(), self.core.epochs
            reason = self.schedule.stop_reason(self.round, now, epochs, reached)
            if not reason and self.max_updates and self.round >= self.max_updates:
                reason = "replayed"  # a replay ends where the run it replays ended
            index = STOP_REASONS.index(reason)
            progress = self.schedule.progress(self.round, now, epochs)
        if not local:
            index, progress = self.comm.agree([index, progress])
        return STOP_REASONS[int(index)], progress

    def begin_round(self, progress: float) -> float:
        """Start the next round at `progress` of the budget: returns its lr."""
        lr = self.core.set_lr(lr_at(self.spec.optim, progress))
        self.round += 1
        self.hooks.round_started(self.round)
        return lr

    def plan_round(self, ks: list[int]) -> tuple[RoundPlan, list[int], tuple[int | None, ...]]:
        """The scheduler's plan for the online workers ks, and its participants with their targets: a
        worker planned 0 steps sits the round out (no work, no arrival, no step-time observation)."""
        ks = self.select(ks)
        infos = self.core.infos
        out = self.scheduler.plan(self.round, [infos[k] for k in ks], self.scheduler_rng, self.scheduler_state)
        if not (type(out) is tuple and len(out) == 2 and isinstance(out[0], RoundPlan)):
            raise HetsimError(f"scheduler {self.spec.scheduler.name!r}: plan returned {_shape(out)}; expected "
                              f"(RoundPlan, state) ({POLICY_DOCS})")
        plan, self.scheduler_state = out
        if len(plan.local_steps) != len(ks):
            raise HetsimError(f"scheduler {self.spec.scheduler.name!r} planned {len(plan.local_steps)} workers "
                              f"in round {self.round}, {len(ks)} were online")
        targets = plan.local_steps
        if not _valid_targets(targets, plan.time_budget_s):
            bad = next(t for t in targets if not _valid_target(t, plan.time_budget_s))
            raise HetsimError(f"scheduler {self.spec.scheduler.name!r} planned {bad!r} local steps in round "
                              f"{self.round}: expected integers >= 0" +
                              (" or None (run for the time budget)" if plan.time_budget_s is not None else ""))
        if 0 in targets:
            kept = [(k, t) for k, t in zip(ks, targets) if t != 0]
            ks, targets = [k for k, _ in kept], tuple(t for _, t in kept)
        # a scheduler that sits everyone out for good would spin forever under a time or epoch budget
        self.idle_rounds = 0 if ks else self.idle_rounds + 1
        if self.idle_rounds >= MAX_IDLE_ROUNDS:
            raise HetsimError(f"scheduler {self.spec.scheduler.name!r} planned 0 local steps for every online "
                              f"worker in {MAX_IDLE_ROUNDS} rounds in a row (up to round {self.round}): the run "
                              f"makes no progress")
        return plan, ks, targets

    def select(self, ks: list[int]) -> list[int]:
        """The selector's participants among the online workers ks, in ks order; the others sit the round
        out like a worker planned 0 steps. A choice of nobody, or of a worker that is not among ks, is a
        one-line HetsimError naming the selector."""
        if not ks:
            return ks
        out = self.selector.select(self.round, _WorkersOf(self.core.infos, ks), self.selector_rng,
                                   self.selector_state)
        name = f"selector {self.spec.selector.name!r}"
        if not (type(out) is tuple and len(out) == 2):
            raise HetsimError(f"{name}: select returned {_shape(out)}; expected (indices, state) ({POLICY_DOCS})")
        chosen, self.selector_state = np.asarray(out[0]), out[1]
        if chosen.ndim != 1 or not (chosen.dtype.kind in "iu" or chosen.size == 0):
            raise HetsimError(f"{name}: select returned {chosen.dtype} indices of shape {chosen.shape} in round "
                              f"{self.round}; expected a list of integers (indices into the online workers)")
        if chosen.size == 0:
            raise HetsimError(f"{name} picked nobody in round {self.round} ({len(ks)} workers online): a round "
                              f"needs at least one participant")
        if chosen.size == len(ks) and chosen[0] == 0 and (np.diff(chosen) == 1).all():
            return ks  # everyone, in order (the 'all' selector): no copy of 10^5 indices
        bad = chosen[(chosen < 0) | (chosen >= len(ks))]
        if bad.size:
            raise HetsimError(f"{name} chose index {int(bad[0])} in round {self.round}: expected indices "
                              f"0..{len(ks) - 1} into the {len(ks)} online workers")
        unique = np.unique(chosen)  # sorted: the participants keep worker order
        if unique.size != chosen.size:
            raise HetsimError(f"{name} chose a worker twice in round {self.round} (indices "
                              f"{chosen.tolist()[:10]}): expected distinct indices")
        return [ks[i] for i in unique.tolist()]

    def local_work(self, ks: list[int], plan: RoundPlan) -> Steps:
        """Workers ks pull the global model and do their planned work (this process's, through the clock);
        returns everybody's Work and Tallies (through the comm) and observes their step times."""
        at = np.asarray(ks, dtype=np.int64)  # one conversion for the per-worker arrays below (10^4 workers)
        self.pulled[at] = self.version
        local = ks if self.comm.world == 1 else [k for k in ks if k in self.comm.local]
        targets = plan.local_steps if local is ks else tuple(t for k, t in zip(ks, plan.local_steps) if k in local)
        self.core.pull(local)
        work = yield from self.clock.local_work(local, RoundPlan(targets, plan.time_budget_s), self.core.train,
                                                self._step)
        self.hooks.work_done(self.round)
        tallies, work = self.comm.gather_tallies(ks, self.core.tallies(local), work)
        busy = work.finish - work.start
        self.busy_s[at] += busy
        self.participation[at] += 1
        self.core.observe_step_times(ks, (busy / np.asarray(work.steps)).tolist())
        return work, tallies

    def _step(self, k: int) -> None:
        self.core.step(k)

    def dispatch_idle(self, idle: Sequence[int]) -> list[int]:
        """Event-driven protocols: the scheduler plans the whole online set (so its ratios hold) and the
        workers of `idle` that are online and planned > 0 steps take their entries: they pull the current
        version and the clock starts their work now (the lr is the one set last, `begin_round`'s). Returns
        the workers of `idle` left idle (offline, or planned 0 steps), in order."""
        if not len(idle):
            return []
        online = self.clock.online(self.workers)
        plan, ks, targets = self.plan_round(online)
        planned = np.asarray(ks, dtype=np.int64)
        want = np.asarray(sorted(idle), dtype=np.int64)
        pos = np.minimum(np.searchsorted(planned, want), max(len(planned) - 1, 0))
        hit = (planned[pos] == want) if len(planned) else np.zeros(len(want), dtype=bool)
        go = want[hit].tolist()
        if go:
            at = want[hit]
            self.pulled[at] = self.version
            local = go if self.comm.world == 1 else [k for k in go if k in self.comm.local]
            self.core.pull(local)
            now = self.clock.now()
            if self.writer is not None:
                for i in self.writer.trace_positions(self.round, go):
                    self._trace("idle", go[i], float(self.ready_at[go[i]]), now)
            self.clock.dispatch(go, RoundPlan(tuple(targets[p] for p in pos[hit].tolist()), plan.time_budget_s),
                                self.core.train, self._step)
        return want[~hit].tolist()

    def arrivals(self, count: int, deadline: float | None = None) -> Steps:
        """Event-driven protocols: the next arrivals (Clock.next_arrivals), with their busy time, step
        times and compute spans recorded; returns the `Arrived`."""
        arrived = yield from self.clock.next_arrivals(count, deadline)
        ks = arrived.workers
        if ks:
            at = np.asarray(ks, dtype=np.int64)
            busy = arrived.work.finish - arrived.work.start
            self.busy_s[at] += busy
            self.ready_at[at] = arrived.work.finish
            self.core.observe_step_times(ks, (busy / np.asarray(arrived.work.steps)).tolist())
            if self.writer is not None:
                for i in self.writer.trace_positions(self.round, ks):
                    self._trace("compute", ks[i], float(arrived.work.start[i]), float(arrived.work.finish[i]),
                                steps=arrived.work.steps[i])
        return arrived

    def take(self, buffer: "ArrivalBuffer", arrived: Arrived, snapshot: bool = False) -> None:
        """Add `arrived` to the update's buffer (with the versions its workers pulled)."""
        buffer.add(arrived, self.pulled[np.asarray(arrived.workers, dtype=np.int64)],
                   arrived.replicas or self.core.replicas, snapshot)

    def combine(self, buffer: "ArrivalBuffer", lr: float, dropped: "ArrivalBuffer | None" = None) -> Steps:
        """Close an event-driven update: charge the exchange of the buffered arrivals' models, combine them
        (damped by staleness, mixed by alpha: `aggregate`), trace their wait and the exchange."""
        ks = buffer.workers
        close = self.clock.now()
        if ks:
            yield from self.clock.exchange(ks, self.core.model_bytes)
        work = buffer.work()
        self.aggregate(ks, buffer.tallies(), None, lr, replicas=buffer.replicas if ks else None,
                       pulled=buffer.pulled(), work=work, dropped=dropped)
        end = self.clock.now()
        self.exchange_total_s += end - close
        if ks:
            self.ready_at[np.asarray(ks, dtype=np.int64)] = end
        if self.writer is not None:
            for i in self.writer.trace_positions(self.round, ks):
                self._trace("idle", ks[i], float(work.finish[i]), close)
                self._trace("comm", ks[i], close, end, bytes=self.core.model_bytes)

    def combine_arrivals(self, at: np.ndarray, tallies: Tallies, staleness: np.ndarray, lr: float,
                         weighted_sum: Callable[[np.ndarray], torch.Tensor], gathered: Callable[[], torch.Tensor] | None
                         ) -> tuple[torch.Tensor, np.ndarray, Any, Arrivals]:
        """The arrivals of workers `at` through the aggregator, by the one rule (`aggregate`): damped by
        staleness, combined (the aggregator's contract checked: a one-line HetsimError naming it), mixed by
        alpha. weighted_sum / gathered: where their replicas are (Comm.arrivals_source). Returns (the new
        global model, the weights, the aggregator's new state, the Arrivals it saw); installs nothing."""
        agg = self.aggregator
        s = self.protocol.staleness_weights(staleness)
        alpha = self.protocol.alpha
        x = self.core.global_params() if (s is not None or alpha != 1.0 or agg.needs_previous_global) else None
        if s is not None and x.numel():  # (the time-only core's model is empty: nothing to damp)
            weighted_sum, gathered = _damped(x, s, weighted_sum, gathered)
        arrivals = Arrivals(at, self.kinds[at], tallies.steps, tallies.samples, tallies.mean_loss(),
                            staleness, self.round, lr, weighted_sum=weighted_sum, replicas=gathered)
        out = agg.combine(x if agg.needs_previous_global else None, arrivals, self.aggregator_state)
        if not (type(out) is tuple and len(out) == 3 and isinstance(out[0], torch.Tensor)
                and np.shape(out[1]) == (len(at),)):
            raise HetsimError(f"aggregator {self.spec.aggregator.name!r}: combine returned {_shape(out)} for "
                              f"{len(at)} arrivals; expected (new global model, {len(at)} weights, state) "
                              f"({POLICY_DOCS})")
        new_global, weights, state = out
        if alpha != 1.0:
            new_global = x + alpha * (new_global - x)
        return new_global, weights, state, arrivals

    def aggregate(self, ks: list[int], tallies: Tallies, time_budget_s: float | None, lr: float,
                  replicas: Callable[[list[int]], torch.Tensor] | None = None, pulled: np.ndarray | None = None,
                  work: Work | None = None, dropped: ArrivalBuffer | None = None) -> RoundRecord:
        """Combine the arrivals of ks with the aggregator (no combine without arrivals: the global model
        stays), install the new global model, merge the loss scores, check divergence and record the
        decisions; the round's row follows (`end_round`). replicas(local_ks): where this process's
        replicas of ks are (default: the core's; a protocol that delivers them by comm.send passes its own).
        pulled: the version each arrival pulled (default: the driver's `pulled`); work: their times (for
        the decisions); dropped: late work discarded in this update (recorded, not combined).

        Applying arrivals (every protocol, one rule): with x the current global model, arrival i is damped
        to x_i' = x + s(tau_i)(x_i - x) (s: the protocol's staleness weight, tau_i = version - pulled_i);
        the aggregator combines the x_i'; the server mixes x_new = x + alpha (x_agg - x). With s = 1 and
        alpha = 1 (sync) nothing of this is computed."""
        samples = int(tallies.samples.sum())
        weights: np.ndarray = np.zeros(0)
        new_global = None
        at = tallies.workers
        if pulled is None:
            pulled = self.pulled[np.asarray(ks, dtype=np.int64)]
        staleness = self.version - np.asarray(pulled, dtype=np.int64)
        if ks:
            weighted_sum, gathered = self.comm.arrivals_source(ks, replicas or self.core.replicas,
                                                               self.aggregator.linear)
            new_global, weights, self.aggregator_state, arrivals = self.combine_arrivals(
                at, tallies, staleness, lr, weighted_sum, gathered)
            self.selector_state = self.selector.observe(self.round, arrivals, self.selector_state)
            self.core.install(new_global)
            self.version += 1
            self.core.merge_scores(tallies.observations)
            self.core.samples_total += samples
            if self.protocol.event_driven:  # (sync counts its participants at their local work)
                self.participation[np.asarray(ks, dtype=np.int64)] += 1
            self.staleness_sum += int(staleness.sum())
            self.arrivals_combined += len(ks)
        train_loss = float(tallies.loss_sum.sum()) / samples if samples else float("nan")
        # one reduction over the parameters per combine; a round without samples has no loss to check
        diverged = (new_global is not None and not bool(torch.isfinite(new_global).all())) or \
            (samples > 0 and not math.isfinite(train_loss))
        if dropped is not None:
            self.dropped_total += len(dropped)
        dwork = dropped.work() if dropped is not None else None
        record = RoundRecord(round=self.round, workers=tuple(ks), local_steps=tuple(tallies.steps.tolist()),
                             samples=tuple(tallies.samples.tolist()), biased_samples=tuple(tallies.biased.tolist()),
                             weights=tuple(np.asarray(weights, dtype=np.float64).tolist()), train_loss=train_loss,
                             time_budget_s=time_budget_s, diverged=diverged,
                             staleness=tuple(staleness.tolist()), pulled=tuple(np.asarray(pulled).tolist()),
                             # NaN: a caller that did not say when its arrivals worked
                             start_s=tuple(work.start.tolist()) if work is not None else (math.nan,) * len(ks),
                             finish_s=tuple(work.finish.tolist()) if work is not None else (math.nan,) * len(ks),
                             version=self.version,
                             dropped=tuple(dropped.workers) if dropped is not None else (),
                             dropped_steps=tuple(dwork.steps) if dwork is not None else (),
                             dropped_finish_s=tuple(dwork.finish.tolist()) if dwork is not None else (),
                             digest=model_digest(self.core.global_params()))
        self.schedule.check_divergence(record)
        if self.writer is not None and self.spec.trace.decisions:
            self.writer.add_decision(record)
        self.pending = _Pending(lr, record)
        return record

    def end_round(self, reason: str) -> Steps:
        """Evaluate the pending round when due (or when it is the last), write its row, checkpoint.
        Returns whether it evaluated."""
        pending, self.pending = self.pending, None
        record = pending.record
        initial = record is None
        due = initial or self.schedule.eval_due(self.round, self.core.epochs) or bool(reason)
        test_loss = test_acc = None  # not evaluated this round (an empty cell, unlike a computed NaN)
        if due:
            test_loss, test_acc = yield from self._evaluate(charged=not initial)
            self.last_acc = math.nan if test_acc is None else test_acc
        if self.writer is not None:
            row = {"round": self.round, "time_s": 0.0 if initial else self.clock.now(), "epoch": self.core.epochs,
                   "samples": self.core.samples_total, "lr": pending.lr,
                   "train_loss": None if initial else record.train_loss,  # None: no training loss yet
                   "test_loss": test_loss, "test_acc": test_acc}
            self.writer.add_row(row)
            if self.progress:
                self.progress(self.writer.rows[-1])  # as stored: what was not computed is NaN
        if not initial:
            self._checkpoint()
        return due

    def _evaluate(self, charged: bool) -> Steps:
        """Test the global model on the evaluator (`eval.on`); charged: the clock advances by its
        evaluation time and the trace shows it (eval there, idle elsewhere)."""
        start = self.clock.now() if charged else 0.0
        if charged:
            yield from self.clock.evaluation(self.evaluator)
        loss = acc = None
        if self.evaluator in self.comm.local:
            if charged:
                self.hooks.evaluating(self.round)
            loss, acc = self.core.test_metrics()
            if charged:
                self.hooks.evaluated(self.round)
        # None (not computed) travels as a flag: the comm carries numbers
        v = self.comm.share(self.evaluator, [math.nan if loss is None else loss, math.nan if acc is None else acc,
                                             float(loss is None), float(acc is None)])
        loss, acc = (None if v[2] else v[0]), (None if v[3] else v[1])
        if charged and self.writer is not None:
            end = self.clock.now()
            if self.protocol.event_driven:
                # the server evaluates (the real backend's rank 0; the time model charges the `eval.on`
                # device's eval_time_s) while the workers may be computing: on the server's own track
                if end > start:
                    self.writer.add_trace(trace_event("eval", self.n, start, end, round=self.round))
            elif end > start:
                for i in self.writer.trace_positions(self.round, self.workers):
                    k = self.workers[i]
                    self.writer.add_trace(trace_event("eval" if k == self.evaluator else "idle", k, start, end,
                                                      round=self.round))
        return loss, acc

    # -- trace -----------------------------------------------------------------------------------

    def trace_work(self, ks: list[int], work: Work, barrier: float) -> None:
        """Compute from start to finish, then idle until the barrier (the fast wait for the slowest)."""
        if self.writer is None:
            return
        for i in self.writer.trace_positions(self.round, ks):  # the trace's sample, not all 10^4 devices
            self._trace("compute", ks[i], float(work.start[i]), float(work.finish[i]), steps=work.steps[i])
            self._trace("idle", ks[i], float(work.finish[i]), barrier)

    def trace_comm(self, ks: list[int], barrier: float) -> None:
        """The exchange, from the barrier to now; its duration counts as the round's exchange time."""
        end = self.clock.now()
        self.exchange_total_s += end - barrier
        if self.writer is None:
            return
        for i in self.writer.trace_positions(self.round, ks):
            self._trace("comm", ks[i], barrier, end, bytes=self.core.model_bytes)

    def _trace(self, kind: str, k: int, start: float, end: float, **args: Any) -> None:
        if end > start:
            self.writer.add_trace(trace_event(kind, k, start, end, round=self.round, **args))

    # -- run -------------------------------------------------------------------------------------

    def run(self) -> RunResult | None:
        """Run to the end; the leader returns the run's result (the others None)."""
        wall0 = time.perf_counter()
        try:
            self.clock.drive(self._main())
        except BaseException:
            if self.writer is not None:
                self.writer.close()  # every finished round is already on disk
            raise
        self.hooks.finished(self.round)
        if self.writer is None:
            return None
        return self.writer.finish(self.summary(time.perf_counter() - wall0))

    def _main(self) -> Steps:
        if self.pending is not None:  # a fresh run: the initial model's row, before the clock starts
            yield from self.end_round("")
        self.clock.start()
        self.stopped_by = yield from self.protocol.run(self)
        self.end_time = self.clock.now()  # work still in flight when the protocol stopped is not combined,
        if self.protocol.event_driven:  # but its workers were busy until now (utilization)
            for k, since in self.clock.in_flight_since().items():
                self.busy_s[k] += max(0.0, self.end_time - since)

    def summary(self, wall_s: float) -> dict:
        return run_summary(
            self.spec, self.writer.rows, self.engine, self.names, self.busy_s, self.round, self.end_time,
            self.core.epochs, self.core.samples_total, self.stopped_by, wall_s,
            diverged_at_round=self.schedule.diverged_at_round, config_changes=self.config_changes,
            **self.clock.summary_fields(), **self.comm.summary_fields(), **self.core.summary_fields(),
            exchange_s=self.exchange_total_s / self.round if self.round else 0.0,
            model_bytes=self.core.model_bytes, evaluator=self.names[self.evaluator],
            rounds_participated={name: int(p) for name, p in zip(self.names, self.participation)},
            protocol=self.protocol.name, selector=self.spec.selector.name, updates=self.version,
            mean_staleness=self.staleness_sum / self.arrivals_combined if self.arrivals_combined else 0.0,
            dropped=self.dropped_total, resumed_at_updates=self.resumed_at or None)

    # -- checkpoints -----------------------------------------------------------------------------

    def _rank_path(self, round_: int) -> Path:
        assert self.run_dir is not None
        return self.run_dir / "checkpoints" / f"round{round_}" / f"rank{self.comm.rank}.pt"

    def _checkpoint(self) -> None:
        """Every run.checkpoint_every rounds. One process: one file with everything. Several: every
        process saves its replicas' state for the round, then (after a barrier) the leader points
        checkpoint.pt at that round, so a crash mid-checkpoint leaves the previous one usable, and drops
        older rounds. The files' sizes do not grow with the run's length."""
        every = self.spec.run.checkpoint_every
        if self.run_dir is None or not every or self.round % every:
            return
        rank_state = {"core": self.core.state_dict(), "clock": self.clock.state_dict()}
        # every process holds the scheduler's and aggregator's states: all of them stop here alike
        self._check_savable(lambda: rank_state["core"])
        if self.comm.world == 1:
            save_checkpoint(self.run_dir / CHECKPOINT, {"round": self.round, "run": self._run_state(),
                                                        "rank": rank_state}, self.engine, self.spec,
                            self.config_changes)
            return
        save_checkpoint(self._rank_path(self.round), {"round": self.round, "rank": rank_state}, self.engine, self.spec)
        self.comm.barrier()
        if self.comm.leader:
            save_checkpoint(self.run_dir / CHECKPOINT, {"round": self.round, "run": self._run_state()},
                            self.engine, self.spec, self.config_changes)
            for old in (self.run_dir / "checkpoints").iterdir():
                if old.name != f"round{self.round}":
                    shutil.rmtree(old, ignore_errors=True)

    def _check_savable(self, core_state: Callable[[], dict[str, Any]]) -> None:
        """With checkpoints on, a one-line HetsimError naming the policy whose state holds something a
        checkpoint cannot store (a set, an object of its own, a Generator), instead of a TypeError from
        deep in the save. core_state: the core's state_dict (called only when checkpoints are on)."""
        if self.run_dir is None or not self.spec.run.checkpoint_every:
            return
        spec = self.spec
        states = [(f"scheduler {spec.scheduler.name!r}", self.scheduler_state),
                  (f"aggregator {spec.aggregator.name!r}", self.aggregator_state),
                  (f"selector {spec.selector.name!r}", self.selector_state)]
        # the sampler's per-worker states live in the emulated core (the time-only core runs no sampler)
        states += [(f"sampler {spec.sampler.name!r} (worker {self.names[k]})", w["sampler"])
                   for k, w in core_state().get("workers", {}).items()]
        for who, state in states:
            where = unsavable(state)
            if where:
                raise HetsimError(f"{who}: its state cannot be saved in a checkpoint: {where}; a policy's state "
                                  f"holds tensors, numpy arrays and plain data only (None, bool, int, float, str, "
                                  f"and lists, tuples and dicts of them)")

    def _run_state(self) -> dict[str, Any]:
        return {"writer": self.writer.state_dict() if self.writer is not None else None,
                "time_s": self.clock.now(),
                "busy_s": self.busy_s, "participation": self.participation, "exchange_total_s": self.exchange_total_s,
                "schedule": self.schedule.state_dict(), "version": self.version, "pulled": self.pulled,
                "last_acc": self.last_acc,
                "scheduler_state": self.scheduler_state, "scheduler_rng": self.scheduler_rng.bit_generator.state,
                "aggregator_state": self.aggregator_state, "staleness_sum": self.staleness_sum,
                "arrivals_combined": self.arrivals_combined, "dropped_total": self.dropped_total,
                "resumed_at": self.resumed_at,
                "selector_state": self.selector_state, "selector_rng": self.selector_rng.bit_generator.state}

    def _restore(self, state: dict[str, Any]) -> None:
        assert self.run_dir is not None
        path = self.run_dir / CHECKPOINT
        with restoring(path):
            self.round = state["round"]
            run = state["run"]
            if self.comm.world == 1:
                rank = state["rank"]
            else:
                path = self._rank_path(self.round)
                rank = load_checkpoint(path, self.engine, self.spec, force=True).state["rank"]
        with restoring(path):
            self.core.load_state_dict(rank["core"])
            self.clock.load_state_dict(rank["clock"])
        with restoring(self.run_dir / CHECKPOINT):
            if self.writer is not None:
                self.writer.load_state_dict(run["writer"])
            self.busy_s, self.participation = run["busy_s"], run["participation"]
            self.exchange_total_s = run["exchange_total_s"]
            self.schedule.load_state_dict(run["schedule"])
            self.version, self.pulled, self.last_acc = run["version"], run["pulled"], run["last_acc"]
            self.scheduler_state, self.aggregator_state = run["scheduler_state"], run["aggregator_state"]
            self.scheduler_rng.bit_generator.state = run["scheduler_rng"]
            # work in flight at the checkpoint is not saved: it is redone (every worker is idle, ready now)
            self.staleness_sum, self.arrivals_combined = run["staleness_sum"], run["arrivals_combined"]
            self.dropped_total = run["dropped_total"]
            self.resumed_at = [*run.get("resumed_at", []), self.round]
            self.ready_at[:] = run["time_s"]
            if "selector_rng" in run:  # a checkpoint from before selectors: its run selected everyone
                self.selector_state = run["selector_state"]
                self.selector_rng.bit_generator.state = run["selector_rng"]
            else:
                self.selector_state = self.selector.init_state(self.core.infos)


POLICY_DOCS = "see README.md, 'Write your own policy'"


def _damped(x: torch.Tensor, s: np.ndarray, weighted_sum: Callable[[np.ndarray], torch.Tensor],
            replicas: Callable[[], torch.Tensor] | None):
    """The arrivals' callables over the damped replicas x_i' = x + s_i (x_i - x):
    sum_i w_i x_i' = (sum_i w_i (1 - s_i)) x + sum_i (w_i s_i) x_i, and the rows x + s_i (x_i - x)."""

    def damped_sum(w: np.ndarray) -> torch.Tensor:
        w = np.asarray(w, dtype=np.float64)
        return float(np.dot(w, 1.0 - s)) * x + weighted_sum(w * s)

    def damped_rows() -> torch.Tensor:
        rows = replicas()
        return x + torch.as_tensor(s, dtype=rows.dtype).unsqueeze(1) * (rows - x)

    return damped_sum, (None if replicas is None else damped_rows)
class _WorkersOf(Sequence):
    """The WorkerInfos of workers ks, as a Sequence that copies nothing: the 'all' selector of a
    10^5-device run reads only its length, every round."""

    def __init__(self, infos: Sequence[Any], ks: Sequence[int]):
        self.infos, self.ks = infos, ks

    def __len__(self) -> int:
        return len(self.ks)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self.infos[k] for k in self.ks[i]]
        return self.infos[self.ks[i]]

    def __iter__(self):
        return (self.infos[k] for k in self.ks)


def _shape(out: Any) -> str:
    """What a policy method returned, in a few words (for the error that says it is not the contract's)."""
    if type(out) is tuple:
        return f"a tuple of {len(out)} ({', '.join(type(v).__name__ for v in out)})"
    return f"a {type(out).__name__}"


def run_to_end(steps: Steps) -> Any:
    """Drive a driver generator whose clock never yields (the wall clock); returns its value."""
    try:
        while True:
            event = next(steps)
            raise RuntimeError(f"a clock without an event loop yielded {event!r}")
    except StopIteration as stop:
        return stop.value
