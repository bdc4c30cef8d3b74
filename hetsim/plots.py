"""Paper-ready figures from run directories (vector PDF + PNG, column-width fonts, colour-blind-safe).

    hetsim plot out/runs/* --out out/figures --target 0.95 --baseline sync-sgd

makes `accuracy.{pdf,png}` (accuracy vs simulated time and vs epochs, mean and min-max band over
seeds), `time_to_accuracy.{pdf,png}` (bars with speedup over the baseline) and
`timeline.{pdf,png}` (compute / comm / idle / eval per device for a window of rounds).

One look per policy across every figure of a study: the legend order is the study's list of labels
(`order`, `hetsim plot --order`) when given, else the baseline first and then the runs in the order
given; a label's colour is PALETTE[its place in that order] (past 8 labels the line style changes
too), so re-plotting, or plotting a subset with the same `order`, keeps every policy's colour. Long
labels wrap at separators and are shortened in the middle, never to the same text as another label.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hetsim.analysis import Run, SpeedupRow  # noqa: E402
from hetsim.errors import HetsimWarning, SpecError  # noqa: E402

# Okabe & Ito (2008), the colour-blind-safe palette
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
KIND_COLOURS = {"compute": "#0072B2", "comm": "#E69F00", "idle": "#DDDDDD", "eval": "#009E73"}
STYLE = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
    "ytick.labelsize": 7, "axes.spines.top": False, "axes.spines.right": False, "pdf.fonttype": 42,
    "ps.fonttype": 42, "savefig.bbox": "tight", "savefig.dpi": 200, "axes.grid": True, "grid.alpha": 0.3,
    "grid.linewidth": 0.5, "lines.linewidth": 1.4,
}
LINESTYLES = ["-", "--", ":", "-."]
COLUMN_WIDTH_IN = 3.4
PAGE_WIDTH_IN = 7.0
#: characters a line of a legend entry or tick label may hold, and lines a label may take
LABEL_WIDTH = 32
LABEL_LINES = 2


def label_order(labels: Sequence[str], order: Sequence[str] | None = None, baseline: str | None = None
                ) -> list[str]:
    """Legend order: the labels listed in `order`, as listed; then (without `order`) the baseline;
    then the rest as first seen."""
    first = [x for x in dict.fromkeys(order or ()) if x in labels]
    if not order and baseline in labels:
        first = [baseline]
    return first + [x for x in labels if x not in first]


def label_styles(labels: Sequence[str], order: Sequence[str] | None = None, baseline: str | None = None
                 ) -> dict[str, tuple[str, str]]:
    """label -> (colour, line style), by the label's place in `order` (absent labels keep their slot)
    or, without `order`, in label_order(labels, baseline=baseline)."""
    slots = list(dict.fromkeys(order)) if order else label_order(labels, baseline=baseline)
    slots += [x for x in labels if x not in slots]
    return {x: (PALETTE[i % len(PALETTE)], LINESTYLES[i // len(PALETTE) % len(LINESTYLES)])
            for i, x in enumerate(slots) if x in labels}


def _pack(text: str, width: int) -> list[str]:
    """Greedy lines of at most `width` characters, broken after spaces, commas, brackets, slashes and
    hyphens (not dots or '=': '0.' / '02' would misread)."""
    lines = [""]
    for token in re.findall(r"[^ ,\[\]/|;-]*[ ,\[\]/|;-]*", text):
        while token:
            if len(lines[-1]) + len(token.rstrip()) <= width:
                lines[-1] += token
                token = ""
            elif lines[-1]:
                lines.append("")
            else:  # a token longer than a line
                lines[-1], token = token[:width], token[width:]
                lines.append("")
    return [x.rstrip() for x in lines if x.strip()]


def wrap_label(label: str, width: int = LABEL_WIDTH, max_lines: int = LABEL_LINES) -> str:
    """At most `max_lines` lines of `width` characters: wrapped at separators, and shortened in the
    middle ('…') when longer, so a 200-character name does not make a page-wide figure."""
    limit = width * max_lines
    if len(label) > limit:
        head = (limit - 1) * 2 // 3
        label = label[:head] + "…" + label[len(label) - (limit - 1 - head):]
    lines = _pack(label, width)
    if len(lines) > max_lines:  # separators fell badly: cut at the width instead
        lines = [label[i:i + width] for i in range(0, len(label), width)]
    return "\n".join(lines)


def display_labels(labels: Sequence[str], width: int = LABEL_WIDTH, max_lines: int = LABEL_LINES
                   ) -> dict[str, str]:
    """label -> its wrapped text; labels that would shorten to the same text are wrapped in full."""
    out = {x: wrap_label(x, width, max_lines) for x in labels}
    texts = [out[x] for x in labels]
    for x in labels:
        if texts.count(out[x]) > 1:
            out[x] = "\n".join(_pack(x, width))
    return out


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


def accuracy_figure(groups: dict[str, list[Run]], target: float | None = None, log_time: bool = True,
                    styles: dict[str, tuple[str, str]] | None = None) -> plt.Figure:
    """The accuracy figure (see plot_accuracy), returned open for inspection."""
    styles = styles or label_styles(list(groups))
    drawn = {k: v for k, v in groups.items() if any(len(r.evaluated()[2]) for r in v)}
    if not drawn:
        raise SpecError("no run has an evaluated accuracy (time-only runs without a surrogate?); nothing to draw "
                        "in the accuracy figure")
    skipped = [k for k in groups if k not in drawn]
    if skipped:
        warnings.warn(f"no evaluated accuracy in the runs of {', '.join(map(repr, skipped))} (time-only runs "
                      "without a surrogate?); they are not drawn in the accuracy figure", HetsimWarning, stacklevel=3)
    texts = display_labels(list(drawn))
    lines = max(t.count("\n") + 1 for t in texts.values())
    ncol = min(3, len(drawn) + 2)
    legend_h = 0.14 * lines * -(-(len(drawn) + 2) // ncol) + 0.1
    fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH_IN, 2.3 + legend_h))
    banded = False
    for ax, axis_name in zip(axes, ("time", "epoch")):
        all_x = np.concatenate([r.evaluated()[0 if axis_name == "time" else 1] for rs in drawn.values() for r in rs])
        positive = all_x[all_x > 0]
        lo = positive.min() if len(positive) else 1e-9
        hi = all_x.max()
        log = log_time and axis_name == "time" and hi > lo
        grid = np.geomspace(lo, hi, 400) if log else np.linspace(0, hi, 400)
        for label, runs in drawn.items():
            colour, ls = styles[label]
            curves = []
            for r in runs:
                t, e, acc = r.evaluated()
                if len(acc):
                    curves.append(_step_curve(t if axis_name == "time" else e, acc, grid))
            c = np.array(curves)
            with warnings.catch_warnings():  # grid points before a run's first evaluation are all-NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, lo_band, hi_band = np.nanmean(c, axis=0), np.nanmin(c, axis=0), np.nanmax(c, axis=0)
            n = len(curves)
            ax.plot(grid, mean, color=colour, ls=ls, label=texts[label] + (f" (n={n})" if n > 1 else ""))
            if n > 1:
                ax.fill_between(grid, lo_band, hi_band, color=colour, alpha=0.2, lw=0)
                banded = True
        if target:
            ax.axhline(target, color="0.4", ls="--", lw=0.8, label=f"target {target:.0%}")
        if log:
            ax.set_xscale("log")
        else:  # epochs: the range every policy covered, so the curves compare at equal work
            ax.set_xlim(0, min(max(r.evaluated()[1][-1] for r in rs if len(r.evaluated()[1])) for rs in drawn.values())
                        or None)
        ax.set_xlabel("simulated time (s)" if axis_name == "time" else "epochs (samples / training-set size)")
        ax.set_ylabel("test accuracy")
    lo_acc = min(np.nanmin(r.evaluated()[2]) for rs in drawn.values() for r in rs if len(r.evaluated()[2]))
    for ax in axes:
        ax.set_ylim(max(0.0, lo_acc - 0.02), 1.0)
    handles, labels = axes[0].get_legend_handles_labels()
    if banded:  # say what the shaded band is
        handles.append(plt.Rectangle((0, 0), 1, 1, color="0.5", alpha=0.3, lw=0))
        labels.append("min–max over seeds")
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False)
    fig.tight_layout(rect=(0, legend_h / (2.3 + legend_h), 1, 1))
    return fig


def plot_accuracy(groups: dict[str, list[Run]], out: Path, target: float | None = None,
                  log_time: bool = True, styles: dict[str, tuple[str, str]] | None = None) -> list[Path]:
    """Test accuracy vs simulated time and vs epochs: mean over seeds, band = min..max, dashed line =
    the target. styles: label -> (colour, line style), from label_styles."""
    with plt.rc_context(STYLE):
        return save_figure(accuracy_figure(groups, target, log_time, styles), out, "accuracy")


def time_to_accuracy_figure(rows: Sequence[SpeedupRow], target: float, baseline: str | None, censor_s: float,
                            styles: dict[str, tuple[str, str]] | None = None) -> plt.Figure:
    styles = styles or label_styles([r.label for r in rows])
    texts = display_labels([r.label for r in rows], width=24)
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH_IN, 0.35 * len(rows) + 0.8))
    ys = np.arange(len(rows))[::-1]
    for y, r in zip(ys, rows):
        colour = styles[r.label][0]
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
    ax.set_yticks(ys, [texts[r.label] for r in rows])
    ax.set_xlabel(f"simulated time to {target:.0%} test accuracy (s)")
    if baseline:
        ax.set_title(f"speedup over {wrap_label(baseline, 40, 1)}", loc="right", fontsize=7)
    ax.grid(axis="y", visible=False)
    ax.margins(x=0.25)
    fig.tight_layout()
    return fig


def plot_time_to_accuracy(rows: Sequence[SpeedupRow], out: Path, target: float, baseline: str | None,
                          censor_s: float, styles: dict[str, tuple[str, str]] | None = None) -> list[Path]:
    """Horizontal bars of mean time to `target` (error bar = std over seeds), labelled with the speedup
    over `baseline`. A policy that never reached the target is drawn hatched to `censor_s`."""
    with plt.rc_context(STYLE):
        return save_figure(time_to_accuracy_figure(rows, target, baseline, censor_s, styles), out, "time_to_accuracy")


def _window_events(trace: list[dict], rounds: tuple[int, int]) -> list[dict]:
    return [e for e in trace if e.get("ph") == "X" and rounds[0] <= e["args"].get("round", -1) <= rounds[1]]


def _traced_rounds(trace: list[dict]) -> tuple[int, int] | None:
    r = [e["args"]["round"] for e in trace if e.get("ph") == "X" and "round" in e.get("args", {})]
    return (min(r), max(r)) if r else None


def timeline_figure(runs: Sequence[Run], rounds: tuple[int, int] = (1, 3), labels: Sequence[str] | None = None
                    ) -> plt.Figure:
    """The timeline figure (see plot_timeline), returned open. The panels share one time axis, so
    their lengths compare; only the kinds of span drawn are in the legend."""
    labels = list(labels) if labels is not None else [r.label for r in runs]
    traces = [r.trace() for r in runs]  # read once: a trace can be large
    windows = [_window_events(t, rounds) for t in traces]
    heights = [0.16 * max(1, len(_thread_names(t))) + 0.5 for t in traces]
    fig, axes = plt.subplots(len(runs), 1, figsize=(PAGE_WIDTH_IN, sum(heights) + 0.3), sharex=True,
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    drawn: set[str] = set()
    for ax, trace, events, label in zip(axes[:, 0], traces, windows, labels):
        names = _thread_names(trace)
        t0 = min((e["ts"] for e in events), default=0.0)
        visible_ms = 1e-3 * max((e["ts"] + e["dur"] - t0 for e in events), default=0.0) / 1e3
        for kind, colour in KIND_COLOURS.items():
            for row, tid in enumerate(names):  # the trace may keep a sample of the devices
                spans = [((e["ts"] - t0) / 1e3, e["dur"] / 1e3) for e in events if e["tid"] == tid and e["name"] == kind]
                if spans:
                    ax.broken_barh(spans, (len(names) - 1 - row - 0.4, 0.8), facecolors=colour, edgecolor="none")
                    if any(d > visible_ms for _, d in spans):  # not a kind whose spans are all ~0 wide
                        drawn.add(kind)
        if not events:
            ax.text(0.5, 0.5, f"no trace events in rounds {rounds[0]}-{rounds[1]}", transform=ax.transAxes,
                    ha="center", va="center", fontsize=7, color="0.4")
        ax.set_yticks(range(len(names))[::-1], list(names.values()))
        ax.set_ylim(-0.6, len(names) - 0.4)
        ax.set_title(f"{wrap_label(label, 80, 1)}: rounds {rounds[0]}-{rounds[1]}", loc="left")
        ax.grid(axis="y", visible=False)
    ends = [(max(e["ts"] + e["dur"] for e in ev) - min(e["ts"] for e in ev)) / 1e3 for ev in windows if ev]
    if ends and max(ends) > 0:
        axes[0, 0].set_xlim(0, max(ends) * 1.02)
    axes[-1, 0].set_xlabel("simulated time since the window's start (ms)")
    kinds = [k for k in KIND_COLOURS if k in drawn]
    if kinds:
        handles = [plt.Rectangle((0, 0), 1, 1, color=KIND_COLOURS[k]) for k in kinds]
        fig.legend(handles, kinds, loc="upper right", ncol=len(kinds), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


def plot_timeline(runs: Sequence[Run], out: Path, rounds: tuple[int, int] = (1, 3),
                  labels: Sequence[str] | None = None) -> list[Path]:
    """Per-device timeline (compute / comm / idle / eval) of rounds rounds[0]..rounds[1], one panel per
    run (titled with `labels`, default the runs' names), on one shared time axis."""
    with plt.rc_context(STYLE):
        return save_figure(timeline_figure(runs, rounds, labels), out, "timeline")


def _thread_names(trace: list[dict]) -> dict[int, str]:
    """Track (tid) -> device name, in track order (the trace may keep a sample of the devices)."""
    meta = {e["tid"]: e["args"]["name"] for e in trace if e.get("ph") == "M" and e.get("name") == "thread_name"}
    return {k: meta[k] for k in sorted(meta)}


def _check_window(groups: dict[str, list[Run]], rounds: tuple[int, int]) -> list[str]:
    """The labels whose first run has trace events in the window. An empty window when the runs do
    have traces is the user's mistake: an error naming the rounds they hold, not an empty figure."""
    if not 0 <= rounds[0] <= rounds[1]:
        raise SpecError(f"rounds {rounds[0]}:{rounds[1]}: expected 0 <= FIRST <= LAST")
    traced, inside = {}, []
    for k, v in groups.items():  # one trace in memory at a time
        trace = v[0].trace()
        traced[k] = _traced_rounds(trace)
        if _window_events(trace, rounds):
            inside.append(k)
    if not inside and any(traced.values()):
        held = "; ".join(f"{k!r}: {a}-{b}" for k, (a, b) in ((k, t) for k, t in traced.items() if t))
        raise SpecError(f"--rounds {rounds[0]}:{rounds[1]}: no run has trace events in that window (their traces "
                        f"hold rounds {held})")
    empty = [k for k in groups if k not in inside]
    if empty:
        warnings.warn(f"no trace events in rounds {rounds[0]}-{rounds[1]} for {', '.join(map(repr, empty))} "
                      "(trace.max_rounds, or fewer rounds); their timeline panels are empty", HetsimWarning,
                      stacklevel=3)
    return inside


def plot_runs(runs: Sequence[Run], out: Path, target: float | None = None, baseline: str | None = None,
              rounds: tuple[int, int] = (1, 3), order: Sequence[str] | None = None) -> list[Path]:
    """All figures and the speedup table for a set of runs (grouped by experiment; seeds averaged).
    order: the study's labels in legend order; fixes each label's colour across figures (module doc)."""
    from hetsim.analysis import check_target, group_by_label, speedup_table, write_speedup_table
    from hetsim.rundir import writable_dir

    if target is not None:
        check_target(target)
    groups = group_by_label(runs)
    ordered = label_order(list(groups), order, baseline)
    groups = {k: groups[k] for k in ordered}
    styles = label_styles(list(groups), order, baseline)
    target = target if target is not None else float(runs[0].summary.get("target_accuracy", 0.9))
    has_trace = _check_window(groups, rounds)
    out = writable_dir(out, "figures folder")
    paths = plot_accuracy(groups, out, target, styles=styles)
    rows = speedup_table(groups, target, baseline)
    write_speedup_table(rows, out, target, baseline)
    censor = max(float(r.metrics["time_s"][-1]) for r in runs)
    paths += plot_time_to_accuracy(rows, out, target, baseline, censor, styles)
    if has_trace:
        paths += plot_timeline([groups[k][0] for k in groups], out, rounds, list(groups))
    else:
        warnings.warn("no run has a trace; the timeline figure is not drawn", HetsimWarning, stacklevel=2)
    return paths + [out / "speedups.csv", out / "speedups.md"]


def log_ticks(lo: float, hi: float, most: int = 4) -> list[float]:
    """At most `most` tick values in [lo, hi] for a log axis: 1-2-5 steps, else powers of ten (every
    k-th on a wide range); where fewer than two fall inside (a narrow range), three geometric points
    at 2 significant digits."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks: list[float] = []
    for subs in ((1, 2, 5), (1,)):
        ticks = [float(f"{m * 10.0 ** d:g}") for d in decades for m in subs if lo <= m * 10.0 ** d <= hi]
        if 2 <= len(ticks) <= most:
            return ticks
    if len(ticks) > most:
        return ticks[::-(-len(ticks) // most)]
    return [float(f"{v:.2g}") for v in np.geomspace(lo, hi, 5)[1:4]]


def compare_figure(predicted: Run, measured: Run) -> plt.Figure:
    """The predicted-vs-measured figure (see plot_compare), returned open."""
    from matplotlib.ticker import FixedLocator, NullFormatter, StrMethodFormatter

    n = min(len(predicted.metrics["round"]), len(measured.metrics["round"]))
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
    axes[1].plot(lim, lim, color="0.5", lw=0.8, ls="--", label="predicted = measured")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    for axis in (axes[1].xaxis, axes[1].yaxis):
        # a few labelled ticks, plain numbers, unlabelled minor ticks (matplotlib labels the minor ticks
        # of a narrow log range, '2x10^1 3x10^1 4x10^1', and they overlap)
        axis.set_major_locator(FixedLocator(log_ticks(*lim)))
        axis.set_major_formatter(StrMethodFormatter("{x:g}"))
        axis.set_minor_formatter(NullFormatter())
    axes[0].set(xlabel="round", ylabel="elapsed time (s)")
    axes[1].set(xlabel="measured round time (ms)", ylabel="predicted round time (ms)", xlim=lim, ylim=lim)
    axes[2].set(xlabel="time (s)", ylabel="test accuracy")
    axes[0].legend(frameon=False)
    axes[1].legend(frameon=False, loc="upper left")
    fig.tight_layout()
    return fig


def plot_compare(predicted: Run, measured: Run, out: Path) -> list[Path]:
    """Predicted vs measured: elapsed time per round, per-round durations, and accuracy vs time."""
    with plt.rc_context(STYLE):
        return save_figure(compare_figure(predicted, measured), out, "predicted_vs_measured")


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
        texts = display_labels(values, width=12, max_lines=3)  # long values wrap, not squash the axis
        ax.set_xticks(xs, [texts[v] for v in values])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("time to 95% (simulated s)")
        ax.set_title(name, loc="left")
        fig.tight_layout()
        return save_figure(fig, out, f"ablation_{name}")
