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
import hashlib
import io
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hetsim.config import Spec, load_spec, replace, spec_to_dict, to_toml
from hetsim.errors import SpecError
from hetsim.results import CHECKPOINT, atomic_write

SUMMARY_COLUMNS = ("time_to_accuracy_s", "final_test_acc", "best_test_acc", "rounds", "time_s", "epochs",
                   "stopped_by", "wall_time_s")


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
    return hashlib.sha256(to_toml(spec_to_dict(spec)).encode()).hexdigest()[:12]


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
                status = "done"
            except Exception as e:  # noqa: BLE001
                failures.append((r, e))
                status = f"FAILED: {e}"
            print(f"[{i}/{len(refs)} {time.perf_counter() - t0:.0f}s ray] {r.spec.name} seed {r.seed}: {status}",
                  file=stream, flush=True)
    finally:
        ray.shutdown()
    return failures


def _run_one(spec: Spec, run_dir: str, engine: str, resume: bool) -> dict[str, Any]:
    if engine == "real":
        from backends.torchmp import run

        return run(spec, run_dir, resume=resume).summary
    import torch

    torch.set_num_threads(1)  # one run per core
    from hetsim.sim import simulate

    return simulate(spec, run_dir, resume=resume).summary


def sweep(config: str | Path, grid_items: Sequence[str], seeds: int, out: str | Path, workers: int = 0,
          engine: str = "sim", overrides: Sequence[str] = (), stream=sys.stderr, ray_address: str = "") -> Path:
    """Run the sweep (see the module docstring); returns the path of sweep.csv. ray_address: run the
    pending runs as Ray tasks on that cluster ('local' starts a Ray instance on this machine)."""
    if engine not in ("sim", "real"):
        raise SpecError(f"--engine {engine!r}: expected 'sim' or 'real'")
    if seeds < 1:
        raise SpecError(f"--seeds {seeds}: expected at least 1")
    out = Path(out)
    base = load_spec(config, overrides)
    runs = expand(base, parse_grid(grid_items), seeds, out)
    pending = [r for r in runs if not r.cached]
    workers = 1 if engine == "real" else (workers or os.cpu_count() or 1)
    print(f"sweep: {len(runs)} runs ({len(runs) - len(pending)} cached), {min(workers, max(1, len(pending)))} "
          f"at a time", file=stream)
    t0 = time.perf_counter()
    failures = []
    if pending and ray_address:
        failures = _sweep_ray(pending, ray_address, workers, engine, stream, t0)
    elif pending:
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_run_one, r.spec, str(r.run_dir), engine, (r.run_dir / CHECKPOINT).is_file()): r
                       for r in pending}
            for i, fut in enumerate(cf.as_completed(futures), 1):
                r = futures[fut]
                try:
                    s = fut.result()
                    tta = s["time_to_accuracy_s"]
                    status = f"final acc {s['final_test_acc']:.3f}, tta {'-' if tta is None else f'{tta:.4g}s'}"
                except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
                    failures.append((r, e))
                    status = f"FAILED: {e}"
                print(f"[{i}/{len(pending)} {time.perf_counter() - t0:.0f}s] {r.spec.name} seed {r.seed}: {status}",
                      file=stream, flush=True)
    table = write_table(runs, out)
    if failures:
        r, e = failures[0]
        raise SpecError(f"{len(failures)} of {len(pending)} runs failed; first: {r.run_dir}: {e}")
    return table


def write_table(runs: Sequence[SweepRun], out: Path) -> Path:
    keys = list(runs[0].point) if runs else []
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run_dir", "name", "seed", *keys, *SUMMARY_COLUMNS])
    for r in runs:
        path = r.run_dir / "summary.json"
        s = json.loads(path.read_text()) if path.is_file() else {}
        w.writerow([r.run_dir.relative_to(out), r.spec.name, r.seed, *(r.point[k] for k in keys),
                    *("" if s.get(c) is None else s[c] for c in SUMMARY_COLUMNS)])
    atomic_write(out / "sweep.csv", buf.getvalue())
    return out / "sweep.csv"


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
    plot_runs(load_runs(run_dirs), figures, target=target, baseline=baseline)
    return figures


def table_runs(table: str | Path) -> list[Path]:
    """The run directories a sweep.csv lists: this sweep's runs only, not stale ones of an older config
    that share the folder. A table cut short (a copy interrupted, a writer without atomic rename) is
    an error naming the line, never a shorter list of runs."""
    from hetsim.errors import HetsimError

    table = Path(table)
    try:
        text = table.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise HetsimError(f"{table}: cannot read the sweep table ({e})") from None
    why = "truncated, or written while being read? re-run `hetsim sweep` to rewrite it"
    if not text.endswith("\n"):
        raise HetsimError(f"{table}: the last line is incomplete ({why})")
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header or "run_dir" not in header:
        raise HetsimError(f"{table}: expected a header with a run_dir column, got {header} ({why})")
    col = header.index("run_dir")
    runs = []
    for row in reader:
        if len(row) != len(header) or not row[col]:
            raise HetsimError(f"{table}: line {reader.line_num} has {len(row)} fields, expected {len(header)} ({why})")
        path = Path(row[col])
        if path.is_absolute() or ".." in path.parts:
            raise HetsimError(f"{table}: line {reader.line_num}: run_dir {row[col]!r} is outside the sweep folder")
        runs.append(table.parent / path)
    return runs
