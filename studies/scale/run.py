"""Scale study (time-only fidelity): utilisation and round time for 10 to 10,000 devices under each
scheduler. The cluster is 20% CPUs and 80% GPUs (the assumed digits profiles: GPU step 8x faster),
every step a 5x straggler with probability 0.01; 200 rounds per run. Two networks: a flat ring
all-reduce (latency grows with n) and a tree all-reduce (latency grows with log n), so the effect of
the exchange can be told apart from that of waiting for the slowest device.

    python studies/scale/run.py            # ~1 min on 2 cores

Runs land in studies/scale/out/ (not committed); figures and scale.csv in studies/scale/figures/.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from hetsim.analysis import load_run
from hetsim.config import spec_from_dict
from hetsim.errors import HetsimError
from hetsim.plots import COLUMN_WIDTH_IN, PALETTE, STYLE, save_figure
from hetsim.sim import simulate

HERE = Path(__file__).resolve().parent
SCHEDULERS = {
    "sync": {"name": "sync"},
    "local-sgd (8 steps)": {"name": "fixed", "params": {"local_steps": 8}},
    "proportional (H=8)": {"name": "proportional", "params": {"max_steps": 8}},
    "time budget (6 ms)": {"name": "time_budget", "params": {"budget_s": 0.006}},
}


def spec(devices: int, scheduler: dict, rounds: int, collective: str):
    cpus = max(1, devices // 5)
    straggle = {"straggler_prob": 0.01, "straggler_factor": 5.0}
    return spec_from_dict({
        "name": f"{scheduler['name']}-{collective}-{devices}", "seed": 0, "workload": {"name": "digits"},
        "cluster": {"devices": [
            {"kind": "cpu", "count": cpus, "profile": "builtin:assumed-cpu", **straggle},
            {"kind": "gpu", "count": devices - cpus, "profile": "builtin:assumed-gpu", **straggle}],
            "network": {"collective": collective, "bandwidth_GBps": 10.0, "latency_s": 2e-5}},
        "scheduler": scheduler, "sampler": {"name": "uniform"}, "aggregator": {"name": "samples"},
        "optim": {"batch_size": 16}, "stop": {"max_rounds": rounds}, "eval": {"every_rounds": rounds},
        "trace": {"max_rounds": 1, "decisions": False}, "sim": {"fidelity": "time_only"},
    }, source="scale study")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--sizes", default="10,100,1000,10000")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for collective in ("ring_allreduce", "tree_allreduce"):
        for label, sched in SCHEDULERS.items():
            for n in sizes:
                out = HERE / "out" / f"{sched['name']}-{collective}-{n}"
                simulate(spec(n, sched, args.rounds, collective), out)
                s = load_run(out).summary
                util = np.array(list(s["utilization"].values()))
                rows.append({"network": collective, "scheduler": label, "devices": n,
                             "round_time_ms": 1e3 * s["time_s"] / s["rounds"], "utilization_mean": float(util.mean()),
                             "samples_per_s": s["samples"] / s["time_s"], "wall_s": s["wall_time_s"]})
                print(f"{collective:15s} {label:20s} {n:>6} devices: round {rows[-1]['round_time_ms']:.2f} ms, "
                      f"utilisation {rows[-1]['utilization_mean']:.2f}, {rows[-1]['samples_per_s']:,.0f} samples/s "
                      f"(wall {s['wall_time_s']:.1f}s)")
    figures = HERE / "figures"
    figures.mkdir(exist_ok=True)
    with open(figures / "scale.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, 2, figsize=(2 * COLUMN_WIDTH_IN, 4.2), sharex=True)
        for row, collective in enumerate(("ring_allreduce", "tree_allreduce")):
            for i, label in enumerate(SCHEDULERS):
                r = [x for x in rows if x["scheduler"] == label and x["network"] == collective]
                kw = {"color": PALETTE[i], "marker": "o", "ms": 3, "label": label}
                axes[row, 0].plot([x["devices"] for x in r], [x["utilization_mean"] for x in r], **kw)
                axes[row, 1].plot([x["devices"] for x in r], [x["round_time_ms"] for x in r], **kw)
            axes[row, 0].set_ylabel(f"utilisation ({collective.split('_')[0]})")
            axes[row, 0].set_ylim(0, 1.02)
            axes[row, 1].set_ylabel(f"round time, ms ({collective.split('_')[0]})")
            axes[row, 1].set_yscale("log")
        for ax in axes.flat:
            ax.set_xscale("log")
        for ax in axes[1]:
            ax.set_xlabel("devices (20% CPUs)")
        axes[0, 0].legend(frameon=False, fontsize=6)
        fig.tight_layout()
        save_figure(fig, figures, "scale")

if __name__ == "__main__":
    try:
        main()
    except HetsimError as e:  # a config, data or run problem: one line, no traceback
        sys.exit(f"error: {e}")
