"""Ablations of biased local SGD on the quickstart's set-up (digits, 2 CPUs + 8 GPUs, assumed speeds),
each a `hetsim sweep` over one parameter, 3 seeds, time to 95% accuracy as the outcome:

  sample_ratio     loss-top-k candidate pool / k on the CPUs: 1 (= uniform), 2, 4, 8
  agg_strength     biased aggregation strength (weights ∝ local steps ** s): 0 (= mean), 0.5, 1, 2
  n_cpus           CPUs beside the 8 GPUs: 0, 1, 2, 4, 8
  speed_ratio      GPU:CPU step-time ratio 4, 8, 16, 32, 64 (CPU step time scaled; H = 8 fixed)
  score_rule       the reference code's running-min loss scores vs the latest loss
  gpu_slowdown     the GPUs become 4x slower at t = 20 ms: plan from the profile vs from observed step times
  stragglers       every device: probability of a 5x step 0, 0.01, 0.05, 0.1

    python studies/ablations/run.py [--seeds 3] [--only sample_ratio,n_cpus]

Runs are cached by config hash; figures and a CSV per ablation land in studies/ablations/figures/.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from hetsim.errors import HetsimError
from hetsim.plots import plot_ablation
from hetsim.quickstart import BASE
from hetsim.sweep import sweep

HERE = Path(__file__).resolve().parent
BIASED = ['sampler={name="loss_topk", params={sample_ratio=4, kinds=["cpu"]}}',
          'aggregator={name="biased", params={strength=1.0}}']
CPU_STEP_S, GPU_STEP_S = 0.004, 0.0005

#: name -> (x label, grid values, overrides per value, fixed overrides)
ABLATIONS = {
    "sample_ratio": ("candidate pool / k on the CPUs", ["1", "2", "4", "8"],
                     lambda v: [f"sampler.params.sample_ratio={v}"], BIASED),
    "agg_strength": ("aggregation bias strength", ["0", "0.5", "1", "2"],
                     lambda v: [f"aggregator.params.strength={v}"], BIASED),
    # with no CPU the CPU-only biased sampler has no one to bias: it is uniform sampling (a sampler naming
    # a kind the cluster lacks is rejected on load)
    "n_cpus": ("CPUs beside 8 GPUs", ["0", "1", "2", "4", "8"],
               lambda v: ([f"cluster.devices.0.count={v}"] if v != "0" else
                          ["cluster.devices=[{kind='gpu', count=8, profile='builtin:assumed-gpu'}]",
                           "sampler={name='uniform'}"]), BIASED),
    "speed_ratio": ("GPU:CPU step-time ratio", ["4", "8", "16", "32", "64"],
                    lambda v: ["cluster.devices.0.profile=''",
                               f"cluster.devices.0.step_time={{dist='lognormal', mean_s={GPU_STEP_S * float(v)}, "
                               f"std_s={GPU_STEP_S * float(v) * 0.05}}}"], BIASED),
    "score_rule": ("loss-score rule", ["latest", "min"],
                   lambda v: [f"sampler.params.score_rule='{v}'"], BIASED),
    "gpu_slowdown": ("scheduler's speed estimate, GPUs 4x slower from t = 20 ms", ["profile", "observed"],
                     lambda v: ["cluster.devices.1.slowdown=[[0.02, 4.0]]", f"scheduler.params.source='{v}'"],
                     BIASED),
    "stragglers": ("probability of a 5x straggler step", ["0", "0.01", "0.05", "0.1"],
                   lambda v: [f"cluster.devices.{g}.straggler_prob={v}" for g in (0, 1)] +
                             [f"cluster.devices.{g}.straggler_factor=5.0" for g in (0, 1)], BIASED),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", help="comma-separated ablation names")
    ap.add_argument("--out", default=str(HERE / "out"), help="sweep folders (not committed)")
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(ABLATIONS)
    figures = HERE / "figures"
    for name in names:
        xlabel, values, per_value, fixed = ABLATIONS[name]
        rows = []
        for v in values:
            table = sweep(BASE, [], args.seeds, Path(args.out) / name / v, args.workers,
                          overrides=[*fixed, *per_value(v), f'name="{name}={v}"'])
            with open(table, newline="") as f:
                rows += [{**r, "value": v} for r in csv.DictReader(f)]
        ttas = {v: [float(r["time_to_accuracy_s"]) for r in rows if r["value"] == v and r["time_to_accuracy_s"]]
                for v in values}
        reached = {v: len(ttas[v]) for v in values}
        plot_ablation(name, xlabel, values, ttas, args.seeds, figures)
        figures.mkdir(exist_ok=True)
        with open(figures / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["value", "seeds_reaching_95", "tta_mean_s", "tta_std_s"])
            for v in values:
                t = ttas[v]
                w.writerow([v, reached[v], np.mean(t) if t else "", np.std(t) if t else ""])
        print(f"{name}: " + ", ".join(f"{v}: {np.mean(ttas[v]):.4g}s ({reached[v]}/{args.seeds})" if ttas[v]
                                      else f"{v}: not reached" for v in values), file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except HetsimError as e:  # a config, data or run problem: one line, no traceback
        sys.exit(f"error: {e}")
