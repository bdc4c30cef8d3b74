"""Event-driven protocols (semi_sync, async, buffered_async) on real processes: a server rank and
worker ranks that exchange jobs and results point to point.

Rank 0 is the server: it holds the global model, runs the Driver (the same protocol objects as the
simulator), writes the run directory, evaluates, and trains nothing. Ranks 1..N run workers 0..N-1,
so the world has N + 1 processes. The Driver's Clock on the server is `ServerClock`:

- `dispatch(ks, plan, ...)` sends each worker of ks a job (non-blocking): a header, the global
  parameters as they are now (the version the worker pulls) and, when the sampler reads loss scores,
  the score table;
- a receiver thread takes the workers' results in the order they arrive (gloo's receive from any
  rank), and `next_arrivals(count, deadline)` hands the Driver those that came before the deadline;
- `in_flight()` is who was dispatched and has not arrived (nor failed).

A worker (`serve_jobs`) loops: receive a job -> pull the parameters -> run its local steps with the same
`TrainingCore.step`, timed as the WallClock times them -> send the result (a header of its tallies, its
loss observations, its replica). Every message is a fixed-layout tensor; nothing is pickled.

Messages go over gloo with CPU tensors, whatever the devices: nccl has no receive-from-any-rank, which
an arrival order needs. A replica computed on a GPU is copied to the host once per result.

A worker that dies does not stop the run: the launcher marks its rank in a shared status array when its
process exits with an error, or when its heartbeat shows no progress in a job for run.fault_timeout_s
(then the launcher ends it); the server reads that array while it waits, drops the worker from the
in-flight set, never dispatches to it again, and summary.json lists it under `failed_workers`. A send
to a worker whose connection is gone marks it failed the same way.

Example (what backends/torchmp/worker.py wires for rank 0)::

    core = ServerCore(spec, experiment.policies, experiment.workload, profile_step_times=...)
    clock = ServerClock(world_comm, core, worker_names(spec.worker_kinds()), status=launcher_status)
    Driver(experiment, core, clock, ServerComm(spec.n_workers), engine="torchmp", run_dir=out).run()
    clock.finish()                       # stop every live worker
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from hetsim.errors import HetsimError
from hetsim.policies import RoundPlan
from hetsim.protocol import Arrived, Clock, InProcessComm, Steps, Work, run_to_end
from hetsim.training import Tallies, TrainingCore

# message tags: a job's three parts, a result's three parts, the final acknowledgement
TAG_JOB, TAG_PARAMS, TAG_SCORES = 10, 11, 12
TAG_RESULT, TAG_OBS, TAG_REPLICA = 20, 21, 22
TAG_ACK = 30

# the job header's columns (float64): stop flag, target steps (-1: run for the budget), budget (s), lr,
# whether a score table follows, and what the server's policies know of the worker's speed (its
# WorkerInfo's observed step time, NaN for None, and observed rounds), which a sampler may read
_J_STOP, _J_TARGET, _J_BUDGET, _J_LR, _J_SCORES, _J_OBSERVED, _J_OBSERVED_ROUNDS = range(7)
JOB_COLUMNS = 7
# the result header's columns (float64): worker, steps, samples, biased samples, loss sum, start and
# finish of the compute on the worker's copy of the common timeline, number of (indices, losses) pairs
_R_WORKER, _R_STEPS, _R_SAMPLES, _R_BIASED, _R_LOSS, _R_START, _R_FINISH, _R_NOBS = range(8)
RESULT_COLUMNS = 8

# values of the shared status array the launcher writes (one per rank) and the server reads
ALIVE, EXITED, NO_PROGRESS, UNREACHABLE = 0, 1, 2, 3
FAILURE_CAUSES = {EXITED: "its process exited with an error", NO_PROGRESS: "no progress in a job for "
                  "run.fault_timeout_s (ended by the launcher)", UNREACHABLE: "its connection was lost"}


@dataclass
class _Result:
    """One worker's result as the receiver thread got it (or its failure: `failed` set)."""

    worker: int
    header: np.ndarray | None = None
    observations: list[tuple[np.ndarray, np.ndarray]] | None = None
    replica: torch.Tensor | None = None
    arrived_s: float = 0.0
    dispatched_s: float = 0.0
    failed: str = ""


class ServerCore(TrainingCore):
    """The server's core: the global model, the loss-score table, evaluation; no replicas of its own.

    Workers pull by message: `pull` records nothing here, because `ServerClock.dispatch` sends the
    global parameters as they are at dispatch, which is what the Driver's pull means. The learning
    rate the Driver sets is kept (`lr`) for the next jobs."""

    def __init__(self, spec: Any, policies: Any, workload: Any = None, profile_step_times: Sequence[float] | None = None):
        super().__init__(spec, policies, workload, profile_step_times, local=[], device="cpu")
        self.lr = spec.optim.lr

    def set_lr(self, lr: float) -> float:
        self.lr = lr
        return lr

    def pull(self, ks: Sequence[int]) -> None:
        """Nothing to copy here: the job message carries the parameters (see the class docstring)."""

    def replicas(self, ks: Sequence[int]) -> torch.Tensor:
        raise RuntimeError("the server holds no replicas: they arrive with the workers' results (Arrived.replicas)")

    def tallies(self, ks: Sequence[int]) -> Tallies:
        raise RuntimeError("the server holds no tallies: they arrive with the workers' results (Arrived.tallies)")


class ServerComm(InProcessComm):
    """The Driver's Comm on the server: it is the only process running the Driver, and every worker's
    pull and result passes through it, so it stands for all of them (world 1, every worker local), with
    the simulator's in-process arithmetic (one matmul over the rows, in arrival order: a replay of this run
    computes the same bits). The workers' messages travel through ServerClock, not here."""

    def summary_fields(self) -> dict[str, Any]:
        return {"backend": "gloo", "server_rank": 0}


class ServerClock(Clock):
    """The wall clock of the server rank: dispatch sends jobs, arrivals are results received.

    comm: the TorchComm of the whole world (rank 0 = this server); its barrier starts the timeline
    together with the workers' WallClocks. core: the ServerCore (global parameters, lr, score table).
    names: the workers' names (worker k on rank k + 1). status: the launcher's shared per-rank status array
    (ALIVE, EXITED, NO_PROGRESS), or None (torchrun: a worker's death ends the job there).
    summary: what summary.json says of the devices. beat(phase): the server's heartbeat while it waits.
    """

    def __init__(self, comm: Any, core: ServerCore, names: Sequence[str], status: Any | None = None,
                 summary: dict[str, Any] | None = None, beat: Callable[[int], None] | None = None,
                 poll_s: float = 0.05):
        self.comm, self.core, self.names, self.n = comm, core, list(names), len(names)
        self.status = status
        self.summary = dict(summary or {})
        self.beat = beat or (lambda phase: None)
        self.poll_s = poll_s
        self._elapsed = 0.0
        self._t0: float | None = None
        self._in_flight: dict[int, float] = {}             # worker -> dispatch time
        self._sends: dict[int, list[Any]] = {}             # worker -> its last job's pending sends
        self._arrived: queue.Queue[_Result] = queue.Queue()
        self._replicas: dict[int, torch.Tensor] = {}       # worker -> the replica of its latest arrival
        self.failed: dict[int, dict[str, Any]] = {}        # worker -> when and why it was given up
        self._numel = core.global_flat.numel
        self._dtype = core.global_params().dtype
        self._receiver: threading.Thread | None = None
        self._receiver_error = ""

    # -- the timeline ------------------------------------------------------------------------------

    def start(self) -> None:
        """The common zero with the workers (the same agree + barrier as their WallClock.start), then
        the receiver thread starts taking results."""
        elapsed, = self.comm.agree([self._elapsed])
        self.comm.barrier()
        self._t0 = time.monotonic() - elapsed
        self._receiver = threading.Thread(target=self._receive, name="hetsim-results", daemon=True)
        self._receiver.start()

    def now(self) -> float:
        if self._t0 is None:
            raise RuntimeError("ServerClock.now() before start(): the timeline begins at the ranks' common barrier")
        return time.monotonic() - self._t0

    def online(self, ks: Sequence[int]) -> list[int]:
        self._poll_status()
        return [k for k in ks if k not in self.failed]

    def until_online(self) -> Steps:
        names = sorted(self.failed)
        raise HetsimError(f"every worker failed (workers {names}); the run cannot go on")
        yield  # a generator, as the port's contract says

    def local_work(self, ks, plan, train, step) -> Steps:
        raise RuntimeError("the server trains nothing: event-driven protocols dispatch jobs to the workers")

    def exchange(self, ks: Sequence[int], nbytes: int) -> Steps:
        """Nothing to advance: the messages take the real time they take."""
        return
        yield

    def evaluation(self, evaluator: int) -> Steps:
        """Nothing to advance: the server's evaluation takes the real time it takes."""
        return
        yield

    def drive(self, steps: Steps) -> None:
        run_to_end(steps)

    # -- jobs and results --------------------------------------------------------------------------

    def dispatch(self, ks: Sequence[int], plan: RoundPlan, train: Callable, step: Callable) -> None:
        """Send workers ks their jobs (ks[i] runs plan.local_steps[i] steps, None = plan.time_budget_s):
        the global parameters and lr as they are now, the score table when the sampler reads it. The
        sends do not wait for the workers; train and step are the simulated clocks' (the workers here
        run their own core's step)."""
        if len(plan.local_steps) != len(ks):
            raise ValueError(f"dispatch: a plan for {len(plan.local_steps)} workers, {len(ks)} dispatched")
        params = self.core.global_params().detach().to("cpu").clone()  # unchanged while the sends are in flight
        scores = torch.from_numpy(self.core.scores.values.copy()) if self.core.keep_scores else None
        now = self.now()
        for k, target in zip(ks, plan.local_steps):
            k = int(k)
            if k in self._in_flight:
                raise RuntimeError(f"dispatch: worker {k} is still in flight")
            if k in self.failed:
                continue  # it died since the protocol asked who was online
            header = torch.zeros(JOB_COLUMNS, dtype=torch.float64)
            header[_J_TARGET] = -1 if target is None else int(target)
            header[_J_BUDGET] = plan.time_budget_s or 0.0
            header[_J_LR] = self.core.lr
            header[_J_SCORES] = float(scores is not None)
            info = self.core.infos[k]
            header[_J_OBSERVED] = math.nan if info.observed_step_time_s is None else info.observed_step_time_s
            header[_J_OBSERVED_ROUNDS] = info.observed_rounds
            self._wait_sends(k)
            try:
                sends = [dist.isend(header, k + 1, tag=TAG_JOB), dist.isend(params, k + 1, tag=TAG_PARAMS)]
                if scores is not None:
                    sends.append(dist.isend(scores, k + 1, tag=TAG_SCORES))
            except RuntimeError:
                self._fail(k, UNREACHABLE)
                continue
            self._sends[k] = sends
            self._in_flight[k] = now

    def _wait_sends(self, k: int) -> None:
        """A worker's previous job's sends are complete once it answered; wait on them (their buffers
        are released) before the next."""
        for s in self._sends.pop(k, []):
            try:
                s.wait()
            except RuntimeError:
                pass  # the worker answered, or is found failed elsewhere: nothing more to send it

    def in_flight(self) -> list[int]:
        return sorted(self._in_flight)

    def in_flight_since(self) -> dict[int, float]:
        return dict(sorted(self._in_flight.items()))

    def next_arrivals(self, count: int, deadline: float | None) -> Steps:
        """Wait until `count` in-flight workers have arrived or the timeline reaches `deadline`
        (absolute; None: no deadline), whichever comes first, and return those arrivals in arrival order.
        A worker found failed meanwhile leaves the in-flight set: when fewer than `count` remain
        possible, the wait ends with the arrivals of all who could still come."""
        got: list[_Result] = []
        while len(got) < count:
            self._poll_status()
            if not self._in_flight:
                break  # nobody left who could come (all arrived, or failed)
            timeout = self.poll_s
            if deadline is not None:
                left = deadline - self.now()
                if left <= 0:
                    break
                timeout = min(timeout, left)
            self.beat(1)
            if self._receiver_error:
                raise HetsimError(f"the server stopped receiving results: {self._receiver_error}")
            try:
                r = self._arrived.get(timeout=timeout)
            except queue.Empty:
                continue
            if r.worker not in self._in_flight:
                continue  # a result of a worker given up on before it arrived
            if r.failed:
                self._fail(r.worker, UNREACHABLE)
                continue
            r.dispatched_s = self._in_flight.pop(r.worker)
            got.append(r)
        return self._arrivals(got)
        yield  # a generator, as the port's contract says; the wall clock never yields

    def _arrivals(self, got: list[_Result]) -> Arrived:
        ks = [r.worker for r in got]
        h = np.array([r.header for r in got]).reshape(len(got), RESULT_COLUMNS)
        steps = h[:, _R_STEPS].astype(np.int64)
        observations = [o for r in got if r.observations for o in r.observations]
        tallies = Tallies(np.array(ks, dtype=np.int64), steps, h[:, _R_SAMPLES].astype(np.int64),
                          h[:, _R_BIASED].astype(np.int64), h[:, _R_LOSS].copy(), observations)
        for r in got:
            self._replicas[r.worker] = r.replica
        # start = the pull (dispatch) and finish = the arrival, both on the server's timeline: the times the
        # protocol decided by (the worker's own compute interval is in the header, inside them)
        work = Work(steps.tolist(), np.array([r.dispatched_s for r in got]), np.array([r.arrived_s for r in got]))
        return Arrived(ks, work, tallies, self._replica_rows)

    def _replica_rows(self, ks: list[int]) -> torch.Tensor:
        """The latest arrived replicas of ks as rows (what the aggregator reads)."""
        return torch.stack([self._replicas[int(k)] for k in ks])

    def _receive(self) -> None:
        """The receiver thread: results in the order they reach this rank (gloo receives from any rank;
        each sender's parts follow in order). A blocking wait per result: a timed-out gloo wait closes the
        connection, so the waiting with deadlines happens on the queue instead. An unexpected error ends
        the thread and is raised by the next wait (the server must not wait forever for nothing)."""
        try:
            self._receive_results()
        except BaseException as e:  # noqa: BLE001 - handed to the server's main thread
            self._receiver_error = f"{type(e).__name__}: {e}"

    def _receive_results(self) -> None:
        while True:
            header = torch.zeros(RESULT_COLUMNS, dtype=torch.float64)
            try:
                work = dist.irecv(header, src=None, tag=TAG_RESULT)
                work.wait()
            except RuntimeError:  # a peer's connection failed under the receive: wait for the next
                time.sleep(self.poll_s)
                continue
            src = work._source_rank()
            k = src - 1
            try:
                h = header.numpy().copy()
                obs = _receive_observations(src, int(h[_R_NOBS]))
                replica = torch.empty(self._numel, dtype=self._dtype)
                dist.recv(replica, src, tag=TAG_REPLICA)
            except RuntimeError as e:
                self._arrived.put(_Result(k, failed=str(e)))
                continue
            self._arrived.put(_Result(k, h, obs, replica, arrived_s=self.now()))

    # -- failures ----------------------------------------------------------------------------------

    def _poll_status(self) -> None:
        if self.status is None:
            return
        for k in range(self.n):
            code = int(self.status[k + 1])
            if code != ALIVE and k not in self.failed:
                self._fail(k, code)

    def _fail(self, k: int, code: int) -> None:
        """Give worker k up: out of the in-flight set (its work is lost), never dispatched again."""
        if k in self.failed:
            return
        self._in_flight.pop(k, None)
        self._sends.pop(k, None)
        self.failed[k] = {"time_s": self.now(), "cause": FAILURE_CAUSES.get(code, f"status {code}")}

    # -- the end -----------------------------------------------------------------------------------

    def finish(self) -> None:
        """Stop every live worker: results still in flight are received and discarded (the protocol
        stopped: their work does not count), each live worker gets a stop job and acknowledges it."""
        stop = torch.zeros(JOB_COLUMNS, dtype=torch.float64)
        stop[_J_STOP] = 1
        live = [k for k in range(self.n) if k not in self.failed]
        for k in live:
            try:
                dist.isend(stop, k + 1, tag=TAG_JOB).wait()
            except RuntimeError:
                self._fail(k, UNREACHABLE)
        ack = torch.zeros(1, dtype=torch.float64)
        for k in live:
            if k in self.failed:
                continue
            try:
                dist.recv(ack, k + 1, tag=TAG_ACK)
            except RuntimeError:
                self._fail(k, UNREACHABLE)

    # -- summary and checkpoints -------------------------------------------------------------------

    def summary_fields(self) -> dict[str, Any]:
        self._poll_status()  # a worker that failed after the last arrival the run waited for is listed too
        return {"fidelity": "real", **self.summary, "failed_workers": self.failed_summary()}

    def failed_summary(self) -> dict[str, dict[str, Any]]:
        """The workers given up on, by name: when (s on the run's timeline) and why."""
        return {self.names[k]: dict(v) for k, v in sorted(self.failed.items())}

    def state_dict(self) -> dict[str, Any]:
        return {"time_s": self.now()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._elapsed = float(state["time_s"])


def _receive_observations(src: int, pairs: int) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """A result's loss observations (see `_send_result`): `pairs` (indices, losses) pairs, one per step."""
    if not pairs:
        return None
    lengths = torch.empty(pairs, dtype=torch.float64)
    dist.recv(lengths, src, tag=TAG_OBS)
    sizes = lengths.numpy().astype(np.int64)
    both = np.zeros((2, 0))
    if sizes.sum():
        buf = torch.empty(2, int(sizes.sum()), dtype=torch.float64)
        dist.recv(buf, src, tag=TAG_OBS)
        both = buf.numpy()
    cuts = np.cumsum(sizes)[:-1]
    return [(i.astype(np.int64), l.copy()) for i, l in zip(np.split(both[0], cuts), np.split(both[1], cuts))]


def serve_jobs(k: int, core: TrainingCore, clock: Any, on_job: Callable[[int], None] | None = None,
               on_sent: Callable[[int], None] | None = None) -> int:
    """Worker k's loop on rank k + 1: receive a job, run it, send the result, until a stop job.

    core: a TrainingCore holding worker k; clock: its WallClock (started by the caller, with the server's
    start), which runs and times the steps exactly as in a sync run. on_job(j) / on_sent(j): called when
    the j-th job (1, 2, ...) arrives and when its result is sent (heartbeat, fault injection). Returns
    how many jobs it ran."""
    header = torch.zeros(JOB_COLUMNS, dtype=torch.float64)
    params = torch.empty(core.global_flat.numel, dtype=core.global_params().dtype)
    scores = torch.empty(core.workload.n_train, dtype=torch.float64)
    jobs = 0
    while True:
        dist.recv(header, 0, tag=TAG_JOB)
        h = header.numpy()
        if h[_J_STOP]:
            dist.send(torch.ones(1, dtype=torch.float64), 0, tag=TAG_ACK)
            return jobs
        jobs += 1
        if on_job is not None:
            on_job(jobs)
        dist.recv(params, 0, tag=TAG_PARAMS)
        if h[_J_SCORES]:
            dist.recv(scores, 0, tag=TAG_SCORES)
            core.scores.values[:] = scores.numpy()
        observed = None if math.isnan(h[_J_OBSERVED]) else float(h[_J_OBSERVED])
        core.infos[k] = core.infos[k]._replace(observed_step_time_s=observed, observed_rounds=int(h[_J_OBSERVED_ROUNDS]))
        core.set_lr(float(h[_J_LR]))
        core.install(params)
        core.pull([k])  # the replica takes the pulled parameters and a fresh tally; momentum stays local
        target = int(h[_J_TARGET])
        plan = RoundPlan((None if target < 0 else target,), float(h[_J_BUDGET]) if target < 0 else None)
        work = run_to_end(clock.local_work([k], plan, core.train, core.step))
        _send_result(k, core.tallies([k]), work, core.replicas([k])[0])
        if on_sent is not None:
            on_sent(jobs)


def _send_result(k: int, tallies: Tallies, work: Work, replica: torch.Tensor) -> None:
    """One result: the header, the loss observations when the sampler keeps them (one pair per step, as
    TrainingCore.record makes them and the protocols split them: a tensor of each pair's length, then one
    [2, n] tensor of indices and losses; float64 holds indices exactly below 2**53), the replica."""
    obs = tallies.observations
    header = torch.tensor([k, tallies.steps[0], tallies.samples[0], tallies.biased[0], tallies.loss_sum[0],
                           work.start[0], work.finish[0], len(obs)], dtype=torch.float64)
    dist.send(header, 0, tag=TAG_RESULT)
    if obs:
        dist.send(torch.tensor([len(o[0]) for o in obs], dtype=torch.float64), 0, tag=TAG_OBS)
        both = np.stack([np.concatenate([o[0] for o in obs]).astype(np.float64),
                         np.concatenate([o[1] for o in obs]).astype(np.float64)])
        if both.shape[1]:
            dist.send(torch.from_numpy(both), 0, tag=TAG_OBS)
    dist.send(replica.detach().to("cpu").contiguous(), 0, tag=TAG_REPLICA)
