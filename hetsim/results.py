"""The run directory, shared by every runner (simulator and real backends).

    config.toml      the fully resolved spec (re-run it with `hetsim simulate config.toml`)
    metrics.csv      one row per round: round, time_s, epoch, samples, lr, train_loss, test_loss, test_acc
                     (round 0 is the initial model; test columns are empty where no evaluation ran)
    decisions.jsonl  one JSON object per round: local_steps, samples, biased_samples, weights per worker
    trace.json       Chrome / Perfetto trace events: compute, comm, idle, eval per device
    summary.json     time_to_accuracy_s, final/best accuracy, utilisation per device, seed, versions, ...

Every file is written atomically (temporary file + rename), so a crashed run leaves complete files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetsim.config import Spec, spec_to_dict, to_toml

_UMASK = os.umask(0)
os.umask(_UMASK)

METRIC_COLUMNS = ("round", "time_s", "epoch", "samples", "lr", "train_loss", "test_loss", "test_acc")


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def versions() -> dict[str, str]:
    import numpy
    import simpy
    import torch

    from hetsim import __version__

    return {"hetsim": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "simpy": simpy.__version__}


def _fmt(v: Any) -> str:
    if isinstance(v, float) and math.isnan(v):
        return ""
    return repr(v) if isinstance(v, float) else str(v)


def metrics_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(METRIC_COLUMNS)
    for r in rows:
        w.writerow([_fmt(r[c]) for c in METRIC_COLUMNS])
    return buf.getvalue()


@dataclass
class RunResult:
    """What a run produced, in memory. `metrics` is a dict of equal-length columns, so
    `pandas.DataFrame(result.metrics)` gives the table; missing test values are NaN."""

    spec: Spec
    metrics: dict[str, list[Any]]
    decisions: list[dict[str, Any]]
    summary: dict[str, Any]
    run_dir: Path | None = None
    trace: list[dict[str, Any]] = field(default_factory=list)


class RunWriter:
    """Collects a run's rows, decisions and trace events and writes the run directory.

    `flush` rewrites the files atomically; runners call it every few seconds and at the end, so an
    interrupted run keeps what it had.
    """

    def __init__(self, run_dir: Path | None, spec: Spec, flush_every_s: float = 5.0):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.spec = spec
        self.rows: list[dict[str, Any]] = []
        self.decisions: list[dict[str, Any]] = []
        self.trace: list[dict[str, Any]] = []
        self.flush_every_s = flush_every_s
        self._last_flush = time.monotonic()
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.run_dir / "config.toml", to_toml(spec_to_dict(spec)))

    def add_row(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.run_dir is not None and time.monotonic() - self._last_flush > self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        if self.run_dir is None:
            return
        atomic_write(self.run_dir / "metrics.csv", metrics_csv(self.rows))
        atomic_write(self.run_dir / "decisions.jsonl", "".join(json.dumps(d) + "\n" for d in self.decisions))
        atomic_write(self.run_dir / "trace.json", json.dumps({"traceEvents": self.trace, "displayTimeUnit": "ms"}))
        self._last_flush = time.monotonic()

    def finish(self, summary: dict[str, Any]) -> RunResult:
        self.flush()
        if self.run_dir is not None:
            atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        columns = {c: [r[c] for r in self.rows] for c in METRIC_COLUMNS}
        return RunResult(self.spec, columns, self.decisions, summary, self.run_dir, self.trace)


def trace_event(name: str, worker: int, start_s: float, end_s: float, **args: Any) -> dict[str, Any]:
    """A Chrome trace 'complete' event; times in microseconds, one track (tid) per worker."""
    return {"name": name, "cat": name, "ph": "X", "pid": 0, "tid": worker,
            "ts": start_s * 1e6, "dur": max(end_s - start_s, 0.0) * 1e6, "args": args}


def trace_thread_names(names: list[str]) -> list[dict[str, Any]]:
    return [{"name": "thread_name", "ph": "M", "pid": 0, "tid": k, "args": {"name": n}} for k, n in enumerate(names)]


def worker_names(kinds: list[str]) -> list[str]:
    """cpu0, cpu1, gpu0, ... in worker order."""
    seen: dict[str, int] = {}
    out = []
    for kind in kinds:
        out.append(f"{kind}{seen.get(kind, 0)}")
        seen[kind] = seen.get(kind, 0) + 1
    return out


def time_to_accuracy(times: list[float], accs: list[float], target: float) -> float | None:
    """First time at which the evaluated accuracy reached `target` (None if never)."""
    for t, a in zip(times, accs):
        if a is not None and not math.isnan(a) and a >= target:
            return t
    return None


def run_summary(spec: Spec, rows: list[dict[str, Any]], engine: str, names: list[str], busy_s: Any,
                rounds: int, time_s: float, epochs: float, samples: int, stopped_by: str, wall_s: float,
                **extra: Any) -> dict[str, Any]:
    """The summary.json every runner writes: time to accuracy, accuracy, utilisation, provenance."""
    import torch

    evaluated = [r for r in rows if not math.isnan(r["test_acc"])]
    target = spec.stop.target_accuracy
    tta = time_to_accuracy([r["time_s"] for r in evaluated], [r["test_acc"] for r in evaluated], target)
    hit = next((r for r in evaluated if r["test_acc"] >= target), None)
    return {
        "name": spec.name, "engine": engine, "seed": spec.seed, "workload": spec.workload.name,
        "n_workers": len(names), "scheduler": spec.scheduler.name, "sampler": spec.sampler.name,
        "aggregator": spec.aggregator.name, "target_accuracy": target, "time_to_accuracy_s": tta,
        "rounds_to_accuracy": hit["round"] if hit else None, "epochs_to_accuracy": hit["epoch"] if hit else None,
        "final_test_acc": evaluated[-1]["test_acc"] if evaluated else None,
        "best_test_acc": max(r["test_acc"] for r in evaluated) if evaluated else None,
        "final_train_loss": rows[-1]["train_loss"], "rounds": rounds, "time_s": time_s, "epochs": epochs,
        "samples": samples, "stopped_by": stopped_by,
        "utilization": {n: (float(b) / time_s if time_s else 0.0) for n, b in zip(names, busy_s)},
        **extra,
        "wall_time_s": wall_s, "torch_threads": torch.get_num_threads(), "versions": versions(),
    }


CHECKPOINT = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (torch.save to a temporary file, then rename)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    from hetsim.errors import HetsimError

    if not path.is_file():
        raise HetsimError(f"{path.parent}: no checkpoint to resume from (set run.checkpoint_every > 0)")
    return torch.load(path, weights_only=False)
