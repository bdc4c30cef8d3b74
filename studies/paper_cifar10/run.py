"""The paper study: sync SGD, local SGD, system-aware local SGD, + biased sampling, + biased sampling
and aggregation, on the paper's cluster (2 CPUs + 8 GPUs, GPU 32 / CPU 1 local steps), same epoch
budget (the paper's v2 claim), several seeds. Figures and a speedup table are regenerated from disk.

    python studies/paper_cifar10/run.py --preset small            # Fashion-MNIST, minutes on 2 cores
    python studies/paper_cifar10/run.py --preset full --seeds 3   # CIFAR-10 from a local copy

Runs are cached by config hash (hetsim sweep): re-running only computes what is missing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from hetsim.errors import HetsimError
from hetsim.sweep import compare_methods

HERE = Path(__file__).resolve().parent

SAMPLING = '{name="loss_topk", params={sample_ratio=4, kinds=["cpu"]}}'
#: label -> (scheduler, sampler, aggregator); the paper's five methods
POLICIES = {
    "sync-sgd": ('{name="sync"}', '{name="uniform"}', '{name="mean"}'),
    "local-sgd": ('{name="fixed", params={local_steps=32}}', '{name="uniform"}', '{name="mean"}'),
    "system-aware": ('{name="fixed", params={per_kind={cpu=1, gpu=32}}}', '{name="uniform"}', '{name="mean"}'),
    "system-aware-biased-sampling": ('{name="fixed", params={per_kind={cpu=1, gpu=32}}}', SAMPLING, '{name="mean"}'),
    "system-aware-biased-sampling-aggregation": ('{name="fixed", params={per_kind={cpu=1, gpu=32}}}', SAMPLING,
                                                 '{name="biased", params={strength=1.0}}'),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["small", "full"], default="small")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", help="sweep folder (default: studies/paper_cifar10/out-PRESET, not committed)")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--target", type=float, help="accuracy for time-to-accuracy and speedups "
                    "(default 0.80 small: every method reaches it within the 3-epoch budget; 0.90 full)")
    args = ap.parse_args()
    target = args.target or (0.80 if args.preset == "small" else 0.90)
    out = Path(args.out or HERE / f"out-{args.preset}")
    config = HERE / f"{args.preset}.toml"
    figures = compare_methods(config, POLICIES, args.seeds, out, args.workers, args.set, target, "sync-sgd")
    print((figures / "speedups.md").read_text())
    if args.preset == "small" and not args.set:  # the committed copies beside this script
        dest = HERE / "figures"
        dest.mkdir(exist_ok=True)
        for name in ("accuracy.png", "time_to_accuracy.png", "timeline.png", "speedups.md", "speedups.csv"):
            shutil.copy(figures / name, dest / name)
    print(f"figures: {figures}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except HetsimError as e:  # a config, data or run problem: one line, no traceback
        sys.exit(f"error: {e}")
