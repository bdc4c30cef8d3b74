"""Start one process per device (torch.multiprocessing, spawn), watch them, and report faults.

A worker that crashes, or makes no progress for `run.fault_timeout_s` (a hang, or a peer blocked in a
collective), ends the whole run within that bound with an error naming the device and the round;
rank 0 has flushed every finished round to the run directory by then. The worker's traceback is in the
run's logs/rank{r}.log, not on the console. SIGTERM or SIGINT to the launcher ends every worker before
the launcher exits, and a worker whose launcher dies anyway (SIGKILL) is killed by the kernel (Linux).
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from backends.torchmp.server import ALIVE, EXITED, NO_PROGRESS
from hetsim.protocols import event_driven
from backends.torchmp.worker import drop_empty_log, error_path, log_path, spawn_entry
from hetsim.analysis import load_run
from hetsim.config import Spec, worker_names
from hetsim.errors import HetsimError, SpecError
from hetsim.resolve import check
from hetsim.results import CHECKPOINT, RunResult, load_checkpoint
from hetsim.rundir import claim_run_dir


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunInterrupted(HetsimError):
    """The launcher got SIGTERM or SIGINT; its workers were ended. `signum` gives the exit status 128 + signum."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    def __reduce__(self):  # a sweep's process pool sends the error back pickled
        return RunInterrupted, (self.signum, str(self))


class _StopOnSignals:
    """While the workers run, the first SIGTERM or SIGINT raises RunInterrupted in the launcher, so that
    its cleanup ends them (SIGTERM's default would leave them running the whole job as orphans). Signals
    that come once `disarm` is called (the cleanup has begun) are only remembered: the cleanup is never
    cut short. Signal handlers can only be set in the main thread; elsewhere this does nothing."""

    def __init__(self) -> None:
        self.armed = True
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_StopOnSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signum
        if self.armed:
            self.armed = False
            raise RunInterrupted(signum)

    def disarm(self) -> None:
        self.armed = False

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)


def check_devices(spec: Spec) -> None:
    """Refuse, before any process starts, a `cuda:i` device this machine cannot provide. Simulating such a
    config needs no GPU; only `hetsim run` does."""
    for i, d in enumerate(spec.cluster.devices):
        if not d.device.startswith("cuda"):
            continue
        what = f"cluster.devices[{i}].device = {d.device!r}"
        index = d.device.partition(":")[2] or "0"
        if not index.isdigit():
            raise HetsimError(f"{what}: expected 'cuda:INDEX' with an integer INDEX")
        if not torch.backends.cuda.is_built():
            raise HetsimError(f"{what}: this torch ({torch.__version__}) is built without CUDA; run the config on "
                              f"a CUDA build of torch, or simulate it (hetsim simulate needs no GPU)")
        count = torch.cuda.device_count()
        if int(index) >= count:
            raise HetsimError(f"{what}: {'no' if count == 0 else f'only {count}'} CUDA device"
                              f"{'' if count == 1 else 's'} visible on this machine")


def check_one_gpu_per_process(spec: Spec) -> None:
    """Refuse two devices on one GPU when they would talk over nccl (every device a GPU): nccl rejects
    two ranks of a communicator on the same GPU ("Duplicate GPU detected") at the first collective. The
    launcher puts every process on this machine, so `cuda:i` names the same GPU for all of them (under
    torchrun, equal names on different nodes are different GPUs). Over gloo, devices may share a GPU."""
    devices = [d.device for d in spec.worker_devices()]
    if not all(d.startswith("cuda") for d in devices):
        return
    names = worker_names(spec.worker_kinds())
    first: dict[int, int] = {}
    for rank, d in enumerate(devices):
        index = int(d.partition(":")[2] or "0")
        if index in first:
            raise HetsimError(f"devices {names[first[index]]} and {names[rank]} both run on cuda:{index}: nccl (used "
                              f"when every device is a GPU) needs one GPU per process; give each device its own "
                              f"'cuda:INDEX' (a kind with count > 1 puts all of its devices on the same one)")
        first[index] = rank


def check_event_driven(spec: Spec) -> None:
    """What the real backend does not offer under an event-driven protocol yet, refused before any process
    starts: checkpoints (the workers' momentum, data streams and sampler states live in their processes
    and would have to be gathered at a checkpoint)."""
    if spec.run.checkpoint_every:
        raise SpecError(f"run.checkpoint_every = {spec.run.checkpoint_every}: the real backend does not checkpoint "
                        f"protocol {spec.protocol.name!r} (only 'sync'); set it to 0, or simulate the config "
                        f"(hetsim simulate checkpoints every protocol)")


def run(spec: Spec, run_dir: str | Path, resume: bool = False, poll_s: float = 0.1, force: bool = False,
        overwrite: bool = False) -> RunResult:
    """Run `spec` on real devices, one process each; write the run directory; return its result.
    resume: continue from the run directory's last checkpoint (run.checkpoint_every > 0); force: even
    if the config changed since (summary.json records it). overwrite: replace another run's files in
    `run_dir` (see hetsim.rundir.claim_run_dir). A run that diverges returns normally, with
    `summary["diverged_at_round"]` set."""
    if any(d.offline or d.slowdown or d.slowdown_trace or d.straggler_prob for d in spec.cluster.devices):
        raise HetsimError("offline windows, slowdown schedules and stragglers are simulator conditions; "
                          "the real backend emulates speed with cluster.devices[].emulated_slowdown")
    check(spec)  # a spec built without hetsim.resolve: every check before anything is written
    check_devices(spec)
    served = event_driven(spec.protocol.name)
    if served:
        check_event_driven(spec)
    else:
        check_one_gpu_per_process(spec)
    run_dir = claim_run_dir(run_dir, spec, "torchmp", overwrite=overwrite, resume=resume)
    # an event-driven protocol has a server rank 0 before the devices' ranks (backends/torchmp/server.py)
    world = spec.n_workers + served
    names = (["server"] if served else []) + worker_names(spec.worker_kinds())
    ctx = mp.get_context("spawn")
    heartbeat = ctx.Array("d", 3 * world, lock=False)
    status = ctx.Array("i", world, lock=False) if served else None  # the workers the server must give up on
    init_method = f"tcp://127.0.0.1:{free_port()}"
    if resume:  # a missing, damaged, foreign or other-engine checkpoint is one line here, before any process starts
        load_checkpoint(run_dir / CHECKPOINT, "torchmp", spec, force)
    for stale in (run_dir / ".errors").glob("rank*.json"):
        stale.unlink()  # reports of an earlier attempt
    procs = [ctx.Process(target=spawn_entry, args=(r, world, spec, str(run_dir), init_method, heartbeat, resume, force,
                                                   status), name=f"hetsim-{names[r]}") for r in range(world)]
    exited_at: dict[int, float] = {}
    with _StopOnSignals() as signals:
        try:
            for p in procs:
                p.start()
            _watch(spec, run_dir, names, procs, heartbeat, exited_at, poll_s, status)
        except RunInterrupted as e:
            round_ = max(int(heartbeat[3 * r]) for r in range(world))
            raise RunInterrupted(e.signum, f"interrupted by {signal.Signals(e.signum).name} in round {round_}; "
                                           f"the {world} worker processes were ended, finished rounds are in "
                                           f"{run_dir}") from None
        finally:
            try:
                signals.disarm()
            finally:  # a signal at the very start of this block disarms too, and must not skip the cleanup
                _end(procs)
                _drop_empty_logs(run_dir, world)
    if signals.received is not None:  # asked to stop while the workers were ending: the run is over anyway
        raise RunInterrupted(signals.received, f"interrupted by {signal.Signals(signals.received).name} as the "
                                               f"run ended; its files are in {run_dir}")
    return load_run(run_dir).as_result()


def _watch(spec: Spec, run_dir: Path, names: list[str], procs: list, heartbeat, exited_at: dict[int, float],
           poll_s: float, status=None) -> None:
    """Return when every worker has finished; raise HetsimError at the first failure or hang.

    status: under an event-driven protocol, the per-rank status the server reads: a device rank (not the
    server, rank 0) that fails or hangs in a job is marked there (and a hung one ended) instead of
    stopping the run; the server gives it up and goes on with the others."""
    world = len(procs)
    while True:
        time.sleep(poll_s)
        for r, p in enumerate(procs):
            if p.exitcode is not None and r not in exited_at:
                exited_at[r] = time.time()
        # a rank that finished its run (phase 2) and then failed only in gloo's teardown did its work
        failed = [r for r in exited_at if procs[r].exitcode != 0 and heartbeat[3 * r + 1] != 2]
        if status is not None:
            for r in failed:
                if r and status[r] == ALIVE:
                    status[r] = EXITED
            failed = [r for r in failed if r == 0]
        if failed:
            raise HetsimError(_failure_message(run_dir, names, failed, exited_at, heartbeat,
                                               {r: procs[r].exitcode for r in failed}))
        if len(exited_at) == world:
            return
        stale = [r for r in range(world) if r not in exited_at and heartbeat[3 * r + 2] > 0
                 and time.time() - heartbeat[3 * r + 2] > spec.run.fault_timeout_s]
        if status is not None:
            # a device rank waiting for its next job (phase 1) is idle, not hung; one stuck in a job is ended
            for r in stale:
                if r and heartbeat[3 * r + 1] == 0 and status[r] == ALIVE:
                    status[r] = NO_PROGRESS
                    procs[r].kill()
            stale = [r for r in stale if r == 0]
        if stale:
            # the culprit is a device still computing (phase 0) while the others wait at the barrier
            culprit = min(stale, key=lambda r: (heartbeat[3 * r], heartbeat[3 * r + 1]))
            raise HetsimError(
                f"device {names[culprit]} (rank {culprit}) made no progress for {spec.run.fault_timeout_s:g} s "
                f"in round {int(heartbeat[3 * culprit])}; the run was stopped, finished rounds are in {run_dir}")


def _end(procs: list) -> None:
    """Terminate the workers still running (SIGTERM, then SIGKILL after 5 s) and reap them all."""
    started = [p for p in procs if p.pid is not None]
    for p in started:
        if p.is_alive():
            p.terminate()
    for p in started:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()


def _drop_empty_logs(run_dir: Path, world: int) -> None:
    for r in range(world):
        drop_empty_log(log_path(run_dir, r))


def _failure_message(run_dir: Path, names: list[str], failed: list[int], exited_at: dict[int, float],
                     heartbeat, exitcodes: dict[int, int]) -> str:
    """Name the first device that failed: the earliest error report, else the earliest exit seen."""
    reports = {}
    for r in failed:
        path = error_path(run_dir, r)
        if path.is_file():
            reports[r] = json.loads(path.read_text())
    first = min(failed, key=lambda r: reports[r]["time"] if r in reports else exited_at[r])
    code = exitcodes[first]
    if first in reports:
        what = reports[first]["error"]
    elif code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        what = f"killed by {name}"
    else:
        what = f"exited with status {code} without a report"
    round_ = int(heartbeat[3 * first])
    log = log_path(run_dir, first)
    where = f"; details in {log}" if log.is_file() and log.stat().st_size else ""
    return (f"device {names[first]} (rank {first}) failed in round {round_}: {what}{where}; "
            f"finished rounds are in {run_dir}")
