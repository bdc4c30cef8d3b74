"""`hetsim profile`: measure a device and write the profile file the simulator reads unchanged.

For one device (cpu with a thread count, or cuda:i; optionally an emulated slowdown) and one
(workload, batch size) it measures, with the backend's own training step:

- step time: after `warmup` steps, steps are timed until the medians of the first and second half of
  the samples agree within 2% (at least `min_steps`, at most `max_steps` or `max_seconds`); all
  samples are stored (dist 'empirical'), with median / p10 / p90 for readers;
- evaluation time: the median of 3 evaluations of the test set;
- exchange (optional, `--exchange`): two gloo processes on loopback run the backend's round
  synchronisation through its TorchComm (tally gather, all-reduce) with a tiny and a large model (at least
  4 MB, so that bandwidth rather than latency dominates); for a ring of 2, T = 2a + S/B gives the
  latency a (which absorbs the fixed per-round costs) and the bandwidth B;
- `--config CONFIG`: every device of a config is measured at the same time, each in its own process
  with its threads and emulated slowdown, as `hetsim run` will run them: cores, caches and memory
  bandwidth are then shared as in the real run (a device that has its samples keeps stepping, untimed,
  until all have). One file per device group, `DIR/<kind>.json`, pooling the group's samples.
- `--config CONFIG --exchange` also measures the per-combine overhead of the config's protocol
  (`measure_overhead`): short real runs of the config on the backend, with the step times just
  measured; per combine, the time from the last arrival's finish to the next local step's start, less
  the alpha-beta exchange, is what the simulator does not otherwise see (control broadcasts, the tally
  gather, the aggregator, the server's turnaround). Fitted as fixed + per_arrival x arrivals and stored
  as the entry's in_run[protocol].overhead with its spread. The same run gives each device's steps as
  the run takes them (cold caches after each pull, wake-ups after the collectives, the other processes'
  load): their median over the profile's is in_run[protocol].factor, which the simulator applies to
  the profiled step times. Both describe this config's shape (protocol, local steps, sampler) and go
  with the entry: re-profiling the workload replaces them.

Entries for other (workload, batch size) pairs already in the file are kept.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetsim.cluster import PROFILE_FORMAT
from hetsim.config import PolicySpec, Spec
from hetsim.errors import HetsimError, SpecError
from hetsim.resolve import spec_from_dict
from hetsim.results import versions, write_json
from hetsim.resolve import build_policies
from hetsim.training import TrainingCore, test_metrics


def _spec(workload: str, batch_size: int, device: str, data_path: str, kind: str = "",
          sampler: dict[str, Any] | None = None, workload_table: dict[str, Any] | None = None) -> Spec:
    """A one-device spec whose local step is the one to measure: the run's sampler matters (loss-biased
    sampling draws a larger pool and computes per-sample losses). The sampler was checked with the run's
    whole cluster; it is set after validation, as its kinds may name the other devices' kinds.
    workload_table: a config's whole `[workload]` (its n_test sizes the evaluation that is timed)."""
    spec = spec_from_dict({
        "name": "profile", "workload": workload_table or {"name": workload, "path": data_path},
        "cluster": {"devices": [{"kind": kind or device.split(":")[0], "device": device,
                                 "step_time": {"mean_s": 1.0}}]},
        "scheduler": {"name": "sync"}, "sampler": {"name": "uniform"}, "aggregator": {"name": "mean"},
        "optim": {"batch_size": batch_size}, "stop": {"max_rounds": 1},
    }, source="hetsim profile")
    if sampler is None:
        return spec
    return dataclasses.replace(spec, sampler=PolicySpec(sampler["name"], dict(sampler.get("params", {}))))


def measure_steps(core: TrainingCore, device: torch.device, slowdown: float, warmup: int, min_steps: int,
                  max_steps: int, max_seconds: float, on_measured: Any = None, keep_busy: Any = None) -> list[float]:
    """Timed local steps (see the module docstring). on_measured: called once the samples are in;
    keep_busy: says whether to go on stepping, untimed (so concurrent measurements see the same load)."""
    def step() -> float:
        t = time.perf_counter()
        core.step(0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t
        if slowdown > 1:
            time.sleep((slowdown - 1) * dt)
        core.workers[0].tally.observations.clear()
        return time.perf_counter() - t

    t_warm = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - t_warm < 0.5:  # let clocks and caches settle
        step()
        done += 1
    samples: list[float] = []
    t0 = time.perf_counter()
    while len(samples) < max_steps and time.perf_counter() - t0 < max_seconds:
        samples.append(step())
        if len(samples) >= min_steps and len(samples) % 10 == 0:
            half = len(samples) // 2
            a, b = statistics.median(samples[:half]), statistics.median(samples[half:])
            if abs(a - b) / statistics.median(samples) < 0.02:
                break
    if on_measured is not None:
        on_measured()
    while keep_busy is not None and keep_busy():
        step()
    return samples


def cpu_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows ('x86_64 CPU')."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    import platform

    return f"{platform.processor() or platform.machine()} CPU"


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
    """Time the backend's synchronisation of a round through its own TorchComm: the tally gather
    (comm.gather_tallies) and the combine's all-reduce of n floats (a linear aggregator's weighted_sum),
    with no model attached to the gather, so that the all-reduce's bytes are timed (the 4 MB model never
    rides in the gather). The alpha-beta fit's latency therefore holds a gather's latency too; the rest of
    a round's fixed cost is measured on the real run (`measure_overhead`), less this fit's prediction."""
    import torch.distributed as dist

    from backends.torchmp.comm import TorchComm
    from hetsim.protocol import Work
    from hetsim.training import RoundTally, Tallies

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        comm = TorchComm(rank, 2, torch.device("cpu"))
        times = []
        tallies = Tallies.of([rank], [RoundTally(8, 512, 0, 1.0)])
        work = Work([8], np.zeros(1), np.ones(1))
        weights = np.array([0.5, 0.5])
        for n in (1, max(1, nbytes // 4)):
            x = torch.ones(1, n)

            def sync() -> None:
                comm.gather_tallies([0, 1], tallies, work)
                comm.arrivals_source([0, 1], lambda ks: x, linear=True)[0](weights)

            for _ in range(3):
                sync()
            ts = []
            for _ in range(repeats):
                dist.barrier()
                t = time.perf_counter()
                sync()
                ts.append(time.perf_counter() - t)
            times.append(statistics.median(ts))
        if rank == 0:
            result[0], result[1] = times
    finally:
        dist.destroy_process_group()


def profile_device(workload: str, batch_size: int, device: str = "cpu", threads: int = 0, slowdown: float = 1.0,
                   data_path: str = "", warmup: int = 20, min_steps: int = 50, max_steps: int = 1000,
                   max_seconds: float = 30.0, exchange: bool = False, start: Any = None,
                   on_measured: Any = None, keep_busy: Any = None, kind: str = "",
                   sampler: dict[str, Any] | None = None, workload_table: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """Measure one device; returns {'entry': profile entry, 'link': ... or None, 'hardware': ...}.
    start: a barrier to wait on before measuring (concurrent profiling); kind and sampler: the device's
    kind and the run's sampler, so that the measured step is the run's step."""
    if not slowdown >= 1:  # a factor below 1 would be silently treated as 1: the step is only ever padded
        raise SpecError(f"emulated slowdown: expected a factor >= 1, got {slowdown!r}")
    if threads < 0:
        raise SpecError(f"threads: expected an integer >= 0 (0 = default), got {threads!r}")
    if threads:
        torch.set_num_threads(threads)
    spec = _spec(workload, batch_size, device, data_path, kind, sampler, workload_table)
    dev = torch.device(device)
    core = TrainingCore(spec, build_policies(spec), device=dev)
    if start is not None:
        start.wait()
    samples = measure_steps(core, dev, slowdown, warmup, min_steps, max_steps, max_seconds, on_measured, keep_busy)
    evals = []
    for _ in range(3):
        t = time.perf_counter()
        test_metrics(core.global_model, core.workload)
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
        hardware = f"{cpu_name()}, {torch.get_num_threads()} torch threads"
    if slowdown > 1:
        hardware += f", emulated {slowdown:g}x slowdown"
    return {"entry": entry, "link": measure_exchange(core.model_bytes) if exchange else None, "hardware": hardware}


def _concurrent_worker(k: int, kw: dict[str, Any], start: Any, done: Any, n: int, results: Any) -> None:
    def measured() -> None:
        with done.get_lock():
            done.value += 1

    results[k] = profile_device(**kw, start=start, on_measured=measured, keep_busy=lambda: done.value < n)


def _device_kwargs(spec: Spec, max_seconds: float) -> list[dict[str, Any]]:
    """profile_device's arguments for each device of `spec`, measured concurrently: with the torch threads
    the backend's launcher gives it (its `threads`, else this machine's usable cores split among the
    devices), so that a profile measures the device as a run uses it."""
    from backends.torchmp.worker import _threads

    devices = spec.worker_devices()
    return [dict(workload=spec.workload.name, batch_size=spec.optim.batch_size, device=d.device,
                 threads=_threads(spec, k, len(devices)), slowdown=d.emulated_slowdown,
                 data_path=spec.workload.path, max_seconds=max_seconds, kind=d.kind,
                 sampler={"name": spec.sampler.name, "params": dict(spec.sampler.params)},
                 workload_table=dataclasses.asdict(spec.workload))
            for k, d in enumerate(devices)]


def profile_cluster(spec: Spec, out_dir: str | Path, max_seconds: float = 30.0, exchange: bool = False
                    ) -> dict[str, Path]:
    """Measure every device of `spec` at once (see the module docstring); returns {kind: profile path}."""
    import torch.multiprocessing as mp

    devices = spec.worker_devices()
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    results = manager.list([None] * len(devices))
    start, done = ctx.Barrier(len(devices)), ctx.Value("i", 0)
    kws = _device_kwargs(spec, max_seconds)
    procs = [ctx.Process(target=_concurrent_worker, args=(k, kw, start, done, len(devices), results))
             for k, kw in enumerate(kws)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise HetsimError("concurrent profiling failed in a device process")
    link = measure_exchange(_model_bytes(spec)) if exchange else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for kind in dict.fromkeys(d.kind for d in devices):
        group = [results[k] for k, d in enumerate(devices) if d.kind == kind]
        pooled = [x for m in group for x in m["entry"]["step_time"]["samples_s"]]
        measured = dict(group[0])
        entry = dict(measured["entry"])
        q = np.quantile(pooled, [0.1, 0.5, 0.9])
        entry.update(step_time={"dist": "empirical", "samples_s": pooled}, median_s=float(q[1]), p10_s=float(q[0]),
                     p90_s=float(q[2]), n_samples=len(pooled), concurrent_with=len(devices) - 1)
        measured.update(entry=entry, link=link)
        paths[kind] = out_dir / f"{kind}.json"
        write_profile(paths[kind], kind, measured)
    if link is not None and spec.protocol.name in OVERHEAD_PROTOCOLS:
        overhead, in_run = measure_overhead(spec, paths)
        for kind, path in paths.items():
            data = json.loads(path.read_text())
            entry = spec_entry(data, spec)
            # a kind whose devices took no step in the calibration run keeps its profiled steps (factor 1)
            steps = in_run.get(kind, {"median_s": entry["median_s"], "rounds": 0})
            entry.setdefault("in_run", {})[spec.protocol.name] = {
                **steps, "factor": steps["median_s"] / entry["median_s"], "overhead": overhead}
            write_json(path, data, indent=1)
    return paths


def spec_entry(data: dict[str, Any], spec: Spec) -> dict[str, Any]:
    """The entry of a profile file (as read) for spec's workload and batch size."""
    return next(e for e in data["entries"]
                if (e["workload"], e["batch_size"]) == (spec.workload.name, spec.optim.batch_size))


#: the protocols whose overhead `measure_overhead` can read off a run's decisions: a worker's next job
#: starts after the combine its arrival went into (buffered_async re-dispatches at once: not measured)
OVERHEAD_PROTOCOLS = ("sync", "semi_sync", "async")


def calibration_spec(spec: Spec, paths: dict[str, Path], rounds: int) -> Spec:
    """`spec` as a short calibration run: its devices on the profiles just written (so the scheduler plans
    the run's steps), `rounds` rounds, one evaluation at the end, no per-combine overhead of its own."""
    from hetsim.config import spec_to_dict

    d = spec_to_dict(spec)
    for g in d["cluster"]["devices"]:
        g.pop("step_time", None)
        g["profile"] = str(Path(paths[g["kind"]]).resolve())
        g["overhead_s"] = g["overhead_per_arrival_s"] = 0.0
        # the exchange subtracted is the measured link's (the real backend's all-reduce), not a network the
        # config emulates: that would fold real time into the overhead, or hide it under a slower network
        g.pop("bandwidth_GBps", None)
        g.pop("latency_s", None)
    d["cluster"]["network"] = {"collective": "ring_allreduce"}
    d["name"] = f"{spec.name}-overhead"
    # a time budget makes every round broadcast the leader's stop check: keep one (never reached) to pay it
    d["stop"] = {"max_rounds": rounds, "target_accuracy": spec.stop.target_accuracy,
                 **({"max_time_s": 1e9} if spec.stop.max_time_s else {})}
    d["trace"] = {**d.get("trace", {}), "decisions": True}  # what the overhead is read from
    d["eval"] = {**d.get("eval", {}), "every_rounds": rounds, "every_epochs": 0}
    d["run"] = {**d.get("run", {}), "checkpoint_every": 0}
    return spec_from_dict(d, source=f"{spec.name} (overhead calibration)")


def evaluated_rounds(run: Any) -> set[int]:
    """The rounds (updates) of a run after which the global model was evaluated."""
    return {int(r) for r, acc in zip(run.metrics["round"], run.metrics["test_acc"]) if acc == acc}


def sync_rounds(run: Any) -> list[tuple[dict[str, Any], float]]:
    """(decision, duration on the leader's clock) of each round of a real sync run that had work and was not
    evaluated (an evaluated round's duration includes its evaluation, charged separately)."""
    times = dict(zip((int(r) for r in run.metrics["round"]), run.metrics["time_s"]))
    evaluated = evaluated_rounds(run)
    return [(d, times[r] - times[r - 1]) for d in run.decisions
            if (r := int(d["round"])) not in evaluated and r - 1 in times and r in times and d["workers"]]


def combine_overheads(run: Any, network: Any, groups: list[Any], group_of: list[int], model_bytes: int,
                      event_driven: bool) -> list[tuple[int, float]]:
    """(arrivals n, overhead s) per combine of a real run, less the alpha-beta exchange of n models
    (cluster.exchange_time with no overhead), each read on one process's clock (the ranks' clocks agree
    only up to their start barrier's release skew, a few ms on a loaded machine):
    - sync: the round's duration on the leader's clock (metrics time_s) less its longest local work
      (finish - start, on that worker's clock): what the simulator charges beyond max(compute);
    - event-driven: from an arrival's finish to its worker's next start, both on the worker's clock
      (its turnaround through the server), the earliest over the update's arrivals.
    Evaluated rounds (their duration includes the evaluation, charged separately) and updates whose
    workers never start again are skipped."""
    from hetsim.cluster import exchange_time

    spans: list[tuple[dict[str, Any], float]] = []  # (decision, its overhead before the exchange)
    if event_driven:
        evaluated = evaluated_rounds(run)
        seen: dict[int, float] = {}  # a worker's start in a later update
        for d in reversed(list(run.decisions)):
            later = [seen.get(w) for w in d["workers"]]
            if later and None not in later and int(d["round"]) not in evaluated:
                spans.append((d, min(t - f for t, f in zip(later, d["finish_s"]))))
            seen.update(zip(d["workers"], d["start_s"]))
        spans.reverse()
    else:
        spans = [(d, duration - max(f - s for s, f in zip(d["start_s"], d["finish_s"])))
                 for d, duration in sync_rounds(run)]
    out = []
    for d, overhead in spans:
        ks = d["workers"]
        present = [groups[g] for g in sorted({group_of[w] for w in ks})]
        ab = exchange_time(network, present, model_bytes, max(d["finish_s"]), n=len(ks), through_server=event_driven)
        out.append((len(ks), overhead - ab))
    return out


def fit_overhead(samples: list[tuple[int, float]]) -> dict[str, Any]:
    """fixed + per_arrival x n through the medians per n (robust to a noisy machine's outliers); with one n
    observed, all of it is fixed. Both parts are clamped at 0 (a negative cost is noise)."""
    if not samples:
        raise HetsimError("overhead calibration: no combine with a clean next start (too few rounds?)")
    by_n: dict[int, list[float]] = {}
    for n, o in samples:
        by_n.setdefault(n, []).append(o)
    ns = sorted(by_n)
    med = np.array([statistics.median(by_n[n]) for n in ns])
    per = 0.0
    if len(ns) > 1:
        per = max(0.0, float(np.polyfit(np.array(ns, dtype=float), med, 1)[0]))
    fixed = max(0.0, float(np.median(med - per * np.array(ns))))
    values = np.array([o for _, o in samples])
    return {"fixed_s": fixed, "per_arrival_s": per, "median_s_by_arrivals": {str(n): float(m) for n, m in zip(ns, med)},
            "p10_s": float(np.quantile(values, 0.1)), "p90_s": float(np.quantile(values, 0.9)),
            "combines": len(samples)}


def in_run_steps(run: Any, kinds: list[str]) -> dict[str, dict[str, Any]]:
    """Per device kind, the median of its workers' mean step time per round (local work / steps) in a real
    run, evaluated rounds included (an evaluation is not local work)."""
    per: dict[str, list[float]] = {}
    for d in run.decisions:
        for w, s, f, n in zip(d["workers"], d["start_s"], d["finish_s"], d["local_steps"]):
            if n:
                per.setdefault(kinds[w], []).append((f - s) / n)
    return {k: {"median_s": float(statistics.median(v)), "rounds": len(v)} for k, v in per.items()}


def measure_overhead(spec: Spec, paths: dict[str, Path], rounds: int = 30
                     ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The per-combine overhead of `spec`'s protocol on the real backend (module docstring), from one
    calibration run of `rounds` combines of the config as it will run, and each device kind's steps in
    that run (`in_run_steps`: the profile's entry stores their median over its own as `in_run`). The
    per-arrival part is fitted only where the run's own combines vary in size (semi_sync with a deadline, say); a run made to vary it (one
    participant a round) measures another regime: its ranks idle longer in the collectives, and on this
    project's 2-core VM that made a one-arrival combine cost 1.7x a two-arrival one, not less."""
    import tempfile

    from backends.torchmp.launcher import run as run_real
    from hetsim.analysis import load_run
    from hetsim.protocols import event_driven
    from hetsim.resolve import build_groups

    cal = calibration_spec(spec, paths, rounds)
    groups = build_groups(cal)
    group_of = [g for g, d in enumerate(cal.cluster.devices) for _ in range(d.count)]
    with tempfile.TemporaryDirectory(prefix="hetsim-overhead-") as tmp:
        run_real(cal, Path(tmp) / "run")
        real = load_run(Path(tmp) / "run")  # (its decisions are read from the folder: use them inside)
        samples = combine_overheads(real, cal.cluster.network, groups, group_of, int(real.summary["model_bytes"]),
                                    event_driven(spec.protocol.name))
        steps = in_run_steps(real, cal.worker_kinds())
    out = fit_overhead(samples)
    out.update(world=len(group_of) + (1 if event_driven(spec.protocol.name) else 0),
               measured_with=f"a calibration run of {rounds} combines of {spec.name!r}")
    return out, steps


def _model_bytes(spec: Spec) -> int:
    from hetsim.training import FlatParams
    from hetsim.workloads import build_model

    return FlatParams(build_model(spec.workload)).nbytes


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
    write_json(path, data, indent=1)
    return data


__all__ = ["measure_exchange", "profile_cluster", "profile_device", "write_profile"]
