"""One device's process in the real backend: the run's driver (hetsim.protocol) on this rank's ports.

Each rank wires a TrainingCore of its one worker, the WallClock (backends/torchmp/clock.py: real
time on a timeline that starts at a barrier of all ranks) and the TorchComm (backends/torchmp/comm.py:
every communicated tensor on the communication device, so the same code runs under gloo and nccl),
and runs the same Driver as the simulator: every process makes the same decisions, rank 0 writes the
run directory, the evaluator (`eval.on`) evaluates and shares its result.

What is this module's own: the process around the run — threads, the process group, heartbeats and
fault injection for the launcher's watch, error reports, the log, the exit without gloo's teardown.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist

from hetsim.cluster import usable_cores
from hetsim.config import Spec, worker_names
from hetsim.protocol import Driver, Hooks
from hetsim.resolve import resolve
from hetsim.results import strict_json
from hetsim.training import TrainingCore

from backends.torchmp.clock import WallClock
from backends.torchmp.comm import TorchComm
from backends.torchmp.server import ServerClock, ServerComm, ServerCore, serve_jobs
from hetsim.protocols import event_driven

FAULT_ENV = "HETSIM_INJECT_FAULT"  # testing aid: "crash:RANK:ROUND" or "hang:RANK:ROUND"


def error_path(run_dir: Path, rank: int) -> Path:
    return run_dir / ".errors" / f"rank{rank}.json"


def log_path(run_dir: Path, rank: int) -> Path:
    """Where a worker's stderr goes: its traceback, and what torch and gloo print."""
    return run_dir / "logs" / f"rank{rank}.log"


def drop_empty_log(path: Path) -> None:
    """A worker's log exists from its start; one that stayed empty says nothing and is removed, and so
    is the logs/ folder once no log is left in it (any process may be the last)."""
    if path.is_file() and path.stat().st_size == 0:
        path.unlink()
    try:
        path.parent.rmdir()
    except OSError:  # other logs remain, or another process removed the folder first
        pass


def send_stderr_to_log(path: Path) -> int:
    """Point this process's stderr (file descriptor 2, so the C++ libraries' messages too) at `path`,
    appending after an earlier attempt's lines; returns a descriptor of the previous stderr, for the
    one line the user should see."""
    path.parent.mkdir(parents=True, exist_ok=True)
    console = os.dup(2)
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    if os.fstat(fd).st_size:
        os.write(fd, f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}: a new attempt (pid {os.getpid()})\n".encode())
    os.dup2(fd, 2)
    os.close(fd)
    return console


def fault_to_inject(environ: Mapping[str, str] = os.environ) -> tuple[str, int, int] | None:
    """(kind, rank, round) of HETSIM_INJECT_FAULT, or None when it is unset or empty. A malformed value is
    a one-line error: a typo must neither pass silently (no fault, the test checks nothing) nor turn an
    unknown kind into a hang."""
    value = environ.get(FAULT_ENV, "")
    if not value:
        return None
    parts = value.split(":")
    if len(parts) != 3 or parts[0] not in ("crash", "hang") or not (parts[1].isdecimal() and parts[2].isdecimal()):
        raise ValueError(f"{FAULT_ENV}={value!r}: expected 'crash:RANK:ROUND' or 'hang:RANK:ROUND' "
                         f"(RANK and ROUND non-negative integers)")
    return parts[0], int(parts[1]), int(parts[2])


def _inject_fault(fault: tuple[str, int, int] | None, rank: int, round: int) -> None:
    if fault is None:
        return
    kind, r, rd = fault
    if r == rank and rd == round:
        if kind == "crash":
            raise RuntimeError(f"injected crash ({FAULT_ENV}={kind}:{r}:{rd})")
        while True:  # hang
            time.sleep(3600)


def local_world_size(init_method: str, world: int, environ: Mapping[str, str] = os.environ) -> int:
    """How many ranks share this node's cores: torchrun's LOCAL_WORLD_SIZE (env://); the spawn
    launcher runs the whole world on one node."""
    if init_method != "env://" or "LOCAL_WORLD_SIZE" not in environ:
        return world
    value = environ["LOCAL_WORLD_SIZE"]
    if not value.isdecimal() or not 1 <= int(value) <= world:
        raise ValueError(f"LOCAL_WORLD_SIZE={value!r}: expected an integer in [1, {world}] (WORLD_SIZE={world})")
    return int(value)


def _threads(spec: Spec, rank: int, local_world: int) -> int:
    """Torch threads of a rank: the device's `threads`, else this node's usable cores split among its ranks."""
    d = spec.worker_devices()[rank]
    return d.threads or max(1, usable_cores() // local_world)


def worker_main(rank: int, world: int, spec: Spec, run_dir: str | None, init_method: str,
                heartbeat: Any | None = None, resume: bool = False, force: bool = False,
                status: Any | None = None) -> None:
    """Entry point of one process (spawned by the launcher, or started by torchrun with env://).

    On success the process group is left open: the caller ends the process with `exit_now`, because
    tearing gloo down at interpreter exit can abort a finished process ("terminate called without an
    active exception") and make torchrun report a failure after all results were written.

    status: under an event-driven protocol, the launcher's per-rank status array, from which the server
    learns which workers failed (backends/torchmp/server.py); None under torchrun."""
    out = Path(run_dir) if run_dir else None
    try:
        if event_driven(spec.protocol.name):
            _run_event_driven(rank, world, spec, out, init_method, heartbeat, status)
        else:
            _run(rank, world, spec, out, init_method, heartbeat, resume, force)
    except BaseException as e:  # noqa: BLE001 - report every failure to the launcher, then re-raise
        if out is not None:
            path = error_path(out, rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            round_ = int(heartbeat[3 * rank]) if heartbeat is not None else -1
            path.write_text(strict_json({"rank": rank, "time": time.time(), "round": round_,
                                        "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}))
        if dist.is_initialized():
            dist.destroy_process_group()
        raise


def exit_now(code: int = 0) -> None:
    """End a worker process at once (stdio flushed), skipping the interpreter's teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _die_with_parent() -> None:
    """Have the kernel kill this process when the launcher dies, however it dies (SIGKILL, OOM killer):
    an orphaned worker would otherwise run the whole job alone. Linux only; elsewhere the launcher's
    own SIGTERM handling is what ends the workers."""
    import ctypes
    import multiprocessing

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the launcher died before prctl took effect
        os._exit(1)


def spawn_entry(rank: int, world: int, spec: Spec, run_dir: str, *args: Any) -> None:
    """The launcher's process target: run the worker, then exit without tearing gloo down. Its stderr
    (a failure's traceback included) goes to the run's logs/rank{rank}.log, the launcher prints one line;
    Ctrl+C is the launcher's to handle, which ends the workers."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.close(send_stderr_to_log(log_path(Path(run_dir), rank)))
    try:
        worker_main(rank, world, spec, run_dir, *args)
    except BaseException:  # noqa: BLE001 - the report is written; the traceback goes to the log
        traceback.print_exc()
        exit_now(1)
    exit_now(0)


def _beat(heartbeat: Any | None, rank: int, round: int, phase: int) -> None:
    """(round, phase, wall time) per rank; phase 0 = computing, 1 = at the barrier, 2 = finished."""
    if heartbeat is not None:
        heartbeat[3 * rank], heartbeat[3 * rank + 1], heartbeat[3 * rank + 2] = round, phase, time.time()


class _Hooks(Hooks):
    """The launcher's watch on this rank (heartbeat) and the fault injection tests use."""

    def __init__(self, heartbeat: Any | None, rank: int):
        self.heartbeat, self.rank = heartbeat, rank
        self.fault = fault_to_inject()  # read once, before round 1: a malformed value fails the run at once
        self.round = 0  # the latest round started (the server's heartbeat while it waits names it)

    def round_started(self, round: int) -> None:
        self.round = round
        _beat(self.heartbeat, self.rank, round, 0)
        _inject_fault(self.fault, self.rank, round)

    def work_done(self, round: int) -> None:
        _beat(self.heartbeat, self.rank, round, 1)

    # the evaluator (`eval.on`) shows as computing while the other ranks wait for its result, so a hang in
    # an evaluation names the evaluator, not the lowest rank among those waiting
    def evaluating(self, round: int) -> None:
        _beat(self.heartbeat, self.rank, round, 0)

    def evaluated(self, round: int) -> None:
        _beat(self.heartbeat, self.rank, round, 1)


def _run(rank: int, world: int, spec: Spec, out: Path | None, init_method: str, heartbeat: Any | None,
         resume: bool, force: bool = False) -> None:
    """Wire this rank's ports (a TrainingCore of its one worker, the WallClock, the TorchComm) and run
    the driver; rank 0 writes the run directory."""
    devices_spec = spec.worker_devices()
    if world != len(devices_spec):
        raise ValueError(f"{world} processes for a cluster of {len(devices_spec)} devices")
    threads = _threads(spec, rank, local_world_size(init_method, world))
    torch.set_num_threads(threads)
    all_cuda = all(d.device.startswith("cuda") for d in devices_spec)
    backend = "nccl" if all_cuda else "gloo"
    device = torch.device(devices_spec[rank].device)
    if device.type == "cuda":
        # before the process group: nccl binds a rank's communicator to the current GPU, which would
        # otherwise be cuda:0 on every rank of the node (or a guess from the rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=2 * spec.run.fault_timeout_s))
    comm = TorchComm(rank, world, device if backend == "nccl" else torch.device("cpu"))
    thread_counts = [int(comm.share(k, [threads])[0]) for k in range(world)]  # each rank's, chosen on its node
    names = worker_names(spec.worker_kinds())
    experiment = resolve(spec)
    core = TrainingCore(spec, experiment.policies, experiment.workload, local=[rank], device=device,
                        profile_step_times=[d.step_time.mean_s for d in experiment.devices])
    comm.attach(core.replicas)  # a small model then travels with the round's tallies (one collective a round)
    emulated = {n: d.emulated_slowdown for n, d in zip(names, devices_spec) if d.emulated_slowdown > 1}
    clock = WallClock(device, comm, devices_spec[rank].emulated_slowdown, summary={
        "devices": {n: d.device for n, d in zip(names, devices_spec)},
        "threads": dict(zip(names, thread_counts)), "emulated_slowdown": emulated,
        "device_sources": {n: ("emulated: " if d.emulated_slowdown > 1 else "") + f"real {d.device}"
                           for n, d in zip(names, devices_spec)}})
    driver = Driver(experiment, core, clock, comm, engine="torchmp", run_dir=out, resume=resume, force=force,
                    hooks=_Hooks(heartbeat, rank))
    driver.run()
    # leave together: a process that tears its connections down while a peer still uses them can make
    # gloo abort the peer
    comm.barrier()
    _beat(heartbeat, rank, driver.round, 2)  # finished: a failure from here on is only the teardown


def _run_event_driven(rank: int, world: int, spec: Spec, out: Path | None, init_method: str,
                      heartbeat: Any | None, status: Any | None) -> None:
    """An event-driven protocol (semi_sync, async, buffered_async): rank 0 is the server (the Driver on a
    ServerClock, the run directory, evaluation), rank k + 1 runs worker k's jobs
    (backends/torchmp/server.py). Messages travel over gloo with CPU tensors (nccl cannot receive from
    any rank)."""
    devices_spec = spec.worker_devices()
    n = len(devices_spec)
    if world != n + 1:
        raise ValueError(f"{world} processes for a cluster of {n} devices under protocol {spec.protocol.name!r}: "
                         f"expected {n + 1} (a server rank and one rank per device)")
    local_world = local_world_size(init_method, world)
    server = rank == 0
    k = rank - 1
    threads = max(1, usable_cores() // local_world) if server else (devices_spec[k].threads or
                                                                   max(1, usable_cores() // local_world))
    torch.set_num_threads(threads)
    device = torch.device("cpu" if server else devices_spec[k].device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=2 * spec.run.fault_timeout_s))
    comm = TorchComm(rank, world, torch.device("cpu"))
    thread_counts = [int(comm.share(r, [threads])[0]) for r in range(world)]
    names = worker_names(spec.worker_kinds())
    experiment = resolve(spec)
    step_times = [d.step_time.mean_s for d in experiment.devices]
    if not server:
        core = TrainingCore(spec, experiment.policies, experiment.workload, local=[k], device=device,
                            profile_step_times=step_times)
        clock = WallClock(device, comm, devices_spec[k].emulated_slowdown)
        fault = fault_to_inject()
        clock.start()  # the common zero, with the server's

        def on_job(j: int) -> None:  # a worker's "round" is its j-th job
            _beat(heartbeat, rank, j, 0)
            _inject_fault(fault, rank, j)

        jobs = serve_jobs(k, core, clock, on_job, lambda j: _beat(heartbeat, rank, j, 1))
        _beat(heartbeat, rank, jobs, 2)
        return
    core = ServerCore(spec, experiment.policies, experiment.workload, profile_step_times=step_times)
    emulated = {nm: d.emulated_slowdown for nm, d in zip(names, devices_spec) if d.emulated_slowdown > 1}
    hooks = _Hooks(heartbeat, rank)
    # the server beats "waiting" (phase 1) while it waits for results: the launcher's hang check is for work
    clock = ServerClock(comm, core, names, status=status, beat=lambda phase: _beat(heartbeat, rank, hooks.round, phase),
                        summary={
        "devices": {nm: d.device for nm, d in zip(names, devices_spec)},
        "threads": dict(zip(names, thread_counts[1:])), "server_threads": thread_counts[0],
        "emulated_slowdown": emulated,
        "device_sources": {nm: ("emulated: " if d.emulated_slowdown > 1 else "") + f"real {d.device}"
                           for nm, d in zip(names, devices_spec)}})
    driver = Driver(experiment, core, clock, ServerComm(n), engine="torchmp", run_dir=out, hooks=hooks)
    driver.run()
    clock.finish()
    _beat(heartbeat, rank, driver.round, 2)
