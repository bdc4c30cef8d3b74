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

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import platform
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hetsim.config import Spec, spec_to_dict, to_toml
from hetsim.errors import HetsimError

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
                diverged_at_round: int | None = None, config_changes: Sequence[dict[str, Any]] = (),
                **extra: Any) -> dict[str, Any]:
    """The summary.json every runner writes: time to accuracy, accuracy, utilisation, provenance.

    diverged_at_round: the first round whose training loss or global parameters were not finite
    (None: the run did not diverge). config_changes: the resumes that went on with an edited config
    (`Checkpoint.config_changes`), reported as resumed_with_changed_config (None: never)."""
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
        "samples": samples, "stopped_by": stopped_by, "diverged_at_round": diverged_at_round,
        "resumed_with_changed_config": list(config_changes) or None,
        "utilization": {n: (float(b) / time_s if time_s else 0.0) for n, b in zip(names, busy_s)},
        **extra,
        "wall_time_s": wall_s, "torch_threads": torch.get_num_threads(), "versions": versions(),
    }


def summary_outcome(summary: dict[str, Any]) -> str:
    """A run's result in words, for status lines: its divergence, "no accuracy" (a time-only run), or
    its final accuracy and time to target."""
    if summary.get("diverged_at_round") is not None:
        return f"diverged at round {summary['diverged_at_round']}: non-finite training loss or parameters"
    acc = summary.get("final_test_acc")
    if acc is None:
        time_only = summary.get("fidelity") == "time_only" and not summary.get("surrogate")
        return "no accuracy" + (" (time-only run without sim.surrogate)" if time_only else " (never evaluated)")
    tta = summary["time_to_accuracy_s"]
    return (f"final acc {acc:.3f}, time to {summary['target_accuracy']:.0%}: "
            f"{'not reached' if tta is None else f'{tta:.4g}s'}")


CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1  # the envelope below; a later hetsim that changes it bumps this
ENGINE_COMMANDS = {"sim": "hetsim simulate", "torchmp": "hetsim run"}


def config_hash(spec: Spec) -> str:
    """sha256 of the fully resolved config (as config.toml holds it): what a checkpoint was written with."""
    return hashlib.sha256(to_toml(spec_to_dict(spec)).encode()).hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the runner's `state` and the config changes its run went through.

    config_changes: one entry per resume that continued with an edited config (`--force`):
    {"round", "checkpoint_config_hash", "config_hash", "changed": [dotted keys]}. A run carries the
    list in every later checkpoint, so summary.json reports it even after further plain resumes.
    """

    state: dict[str, Any]
    config_changes: list[dict[str, Any]]


def save_checkpoint(path: Path, state: dict[str, Any], engine: str, spec: Spec,
                    config_changes: Sequence[dict[str, Any]] = ()) -> None:
    """Write a checkpoint atomically (torch.save to a temporary file, then rename).

    The file holds tensors and plain data only (numpy arrays become tensors, numpy scalars Python
    numbers), so `load_checkpoint` can read it with torch's weights-only unpickler and a checkpoint in a
    shared run folder can never run code. It records the engine and the resolved config it belongs to.
    """
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"hetsim_checkpoint": CHECKPOINT_FORMAT, "engine": engine, "config": spec_to_dict(spec),
                "config_hash": config_hash(spec), "config_changes": _to_plain(list(config_changes)),
                "state": _to_plain(state)}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, engine: str, spec: Spec, force: bool = False) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint` for `engine` ("sim" or "torchmp") and `spec`.

    Only tensors and plain data are unpickled (torch's weights-only loader; anything else is refused
    before it is built). A missing, empty, truncated or corrupt file (zip CRC checked), a file that is not
    a hetsim checkpoint, one of the other engine, or one written with another config is a one-line
    HetsimError; with `force`, a changed config is accepted and recorded in `Checkpoint.config_changes`.
    """
    import pickle
    import zipfile

    import torch

    if not path.is_file():
        raise HetsimError(f"{path.parent}: no checkpoint to resume from (set run.checkpoint_every > 0)")
    if path.stat().st_size == 0:
        raise HetsimError(f"{path}: the checkpoint is empty (the run was interrupted while writing it?)")
    if not zipfile.is_zipfile(path):
        raise HetsimError(f"{path}: not a hetsim checkpoint (truncated, or not written by hetsim)")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # torch does not verify the archive's CRCs; a flipped bit would load silently
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise HetsimError(f"{path}: the checkpoint is corrupt ({_one_line(e)})") from None
    if bad is not None:
        raise HetsimError(f"{path}: the checkpoint is corrupt (checksum mismatch in {bad})")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise HetsimError(f"{path}: refused to load: the checkpoint holds objects other than tensors and plain "
                          f"data, so it was not written by this hetsim or was tampered with"
                          + (f" (it refers to {found.group(1)})" if found else "")) from None
    except Exception as e:  # noqa: BLE001 - whatever else torch.load trips on, the file is unusable
        raise HetsimError(f"{path}: the checkpoint is corrupt ({_one_line(e)})") from None
    if not isinstance(data, dict) or "hetsim_checkpoint" not in data or not isinstance(data.get("state"), dict):
        raise HetsimError(f"{path}: not a hetsim checkpoint")
    if data["hetsim_checkpoint"] != CHECKPOINT_FORMAT:
        raise HetsimError(f"{path}: checkpoint format {data['hetsim_checkpoint']!r}; this hetsim reads format "
                          f"{CHECKPOINT_FORMAT}")
    if data.get("engine") != engine:
        other = ENGINE_COMMANDS.get(data.get("engine"), repr(data.get("engine")))
        raise HetsimError(f"{path}: written by `{other}`, not `{ENGINE_COMMANDS[engine]}`; resume it with "
                          f"`{other} --resume {path.parent}`")
    changes = list(data.get("config_changes") or [])
    new_hash = config_hash(spec)
    if data.get("config_hash") != new_hash:
        changed = _changed_keys(data.get("config") or {}, spec_to_dict(spec))
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        if not force:
            raise HetsimError(f"{path}: the config changed since this checkpoint ({shown or 'config hash differs'}); "
                              f"restore config.toml, or resume with --force to continue with the edited config "
                              f"(recorded in summary.json)")
        changes.append({"round": data["state"].get("round"), "checkpoint_config_hash": data.get("config_hash"),
                        "config_hash": new_hash, "changed": changed})
    return Checkpoint(_from_plain(data["state"]), changes)


@contextlib.contextmanager
def restoring(path: Path):
    """Around a runner's restore of a loaded state: a state that does not fit this run (a config changed
    with --force beyond what the state can take, a damaged file) is a one-line error, not a traceback."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise HetsimError(f"{path}: the checkpoint does not fit this run ({_one_line(e)})") from None


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs (list items by index)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in list(old) + [k for k in new if k not in old]:
            out += _changed_keys(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and \
            any(isinstance(x, dict) for x in old + new):
        return [key for i, (a, b) in enumerate(zip(old, new)) for key in _changed_keys(a, b, f"{prefix}.{i}")]
    return [] if old == new else [prefix]


_NDARRAY = "__hetsim_ndarray__"  # marks a numpy array stored as a tensor
_PLAIN = (type(None), bool, int, float, str)


def _to_plain(obj: Any) -> Any:
    """Tensors and plain data only: numpy arrays become tagged tensors, numpy scalars Python numbers.
    Anything else is a TypeError here, at save, rather than a checkpoint that cannot be loaded."""
    import collections

    import numpy as np
    import torch

    if isinstance(obj, np.generic):  # before the plain types: np.float64 is a float, but pickles as numpy
        return obj.item()
    if isinstance(obj, _PLAIN) or isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"cannot checkpoint a numpy array of dtype {obj.dtype}")
        return {_NDARRAY: torch.from_numpy(np.ascontiguousarray(obj))}
    if type(obj) in (dict, collections.OrderedDict):
        out = type(obj)((_to_plain(k), _to_plain(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a module state_dict's per-module versions
            out._metadata = obj._metadata
        return out
    if type(obj) in (list, tuple):
        if all(type(v) in _PLAIN for v in obj):  # the common long lists (per-worker numbers): nothing to convert
            return obj
        return type(obj)(_to_plain(v) for v in obj)
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}: only tensors, numpy arrays and plain data")


def _from_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        if len(obj) == 1 and _NDARRAY in obj:
            return obj[_NDARRAY].numpy()
        out = type(obj)((k, _from_plain(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        if all(type(v) in _PLAIN for v in obj):
            return obj
        return type(obj)(_from_plain(v) for v in obj)
    return obj
