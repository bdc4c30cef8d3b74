"""`hetsim profile`: measure a device and write the profile file the simulator reads unchanged.

For one device (cpu with a thread count, or cuda:i; optionally an emulated slowdown) and one
(workload, batch size) it measures, with the backend's own training step:

- step time: after `warmup` steps, steps are timed until the medians of the first and second half of
  the samples agree within 2% (at least `min_steps`, at most `max_steps` or `max_seconds`); all
  samples are stored (dist 'empirical'), with median / p10 / p90 for readers;
- evaluation time: the median of 3 evaluations of the test set;
- exchange (optional, `--exchange`): two gloo processes on loopback all-reduce a tiny tensor and a
  large one (the model's size, at least 4 MB, so that bandwidth rather than latency dominates); for a
  ring of 2, T = 2a + S/B gives the latency a and bandwidth B.

Entries for other (workload, batch size) pairs already in the file are kept.
"""

from __future__ import annotations

import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetsim.cluster import PROFILE_FORMAT
from hetsim.config import Spec, spec_from_dict
from hetsim.errors import HetsimError
from hetsim.results import atomic_write, versions
from hetsim.training import TrainingCore, evaluate


def _spec(workload: str, batch_size: int, device: str, data_path: str) -> Spec:
    return spec_from_dict({
        "name": "profile", "workload": {"name": workload, "path": data_path},
        "cluster": {"devices": [{"kind": device.split(":")[0], "device": device, "step_time": {"mean_s": 1.0}}]},
        "scheduler": {"name": "sync"}, "sampler": {"name": "uniform"}, "aggregator": {"name": "mean"},
        "optim": {"batch_size": batch_size}, "stop": {"max_rounds": 1},
    }, source="hetsim profile")


def measure_steps(core: TrainingCore, device: torch.device, slowdown: float, warmup: int, min_steps: int,
                  max_steps: int, max_seconds: float) -> list[float]:
    def step() -> float:
        t = time.perf_counter()
        core.local_step(0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t
        if slowdown > 1:
            time.sleep((slowdown - 1) * dt)
        core.workers[0].tally.observations.clear()
        return time.perf_counter() - t

    for _ in range(warmup):
        step()
    samples: list[float] = []
    t0 = time.perf_counter()
    while len(samples) < max_steps and time.perf_counter() - t0 < max_seconds:
        samples.append(step())
        if len(samples) >= min_steps and len(samples) % 10 == 0:
            half = len(samples) // 2
            a, b = statistics.median(samples[:half]), statistics.median(samples[half:])
            if abs(a - b) / statistics.median(samples) < 0.02:
                break
    return samples


def measure_exchange(model_bytes: int, repeats: int = 20) -> dict[str, float]:
    """Latency and bandwidth of an all-reduce between two local gloo processes."""
    import torch.multiprocessing as mp

    from backends.torchmp.launcher import free_port

    model_bytes = max(model_bytes, 4 << 20)
    ctx = mp.get_context("spawn")
    result = ctx.Array("d", 2)
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_exchange_worker, args=(r, init, model_bytes, repeats, result)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    if any(p.exitcode != 0 for p in procs):
        raise HetsimError("exchange measurement failed (two gloo processes on 127.0.0.1)")
    small, big = result[0], result[1]
    latency = max(small / 2, 0.0)
    bandwidth = model_bytes / max(big - small, 1e-9)
    return {"latency_s": latency, "bandwidth_GBps": bandwidth / 1e9, "allreduce_small_s": small,
            "allreduce_large_s": big, "large_bytes": model_bytes}


def _exchange_worker(rank: int, init: str, nbytes: int, repeats: int, result: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        times = []
        for n in (1, max(1, nbytes // 4)):
            x = torch.ones(n)
            for _ in range(3):
                dist.all_reduce(x)
            ts = []
            for _ in range(repeats):
                dist.barrier()
                t = time.perf_counter()
                dist.all_reduce(x)
                ts.append(time.perf_counter() - t)
            times.append(statistics.median(ts))
        if rank == 0:
            result[0], result[1] = times
    finally:
        dist.destroy_process_group()


def profile_device(workload: str, batch_size: int, device: str = "cpu", threads: int = 0, slowdown: float = 1.0,
                   data_path: str = "", warmup: int = 20, min_steps: int = 50, max_steps: int = 1000,
                   max_seconds: float = 30.0, exchange: bool = False) -> dict[str, Any]:
    """Measure one device; returns {'entry': profile entry, 'link': ... or None, 'hardware': ...}."""
    if threads:
        torch.set_num_threads(threads)
    spec = _spec(workload, batch_size, device, data_path)
    dev = torch.device(device)
    core = TrainingCore(spec, device=dev)
    samples = measure_steps(core, dev, slowdown, warmup, min_steps, max_steps, max_seconds)
    evals = []
    for _ in range(3):
        t = time.perf_counter()
        evaluate(core.global_model, core.workload)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        evals.append(time.perf_counter() - t)
    q = np.quantile(samples, [0.1, 0.5, 0.9])
    entry = {"workload": workload, "batch_size": batch_size,
             "step_time": {"dist": "empirical", "samples_s": [float(x) for x in samples]},
             "median_s": float(q[1]), "p10_s": float(q[0]), "p90_s": float(q[2]), "n_samples": len(samples),
             "eval_time_s": float(statistics.median(evals))}
    if dev.type == "cuda":
        hardware = torch.cuda.get_device_name(dev)
    else:
        import platform

        hardware = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"
    if slowdown > 1:
        hardware += f", emulated {slowdown:g}x slowdown"
    return {"entry": entry, "link": measure_exchange(core.model_bytes) if exchange else None, "hardware": hardware}


def write_profile(path: str | Path, device_kind: str, measured: dict[str, Any]) -> dict[str, Any]:
    """Add (or replace) the measured entry in the profile file at `path`."""
    path = Path(path)
    data: dict[str, Any] = {"format": PROFILE_FORMAT, "device": device_kind, "entries": []}
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("format") != PROFILE_FORMAT:
            raise HetsimError(f"{path}: exists and is not a {PROFILE_FORMAT} profile; choose another --out")
    e = measured["entry"]
    data["entries"] = [x for x in data.get("entries", [])
                       if (x.get("workload"), x.get("batch_size")) != (e["workload"], e["batch_size"])] + [e]
    data.update(source="measured", hardware=measured["hardware"],
                measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), versions=versions())
    if measured.get("link"):
        data["link"] = measured["link"]
    atomic_write(path, json.dumps(data, indent=1) + "\n")
    return data


__all__ = ["profile_device", "write_profile", "measure_exchange"]
