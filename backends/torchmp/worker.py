"""One device's process in the real backend: the simulator's protocol on the wall clock.

Every round, in every process alike::

    stop, progress = comm.agree(rank 0's)        # budgets on the common clock and accuracy
    plan = core.plan(round)                      # the shared scheduler; identical in every process
    clock.local_work(...)                        # the shared sampler and training core, each step timed
    comm.gather_tallies(...)                     # the barrier: fixed-size tensors, nothing pickled
    arrivals' weighted_sum (one all_reduce) or replicas (all_gather), by the aggregator's linearity
    core.finish_round(...)                       # merge loss scores in worker order, as the simulator
    rank 0: evaluate when due; write metrics, decisions, trace

Times are seconds on the wall clock's common timeline (backends/torchmp/clock.py), which starts at a
barrier of all ranks; the TorchComm (backends/torchmp/comm.py) keeps every communicated tensor on the
communication device, so the same code runs under gloo and nccl.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist

from hetsim.config import Spec
from hetsim.results import (CHECKPOINT, RunWriter, load_checkpoint, restoring, run_summary, save_checkpoint,
                            strict_json, trace_event, worker_names)
from hetsim.resolve import build_devices
from hetsim.policies import RoundPlan
from hetsim.training import RunSchedule, TrainingCore

from backends.torchmp.clock import WallClock
from backends.torchmp.comm import TorchComm

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


def _inject_fault(rank: int, round: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    kind, r, rd = spec.split(":")
    if int(r) == rank and int(rd) == round:
        if kind == "crash":
            raise RuntimeError(f"injected crash ({FAULT_ENV}={spec})")
        while True:  # hang
            time.sleep(3600)


def local_world_size(init_method: str, world: int, environ: Mapping[str, str] = os.environ) -> int:
    """How many ranks share this node's cores: torchrun's LOCAL_WORLD_SIZE (env://); the spawn
    launcher runs the whole world on one node."""
    if init_method != "env://" or "LOCAL_WORLD_SIZE" not in environ:
        return world
    value = environ["LOCAL_WORLD_SIZE"]
    if not value.isdigit() or not 1 <= int(value) <= world:
        raise ValueError(f"LOCAL_WORLD_SIZE={value!r}: expected an integer in [1, {world}] (WORLD_SIZE={world})")
    return int(value)


def _threads(spec: Spec, rank: int, local_world: int) -> int:
    """Torch threads of a rank: the device's `threads`, else this node's cores split among its ranks."""
    d = spec.worker_devices()[rank]
    return d.threads or max(1, (os.cpu_count() or 1) // local_world)


def worker_main(rank: int, world: int, spec: Spec, run_dir: str | None, init_method: str,
                heartbeat: Any | None = None, resume: bool = False, force: bool = False) -> None:
    """Entry point of one process (spawned by the launcher, or started by torchrun with env://).

    On success the process group is left open: the caller ends the process with `exit_now`, because
    tearing gloo down at interpreter exit can abort a finished process ("terminate called without an
    active exception") and make torchrun report a failure after all results were written."""
    out = Path(run_dir) if run_dir else None
    try:
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


def _done(gen: Any) -> Any:
    """The return value of a wall-clock generator (which never yields)."""
    try:
        next(gen)
    except StopIteration as e:
        return e.value
    raise RuntimeError("the wall clock yielded")


def _rank_checkpoint(out: Path, round_: int, rank: int) -> Path:
    return out / "checkpoints" / f"round{round_}" / f"rank{rank}.pt"


def _run(rank: int, world: int, spec: Spec, out: Path | None, init_method: str, heartbeat: Any | None,
         resume: bool, force: bool = False) -> None:
    devices_spec = spec.worker_devices()
    if world != len(devices_spec):
        raise ValueError(f"{world} processes for a cluster of {len(devices_spec)} devices")
    threads = _threads(spec, rank, local_world_size(init_method, world))
    torch.set_num_threads(threads)
    all_cuda = all(d.device.startswith("cuda") for d in devices_spec)
    backend = "nccl" if all_cuda else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=2 * spec.run.fault_timeout_s))
    device = torch.device(devices_spec[rank].device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    comm = TorchComm(rank, world, device if backend == "nccl" else torch.device("cpu"))
    clock = WallClock(device, devices_spec[rank].emulated_slowdown)
    time_models = build_devices(spec)
    core = TrainingCore(spec, local=[rank], profile_step_times=[d.step_time.mean_s for d in time_models], device=device)
    names = worker_names(spec.worker_kinds())
    schedule = RunSchedule(spec)
    writer = RunWriter(out, spec, names, resume=resume) if rank == 0 else None
    ks = list(range(world))
    busy = np.zeros(world)

    round_, elapsed = 0, 0.0
    rows_acc = math.nan
    config_changes: list[dict] = []
    if resume:
        if out is None:
            raise ValueError("resume needs the run directory")
        loaded = load_checkpoint(out / CHECKPOINT, "torchmp", spec, force)
        runner, config_changes = loaded.state, loaded.config_changes
        with restoring(out / CHECKPOINT):
            round_, elapsed = runner["round"], runner["time_s"]
            rank_path = _rank_checkpoint(out, round_, rank)
            rank_state = load_checkpoint(rank_path, "torchmp", spec, force).state
            busy = runner["busy_s"]
            schedule.load_state_dict(runner["schedule"])
        with restoring(rank_path):
            core.load_state_dict(rank_state)
        if writer:
            writer.load_state_dict(runner["writer"])
            rows_acc = writer.rows[-1]["test_acc"]

    if writer and not resume:
        # the initial model's accuracy anchors the curves; as in the simulator it is not on the clock
        test_loss, rows_acc = core.evaluate()
        writer.add_row({"round": 0, "time_s": 0.0, "epoch": 0.0, "samples": 0, "lr": core.set_lr(0.0),
                        "train_loss": None, "test_loss": test_loss, "test_acc": rows_acc})
    # the threads each rank chose on its own node, for the summary
    thread_counts = [int(comm.share(k, [threads])[0]) for k in ks]
    clock.start(comm.barrier, elapsed)  # every time below is seconds since this barrier (of the first attempt)
    wall0 = time.perf_counter()
    now = clock.now

    stopped_by = ""
    try:
        while True:
            ctl = [0.0, 0.0]
            if rank == 0:
                reached = rows_acc >= spec.stop.target_accuracy
                stopped_by = schedule.stop_reason(round_, now(), core.epochs, reached)
                ctl = [float(bool(stopped_by)), schedule.progress(round_, now(), core.epochs)]
            stop, progress = comm.agree(ctl)
            if stop > 0:
                break
            lr = core.set_lr(progress)
            round_ += 1
            _beat(heartbeat, rank, round_, 0)
            _inject_fault(rank, round_)
            plan = core.plan(round_)
            budget = plan.time_budget_s
            work = _done(clock.local_work([rank], RoundPlan((plan.local_steps[rank],), budget), None, core.local_step))
            _beat(heartbeat, rank, round_, 1)
            tallies, work = comm.gather_tallies(ks, {rank: core.workers[rank].tally}, work)
            barrier = now()
            contributions = core.contributions(ks, tallies)
            linear = core.aggregator.is_linear()
            weighted_sum, replicas = comm.arrivals_source(ks, {rank: core.workers[rank].flat.get()}, linear)
            if linear:
                a, weights = core.aggregator.coefficients(contributions)
                x = weighted_sum(weights)
                new_global = x + a * core.global_flat.get() if a else x
            else:
                new_global, weights = core.aggregator.combine(core.global_flat.get(), replicas(), contributions)
            gathered = [{"steps": n, "start": a_, "finish": b_} for n, a_, b_ in zip(work.steps, work.start, work.finish)]
            comm_end = now()
            record = core.finish_round(round_, ks, tallies, new_global, np.asarray(weights), budget)
            schedule.check_divergence(record)  # the same record in every process: all ranks agree
            core.observe_step_times(ks, [(g["finish"] - g["start"]) / g["steps"] for g in gathered])
            for k, g in enumerate(gathered):
                busy[k] += g["finish"] - g["start"]
            if writer:
                _record_round(writer, round_, gathered, barrier, comm_end, core.model_bytes)
                if spec.trace.decisions:
                    writer.add_decision(record)
                test_loss = test_acc = None  # not evaluated this round (an empty cell, unlike a computed NaN)
                last = bool(schedule.stop_reason(round_, now(), core.epochs, False))
                if schedule.eval_due(round_, core.epochs) or last:
                    eval_start = now()
                    test_loss, test_acc = core.evaluate()
                    writer.add_trace(trace_event("eval", 0, eval_start, now(), round=round_))
                rows_acc = math.nan if test_acc is None else test_acc
                writer.add_row({"round": round_, "time_s": now(), "epoch": core.epochs, "samples": core.samples_total,
                                "lr": lr, "train_loss": record.train_loss, "test_loss": test_loss, "test_acc": test_acc})
            every = spec.run.checkpoint_every
            if out is not None and every and round_ % every == 0:
                _checkpoint(out, rank, round_, core, writer, busy, schedule, now(), spec, config_changes)
    finally:
        if writer:
            writer.flush()  # a failing peer still leaves every finished round on disk
    if writer:
        total = now()
        emulated = {n: d.emulated_slowdown for n, d in zip(names, devices_spec) if d.emulated_slowdown > 1}
        writer.finish(run_summary(
            spec, writer.rows, "torchmp", names, busy, round_, total, core.epochs, core.samples_total, stopped_by,
            time.perf_counter() - wall0, diverged_at_round=schedule.diverged_at_round, config_changes=config_changes,
            fidelity="real", backend=backend,
            devices={n: d.device for n, d in zip(names, devices_spec)},
            threads=dict(zip(names, thread_counts)),
            emulated_slowdown=emulated, model_bytes=core.model_bytes,
            device_sources={n: ("emulated: " if d.emulated_slowdown > 1 else "") + f"real {d.device}"
                            for n, d in zip(names, devices_spec)}))
    # leave together: a process that tears its connections down while a peer still uses them can make
    # gloo abort the peer
    dist.barrier()
    _beat(heartbeat, rank, round_, 2)  # finished: a failure from here on is only the teardown


def _checkpoint(out: Path, rank: int, round_: int, core: TrainingCore, writer: RunWriter | None, busy: np.ndarray,
                schedule: RunSchedule, time_s: float, spec: Spec, config_changes: list[dict]) -> None:
    """Every rank saves its replica's state for this round; once all have, rank 0 points checkpoint.pt
    at the round (so a crash mid-checkpoint leaves the previous one usable) and drops older rounds."""
    save_checkpoint(_rank_checkpoint(out, round_, rank), core.state_dict(), "torchmp", spec)
    dist.barrier()
    if writer is not None:
        # the files' lengths, not their contents: a checkpoint stays the same size however long the run
        save_checkpoint(out / CHECKPOINT, {"round": round_, "time_s": time_s, "busy_s": busy.copy(),
                                           "schedule": schedule.state_dict(), "writer": writer.state_dict()},
                        "torchmp", spec, config_changes)
        for old in (out / "checkpoints").iterdir():
            if old.name != f"round{round_}":
                shutil.rmtree(old, ignore_errors=True)


def _record_round(writer: RunWriter, round_: int, gathered: list[dict], barrier: float, comm_end: float,
                  model_bytes: int) -> None:
    for k in writer.trace_positions(round_, range(len(gathered))):  # the trace's sample of rounds and ranks
        g = gathered[k]
        writer.add_trace(trace_event("compute", k, g["start"], g["finish"], round=round_, steps=g["steps"]))
        if barrier > g["finish"]:
            writer.add_trace(trace_event("idle", k, g["finish"], barrier, round=round_))
        writer.add_trace(trace_event("comm", k, barrier, comm_end, round=round_, bytes=model_bytes))
