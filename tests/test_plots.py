"""Grouping runs into curves, the inputs of `hetsim plot` / `hetsim compare`, and the decisions the
figures make (colours, order, labels, axes, legends), read from the figure objects, not pixels."""

import csv
import json
import shutil
import sys
import tomllib
import warnings

import matplotlib.image
import numpy as np
import pytest

import hetsim.plots as plots
from hetsim.analysis import group_by_label, load_run, load_runs
from hetsim.cli import main
from hetsim.config import to_toml
from hetsim.errors import HetsimWarning
from hetsim.plots import PALETTE, display_labels, label_styles, log_ticks, plot_runs, wrap_label
from hetsim.resolve import spec_from_dict
from hetsim.sim import simulate

from conftest import ROOT, TINY

RUNS = {  # folder -> overrides of the tiny spec; 4 rounds each
    "sgd-a0": ["name='sgd'", "seed=0"],
    "sgd-a1": ["name='sgd'", "seed=1", "run.fault_timeout_s=9.0", "trace.max_rounds=1"],
    "sgd-b0": ["name='sgd'", "seed=0", "optim.lr=0.05"],
    "base0": ["name='base'", "seed=0", "scheduler={name='sync'}"],
    "base1": ["name='base'", "seed=1", "scheduler={name='sync'}"],
    "slow0": ["name='slow'", "cluster.devices.0.step_time.mean_s=0.05", "eval.every_rounds=100"],
    "timeonly0": ["name='time-only'", "sim.fidelity='time_only'"],  # no accuracy
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for folder, overrides in RUNS.items():
        simulate(spec_from_dict(TINY, source="tiny", overrides=["stop.max_rounds=4", *overrides]), root / folder)
    return root


def load(runs, *folders):
    return load_runs([runs / f for f in folders])


@pytest.fixture
def figures(monkeypatch):
    """The figures plot_* would save, kept open: name -> Figure."""
    made = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, out, name: made.update({name: fig}) or [])
    return made


# -- which runs are one curve -----------------------------------------------------------------


def test_different_configs_sharing_a_name_are_drawn_apart_with_a_warning(runs):
    with pytest.warns(HetsimWarning, match="2 different configs share the label 'sgd'.*optim.lr"):
        groups = group_by_label(load(runs, "sgd-a0", "sgd-a1", "sgd-b0"))
    assert {k: [r.seed for r in v] for k, v in groups.items()} == {
        "sgd [optim.lr=0.1]": [0, 1], "sgd [optim.lr=0.05]": [0]}


def test_seeds_differing_in_run_and_trace_settings_are_one_curve(runs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", HetsimWarning)
        groups = group_by_label(load(runs, "sgd-a1", "sgd-a0"))
    assert {k: [r.seed for r in v] for k, v in groups.items()} == {"sgd": [0, 1]}


def test_a_run_given_twice_is_one_run(runs):
    assert [r.path for r in load_runs([runs / "base0", runs, runs / "base0"])][:2] == [runs / "base0", runs / "base1"]
    assert sum(r.path == runs / "base0" for r in load_runs([runs / "base0", runs])) == 1


def test_copies_of_one_run_and_renamed_copies_are_named_in_warnings(runs, tmp_path):
    shutil.copytree(runs / "base0", tmp_path / "copy")
    with pytest.warns(HetsimWarning, match=r"'base': runs with the same config and seed \[0\] are counted as separate"):
        assert [len(v) for v in group_by_label(load_runs([runs / "base0", tmp_path / "copy"])).values()] == [2]
    config = tomllib.loads((tmp_path / "copy" / "config.toml").read_text())
    (tmp_path / "copy" / "config.toml").write_text(to_toml({**config, "name": "renamed", "seed": 5}))
    with pytest.warns(HetsimWarning, match="runs named 'base', 'renamed' have the same config; drawn as one curve 'base'"):
        assert list(group_by_label(load_runs([runs / "base0", tmp_path / "copy"]))) == ["base"]


def test_a_simulated_and_a_measured_run_are_never_seeds_of_one_curve(runs, tmp_path):
    shutil.copytree(runs / "sgd-a0", tmp_path / "real")
    summary = json.loads((tmp_path / "real" / "summary.json").read_text())
    (tmp_path / "real" / "summary.json").write_text(json.dumps({**summary, "engine": "torchmp", "fidelity": "real"}))
    with pytest.warns(HetsimWarning):
        groups = group_by_label(load_runs([runs / "sgd-a0", tmp_path / "real"]))
    assert list(groups) == ["sgd [engine=sim, fidelity=emulated]", "sgd [engine=torchmp, fidelity=real]"]


def test_plot_command_labels_the_configs_apart_and_warns_in_one_line(runs, tmp_path, capsys):
    assert main(["plot", str(runs / "sgd-a0"), str(runs / "sgd-a1"), str(runs / "sgd-b0"),
                 "--out", str(tmp_path / "fig")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("hetsim: warning: 2 different configs share the label 'sgd'") and err.count("\n") == 1
    md = (tmp_path / "fig" / "speedups.md").read_text()
    assert "| sgd [optim.lr=0.1] | " in md and "/2 |" in md.split("sgd [optim.lr=0.1]")[1].split("\n")[0]
    assert "| sgd [optim.lr=0.05] | " in md


# -- plot and compare inputs ------------------------------------------------------------------


@pytest.mark.parametrize("target", ["95", "0", "1.5", "-0.2", "nan"])
def test_plot_target_outside_0_1_is_an_error(runs, tmp_path, capsys, target):
    assert main(["plot", str(runs / "base0"), "--out", str(tmp_path / "fig"), "--target", target]) == 2
    assert capsys.readouterr().err == (f"hetsim: error: --target {float(target)!r}: expected a fraction in (0, 1], "
                                       "e.g. 0.95 for 95%\n")
    assert not (tmp_path / "fig").exists()


def test_plot_rounds_window_without_trace_events_is_an_error(runs, tmp_path, capsys):
    assert main(["plot", str(runs / "base0"), "--out", str(tmp_path / "fig"), "--rounds", "50:60"]) == 2
    err = capsys.readouterr().err
    assert "--rounds 50:60: no run has trace events" in err and "'base': 1-4" in err and err.count("\n") == 1
    assert main(["plot", str(runs / "base0"), "--out", str(tmp_path / "fig"), "--rounds", "3:1"]) == 2
    assert "expected 0 <= FIRST <= LAST" in capsys.readouterr().err
    assert not (tmp_path / "fig").exists()


def test_a_run_with_no_trace_in_the_window_is_named(runs, tmp_path, capsys):
    # sgd-a1 keeps the trace of round 1 only (trace.max_rounds=1)
    assert main(["plot", str(runs / "base0"), str(runs / "sgd-a1"), "--out", str(tmp_path / "fig"),
                 "--rounds", "2:3"]) == 0
    err = capsys.readouterr().err
    assert "hetsim: warning: no trace events in rounds 2-3 for 'sgd'" in err


def write_sweep(runs, root, text):
    (root / "runs").mkdir(parents=True)
    shutil.copytree(runs / "base0", root / "runs" / "aaa")
    (root / "sweep.csv").write_text(text)
    return root


def test_a_truncated_sweep_csv_is_an_error_naming_it(runs, tmp_path, capsys):
    # cut inside the last line, after a complete run_dir: read naively, it lists runs/aaa and plots
    write_sweep(runs, tmp_path / "sw", "run_dir,name,seed,final_test_acc\nruns/aaa,ba")
    assert main(["plot", str(tmp_path / "sw"), "--out", str(tmp_path / "fig")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'sw' / 'sweep.csv'}: the last line is incomplete" in err and err.count("\n") == 1


def test_a_sweep_csv_line_with_missing_fields_is_an_error(runs, tmp_path, capsys):
    write_sweep(runs, tmp_path / "sw", "run_dir,name,seed,final_test_acc\nruns/aaa,base\n")
    assert main(["plot", str(tmp_path / "sw"), "--out", str(tmp_path / "fig")]) == 1
    assert "sweep.csv: line 2 has 2 fields, expected 4" in capsys.readouterr().err


def test_a_sweep_run_still_running_is_left_out_with_a_warning(runs, tmp_path, capsys):
    sw = write_sweep(runs, tmp_path / "sw", "run_dir,name,seed,final_test_acc\nruns/aaa,base,0,0.5\nruns/bbb,base,1,\n")
    (sw / "runs" / "bbb").mkdir()
    shutil.copy(runs / "base1" / "config.toml", sw / "runs" / "bbb")  # started, not finished
    assert main(["plot", str(sw), "--out", str(tmp_path / "fig")]) == 0
    err = capsys.readouterr().err
    assert "hetsim: warning:" in err and "1 of 2 runs have not finished" in err and "runs/bbb" in err
    assert "| base | " in (tmp_path / "fig" / "speedups.md").read_text()


@pytest.mark.parametrize("command", ["plot", "compare"])
def test_an_out_that_is_a_file_is_one_line(runs, tmp_path, capsys, command):
    (tmp_path / "f").write_text("x")
    inputs = [str(runs / "base0")] * (2 if command == "compare" else 1)
    assert main([command, *inputs, "--out", str(tmp_path / "f")]) == 2
    assert capsys.readouterr().err.startswith(f"hetsim: error: {tmp_path / 'f'}: exists and is not a folder")
    assert (tmp_path / "f").read_text() == "x"


def test_compare_refuses_runs_of_different_configs(runs, tmp_path, capsys):
    assert main(["compare", str(runs / "sgd-a0"), str(runs / "sgd-b0"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "are runs of different configs (optim.lr: 0.1 vs 0.05)" in err and err.count("\n") == 1
    assert not (tmp_path / "c").exists()


def test_compare_accepts_another_machines_data_folder_with_a_warning(runs, tmp_path, capsys):
    shutil.copytree(runs / "base0", tmp_path / "there")
    config = tomllib.loads((tmp_path / "there" / "config.toml").read_text())
    (tmp_path / "there" / "config.toml").write_text(to_toml({**config, "workload": {**config["workload"],
                                                                                    "path": "/data/elsewhere"}}))
    assert main(["compare", str(runs / "base0"), str(tmp_path / "there"), "--out", str(tmp_path / "c")]) == 0
    assert "hetsim: warning:" in capsys.readouterr().err
    assert json.loads((tmp_path / "c" / "compare.json").read_text())["config_differences"] == ["workload.path"]


def test_compare_of_two_seeds_warns_and_records_it(runs, tmp_path, capsys):
    assert main(["compare", str(runs / "base0"), str(runs / "base1"), "--out", str(tmp_path / "c")]) == 0
    assert "hetsim: warning:" in capsys.readouterr().err
    assert json.loads((tmp_path / "c" / "compare.json").read_text())["config_differences"] == ["seed"]


# -- figures ----------------------------------------------------------------------------------


def colours_of(figures):
    """label -> colour in each figure: accuracy lines, time-to-accuracy bars (top to bottom)."""
    acc = {line.get_label(): matplotlib.colors.to_hex(line.get_color()) for line in figures["accuracy"].axes[0].get_lines()
           if not line.get_label().startswith("target")}
    ax = figures["time_to_accuracy"].axes[0]
    bars = sorted(ax.patches, key=lambda p: -p.get_y())
    tta = {t.get_text(): matplotlib.colors.to_hex(b.get_facecolor()) for t, b in
           zip(sorted(ax.get_yticklabels(), key=lambda t: -t.get_position()[1]), bars)}
    return acc, tta


def test_colours_and_order_follow_the_study_list_in_every_figure(runs, tmp_path, figures):
    plot_runs(load(runs, "base0", "slow0"), tmp_path, target=0.05, order=["slow", "base"])
    acc, tta = colours_of(figures)
    assert list(acc) == list(tta) == ["slow", "base"]
    assert acc == tta == {"slow": PALETTE[0].lower(), "base": PALETTE[1].lower()}
    assert [ax.get_title(loc="left") for ax in figures["timeline"].axes] == ["slow: rounds 1-3", "base: rounds 1-3"]
    figures.clear()
    plot_runs(load(runs, "base0"), tmp_path, target=0.05, order=["slow", "base"])  # a subset keeps its colour
    assert colours_of(figures)[0] == {"base": PALETTE[1].lower()}


def test_without_a_list_the_baseline_leads_and_takes_the_first_colour(runs, tmp_path, figures):
    plot_runs(load(runs, "slow0", "base0"), tmp_path, target=0.05, baseline="base")
    acc, tta = colours_of(figures)
    assert list(acc) == list(tta) == ["base", "slow"]
    assert acc["base"] == PALETTE[0].lower()


def test_label_styles_past_the_palette_change_the_line_style():
    labels = [f"p{i}" for i in range(10)]
    styles = label_styles(labels)
    assert styles["p0"] == (PALETTE[0], "-") and styles["p8"] == (PALETTE[0], "--") and styles["p9"] == (PALETTE[1], "--")


def test_long_labels_wrap_at_separators_or_shorten_in_the_middle():
    assert wrap_label("sgd [optim.lr=0.1]") == "sgd [optim.lr=0.1]"
    assert wrap_label("digits[optim.lr=0.02,scheduler.params.max_steps=4]") == \
        "digits[optim.lr=0.02,\nscheduler.params.max_steps=4]"
    assert wrap_label("system-aware-biased-sampling-aggregation") == "system-aware-biased-sampling-\naggregation"
    # 64 characters at most: the first 42 (two thirds of 63), an ellipsis, the last 21
    assert wrap_label("a" * 100 + "b" * 100) == "a" * 32 + "\n" + "a" * 10 + "…" + "b" * 21


def test_labels_never_shorten_to_the_same_text():
    a, b = "x" * 100 + "A" + "x" * 100, "x" * 100 + "B" + "x" * 100
    texts = display_labels([a, b])
    assert texts[a] != texts[b]
    assert texts[a].replace("\n", "") == a and max(len(line) for line in texts[a].split("\n")) <= 32


def test_a_200_character_name_keeps_the_figure_page_wide(runs, tmp_path):
    shutil.copytree(runs / "base0", tmp_path / "long")
    config = tomllib.loads((tmp_path / "long" / "config.toml").read_text())
    (tmp_path / "long" / "config.toml").write_text(to_toml({**config, "name": "n" * 200}))
    assert main(["plot", str(tmp_path / "long"), str(runs / "slow0"), "--out", str(tmp_path / "fig")]) == 0
    for name in ("accuracy", "timeline"):
        width_px = matplotlib.image.imread(tmp_path / "fig" / f"{name}.png").shape[1]
        assert width_px <= plots.PAGE_WIDTH_IN * plots.STYLE["savefig.dpi"] * 1.05, name
    width_px = matplotlib.image.imread(tmp_path / "fig" / "time_to_accuracy.png").shape[1]
    assert width_px <= plots.PAGE_WIDTH_IN * plots.STYLE["savefig.dpi"]


def test_timeline_panels_share_one_time_axis(runs, tmp_path, figures):
    plots.plot_timeline(load(runs, "base0", "slow0"), tmp_path, (1, 3))
    fast, slow = figures["timeline"].axes
    assert fast.get_xlim() == slow.get_xlim()
    events = [e for e in load_run(runs / "slow0").trace() if e["ph"] == "X" and 1 <= e["args"]["round"] <= 3]
    span_ms = (max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)) / 1e3
    assert slow.get_xlim()[1] >= span_ms


def test_timeline_legend_lists_only_what_is_drawn(runs, tmp_path, figures):
    # the tiny cluster's evaluations take no time (no eval_time_s): there is no eval span to draw
    plots.plot_timeline(load(runs, "slow0"), tmp_path, (1, 3))
    assert [t.get_text() for t in figures["timeline"].legends[0].get_texts()] == ["compute", "comm", "idle"]


def test_timeline_legend_leaves_out_zero_length_idle(runs, tmp_path, figures):
    # sgd-a0: the cpu's 1 step of 10 ms and each gpu's 5 steps of 2 ms end together: idle spans of
    # float round-off (1e-12 s) only
    plots.plot_timeline(load(runs, "sgd-a0"), tmp_path, (1, 3))
    assert [t.get_text() for t in figures["timeline"].legends[0].get_texts()] == ["compute", "comm"]


def test_accuracy_legend_names_the_band_and_the_target(runs, tmp_path, figures):
    plot_runs(load(runs, "base0", "base1", "slow0"), tmp_path, target=0.5)
    texts = [t.get_text() for t in figures["accuracy"].legends[0].get_texts()]
    assert texts == ["base (n=2)", "slow", "target 50%", "min–max over seeds"]


def test_a_run_without_accuracy_has_no_accuracy_legend_entry(runs, tmp_path, figures):
    with pytest.warns(HetsimWarning, match="no evaluated accuracy in the runs of 'time-only'"):
        plot_runs(load(runs, "base0", "timeonly0"), tmp_path, target=0.5)
    assert [t.get_text() for t in figures["accuracy"].legends[0].get_texts()] == ["base", "target 50%"]
    assert [ax.get_title(loc="left") for ax in figures["timeline"].axes] == ["base: rounds 1-3", "time-only: rounds 1-3"]


def test_log_ticks_are_few_and_inside_the_range():
    assert log_ticks(8.3, 24) == [10, 20]
    assert log_ticks(4, 110) == [10, 100]           # 1-2-5 would give five
    assert log_ticks(0.05, 2e5) == [0.1, 10, 1000, 100000]
    assert log_ticks(11, 19) == [13, 14, 17]       # no 1-2-5 value inside: three geometric points


def test_predicted_vs_measured_tick_labels_do_not_overlap(runs, tmp_path, figures):
    # round times of 10 ms and ~50 ms: matplotlib labels 2x10^1, 3x10^1, 4x10^1 ... and they collide
    plots.plot_compare(load_run(runs / "base0"), load_run(runs / "slow0"), tmp_path)
    fig = figures["predicted_vs_measured"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for axis in (fig.axes[1].xaxis, fig.axes[1].yaxis):
        lo, hi = sorted(axis.get_view_interval())
        pairs = list(zip(axis.get_majorticklabels() + axis.get_minorticklabels(),
                         list(axis.get_majorticklocs()) + list(axis.get_minorticklocs())))
        boxes = [t.get_window_extent(renderer) for t, loc in pairs if t.get_visible() and t.get_text() and lo <= loc <= hi]
        assert len(boxes) >= 2
        assert not any(boxes[i].overlaps(boxes[j]) for i in range(len(boxes)) for j in range(i + 1, len(boxes)))


# -- a run folder is read without its data, profiles or policy code ------------------------------

def test_a_run_reads_back_plots_and_compares_after_its_profile_and_plugin_policy_are_gone(tmp_path, monkeypatch,
                                                                                          capsys):
    # the run's own profile file and plug-in scheduler: both gone (deleted, moved) once it finished
    profile = tmp_path / "profiles" / "cpu.json"
    profile.parent.mkdir()
    shutil.copy(ROOT / "hetsim" / "profiles" / "assumed-cpu.json", profile)  # has synthetic at batch size 32
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "gone_policy.py").write_text("from hetsim.policies.scheduling import FixedSteps\n\n\n"
                                            "class GoneFixed(FixedSteps):\n    pass\n")
    monkeypatch.syspath_prepend(str(plugins))
    overrides = ["optim.batch_size=32", f"cluster.devices.0={{kind='cpu', profile='{profile}'}}",
                 "scheduler={name='gone_policy:GoneFixed', params={per_kind={cpu=1, gpu=5}}}", "stop.max_rounds=3"]
    specs = [spec_from_dict(TINY, source="tiny", overrides=[*overrides, f"seed={seed}"]) for seed in (0, 1)]
    for seed, spec in enumerate(specs):
        simulate(spec, tmp_path / f"run{seed}")
    shutil.rmtree(plugins)
    monkeypatch.delitem(sys.modules, "gone_policy")
    profile.unlink()
    with pytest.raises(Exception, match="gone_policy"):  # the policy code is really gone
        __import__("gone_policy")

    result = load_run(tmp_path / "run0").as_result()
    assert result.spec == specs[0]  # the config as written, types and all, nothing re-checked
    assert result.metrics["round"] == [0, 1, 2, 3]  # round 0: the initial model's evaluation
    assert main(["plot", str(tmp_path / "run0"), str(tmp_path / "run1"), "--out", str(tmp_path / "fig")]) == 0
    assert main(["compare", str(tmp_path / "run0"), str(tmp_path / "run1"), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "compare.json").is_file()
    assert "error" not in capsys.readouterr().err


@pytest.mark.parametrize("table, shown", [("protocol", "protocol.name: 'sync' vs 'async'"),
                                          ("selector", "selector.name: 'all' vs 'async'"),
                                          ("data", "data.name: 'shared' vs 'async'")])
def test_compare_refuses_runs_of_another_protocol_selector_or_placement(runs, tmp_path, capsys, table, shown):
    # (the name is what matters here, not whether it is a valid one: compare reads the recorded configs)
    shutil.copytree(runs / "sgd-a0", tmp_path / "other")
    config = tmp_path / "other" / "config.toml"
    text = config.read_text()
    default = {"protocol": "sync", "selector": "all", "data": "shared"}[table]
    assert f'[{table}]\nname = "{default}"\n' in text
    config.write_text(text.replace(f'[{table}]\nname = "{default}"\n', f'[{table}]\nname = "async"\n'))
    assert main(["compare", str(runs / "sgd-a0"), str(tmp_path / "other"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert f"are runs of different configs ({shown})" in err and err.count("\n") == 1


def _scaled_copy(run, to, factor):
    """A copy of `run` whose every round took `factor` times as long (metrics.csv's time_s scaled)."""
    shutil.copytree(run, to)
    rows = list(csv.DictReader((to / "metrics.csv").open()))
    for r in rows:
        r["time_s"] = repr(float(r["time_s"]) * factor)
    with (to / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return [float(r["time_s"]) for r in rows]


def test_compare_reports_the_round_time_distributions_ks_statistic(runs, tmp_path):
    from scipy.stats import ks_2samp

    from hetsim.analysis import compare_runs

    slower = _scaled_copy(runs / "sgd-a0", tmp_path / "slower", 1.5)
    base = [float(r["time_s"]) for r in csv.DictReader((runs / "sgd-a0" / "metrics.csv").open())]
    report = compare_runs(load_run(runs / "sgd-a0"), load_run(tmp_path / "slower"))
    expected = ks_2samp(np.diff(base), np.diff(slower))
    assert report["round_time_ks"] == pytest.approx(expected.statistic)
    assert report["round_time_ks_pvalue"] == pytest.approx(expected.pvalue)
    assert compare_runs(load_run(runs / "sgd-a0"), load_run(runs / "sgd-a0"))["round_time_ks"] == 0.0


def test_compare_with_repeated_measurements_reports_the_noise_floor(runs, tmp_path, capsys):
    shutil.copytree(runs / "sgd-a0", tmp_path / "real1")
    _scaled_copy(runs / "sgd-a0", tmp_path / "real2", 1.1)
    shutil.copytree(runs / "sgd-a0", tmp_path / "real3")
    assert main(["compare", str(runs / "sgd-a0"), str(tmp_path / "real1"), str(tmp_path / "real2"),
                 str(tmp_path / "real3"), "--out", str(tmp_path / "c")]) == 0
    nf = json.loads((tmp_path / "c" / "compare.json").read_text())["noise_floor"]
    # every round of real2 is 10% longer than real1's and real3's, real1 = real3: the pairs (later run
    # predicting the earlier) give per-round and total errors 0.1 (real2 vs real1), 0 (real3 vs real1) and
    # |d - 1.1 d| / 1.1 d = 0.1/1.1 (real3 vs real2): median 0.1/1.1
    assert nf["pairs"] == 3 and len(nf["runs"]) == 3
    assert nf["round_time_rel_error_median"] == pytest.approx(0.1 / 1.1)
    assert nf["total_time_rel_error"] == pytest.approx(0.1 / 1.1)
    out = capsys.readouterr().out
    assert "noise floor (3 real runs, 3 pairs, medians): per-round 9.1%" in out


def test_compare_refuses_a_repeat_of_another_config(runs, tmp_path, capsys):
    shutil.copytree(runs / "sgd-a0", tmp_path / "real1")
    assert main(["compare", str(runs / "sgd-a0"), str(tmp_path / "real1"), str(runs / "sgd-b0"),
                 "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "are runs of different configs (optim.lr: 0.1 vs 0.05)" in err and err.count("\n") == 1


def test_compare_refuses_swapped_runs_and_a_measurement_given_twice(runs, tmp_path, capsys):
    real = tmp_path / "real"
    shutil.copytree(runs / "sgd-a0", real)
    summary = json.loads((real / "summary.json").read_text())
    (real / "summary.json").write_text(json.dumps({**summary, "engine": "torchmp", "fidelity": "real"}))
    assert main(["compare", str(real), str(runs / "sgd-a0"), "--out", str(tmp_path / "c")]) == 2
    assert "the order is PREDICTED (hetsim simulate) then MEASURED (hetsim run)" in capsys.readouterr().err
    assert main(["compare", str(runs / "sgd-a0"), str(real), str(real), "--out", str(tmp_path / "c")]) == 2
    assert "given twice as a measurement" in capsys.readouterr().err
    assert main(["compare", str(runs / "sgd-a0"), str(real), str(runs / "sgd-a0"), "--out", str(tmp_path / "c")]) == 2
    assert "a sim run among torchmp measurements" in capsys.readouterr().err
    # the parent of `hetsim run --repeat`'s runs is not a run: exit 2, pointing at its rep folders
    (tmp_path / "reps").mkdir()
    shutil.copytree(real, tmp_path / "reps" / "rep1")
    assert main(["compare", str(runs / "sgd-a0"), str(tmp_path / "reps"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert f"give {tmp_path / 'reps'}/rep1 ..." in err and err.count("\n") == 1
    assert not (tmp_path / "c").exists()
