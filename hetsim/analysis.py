"""Reading run directories back: metrics, summaries, time-to-accuracy, speedups.

Works on any runner's output (simulator or real backend), since they share one schema.

    runs = load_runs(["out/runs/sync-sgd-s0", "out/runs/system-aware-s0"])
    table = speedup_table(group_by_label(runs), target=0.95, baseline="sync-sgd")
"""

from __future__ import annotations

import csv
import io
import json
import math
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hetsim.errors import HetsimError, HetsimWarning, SpecError
from hetsim.results import (RUN_SCHEMA, RunResult, read_decisions, read_metrics_columns, read_trace,
                            time_to_accuracy)
from hetsim.rundir import IDENTITY_IGNORES, MISSING, config_differences, flatten, identity_key, short_repr


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

    @property
    def engine(self) -> str:
        return str(self.summary.get("engine", "sim"))

    @property
    def fidelity(self) -> str:
        return str(self.summary.get("fidelity", "emulated" if self.engine == "sim" else "real"))

    @property
    def identity(self) -> str:
        """The experiment this run is a seed of (hetsim.rundir.identity_key): config without seed, name,
        run.* and trace.*, plus engine and fidelity."""
        return identity_key(self.config, self.engine, self.fidelity)

    def evaluated(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(time_s, epoch, test_acc) at the rounds where the model was evaluated."""
        acc = self.metrics["test_acc"]
        ok = ~np.isnan(acc)
        return self.metrics["time_s"][ok], self.metrics["epoch"][ok], acc[ok]

    def time_to_accuracy(self, target: float) -> float | None:
        t, _, acc = self.evaluated()
        return time_to_accuracy(list(t), list(acc), target)

    def as_result(self) -> RunResult:
        """The run as a RunResult (what `hetsim.simulate` returns), read back from disk. Its config is
        parsed, not checked again: the run's data, profiles and policy modules may be gone since."""
        from hetsim.config import parse_spec

        spec = parse_spec(self.config, source=str(self.path / "config.toml"))
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
        reps = sorted(p.name for p in path.glob("rep[0-9]*") if (p / "summary.json").is_file()) if path.is_dir() else []
        hint = f"; it holds the runs of `hetsim run --repeat`: give {path}/rep1 ... (or {path}/rep*)" if reps else ""
        raise SpecError(f"{path}: not a finished run directory (missing {', '.join(missing)}){hint}")
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
            runs.extend(_sweep_runs(p / "sweep.csv"))
        elif p.is_dir():
            children = sorted(c for c in p.iterdir() if (c / "summary.json").is_file())
            if not children:
                raise HetsimError(f"{p}: holds no run directories")
            runs.extend(load_run(c) for c in children)
        else:
            raise HetsimError(f"{p}: no such run directory")
    seen: set[Path] = set()  # a run named twice (a folder and a run inside it) is one run, not two seeds
    return [r for r in runs if not (r.path.resolve() in seen or seen.add(r.path.resolve()))]


def table_runs(table: str | Path) -> list[Path]:
    """The run directories a sweep.csv lists: this sweep's runs only, not stale ones of an older config
    that share the folder. A table cut short (a copy interrupted, a writer without atomic rename) is
    an error naming the line, never a shorter list of runs."""
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


def _sweep_runs(table: Path) -> list[Run]:
    """The finished runs a sweep.csv lists. A listed run without summary.json (failed, or its sweep
    still running) is left out with a warning naming it, never read half-written."""
    listed = table_runs(table)
    finished = [r for r in listed if (r / "summary.json").is_file()]
    if not finished:
        raise HetsimError(f"{table}: none of its {len(listed)} runs has finished (no summary.json)")
    if len(finished) < len(listed):
        missing = [str(r) for r in listed if r not in finished]
        warnings.warn(f"{table}: {len(missing)} of {len(listed)} runs have not finished (failed, or the sweep is "
                      f"still running) and are left out: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}",
                      HetsimWarning, stacklevel=3)
    return [load_run(r) for r in finished]


def _value_text(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v)
    return text if len(text) <= 40 else short_repr(v)


def group_by_label(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs grouped by experiment (Run.identity) in first-seen order, each group's runs sorted by seed,
    keyed by its legend label: the runs' name. Different experiments that share a name are never
    averaged: each gets the keys where they differ appended, e.g. 'sgd [optim.lr=0.1]', and a warning."""
    by_identity: dict[str, list[Run]] = {}
    for r in runs:
        by_identity.setdefault(r.identity, []).append(r)
    groups = [sorted(v, key=lambda r: r.seed) for v in by_identity.values()]
    by_name: dict[str, list[list[Run]]] = {}
    for g in groups:
        by_name.setdefault(g[0].label, []).append(g)
    labels: dict[int, str] = {}
    for name, same in by_name.items():
        if len(same) == 1:
            labels[id(same[0])] = name
            continue
        flat = [{**flatten({k: v for k, v in g[0].config.items() if k not in IDENTITY_IGNORES}),
                 "engine": g[0].engine, "fidelity": g[0].fidelity} for g in same]
        keys = [k for k in dict.fromkeys(k for f in flat for k in f) if len({json.dumps(f.get(k)) for f in flat}) > 1]
        if "sim.fidelity" in keys:  # the summary's fidelity says it again
            keys.remove("fidelity")
        for g, f in zip(same, flat):
            labels[id(g)] = f"{name} [{', '.join(f'{k}={_value_text(f.get(k, MISSING))}' for k in keys)}]"
        warnings.warn(f"{len(same)} different configs share the label {name!r} (they differ in {', '.join(keys)}); "
                      f"drawn apart as {', '.join(repr(labels[id(g)]) for g in same)}", HetsimWarning, stacklevel=2)
    out: dict[str, list[Run]] = {}
    for g in groups:
        label = labels[id(g)]
        while label in out:  # a name that happens to equal another's disambiguated label
            label += "'"
        out[label] = g
        names = list(dict.fromkeys(r.label for r in g))
        if len(names) > 1:
            warnings.warn(f"runs named {', '.join(map(repr, names))} have the same config; drawn as one curve "
                          f"{label!r}", HetsimWarning, stacklevel=2)
        seeds = [r.seed for r in g]
        if len(set(seeds)) < len(seeds):
            dup = sorted({s for s in seeds if seeds.count(s) > 1})
            warnings.warn(f"{label!r}: runs with the same config and seed {dup} are counted as separate seeds: "
                          f"{', '.join(str(r.path) for r in g if r.seed in dup)}", HetsimWarning, stacklevel=2)
    return out


def check_target(target: float, what: str = "target accuracy") -> float:
    """An accuracy target must be a fraction in (0, 1]: 95 or 0 would make every run 'not reached'
    (or reached at once) and print '9500%' in the tables."""
    if not (isinstance(target, (int, float)) and 0 < target <= 1):
        raise SpecError(f"{what} {target!r}: expected a fraction in (0, 1], e.g. 0.95 for 95%")
    return float(target)


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
    check_target(target)
    if baseline is not None and baseline not in groups:
        raise HetsimError(f"baseline {baseline!r} is not among the runs' labels {list(groups)}")
    rows = []
    for label, runs in groups.items():
        ttas = [t for t in (r.time_to_accuracy(target) for r in runs) if t is not None]
        finals = [acc[-1] if len(acc) else math.nan for acc in (r.evaluated()[2] for r in runs)]
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

    def speedup(r: SpeedupRow) -> str:
        # "not reached" only where this row missed the target: without a baseline, or with one that
        # missed it, there is no speedup to give, whatever the row did
        if r.speedup is not None:
            return f"{r.speedup:.2f}x"
        if r.tta_mean_s is None:
            return "not reached"
        return "-" if baseline is None else "- (baseline not reached)"

    head = (f"| policy | seeds reaching {target:.0%} | time to {target:.0%} (s) | final accuracy | "
            f"speedup over {baseline or '- (no --baseline)'} |\n|---|---|---|---|---|\n")
    body = "".join(
        f"| {r.label} | {r.reached}/{r.seeds} | "
        f"{'not reached' if r.tta_mean_s is None else f(r.tta_mean_s, '.4g') + ' ± ' + f(r.tta_std_s, '.2g')} | "
        f"{r.final_acc_mean:.3f} ± {r.final_acc_std:.3f} | {speedup(r)} |\n"
        for r in rows)
    return head + body


def write_speedup_table(rows: Sequence[SpeedupRow], out_dir: Path, target: float, baseline: str | None) -> None:
    from hetsim.results import atomic_write

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SpeedupRow.__dataclass_fields__)
    w.writerows(["" if v is None else v for v in r.as_dict().values()] for r in rows)
    atomic_write(out_dir / "speedups.csv", buf.getvalue())
    atomic_write(out_dir / "speedups.md", speedup_markdown(rows, target, baseline))


def _decides_the_math(key: str) -> bool:
    """Whether a config key (dotted) changes what is trained, rather than how long it takes."""
    top = key.split(".")[0]
    if key == "workload.path":  # where the data lives (machines differ), not what it is
        return False
    if top in ("workload", "scheduler", "sampler", "aggregator", "optim", "eval", "selector", "protocol", "data"):
        return True
    parts = key.split(".")
    return top == "cluster" and len(parts) == 4 and parts[1] == "devices" and parts[3] in ("kind", "count")


def compare_runs(predicted: Run, measured: Run) -> dict[str, Any]:
    """Predicted (usually the simulator) against measured (usually the real backend), round by round.

    round_time_rel_error: |pred - meas| / meas of each round's duration (round r ends at time_s[r]),
    over the rounds both runs have; its median and p90 are the headline numbers.

    The runs must train and decide the same thing: an error names the keys that differ in the
    workload, the policies (selector, protocol and data placement included), optim, eval or the device
    groups' kinds and counts. The time model (step
    times, profiles, links, conditions, where devices run), the data's folder, the seed and the stop
    rule may differ: a warning names them, and the report lists them in `config_differences`.
    """
    diffs = config_differences(predicted.config, measured.config, ignore=("name", "run", "trace", "sim"))
    tolerated = {k: v for k, v in diffs.items() if not _decides_the_math(k)}
    if len(tolerated) < len(diffs):
        shown = "; ".join(f"{k}: {short_repr(a)} vs {short_repr(b)}" for k, (a, b) in diffs.items()
                          if k not in tolerated)
        raise SpecError(f"{predicted.path} and {measured.path} are runs of different configs ({shown}); "
                        "compare a prediction and a measurement of one config")
    if tolerated:
        warnings.warn(f"{predicted.path} and {measured.path} differ in "
                      + "; ".join(f"{k}: {short_repr(a)} vs {short_repr(b)}" for k, (a, b) in tolerated.items())
                      + " (compared anyway)", HetsimWarning, stacklevel=2)
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
    from scipy.stats import ks_2samp

    ks = ks_2samp(dp, dm)
    return {
        "predicted": str(predicted.path), "measured": str(measured.path), "rounds_compared": n - 1,
        "round_time_rel_error_median": float(np.nanmedian(rel)),
        "round_time_rel_error_p90": float(np.nanquantile(rel, 0.9)),
        # the round times as distributions (order ignored): the two-sample Kolmogorov-Smirnov statistic
        # (the largest gap between the empirical CDFs, 0 = the same) and its p-value
        "round_time_ks": float(ks.statistic), "round_time_ks_pvalue": float(ks.pvalue),
        "total_time_predicted_s": float(tp[-1]), "total_time_measured_s": float(tm[-1]),
        "total_time_rel_error": float(abs(tp[-1] - tm[-1]) / tm[-1]) if tm[-1] > 0 else None,
        "target_accuracy": target, "time_to_accuracy_predicted_s": tta_p, "time_to_accuracy_measured_s": tta_m,
        "time_to_accuracy_rel_error": (abs(tta_p - tta_m) / tta_m) if (tta_p is not None and tta_m) else None,
        "accuracy_points_compared": int(both.sum()),
        "accuracy_abs_diff_max": float(np.max(np.abs(ap[both] - am[both]))) if both.any() else None,
        "accuracy_abs_diff_mean": float(np.mean(np.abs(ap[both] - am[both]))) if both.any() else None,
        "same_decisions": same_decisions,
        "config_differences": sorted(tolerated),
    }


#: the metrics of a comparison that a noise floor repeats real-vs-real
NOISE_METRICS = ("round_time_rel_error_median", "round_time_rel_error_p90", "total_time_rel_error",
                 "time_to_accuracy_rel_error", "round_time_ks")


def noise_floor(measured: Sequence[Run]) -> dict[str, Any]:
    """The machine's noise: `compare_runs` applied real-vs-real to every pair of repeated measurements of
    one config (2+ runs), each metric of NOISE_METRICS as the median over the pairs (None where no pair
    has it, e.g. a target never reached). A prediction error at or below these is machine noise, not
    model error."""
    if len(measured) < 2:
        raise SpecError(f"a noise floor needs 2 or more repeated measurements, got {len(measured)}")
    with warnings.catch_warnings():  # repeated runs differ only in where they ran: no warning per pair
        warnings.simplefilter("ignore", HetsimWarning)
        pairs = [compare_runs(measured[j], measured[i]) for i in range(len(measured))
                 for j in range(i + 1, len(measured))]
    out: dict[str, Any] = {"runs": [str(r.path) for r in measured], "pairs": len(pairs)}
    for key in NOISE_METRICS:
        values = [p[key] for p in pairs if p[key] is not None]
        out[key] = float(np.median(values)) if values else None
    return out
