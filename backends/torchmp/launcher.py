"""Start one process per device (torch.multiprocessing, spawn), watch them, and report faults.

A worker that crashes, or makes no progress for `run.fault_timeout_s` (a hang, or a peer blocked in a
collective), ends the whole run within that bound with an error naming the device and the round;
rank 0 has flushed every finished round to the run directory by then.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import torch.multiprocessing as mp

from backends.torchmp.worker import error_path, spawn_entry
from hetsim.analysis import load_run
from hetsim.config import Spec
from hetsim.errors import HetsimError
from hetsim.results import CHECKPOINT, RunResult, worker_names
from hetsim.rundir import claim_run_dir


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(spec: Spec, run_dir: str | Path, resume: bool = False, poll_s: float = 0.1,
        overwrite: bool = False) -> RunResult:
    """Run `spec` on real devices, one process each; write the run directory; return its result.
    resume: continue from the run directory's last checkpoint (run.checkpoint_every > 0).
    overwrite: replace another run's files in `run_dir` (see hetsim.rundir.claim_run_dir)."""
    if any(d.offline or d.slowdown or d.slowdown_trace or d.straggler_prob for d in spec.cluster.devices):
        raise HetsimError("offline windows, slowdown schedules and stragglers are simulator conditions; "
                          "the real backend emulates speed with cluster.devices[].emulated_slowdown")
    run_dir = claim_run_dir(run_dir, spec, "torchmp", overwrite=overwrite, resume=resume)
    world = spec.n_workers
    names = worker_names(spec.worker_kinds())
    ctx = mp.get_context("spawn")
    heartbeat = ctx.Array("d", 3 * world, lock=False)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    if resume and not (run_dir / CHECKPOINT).is_file():
        raise HetsimError(f"{run_dir}: no checkpoint to resume from (set run.checkpoint_every > 0)")
    for stale in (run_dir / ".errors").glob("rank*.json"):
        stale.unlink()  # reports of an earlier attempt
    procs = [ctx.Process(target=spawn_entry, args=(r, world, spec, str(run_dir), init_method, heartbeat, resume),
                         name=f"hetsim-{names[r]}") for r in range(world)]
    for p in procs:
        p.start()
    exited_at: dict[int, float] = {}
    try:
        while True:
            time.sleep(poll_s)
            for r, p in enumerate(procs):
                if p.exitcode is not None and r not in exited_at:
                    exited_at[r] = time.time()
            # a rank that finished its run (phase 2) and then failed only in gloo's teardown did its work
            failed = [r for r in exited_at if procs[r].exitcode != 0 and heartbeat[3 * r + 1] != 2]
            if failed:
                raise HetsimError(_failure_message(run_dir, names, failed, exited_at, heartbeat))
            if len(exited_at) == world:
                break
            stale = [r for r in range(world) if r not in exited_at and heartbeat[3 * r + 2] > 0
                     and time.time() - heartbeat[3 * r + 2] > spec.run.fault_timeout_s]
            if stale:
                # the culprit is a device still computing (phase 0) while the others wait at the barrier
                culprit = min(stale, key=lambda r: (heartbeat[3 * r], heartbeat[3 * r + 1]))
                raise HetsimError(
                    f"device {names[culprit]} (rank {culprit}) made no progress for {spec.run.fault_timeout_s:g} s "
                    f"in round {int(heartbeat[3 * culprit])}; the run was stopped, finished rounds are in {run_dir}")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    return load_run(run_dir).as_result()


def _failure_message(run_dir: Path, names: list[str], failed: list[int], exited_at: dict[int, float],
                     heartbeat) -> str:
    """Name the first device that failed: the earliest error report, else the earliest exit seen."""
    reports = {}
    for r in failed:
        path = error_path(run_dir, r)
        if path.is_file():
            reports[r] = json.loads(path.read_text())
    first = min(failed, key=lambda r: reports[r]["time"] if r in reports else exited_at[r])
    what = reports[first]["error"] if first in reports else "exited without a report"
    round_ = int(heartbeat[3 * first])
    return (f"device {names[first]} (rank {first}) failed in round {round_}: {what}; "
            f"finished rounds are in {run_dir}")
