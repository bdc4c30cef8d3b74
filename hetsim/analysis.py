"""Reading run directories back: metrics, summaries, time-to-accuracy, speedups.

Works on any runner's output (simulator or real backend), since they share one schema.

    runs = load_runs(["out/runs/sync-sgd-s0", "out/runs/system-aware-s0"])
    table = speedup_table(group_by_label(runs), target=0.95, baseline="sync-sgd")
"""

from __future__ import annotations

import csv
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hetsim.errors import HetsimError
from hetsim.results import (RUN_SCHEMA, RunResult, read_decisions, read_metrics_columns, read_trace,
                            time_to_accuracy)


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    metrics: dict[str, np.ndarray]
    decisions: Sequence[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The policy label: the spec's name (seeds of one configuration share it)."""
        return str(self.config.get("name", self.path.name))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    def evaluated(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(time_s, epoch, test_acc) at the rounds where the model was evaluated."""
        acc = self.metrics["test_acc"]
        ok = ~np.isnan(acc)
        return self.metrics["time_s"][ok], self.metrics["epoch"][ok], acc[ok]

    def time_to_accuracy(self, target: float) -> float | None:
        t, _, acc = self.evaluated()
        return time_to_accuracy(list(t), list(acc), target)

    def as_result(self) -> RunResult:
        """The run as a RunResult (what `hetsim.simulate` returns), read back from disk."""
        from hetsim.config import spec_from_dict

        spec = spec_from_dict(self.config, source=str(self.path / "config.toml"))
        metrics = {c: [int(v) if c in ("round", "samples") else float(v) for v in col] for c, col in self.metrics.items()}
        return RunResult(spec, metrics, self.decisions, self.summary, self.path, self.trace())

    def trace(self) -> list[dict[str, Any]]:
        path = self.path / "trace.json"
        return read_trace(path) if path.is_file() else []


def read_metrics(path: Path) -> dict[str, np.ndarray]:
    """metrics.csv as arrays; values not computed (empty cells) are NaN, as are computed NaNs (`nan`)."""
    return {c: np.array(v, dtype=float) for c, v in read_metrics_columns(path).items()}


def load_run(path: str | Path) -> Run:
    """A finished run directory of this schema (RUN_SCHEMA) or schema 1 (before summary.json carried
    `schema_version`: decisions.jsonl and a `{"traceEvents": ...}` trace); a newer one is refused."""
    path = Path(path)
    needed = ["config.toml", "metrics.csv", "summary.json"]
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise HetsimError(f"{path}: not a finished run directory (missing {', '.join(missing)})")
    try:
        summary = json.loads((path / "summary.json").read_text())
    except json.JSONDecodeError as e:
        raise HetsimError(f"{path / 'summary.json'}: not valid JSON ({e})") from None
    schema = summary.get("schema_version", 1)
    if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
        raise HetsimError(f"{path / 'summary.json'}: schema_version: expected an integer >= 1, got {schema!r}")
    if schema > RUN_SCHEMA:
        raise HetsimError(f"{path}: written in run schema {schema}, newer than this hetsim reads (up to "
                          f"{RUN_SCHEMA}); upgrade hetsim")
    if schema == 1:
        legacy = path / "decisions.jsonl"
        decisions: Sequence[dict[str, Any]] = \
            [json.loads(line) for line in legacy.read_text().splitlines()] if legacy.is_file() else []
    else:
        current = path / "decisions.bin"
        decisions = read_decisions(current) if current.is_file() else []
    return Run(path, tomllib.loads((path / "config.toml").read_text()), summary,
               read_metrics(path / "metrics.csv"), decisions)


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Load run directories; a sweep folder loads the runs its sweep.csv lists (not stale runs of an
    older config beside them), and any other folder of run directories is expanded."""
    runs = []
    for p in map(Path, paths):
        if (p / "summary.json").is_file() or (p / "config.toml").is_file():
            runs.append(load_run(p))
        elif (p / "sweep.csv").is_file():
            from hetsim.sweep import table_runs

            runs.extend(load_run(r) for r in table_runs(p / "sweep.csv"))
        elif p.is_dir():
            children = sorted(c for c in p.iterdir() if (c / "summary.json").is_file())
            if not children:
                raise HetsimError(f"{p}: holds no run directories")
            runs.extend(load_run(c) for c in children)
        else:
            raise HetsimError(f"{p}: no such run directory")
    return runs


def group_by_label(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs grouped by label, in first-seen order; each group's runs sorted by seed."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.label, []).append(r)
    return {k: sorted(v, key=lambda r: r.seed) for k, v in groups.items()}


@dataclass(frozen=True)
class SpeedupRow:
    label: str
    seeds: int
    reached: int                    # seeds that reached the target
    tta_mean_s: float | None        # over the seeds that reached it
    tta_std_s: float | None
    final_acc_mean: float
    final_acc_std: float
    speedup: float | None           # baseline mean TTA / this mean TTA

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def speedup_table(groups: dict[str, list[Run]], target: float, baseline: str | None = None) -> list[SpeedupRow]:
    """Time to `target` accuracy per label (mean/std over seeds) and speedup over `baseline`."""
    if baseline is not None and baseline not in groups:
        raise HetsimError(f"baseline {baseline!r} is not among the runs' labels {list(groups)}")
    rows = []
    for label, runs in groups.items():
        ttas = [t for t in (r.time_to_accuracy(target) for r in runs) if t is not None]
        finals = [r.evaluated()[2][-1] for r in runs]
        rows.append(SpeedupRow(label, len(runs), len(ttas),
                               float(np.mean(ttas)) if ttas else None, float(np.std(ttas)) if ttas else None,
                               float(np.mean(finals)), float(np.std(finals)), None))
    if baseline is not None:
        base = next(r for r in rows if r.label == baseline).tta_mean_s
        rows = [SpeedupRow(**{**r.as_dict(), "speedup": (base / r.tta_mean_s) if (base and r.tta_mean_s) else None})
                for r in rows]
    return rows


def speedup_markdown(rows: Sequence[SpeedupRow], target: float, baseline: str | None) -> str:
    def f(v: float | None, spec: str) -> str:
        return "not reached" if v is None else format(v, spec)

    head = (f"| policy | seeds reaching {target:.0%} | time to {target:.0%} (s) | final accuracy | "
            f"speedup over {baseline or '-'} |\n|---|---|---|---|---|\n")
    body = "".join(
        f"| {r.label} | {r.reached}/{r.seeds} | {f(r.tta_mean_s, '.4g')} ± {f(r.tta_std_s, '.2g')} | "
        f"{r.final_acc_mean:.3f} ± {r.final_acc_std:.3f} | {f(r.speedup, '.2f')}{'x' if r.speedup else ''} |\n"
        for r in rows)
    return head + body


def write_speedup_table(rows: Sequence[SpeedupRow], out_dir: Path, target: float, baseline: str | None) -> None:
    import io

    from hetsim.results import atomic_write

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SpeedupRow.__dataclass_fields__)
    w.writerows(["" if v is None else v for v in r.as_dict().values()] for r in rows)
    atomic_write(out_dir / "speedups.csv", buf.getvalue())
    atomic_write(out_dir / "speedups.md", speedup_markdown(rows, target, baseline))


def compare_runs(predicted: Run, measured: Run) -> dict[str, Any]:
    """Predicted (usually the simulator) against measured (usually the real backend), round by round.

    round_time_rel_error: |pred - meas| / meas of each round's duration (round r ends at time_s[r]),
    over the rounds both runs have; its median and p90 are the headline numbers.
    """
    n = min(len(predicted.metrics["round"]), len(measured.metrics["round"]))
    if n < 2:
        raise HetsimError("the runs share fewer than one round; nothing to compare")
    tp, tm = predicted.metrics["time_s"][:n], measured.metrics["time_s"][:n]
    dp, dm = np.diff(tp), np.diff(tm)
    rel = np.abs(dp - dm) / np.where(dm > 0, dm, np.nan)
    ap, am = predicted.metrics["test_acc"][:n], measured.metrics["test_acc"][:n]
    both = ~np.isnan(ap) & ~np.isnan(am)
    target = float(measured.summary.get("target_accuracy", predicted.summary.get("target_accuracy", 0.9)))
    tta_p, tta_m = predicted.time_to_accuracy(target), measured.time_to_accuracy(target)
    same_decisions = None
    if predicted.decisions and measured.decisions:
        keys = ("workers", "local_steps", "samples", "biased_samples")
        m = min(len(predicted.decisions), len(measured.decisions))
        same_decisions = all({k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}
                             for a, b in zip(predicted.decisions[:m], measured.decisions[:m]))
    return {
        "predicted": str(predicted.path), "measured": str(measured.path), "rounds_compared": n - 1,
        "round_time_rel_error_median": float(np.nanmedian(rel)),
        "round_time_rel_error_p90": float(np.nanquantile(rel, 0.9)),
        "total_time_predicted_s": float(tp[-1]), "total_time_measured_s": float(tm[-1]),
        "total_time_rel_error": float(abs(tp[-1] - tm[-1]) / tm[-1]) if tm[-1] > 0 else None,
        "target_accuracy": target, "time_to_accuracy_predicted_s": tta_p, "time_to_accuracy_measured_s": tta_m,
        "time_to_accuracy_rel_error": (abs(tta_p - tta_m) / tta_m) if (tta_p is not None and tta_m) else None,
        "accuracy_points_compared": int(both.sum()),
        "accuracy_abs_diff_max": float(np.max(np.abs(ap[both] - am[both]))) if both.any() else None,
        "accuracy_abs_diff_mean": float(np.mean(np.abs(ap[both] - am[both]))) if both.any() else None,
        "same_decisions": same_decisions,
    }
