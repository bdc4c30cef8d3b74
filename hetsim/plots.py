"""Paper-ready figures from run directories (vector PDF + PNG, column-width fonts, colour-blind-safe).

    hetsim plot out/runs/* --out out/figures --target 0.95 --baseline sync-sgd

makes `accuracy.{pdf,png}` (accuracy vs simulated time and vs epochs, mean and min-max band over
seeds), `time_to_accuracy.{pdf,png}` (bars with speedup over the baseline) and
`timeline.{pdf,png}` (compute / comm / idle / eval per device for a window of rounds).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hetsim.analysis import Run, SpeedupRow  # noqa: E402

# Okabe & Ito (2008), the colour-blind-safe palette
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
KIND_COLOURS = {"compute": "#0072B2", "comm": "#E69F00", "idle": "#DDDDDD", "eval": "#009E73"}
STYLE = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
    "ytick.labelsize": 7, "axes.spines.top": False, "axes.spines.right": False, "pdf.fonttype": 42,
    "ps.fonttype": 42, "savefig.bbox": "tight", "savefig.dpi": 200, "axes.grid": True, "grid.alpha": 0.3,
    "grid.linewidth": 0.5, "lines.linewidth": 1.4,
}
COLUMN_WIDTH_IN = 3.4
PAGE_WIDTH_IN = 7.0


def save_figure(fig: plt.Figure, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.pdf", out / f"{name}.png"]
    for p in paths:
        fig.savefig(p)
    plt.close(fig)
    return paths


def _step_curve(x: np.ndarray, y: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """y of the last evaluation at or before each grid point (NaN before the first)."""
    pos = np.searchsorted(x, grid, side="right") - 1
    out = np.where(pos >= 0, y[np.clip(pos, 0, None)], np.nan)
    return np.where(grid <= x[-1], out, np.nan)  # do not extend a run past its end


def plot_accuracy(groups: dict[str, list[Run]], out: Path, target: float | None = None,
                  log_time: bool = True) -> list[Path]:
    """Test accuracy vs simulated time and vs epochs: mean over seeds, band = min..max."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH_IN, 2.4))
        for ax, axis_name in zip(axes, ("time", "epoch")):
            all_x = np.concatenate([r.evaluated()[0 if axis_name == "time" else 1] for rs in groups.values() for r in rs])
            positive = all_x[all_x > 0]
            lo = positive.min() if len(positive) else 1e-9
            hi = all_x.max()
            log = log_time and axis_name == "time"
            grid = np.geomspace(lo, hi, 400) if log else np.linspace(0, hi, 400)
            for i, (label, runs) in enumerate(groups.items()):
                colour = PALETTE[i % len(PALETTE)]
                curves = []
                for r in runs:
                    t, e, acc = r.evaluated()
                    curves.append(_step_curve(t if axis_name == "time" else e, acc, grid))
                c = np.array(curves)
                with warnings.catch_warnings():  # grid points before a run's first evaluation are all-NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean, lo_band, hi_band = np.nanmean(c, axis=0), np.nanmin(c, axis=0), np.nanmax(c, axis=0)
                ax.plot(grid, mean, color=colour, label=f"{label} (n={len(runs)})" if len(runs) > 1 else label)
                if len(runs) > 1:
                    ax.fill_between(grid, lo_band, hi_band, color=colour, alpha=0.2, lw=0)
            if target:
                ax.axhline(target, color="0.4", ls="--", lw=0.8)
            if log:
                ax.set_xscale("log")
            else:  # epochs: the range every policy covered, so the curves compare at equal work
                ax.set_xlim(0, min(max(r.evaluated()[1][-1] for r in rs) for rs in groups.values()))
            ax.set_xlabel("simulated time (s)" if axis_name == "time" else "epochs (samples / training-set size)")
            ax.set_ylabel("test accuracy")
        lo_acc = min(np.nanmin(r.evaluated()[2]) for rs in groups.values() for r in rs)
        for ax in axes:
            ax.set_ylim(max(0.0, lo_acc - 0.02), 1.0)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), frameon=False)
        fig.tight_layout(rect=(0, 0.06 * ((len(labels) + 2) // 3) + 0.02, 1, 1))
        return save_figure(fig, out, "accuracy")


def plot_time_to_accuracy(rows: Sequence[SpeedupRow], out: Path, target: float, baseline: str | None,
                          censor_s: float) -> list[Path]:
    """Horizontal bars of mean time to `target` (error bar = std over seeds), labelled with the speedup
    over `baseline`. A policy that never reached the target is drawn hatched to `censor_s`."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH_IN, 0.35 * len(rows) + 0.8))
        ys = np.arange(len(rows))[::-1]
        for i, (y, r) in enumerate(zip(ys, rows)):
            colour = PALETTE[i % len(PALETTE)]
            if r.tta_mean_s is None:
                ax.barh(y, censor_s, color="white", edgecolor=colour, hatch="///", height=0.6)
                ax.text(censor_s, y, " not reached", va="center", fontsize=7)
                continue
            ax.barh(y, r.tta_mean_s, xerr=r.tta_std_s if r.seeds > 1 else None, color=colour, height=0.6,
                    error_kw={"lw": 0.8, "capsize": 2})
            note = f" {r.speedup:.1f}x" if r.speedup else ""
            if r.reached < r.seeds:
                note += f" ({r.reached}/{r.seeds} seeds)"
            ax.text(r.tta_mean_s + (r.tta_std_s or 0), y, note, va="center", fontsize=7)
        ax.set_yticks(ys, [r.label for r in rows])
        ax.set_xlabel(f"simulated time to {target:.0%} test accuracy (s)")
        if baseline:
            ax.set_title(f"speedup over {baseline}", loc="right", fontsize=7)
        ax.grid(axis="y", visible=False)
        ax.margins(x=0.25)
        fig.tight_layout()
        return save_figure(fig, out, "time_to_accuracy")


def plot_timeline(runs: Sequence[Run], out: Path, rounds: tuple[int, int] = (1, 3)) -> list[Path]:
    """Per-device timeline (compute / comm / idle / eval) of rounds rounds[0]..rounds[1], one panel per run."""
    with plt.rc_context(STYLE):
        heights = [0.16 * max(1, len(_thread_names(r))) + 0.5 for r in runs]
        fig, axes = plt.subplots(len(runs), 1, figsize=(PAGE_WIDTH_IN, sum(heights) + 0.3),
                                 gridspec_kw={"height_ratios": heights}, squeeze=False)
        for ax, run in zip(axes[:, 0], runs):
            names = _thread_names(run)
            events = [e for e in run.trace() if e.get("ph") == "X" and rounds[0] <= e["args"].get("round", -1) <= rounds[1]]
            t0 = min((e["ts"] for e in events), default=0.0)
            for kind, colour in KIND_COLOURS.items():
                for row, tid in enumerate(names):  # the trace may keep a sample of the devices
                    spans = [((e["ts"] - t0) / 1e3, e["dur"] / 1e3) for e in events if e["tid"] == tid and e["name"] == kind]
                    if spans:
                        ax.broken_barh(spans, (len(names) - 1 - row - 0.4, 0.8), facecolors=colour, edgecolor="none")
            ax.set_yticks(range(len(names))[::-1], list(names.values()))
            ax.set_ylim(-0.6, len(names) - 0.4)
            ax.set_title(f"{run.label}: rounds {rounds[0]}-{rounds[1]}", loc="left")
            ax.grid(axis="y", visible=False)
        axes[-1, 0].set_xlabel("simulated time since the window's start (ms)")
        handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in KIND_COLOURS.values()]
        fig.legend(handles, list(KIND_COLOURS), loc="upper right", ncol=4, frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        return save_figure(fig, out, "timeline")


def _thread_names(run: Run) -> dict[int, str]:
    """Track (tid) -> device name, in track order."""
    meta = {e["tid"]: e["args"]["name"] for e in run.trace() if e.get("ph") == "M" and e.get("name") == "thread_name"}
    return {k: meta[k] for k in sorted(meta)}


def plot_runs(runs: Sequence[Run], out: Path, target: float | None = None, baseline: str | None = None,
              rounds: tuple[int, int] = (1, 3)) -> list[Path]:
    """All figures and the speedup table for a set of runs (grouped by label; seeds averaged)."""
    from hetsim.analysis import group_by_label, speedup_table, write_speedup_table

    groups = group_by_label(runs)
    if baseline in groups:  # the baseline leads the legend and the bars
        groups = {baseline: groups[baseline], **{k: v for k, v in groups.items() if k != baseline}}
    target = target if target is not None else float(runs[0].summary.get("target_accuracy", 0.9))
    paths = plot_accuracy(groups, out, target)
    rows = speedup_table(groups, target, baseline)
    write_speedup_table(rows, out, target, baseline)
    censor = max(float(r.metrics["time_s"][-1]) for r in runs)
    paths += plot_time_to_accuracy(rows, out, target, baseline, censor)
    paths += plot_timeline([rs[0] for rs in groups.values()], out, rounds)
    return paths + [out / "speedups.csv", out / "speedups.md"]


def plot_compare(predicted: Run, measured: Run, out: Path) -> list[Path]:
    """Predicted vs measured: elapsed time per round, per-round durations, and accuracy vs time."""
    n = min(len(predicted.metrics["round"]), len(measured.metrics["round"]))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(PAGE_WIDTH_IN, 2.3))
        rounds = predicted.metrics["round"][:n]
        for run, colour, label in ((predicted, PALETTE[0], "predicted"), (measured, PALETTE[3], "measured")):
            axes[0].plot(rounds, run.metrics["time_s"][:n], color=colour, label=label)
            t, _, acc = run.evaluated()
            axes[2].plot(t, acc, color=colour, marker="o", ms=2, label=label)
        dp, dm = np.diff(predicted.metrics["time_s"][:n]), np.diff(measured.metrics["time_s"][:n])
        axes[1].scatter(dm * 1e3, dp * 1e3, s=6, color=PALETTE[0])
        both = np.concatenate([dm, dp]) * 1e3
        lim = [both[both > 0].min() / 1.2, both.max() * 1.2]
        axes[1].plot(lim, lim, color="0.5", lw=0.8, ls="--")
        axes[1].set_xscale("log")
        axes[1].set_yscale("log")
        axes[0].set(xlabel="round", ylabel="elapsed time (s)")
        axes[1].set(xlabel="measured round time (ms)", ylabel="predicted round time (ms)", xlim=lim, ylim=lim)
        axes[2].set(xlabel="time (s)", ylabel="test accuracy")
        axes[0].legend(frameon=False)
        fig.tight_layout()
        return save_figure(fig, out, "predicted_vs_measured")


def plot_ablation(name: str, xlabel: str, values: Sequence[str], ttas: dict[str, list[float]], seeds: int,
                  out: Path) -> list[Path]:
    """Time to accuracy (mean, and each seed as a dot) for each value of one swept parameter."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH_IN, 2.2))
        xs = np.arange(len(values))
        means = [np.mean(ttas[v]) if ttas[v] else np.nan for v in values]
        ax.plot(xs, means, color=PALETTE[0], marker="o", ms=3)
        for x, v in zip(xs, values):
            ax.scatter([x] * len(ttas[v]), ttas[v], color=PALETTE[0], s=6, alpha=0.5)
            if len(ttas[v]) < seeds:
                ax.annotate(f"{len(ttas[v])}/{seeds}", (x, means[x] if ttas[v] else 0), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xticks(xs, values)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("time to 95% (simulated s)")
        ax.set_title(name, loc="left")
        fig.tight_layout()
        return save_figure(fig, out, f"ablation_{name}")
