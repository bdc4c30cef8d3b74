"""The backend's GPU checks, as one short script for a machine with a CUDA device (a few minutes):

    python studies/device_check.py OUT_DIR [--gpu cuda:0]

1. world 1 over nccl: one `cuda:i` device, so the backend picks nccl and every control value,
   tally and replica travels on the GPU;
2. two ranks over gloo: a CPU and the GPU (a mixed cluster), replicas computed on the GPU and
   exchanged through the CPU.

Each runs a few rounds of the synthetic task for real and in the simulator; a check passes when the
backend is the expected one and the decisions and accuracies are the simulator's. One JSON line per
check; the exit status is 1 when any fails. `--gpu cpu` runs the same checks on the CPU (both over
gloo), to try the script where there is no GPU. It lives in studies/, not backends/, because it
runs the simulator too: the backend imports nothing of hetsim.sim.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

TASK: dict[str, Any] = {
    "name": "device-check", "seed": 0,
    "workload": {"name": "synthetic", "n_train": 512, "n_test": 256, "n_features": 16, "n_classes": 4},
    "scheduler": {"name": "fixed", "params": {"local_steps": 4}},
    "sampler": {"name": "loss_topk", "params": {"kinds": ["*"], "sample_ratio": 2}},
    "aggregator": {"name": "fednova"},
    "optim": {"lr": 0.1, "batch_size": 16},
    "stop": {"max_rounds": 6}, "eval": {"every_rounds": 2},
    "run": {"fault_timeout_s": 120},
}


def _device(kind: str, device: str, mean_s: float) -> dict[str, Any]:
    return {"kind": kind, "count": 1, "device": device, "threads": 1,
            "step_time": {"dist": "constant", "mean_s": mean_s}}


def checks(gpu: str) -> dict[str, tuple[dict[str, Any], str]]:
    """name -> (config, the torch.distributed backend it must run on)."""
    on_gpu = gpu.startswith("cuda")
    return {
        "world1": ({**TASK, "cluster": {"devices": [_device("gpu", gpu, 0.001)]}}, "nccl" if on_gpu else "gloo"),
        "cpu_gpu": ({**TASK, "cluster": {"devices": [_device("cpu", "cpu", 0.004), _device("gpu", gpu, 0.001)]}},
                    "gloo"),
    }


def run_check(name: str, config: dict[str, Any], backend: str, out: Path) -> dict[str, Any]:
    from backends.torchmp import run
    from hetsim.config import spec_from_dict
    from hetsim.sim import simulate

    spec = spec_from_dict(config, source=f"device_check:{name}")
    result: dict[str, Any] = {"check": name, "expected_backend": backend}
    try:
        real = run(spec, out / name, overwrite=True)
    except Exception as e:  # noqa: BLE001 - reported as the check's outcome, the next check still runs
        return {**result, "ok": False, "error": f"{type(e).__name__}: {e}"}
    sim = simulate(spec)
    keys = ("workers", "local_steps", "samples", "biased_samples")
    same = len(real.decisions) == len(sim.decisions) and all(
        {k: a[k] for k in keys} == {k: b[k] for k in keys} and np.allclose(a["weights"], b["weights"])
        for a, b in zip(real.decisions, sim.decisions))
    acc = np.allclose(real.metrics["test_acc"], sim.metrics["test_acc"], atol=1e-3, equal_nan=True)
    got = real.summary.get("backend")
    return {**result, "ok": bool(same and acc and got == backend), "backend": got, "same_decisions": same,
            "same_accuracy": bool(acc), "final_test_acc": real.summary.get("final_test_acc"),
            "devices": real.summary.get("devices")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder for the run directories")
    ap.add_argument("--gpu", default="cuda:0", help="the GPU to check (cuda:i), or cpu to try the script")
    args = ap.parse_args(argv)
    ok = True
    for name, (config, backend) in checks(args.gpu).items():
        outcome = run_check(name, config, backend, args.out)
        print(json.dumps(outcome), flush=True)
        ok &= outcome["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
