"""The command line: `hetsim quickstart | simulate | run | profile | compare | sweep | surrogate | plot`.

Errors in configs, profiles or data paths print one line (`hetsim: error: FILE: KEY: expected ...`)
and exit with status 2; no traceback.

Exit status: 0 done; 1 the run failed (one line: a crashed or hung device, an unusable checkpoint);
2 bad input (config, profile, data path, arguments); 3 the run diverged: its training loss or model
became non-finite (summary.json `diverged_at_round`; the run directory is complete); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from hetsim.errors import HetsimError, HetsimWarning, SpecError

EXIT_DIVERGED = 3  # distinct from 1 (a failure): the run finished, and its result is that SGD diverged


def _report_divergence(summary: dict, out: Path) -> int:
    """One line for a diverged run, and its exit status (0 when it did not diverge)."""
    r = summary.get("diverged_at_round")
    if r is None:
        return 0
    how = ("stopped there" if summary.get("stopped_by") == "diverged"
           else "continued to its budget (stop.on_divergence = 'continue')")
    print(f"hetsim: the run diverged at round {r}: its training loss or model became non-finite; it {how} "
          f"(try a smaller optim.lr). Files: {out}", file=sys.stderr)
    return EXIT_DIVERGED


def _unit(summary: dict) -> str:
    """What a run's rows count: rounds (sync) or updates (the event-driven protocols)."""
    return "rounds" if summary.get("protocol", "sync") == "sync" else "updates"


class Progress:
    """One status line per run, refreshed in place on a terminal and every few seconds otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr  # looked up now, not at import: the stream may be redirected
        self.tty = self.stream.isatty()
        self.every_s = 0.25 if self.tty else 5.0
        self._last = 0.0
        self.prefix = ""
        self.last_acc = math.nan
        self.unit = "round"

    def start(self, prefix: str, protocol: str = "sync") -> None:
        self.prefix = prefix
        self._last = 0.0
        self.last_acc = math.nan
        self.unit = "round" if protocol == "sync" else "update"  # an event-driven protocol's row is an update

    def __call__(self, row: dict) -> None:
        if not math.isnan(row["test_acc"]):
            self.last_acc = row["test_acc"]
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        acc = "n/a" if math.isnan(self.last_acc) else f"{self.last_acc:.3f}"  # n/a: not evaluated yet, or time-only
        self._print(f"{self.unit} {row['round']:>5}  t={row['time_s']:.4g}s  epoch {row['epoch']:.2f}  acc {acc}",
                    final=False)

    def done(self, summary: dict) -> None:
        from hetsim.results import summary_outcome

        self._print(f"done: {summary['rounds']} {_unit(summary)}, t={summary['time_s']:.4g}s, {summary_outcome(summary)} "
                    f"(wall {summary['wall_time_s']:.1f}s)", final=True)

    def _print(self, text: str, final: bool) -> None:
        line = f"{self.prefix} {text}"
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _spec_and_out(args: argparse.Namespace, engine: str):
    """The spec and run directory of `simulate` / `run`: a config, or --resume RUN_DIR (its config.toml).
    The default folder, runs/NAME-sSEED-IDENTITY, stays inside runs/ whatever the name holds and
    differs between configs (hetsim.rundir.default_run_dir)."""
    from hetsim.resolve import load_spec
    from hetsim.rundir import default_run_dir

    if args.force and not args.resume:
        raise SpecError("--force only applies to --resume RUN_DIR (continue with a config edited since the checkpoint)")
    if args.resume:
        if args.config or args.set:
            raise SpecError("--resume RUN_DIR continues that run with its own config.toml; give no CONFIG or --set")
        if args.overwrite:
            raise SpecError("--resume RUN_DIR continues that run; it cannot be combined with --overwrite")
        return load_spec(Path(args.resume) / "config.toml"), Path(args.resume)
    if not args.config:
        raise SpecError("expected a CONFIG file (or --resume RUN_DIR)")
    spec = load_spec(args.config, args.set)
    return spec, Path(args.out) if args.out else default_run_dir(spec, engine)


def cmd_simulate(args: argparse.Namespace) -> int:
    from hetsim.sim import simulate

    if args.replay:
        return _replay(args)
    spec, out = _spec_and_out(args, "sim")
    progress = None if args.quiet else Progress()
    if progress:
        progress.start(f"[{spec.name} seed {spec.seed}]", spec.protocol.name)
    result = simulate(spec, out, progress, resume=bool(args.resume), force=args.force, overwrite=args.overwrite)
    if progress:
        progress.done(result.summary)
    status = _report_divergence(result.summary, out)
    print(out)
    return status


def _replay(args: argparse.Namespace) -> int:
    """`simulate --replay RUN [--out DIR]`: RUN's config on a clock that takes RUN's arrivals (hetsim.sim.replay)."""
    from hetsim.sim.replay import replay

    if args.config or args.set or args.resume or args.force:
        raise SpecError("--replay RUN runs RUN's own config.toml; give no CONFIG, --set, --resume or --force")
    progress = None if args.quiet else Progress()
    if progress:
        progress.start(f"[replay {args.replay}]")
    result = replay(args.replay, args.out, progress, overwrite=args.overwrite)
    if progress:
        progress.done(result.summary)
    r = result.summary["replay"]
    print(f"replayed {r['updates']} updates of {args.replay}: the same decisions; model digests "
          f"{r['digests_matched']}/{r['digests_compared']} equal" + (f"; written to {args.out}" if args.out else ""))
    if r["digests_matched"] == r["digests_compared"]:
        return 0
    if result.spec.protocol.name == "sync" and _engine_of(args.replay) != "sim":
        print("hetsim: a real sync run sums its replicas with an all-reduce, in another order than the "
              "simulator's matmul: the models differ by round-off (the decisions above are the check); the "
              "event-driven protocols' server sums as the simulator does, bit for bit", file=sys.stderr)
    return 1


def _engine_of(run: str) -> str:
    import json

    summary = Path(run) / "summary.json"
    return str(json.loads(summary.read_text()).get("engine", "sim")) if summary.is_file() else "sim"


def cmd_run(args: argparse.Namespace) -> int:
    """The real backend: spawn one process per device, or be one rank under torchrun (env://)."""
    import os

    from backends.torchmp.launcher import RunInterrupted, check_devices, check_event_driven

    if args.repeat < 1:
        raise SpecError(f"--repeat {args.repeat}: expected a number of runs >= 1")
    if args.repeat > 1 and args.resume:
        raise SpecError("--repeat N runs the config afresh N times; it does not --resume")
    spec, out = _spec_and_out(args, "torchmp")
    if args.repeat > 1 and "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        raise SpecError("--repeat under torchrun: start torchrun once per repetition (each its own --out)")
    if args.repeat > 1:
        return _run_repeated(args, spec, out)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        import traceback

        from backends.torchmp.worker import drop_empty_log, exit_now, log_path, send_stderr_to_log, worker_main
        from hetsim.config import worker_names
        from hetsim.rundir import claim_run_dir

        from hetsim.protocols import event_driven

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        served = event_driven(spec.protocol.name)  # a server rank 0 before the devices' ranks
        if world != spec.n_workers + served:
            raise SpecError(f"{args.config}: torchrun started {world} processes for {spec.n_workers} devices"
                            + (f" under protocol {spec.protocol.name!r}: expected {spec.n_workers + 1} (a server "
                               f"rank and one rank per device)" if served else ""))
        check_devices(spec)
        if served:
            check_event_driven(spec)
        if rank == 0:  # the writer claims the folder; if it refuses, torchrun stops the other ranks
            claim_run_dir(out, spec, "torchmp", overwrite=args.overwrite, resume=bool(args.resume))
        # as under the launcher: tracebacks and library noise go to the run's log, the console gets one line
        log = log_path(out, rank)
        console = send_stderr_to_log(log)
        heartbeat = [0.0] * (3 * world)  # (round, phase, time) per rank: the round a failure happened in
        try:
            worker_main(rank, world, spec, str(out), "env://", heartbeat, resume=bool(args.resume), force=args.force)
        except BaseException as e:  # noqa: BLE001 - every failure ends this rank with one line
            traceback.print_exc()
            rank_names = (["server"] if served else []) + worker_names(spec.worker_kinds())
            os.write(console, f"hetsim: error: device {rank_names[rank]} (rank {rank}) failed "
                              f"in round {int(heartbeat[3 * rank])}: {type(e).__name__}: {e}; details in {log}; "
                              f"finished rounds are in {out}\n".encode())
            exit_now(1)
        drop_empty_log(log)
        status = 0
        if rank == 0:  # rank 0 wrote the summary; the other ranks' status stays 0 so torchrun names rank 0
            import json

            status = _report_divergence(json.loads((out / "summary.json").read_text()), out)
            print(out)
        exit_now(status)  # skip gloo's teardown at interpreter exit (see worker_main)
    from backends.torchmp import run
    from hetsim.results import summary_outcome

    try:
        result = run(spec, out, resume=bool(args.resume), force=args.force, overwrite=args.overwrite)
    except RunInterrupted as e:
        print(f"hetsim: error: {e}", file=sys.stderr)
        return 128 + e.signum
    s = result.summary
    print(f"{spec.name}: {s['rounds']} {_unit(s)} in {s['time_s']:.3g}s wall, {summary_outcome(s)}", file=sys.stderr)
    status = _report_divergence(s, out)
    print(out)
    return status


def _run_repeated(args: argparse.Namespace, spec: Any, out: Path) -> int:
    """`hetsim run --repeat N`: the config N times, into OUT/rep1 ... OUT/repN, one after the other, then
    their noise floor (analysis.noise_floor: the compare metrics real vs real, median over the pairs),
    printed and written to OUT/noise_floor.json."""
    from backends.torchmp import run
    from backends.torchmp.launcher import RunInterrupted
    from hetsim.analysis import load_run, noise_floor
    from hetsim.results import summary_outcome, write_json

    if (out / "config.toml").exists():
        raise SpecError(f"{out}: is a run directory; --repeat N writes N runs into OUT/rep1 ... OUT/repN: "
                        f"give another --out")
    out.mkdir(parents=True, exist_ok=True)
    dirs = [out / f"rep{i}" for i in range(1, args.repeat + 1)]
    status = 0
    for i, d in enumerate(dirs, 1):
        try:
            result = run(spec, d, overwrite=args.overwrite)
        except RunInterrupted as e:
            print(f"hetsim: error: {e} (during repetition {i} of {args.repeat}; finished ones are in {out})",
                  file=sys.stderr)
            return 128 + e.signum
        s = result.summary
        print(f"{spec.name} [{i}/{args.repeat}]: {s['rounds']} {_unit(s)} in {s['time_s']:.3g}s wall, "
              f"{summary_outcome(s)}", file=sys.stderr)
        status = max(status, _report_divergence(s, d))
    nf = noise_floor([load_run(d) for d in dirs])
    write_json(out / "noise_floor.json", nf)

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    print(f"noise floor ({len(dirs)} runs, {nf['pairs']} pairs, medians): per-round {pct(nf['round_time_rel_error_median'])} "
          f"(p90 {pct(nf['round_time_rel_error_p90'])}), total {pct(nf['total_time_rel_error'])}, time to accuracy "
          f"{pct(nf['time_to_accuracy_rel_error'])}, KS {nf['round_time_ks']:.3f}", file=sys.stderr)
    print(out)
    return status


def _spec_to_profile(path: str, overrides: list[str]):
    """A config whose devices are about to be profiled: their profiles may not exist yet, so each
    device's time source is replaced by a placeholder before validation."""
    from hetsim.config import apply_overrides, read_toml
    from hetsim.resolve import spec_from_dict

    p = Path(path)
    data = apply_overrides(read_toml(p), overrides)
    for d in data.get("cluster", {}).get("devices", []):
        if isinstance(d, dict):
            d.pop("profile", None)
            d["step_time"] = {"dist": "constant", "mean_s": 1.0}
    return spec_from_dict(data, source=str(p), base=p.parent)


#: the flags of single-device profiling and their defaults (with --config, the config says these)
PROFILE_DEVICE_DEFAULTS = {"device": "cpu", "threads": 0, "emulated_slowdown": 1.0, "workload": "digits",
                           "data_path": "", "batch_size": 16}


def cmd_profile(args: argparse.Namespace) -> int:
    from backends.torchmp.profiler import profile_cluster, profile_device, spec_entry, write_profile

    if not args.max_seconds > 0:
        raise SpecError(f"--max-seconds {args.max_seconds!r}: expected a number of seconds > 0")
    if args.config:
        # the config's devices say these; a flag given beside it would be silently ignored
        single = [f"--{name.replace('_', '-')}" for name, default in PROFILE_DEVICE_DEFAULTS.items()
                  if getattr(args, name) != default]
        if single:
            raise SpecError(f"{single[0]}: a flag of single-device profiling; with --config set it in the config "
                            f"(cluster.devices[], workload, optim.batch_size)")
        spec = _spec_to_profile(args.config, args.set)
        print(f"profiling the {spec.n_workers} devices of {args.config} concurrently ...", file=sys.stderr)
        paths = profile_cluster(spec, args.out, args.max_seconds, args.exchange)
        for kind, path in paths.items():
            print(f"{kind}: {path}")
        if args.exchange:
            data = json.loads(next(iter(paths.values())).read_text())
            link, entry = data["link"], spec_entry(data, spec)
            ov = ((entry.get("in_run") or {}).get(spec.protocol.name) or {}).get("overhead")
            print(f"link {link['bandwidth_GBps']:.2f} GB/s, {link['latency_s'] * 1e6:.0f} us; " +
                  (f"per-combine overhead under {spec.protocol.name}: {ov['fixed_s'] * 1e3:.2f} ms + "
                   f"{ov['per_arrival_s'] * 1e3:.2f} ms per arrival (p10-p90 {ov['p10_s'] * 1e3:.2f}-"
                   f"{ov['p90_s'] * 1e3:.2f} ms over {ov['combines']} combines)" if ov else
                   f"per-combine overhead not measured for protocol {spec.protocol.name!r} (measured for "
                   f"sync, semi_sync and async)"), file=sys.stderr)
        return 0

    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise SpecError(f"--device {args.device!r}: expected 'cpu' or 'cuda:INDEX'")
    for flag, value, ok, expected in (
            ("--emulated-slowdown", args.emulated_slowdown, args.emulated_slowdown >= 1, "a factor >= 1"),
            ("--threads", args.threads, args.threads >= 0, "an integer >= 0 (0 = default)"),
            ("--batch-size", args.batch_size, args.batch_size >= 1, "an integer >= 1")):
        if not ok:
            raise SpecError(f"{flag} {value!r}: expected {expected}")
    print(f"profiling {args.device} on {args.workload} (batch {args.batch_size}) ...", file=sys.stderr)
    measured = profile_device(args.workload, args.batch_size, args.device, args.threads, args.emulated_slowdown,
                              args.data_path, max_seconds=args.max_seconds, exchange=args.exchange)
    write_profile(args.out, args.device.split(":")[0], measured)
    e = measured["entry"]
    print(f"step median {e['median_s'] * 1e3:.3f} ms (p10 {e['p10_s'] * 1e3:.3f}, p90 {e['p90_s'] * 1e3:.3f}; "
          f"{e['n_samples']} steps), eval {e['eval_time_s'] * 1e3:.1f} ms"
          + (f", link {measured['link']['bandwidth_GBps']:.2f} GB/s, {measured['link']['latency_s'] * 1e6:.0f} us"
             if measured["link"] else ""), file=sys.stderr)
    print(args.out)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from hetsim.analysis import compare_runs, load_run, noise_floor
    from hetsim.plots import plot_compare
    from hetsim.results import write_json
    from hetsim.rundir import writable_dir

    predicted, measured = load_run(args.predicted), load_run(args.measured)
    if predicted.engine != "sim" and measured.engine == "sim":
        raise SpecError(f"{args.predicted} is a real run and {args.measured} a simulated one: the order is "
                        f"PREDICTED (hetsim simulate) then MEASURED (hetsim run)")
    report = compare_runs(predicted, measured)
    repeats = [measured] + [load_run(r) for r in args.repeats]
    if args.repeats:  # each repeat: another measurement of the same config, by the same engine
        seen: dict[Path, str] = {}
        for given, r in zip([args.measured, *args.repeats], repeats):
            where = Path(given).resolve()
            if where in seen:
                raise SpecError(f"{given}: given twice as a measurement (as {seen[where]}); a noise floor compares "
                                f"different repetitions")
            seen[where] = given
            if r.engine != measured.engine:
                raise SpecError(f"{given}: a {r.engine} run among {measured.engine} measurements; the noise floor "
                                f"compares repetitions of the measurement (hetsim run --repeat N)")
        for r in repeats[1:]:
            compare_runs(predicted, r)
        report["noise_floor"] = noise_floor(repeats)
    out = writable_dir(Path(args.out) if args.out else Path(args.measured) / "compare")
    write_json(out / "compare.json", report)
    plot_compare(predicted, measured, out)

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    def secs(v):  # None: never reached, or no accuracy at all (a time-only prediction)
        return "n/a" if v is None else f"{v:.4g}s"

    print(f"rounds compared:            {report['rounds_compared']}")
    print(f"per-round time error:       median {pct(report['round_time_rel_error_median'])}, "
          f"p90 {pct(report['round_time_rel_error_p90'])}")
    print(f"total time:                 predicted {report['total_time_predicted_s']:.4g}s, measured "
          f"{report['total_time_measured_s']:.4g}s ({pct(report['total_time_rel_error'])})")
    print(f"{'time to ' + format(report['target_accuracy'], '.0%') + ':':<28}"
          f"predicted {secs(report['time_to_accuracy_predicted_s'])}, "
          f"measured {secs(report['time_to_accuracy_measured_s'])} ({pct(report['time_to_accuracy_rel_error'])})")
    if report["accuracy_points_compared"]:
        print(f"accuracy difference:        max {report['accuracy_abs_diff_max']:.4g}, "
              f"mean {report['accuracy_abs_diff_mean']:.4g} over {report['accuracy_points_compared']} evaluations")
    else:
        print("accuracy difference:        n/a (no accuracy evaluated in both runs)")
    print(f"round-time distribution:    KS {report['round_time_ks']:.3f} (p {report['round_time_ks_pvalue']:.2g})")
    print(f"same decisions:             {report['same_decisions']}")
    if "noise_floor" in report:
        nf = report["noise_floor"]
        print(f"noise floor ({len(nf['runs'])} real runs, {nf['pairs']} pairs, medians): per-round "
              f"{pct(nf['round_time_rel_error_median'])} (p90 {pct(nf['round_time_rel_error_p90'])}), total "
              f"{pct(nf['total_time_rel_error'])}, time to accuracy {pct(nf['time_to_accuracy_rel_error'])}, "
              f"KS {nf['round_time_ks']:.3f}")
    print(out)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from hetsim.sweep import sweep

    print(sweep(args.config, args.grid, args.seeds, args.out, args.workers, args.engine, args.set,
                ray_address=args.ray or ""))
    return 0


def cmd_surrogate(args: argparse.Namespace) -> int:
    from hetsim.analysis import load_runs
    from hetsim.results import strict_json
    from hetsim.surrogate import fit, holdout_error

    curve = fit(load_runs(args.runs))
    curve.save(args.out)
    print(f"acc(e) = {curve.a:.4f} - {curve.b:.4f} exp(-{curve.c:.4f} e), valid for epochs "
          f"{curve.epochs_min:.3g}..{curve.epochs_max:.3g}", file=sys.stderr)
    if args.holdout:
        held = load_runs(args.holdout)
        target = args.target or float(held[0].summary.get("target_accuracy", 0.9))
        print(strict_json(holdout_error(curve, held, target), indent=2))
    print(args.out)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from hetsim.analysis import load_runs
    from hetsim.plots import plot_runs
    from hetsim.quickstart import BASELINE, POLICIES, quickstart_runs
    from hetsim.sweep import check_workers, run_all, table_runs

    check_workers(args.workers)
    out = Path(args.out)
    runs = quickstart_runs(out, args.seeds, args.set)
    t0 = time.perf_counter()
    table = run_all(runs, out, args.workers)
    paths = plot_runs(load_runs(table_runs(table)), out / "figures", baseline=BASELINE, order=list(POLICIES))
    print((out / "figures" / "speedups.md").read_text())
    print(f"{len(runs)} runs in {time.perf_counter() - t0:.0f}s; figures:")
    for p in paths:
        print(f"  {p}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from hetsim.analysis import check_target, load_runs
    from hetsim.plots import plot_runs

    if args.target is not None:
        check_target(args.target, "--target")
    a, _, b = args.rounds.partition(":")
    try:
        window = (int(a), int(b or a))
    except ValueError:
        raise SpecError(f"--rounds {args.rounds!r}: expected FIRST:LAST, e.g. 1:3") from None
    if not 0 <= window[0] <= window[1]:
        raise SpecError(f"--rounds {args.rounds!r}: expected 0 <= FIRST <= LAST, e.g. 1:3")
    order = [x.strip() for x in args.order.split(",") if x.strip()] if args.order else None
    runs = load_runs(args.runs)
    for p in plot_runs(runs, Path(args.out), args.target, args.baseline, window, order=order):
        print(p)
    return 0


OVERWRITE_HELP = ("write into a folder holding other files or a different run: hetsim's run files there are "
                  "replaced, other files are kept")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetsim", description="Simulate biased local SGD on heterogeneous clusters.")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quickstart", help="compare five policies on the embedded default and plot them")
    q.add_argument("--out", default="hetsim-quickstart", help="output folder (runs/ and figures/)")
    q.add_argument("--seeds", type=int, default=3, help="seeds per policy (default 3)")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the base spec")
    q.add_argument("--workers", type=int, default=0, help="parallel runs (default: the cores)")
    q.set_defaults(func=cmd_quickstart)

    s = sub.add_parser("simulate", help="run one config in the simulator")
    s.add_argument("config", nargs="?", help="TOML spec (see examples/)")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    s.add_argument("--force", action="store_true", help="with --resume: continue even though config.toml changed "
                   "since the checkpoint (summary.json records it)")
    s.add_argument("--replay", metavar="RUN", help="replay RUN (a run directory) with its arrival order and times; "
                   "fails at the first update whose decisions differ; exit 1 if a model digest differs")
    s.add_argument("--out", help="run directory (default runs/NAME-sSEED-IDENTITY; with --replay: none unless given)")
    s.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set optim.lr=0.05 --set cluster.devices.1.count=4")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=cmd_simulate)

    r = sub.add_parser("run", help="run one config on real devices (one process per device; works under torchrun)",
                       description="Run one config on real devices: one process per device (sync), plus a server "
                       "process (rank 0) under the event-driven protocols semi_sync, async and buffered_async, so "
                       "N devices take N + 1 processes; under torchrun, --nproc-per-node must add up to that "
                       "world size over the nodes.")
    r.add_argument("config", nargs="?", help="TOML spec; cluster.devices[].device = 'cpu' or 'cuda:i'")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    r.add_argument("--force", action="store_true", help="with --resume: continue even though config.toml changed "
                   "since the checkpoint (summary.json records it)")
    r.add_argument("--out", help="run directory (default runs/NAME-sSEED-IDENTITY-real)")
    r.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    r.add_argument("--repeat", type=int, default=1, metavar="N", help="run the config N times, into OUT/rep1 ... "
                   "OUT/repN, and report their noise floor (the compare metrics real vs real; OUT/noise_floor.json)")
    r.set_defaults(func=cmd_run)

    pf = sub.add_parser("profile", help="measure a device's step, evaluation and exchange times into a profile file")
    d = PROFILE_DEVICE_DEFAULTS
    pf.add_argument("--device", default=d["device"], help="cpu or cuda:INDEX")
    pf.add_argument("--threads", type=int, default=d["threads"], help="torch threads (cpu; 0 = default)")
    pf.add_argument("--emulated-slowdown", type=float, default=d["emulated_slowdown"],
                    help="pad each step to this factor (>= 1)")
    pf.add_argument("--workload", default=d["workload"])
    pf.add_argument("--data-path", default=d["data_path"], help="data directory of file-based workloads")
    pf.add_argument("--batch-size", type=int, default=d["batch_size"])
    pf.add_argument("--max-seconds", type=float, default=30.0, help="time cap of the step measurement")
    pf.add_argument("--exchange", action="store_true", help="also measure all-reduce latency and bandwidth")
    pf.add_argument("--config", help="profile every device of this config at once, as `hetsim run` runs them; "
                                     "--out is then a folder receiving KIND.json per device group")
    pf.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field of --config")
    pf.add_argument("--out", required=True, help="profile file (entries for other workloads are kept)")
    pf.set_defaults(func=cmd_profile)

    c = sub.add_parser("compare", help="predicted (simulator) vs measured (real backend) run directories")
    c.add_argument("predicted", help="run directory of the prediction (hetsim simulate)")
    c.add_argument("measured", help="run directory of the measurement (hetsim run)")
    c.add_argument("repeats", nargs="*", help="more measurements of the same config: the report adds the noise "
                   "floor (the same metrics real vs real, median over every pair of measurements)")
    c.add_argument("--out", help="folder for compare.json and the figure (default MEASURED/compare)")
    c.set_defaults(func=cmd_compare)

    sw = sub.add_parser("sweep", help="a grid of configs x seeds in parallel, cached by config hash")
    sw.add_argument("config", help="the base TOML spec")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="a swept field and its values (V1|V2 when values hold commas); repeat for a product")
    sw.add_argument("--seeds", type=int, default=1, help="seeds per grid point (seed, seed+1, ...)")
    sw.add_argument("--out", required=True, help="sweep folder: runs/<config hash>/ and sweep.csv")
    sw.add_argument("--workers", type=int, default=0, help="parallel runs (default: the cores)")
    sw.add_argument("--engine", default="sim", help="sim (default) or real (the backend, one run at a time)")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the base spec")
    sw.add_argument("--ray", metavar="ADDRESS", help="run on a Ray cluster ('local': start one here); "
                    "needs pip install 'hetsim[ray]'")
    sw.set_defaults(func=cmd_sweep)

    su = sub.add_parser("surrogate", help="fit a learning curve (accuracy vs epochs) for time-only runs")
    su.add_argument("runs", nargs="+", help="emulated run directories of one policy (seeds)")
    su.add_argument("--holdout", nargs="*", default=[], help="run directories to report the curve's error on")
    su.add_argument("--target", type=float, help="accuracy for the held-out time-to-accuracy error")
    su.add_argument("--out", required=True, help="learning-curve JSON file")
    su.set_defaults(func=cmd_surrogate)

    pl = sub.add_parser("plot", help="figures and a speedup table from run directories")
    pl.add_argument("runs", nargs="+", help="run directories, or folders holding them")
    pl.add_argument("--out", default="figures", help="output folder")
    pl.add_argument("--target", type=float, help="target accuracy (default: the runs' configured target)")
    pl.add_argument("--baseline", help="label of the baseline for speedups, e.g. sync-sgd")
    pl.add_argument("--rounds", default="1:3", help="round window of the timeline, FIRST:LAST")
    pl.add_argument("--order", metavar="LABEL,LABEL,...",
                    help="legend order and colours: a label's colour is fixed by its place in this list, so every "
                         "figure of a study matches (default: the baseline, then the runs' order)")
    pl.set_defaults(func=cmd_plot)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None,
                  _default=warnings.showwarning) -> None:
    """hetsim's own warnings as one line, like its errors; others as Python prints them."""
    if issubclass(category, HetsimWarning):
        print(f"hetsim: warning: {message}", file=file or sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            # each distinct warning once per command: a sweep validates one spec per run
            warnings.simplefilter("default", HetsimWarning)
            warnings.showwarning = _show_warning
            return args.func(args)
    except SpecError as e:
        print(f"hetsim: error: {e}", file=sys.stderr)
        return 2
    except HetsimError as e:
        print(f"hetsim: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # a sweep says what finished; a plain Ctrl+C carries no text
        print(f"hetsim: interrupted; {str(e) or 'completed files are kept in the run directory'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
