"""`hetsim sweep`: a grid of configs x seeds, run in parallel processes, cached by config hash.

    hetsim sweep examples/digits.toml --grid optim.lr=0.02,0.05 --grid scheduler.params.max_steps=4,8 \\
        --seeds 3 --out sweeps/lr-h

Every point of the grid and every seed is one spec: the base config with `--set`-style overrides.
Its run directory is `runs/<hash>` where the hash is that of the fully resolved config, so a finished
run (its summary.json written for the same config) is never run twice: re-running the command after an
interrupt runs only what is missing (a run with a checkpoint resumes from it). Runs of one grid point
share a name, `<base name>[key=value,...]`, so `hetsim plot DIR` averages their seeds. One table,
`sweep.csv`, holds every run's grid values and summary.

The local process pool is the default. `--ray ADDRESS` runs the pending runs as Ray tasks on a Ray
cluster instead (`--ray local` starts one on this machine); each task returns its run directory's
files, which the driver writes, so the cluster's machines need hetsim installed but no shared disk.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import fcntl
import io
import itertools
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hetsim.analysis import table_runs
from hetsim.cluster import usable_cores
from hetsim.config import Spec, spec_to_dict, to_toml
from hetsim.errors import HetsimError, SpecError
from hetsim.resolve import load_spec, replace
from hetsim.results import CHECKPOINT, atomic_write
from hetsim.results import config_hash as full_config_hash

SUMMARY_COLUMNS = ("time_to_accuracy_s", "final_test_acc", "best_test_acc", "rounds", "time_s", "epochs",
                   "stopped_by", "diverged_at_round", "wall_time_s")


@dataclass(frozen=True)
class SweepRun:
    point: dict[str, str]      # grid key -> value (as given)
    seed: int
    spec: Spec
    run_dir: Path

    @property
    def cached(self) -> bool:
        summary = self.run_dir / "summary.json"
        config = self.run_dir / "config.toml"
        return summary.is_file() and config.is_file() and config.read_text() == to_toml(spec_to_dict(self.spec))


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """`key=v1,v2` (or `key=v1|v2` when values hold commas, e.g. TOML tables) -> {key: [v1, v2]}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise SpecError(f"--grid {item!r}: expected KEY=V1,V2,... (or KEY=V1|V2 for values with commas)")
        parts = values.split("|") if "|" in values else values.split(",")
        grid[key.strip()] = [p.strip() for p in parts if p.strip()]
    return grid


def config_hash(spec: Spec) -> str:
    """A run folder's name: the checkpoint's config hash (results.config_hash), shortened."""
    return full_config_hash(spec)[:12]


def expand(base: Spec, grid: dict[str, list[str]], seeds: int, out: Path) -> list[SweepRun]:
    runs = []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        label = f"{base.name}[{','.join(f'{k}={v}' for k, v in point.items())}]" if point else base.name
        for seed in range(seeds):
            overrides = [f"{k}={v}" for k, v in point.items()] + [f"seed={base.seed + seed}", f"name={json.dumps(label)}"]
            spec = replace(base, overrides)
            runs.append(SweepRun(point, base.seed + seed, spec, out / "runs" / config_hash(spec)))
    return runs


def _run_remote(spec: Spec, engine: str) -> dict[str, bytes]:
    """A Ray task: run into a local temporary folder and return the run directory's files, so that
    results reach the driver whatever machine of the cluster ran them."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _run_one(spec, tmp, engine, False)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def _sweep_ray(pending: Sequence[SweepRun], address: str, workers: int, engine: str, stream, t0: float
               ) -> list[tuple[SweepRun, Exception]]:
    try:
        import ray
    except ImportError:
        raise SpecError("--ray needs Ray: pip install 'hetsim[ray]'") from None
    if address == "local":
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    failures = []
    try:
        task = ray.remote(num_cpus=1)(_run_remote)
        refs = {task.remote(r.spec, engine): r for r in pending}
        remaining = list(refs)
        for i in range(1, len(refs) + 1):
            (ref,), remaining = ray.wait(remaining, num_returns=1)
            r = refs[ref]
            try:
                files = ray.get(ref)
                r.run_dir.mkdir(parents=True, exist_ok=True)
                for name, data in sorted(files.items(), key=lambda kv: kv[0] == "summary.json"):
                    (r.run_dir / name).write_bytes(data)  # summary.json last: it marks the run finished
                status = _status(json.loads(files["summary.json"]))
            except Exception as e:  # noqa: BLE001
                failures.append((r, e))
                status = f"FAILED: {e}"
            print(f"[{i}/{len(refs)} {time.perf_counter() - t0:.0f}s ray] {r.spec.name} seed {r.seed}: {status}",
                  file=stream, flush=True)
    finally:
        ray.shutdown()
    return failures


class _Stopped(BaseException):
    """Raised in a pool worker by SIGTERM: the driver stops the sweep (Ctrl+C)."""


_RUNNING = False  # whether this pool worker is inside a run (see _on_terminate)


def _worker_init() -> None:
    # Ctrl+C reaches every process of the terminal's group; the driver alone decides what stops, so a
    # worker must not turn it into a failed run and go on to the next queued one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_terminate)


def _on_terminate(signum: int, frame: Any) -> None:
    if not _RUNNING:
        os._exit(128 + signum)
    raise _Stopped  # unwind the run first: the real backend's finally stops its device processes


def _run_one(spec: Spec, run_dir: str, engine: str, resume: bool) -> dict[str, Any]:
    global _RUNNING
    try:
        _RUNNING = True
        if engine == "real":
            from backends.torchmp import run

            return run(spec, run_dir, resume=resume).summary
        from hetsim.sim import simulate  # one torch thread per run unless sim.threads says otherwise

        return simulate(spec, run_dir, resume=resume).summary
    except _Stopped:
        os._exit(128 + signal.SIGTERM)  # end the worker: it must not start a queued run
    finally:
        _RUNNING = False


def default_workers() -> int:
    """One parallel run per core this process may use (`hetsim.cluster.usable_cores`)."""
    return usable_cores()


def check_workers(workers: int) -> None:
    if workers < 0:
        raise SpecError(f"--workers {workers}: expected 0 (one per core) or a positive number of parallel runs")


def sweep(config: str | Path, grid_items: Sequence[str], seeds: int, out: str | Path, workers: int = 0,
          engine: str = "sim", overrides: Sequence[str] = (), stream=None, ray_address: str = "") -> Path:
    """Run the sweep (see the module docstring); returns the path of sweep.csv. ray_address: run the
    pending runs as Ray tasks on that cluster ('local' starts a Ray instance on this machine)."""
    if engine not in ("sim", "real"):
        raise SpecError(f"--engine {engine!r}: expected 'sim' or 'real'")
    if seeds < 1:
        raise SpecError(f"--seeds {seeds}: expected at least 1")
    check_workers(workers)
    out = Path(out)
    base = load_spec(config, overrides)
    return run_all(expand(base, parse_grid(grid_items), seeds, out), out, workers, engine, stream, ray_address)


def run_all(runs: Sequence[SweepRun], out: str | Path, workers: int = 0, engine: str = "sim", stream=None,
            ray_address: str = "") -> Path:
    """Run the runs that are not cached (in parallel processes, or on Ray), then merge every finished
    one into out/sweep.csv (see write_table); returns its path.

    Ctrl+C stops promptly: queued runs are cancelled, running ones are stopped (a run with a
    checkpoint resumes from it next time, one without is redone), the finished ones are written to
    sweep.csv, and KeyboardInterrupt is raised again with a one-line account of what finished."""
    from hetsim.rundir import writable_dir

    check_workers(workers)
    stream = stream or sys.stderr  # looked up now: a redirected stderr (tests, notebooks) gets the lines
    out = Path(out)
    # before any run: a file in the way or a foreign sweep.csv would otherwise be found only after them
    writable_dir(out, "sweep folder")
    _read_table(out / "sweep.csv")
    pending = [r for r in runs if not r.cached]
    workers = 1 if engine == "real" else (workers or default_workers())
    print(f"sweep: {len(runs)} runs ({len(runs) - len(pending)} cached), {min(workers, max(1, len(pending)))} "
          f"at a time", file=stream)
    t0 = time.perf_counter()
    failures: list[tuple[SweepRun, BaseException]] = []
    try:
        if pending and ray_address:
            failures = _sweep_ray(pending, ray_address, workers, engine, stream, t0)
        elif pending:
            failures = _sweep_pool(pending, workers, engine, stream, t0)
    except KeyboardInterrupt:
        table = write_table(runs, out)
        done = sum(r.cached for r in runs)
        raise KeyboardInterrupt(f"{done} of {len(runs)} runs finished and are listed in {table}; the same "
                                f"command runs the rest") from None
    table = write_table(runs, out)
    if failures:
        r, e = failures[0]
        raise HetsimError(f"{len(failures)} of {len(pending)} runs failed; first: {r.run_dir}: {e}")
    return table


def _status(s: dict[str, Any]) -> str:
    """One run's outcome for the progress line; a diverged run is a result, not a failure."""
    if s.get("diverged_at_round") is not None:
        return f"diverged at round {s['diverged_at_round']}"
    acc, tta = s.get("final_test_acc"), s.get("time_to_accuracy_s")
    return (f"final acc {'-' if acc is None else f'{acc:.3f}'}, "
            f"tta {'-' if tta is None else f'{tta:.4g}s'}")


def _sweep_pool(pending: Sequence[SweepRun], workers: int, engine: str, stream, t0: float
                ) -> list[tuple[SweepRun, BaseException]]:
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_worker_init)
    failures: list[tuple[SweepRun, BaseException]] = []
    try:
        futures = {pool.submit(_run_one, r.spec, str(r.run_dir), engine, (r.run_dir / CHECKPOINT).is_file()): r
                   for r in pending}
        for i, fut in enumerate(cf.as_completed(futures), 1):
            r = futures[fut]
            try:
                status = _status(fut.result())
            except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
                failures.append((r, e))
                status = f"FAILED: {e}"
            print(f"[{i}/{len(pending)} {time.perf_counter() - t0:.0f}s] {r.spec.name} seed {r.seed}: {status}",
                  file=stream, flush=True)
    except BaseException:
        _stop_pool(pool)
        raise
    pool.shutdown()
    return failures


def _stop_pool(pool: cf.ProcessPoolExecutor, grace_s: float = 10.0) -> None:
    """Cancel the queued runs and stop the running ones. The executor can only wait for running work
    (shutdown runs every run already handed to a worker), so its processes are terminated: SIGTERM
    unwinds a run (see _on_terminate), and a worker still alive after grace_s is killed."""
    procs = list((pool._processes or {}).values())  # noqa: SLF001 - no public way to stop running work
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def write_table(runs: Sequence[SweepRun], out: Path) -> Path:
    """Merge the finished runs of `runs` into out/sweep.csv: the rows of the labels (spec names) these
    runs have are replaced by theirs, every other label's rows are kept. So two sweeps into one folder
    keep each other's runs, and a label re-run with a changed config lists only its new runs (stale
    ones stay in runs/ but out of the table). Read-merge-write holds an exclusive lock on
    out/.sweep.lock, so concurrent sweeps cannot lose each other's rows; the file is replaced atomically.
    A run that did not finish (no summary.json for its config) has no row."""
    out.mkdir(parents=True, exist_ok=True)
    table = out / "sweep.csv"
    labels = {r.spec.name for r in runs}
    with open(out / ".sweep.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        header, rows = _read_table(table)
        keys = [c for c in header if c not in _FIXED_COLUMNS and c not in SUMMARY_COLUMNS]
        rows = [row for row in rows if row.get("name") not in labels]
        for r in runs:
            if not r.cached:
                continue
            s = json.loads((r.run_dir / "summary.json").read_text())
            keys += [k for k in r.point if k not in keys]
            rows.append({"run_dir": str(r.run_dir.relative_to(out)), "name": r.spec.name, "seed": r.seed, **r.point,
                         **{c: "" if s.get(c) is None else s[c] for c in SUMMARY_COLUMNS}})
        buf = io.StringIO()
        w = csv.DictWriter(buf, [*_FIXED_COLUMNS, *keys, *SUMMARY_COLUMNS], restval="", extrasaction="ignore",
                           lineterminator="\n")
        w.writeheader()
        w.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
        atomic_write(table, buf.getvalue())
    return table


_FIXED_COLUMNS = ("run_dir", "name", "seed")


def _read_table(table: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of an existing sweep.csv (none if there is no file)."""
    if not table.is_file():
        return [], []
    with open(table, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        if not {"run_dir", "name"} <= set(header):
            raise HetsimError(f"{table}: not a sweep table (expected run_dir and name columns); move it away to "
                              f"start a new one")
        return header, [row for row in reader if row.get("run_dir")]


def compare_methods(config: str | Path, methods: dict[str, tuple[str, str, str]], seeds: int, out: str | Path,
                    workers: int = 0, overrides: Sequence[str] = (), target: float | None = None,
                    baseline: str | None = None) -> Path:
    """Run each method — label -> (scheduler, sampler, aggregator) tables as TOML — for `seeds` seeds
    on the base config (cached sweeps), then draw the comparison; returns the figures folder."""
    from hetsim.analysis import load_runs
    from hetsim.plots import plot_runs

    out = Path(out)
    run_dirs: list[Path] = []
    for label, (sched, samp, agg) in methods.items():
        table = sweep(config, [], seeds, out / label, workers,
                      overrides=[*overrides, f"name={json.dumps(label)}", f"scheduler={sched}", f"sampler={samp}",
                                 f"aggregator={agg}"])
        run_dirs += table_runs(table)
    figures = out / "figures"
    plot_runs(load_runs(run_dirs), figures, target=target, baseline=baseline, order=list(methods))
    return figures
