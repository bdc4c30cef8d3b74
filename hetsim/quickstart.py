"""`hetsim quickstart`: the embedded comparison of five policies on the default workload.

The base spec is `hetsim/quickstart.toml` (digits + MLP, 2 CPUs + 8 GPUs with assumed speeds);
each policy below replaces its scheduler, sampler and aggregator — nothing else differs.
The runs go through the sweep machinery (hetsim/sweep.py): parallel processes, cached by config, so
re-running after an interrupt runs only what is missing; OUT/sweep.csv lists them.
"""

from __future__ import annotations

from pathlib import Path

from hetsim.config import Spec
from hetsim.errors import SpecError
from hetsim.resolve import load_spec, replace
from hetsim.sweep import SweepRun, config_hash

BASE = Path(__file__).parent / "quickstart.toml"


def _policy(scheduler: str, sampler: str, aggregator: str) -> list[str]:
    return [f"scheduler={scheduler}", f"sampler={sampler}", f"aggregator={aggregator}"]


UNIFORM = '{name = "uniform"}'
BIASED_SAMPLING = '{name = "loss_topk", params = {sample_ratio = 4, kinds = ["cpu"]}}'
PROPORTIONAL = '{name = "proportional", params = {max_steps = 8}}'
MEAN = '{name = "mean"}'

#: label -> overrides of the base spec. Labels name run directories and plot legends.
POLICIES: dict[str, list[str]] = {
    # one step per round, averaged every step: every step waits for the slowest device
    "sync-sgd": _policy('{name = "sync"}', UNIFORM, MEAN),
    # local SGD with equal steps on every device: the fast devices idle while the CPUs finish
    "local-sgd": _policy('{name = "fixed", params = {local_steps = 8}}', UNIFORM, MEAN),
    # system-aware: local steps proportional to speed (GPU 8, CPU 1), as the paper
    "system-aware": _policy(PROPORTIONAL, UNIFORM, MEAN),
    # + the slow devices train on the highest-loss samples of a 4x candidate pool
    "system-aware-biased-sampling": _policy(PROPORTIONAL, BIASED_SAMPLING, MEAN),
    # + replicas weighted by the work they did (biased aggregation, strength 1)
    "system-aware-biased-sampling-aggregation": _policy(
        PROPORTIONAL, BIASED_SAMPLING, '{name = "biased", params = {strength = 1.0, basis = "steps"}}'),
}
BASELINE = "sync-sgd"


def quickstart_specs(seeds: int = 3, overrides: list[str] | None = None) -> list[tuple[str, Spec]]:
    """(run directory name, spec) for every policy and seed."""
    if seeds < 1:
        raise SpecError(f"--seeds {seeds}: expected at least 1")
    base = load_spec(BASE, overrides or [])
    out = []
    for label, policy in POLICIES.items():
        for seed in range(seeds):
            out.append((f"{label}-s{seed}", replace(base, [*policy, f'name="{label}"', f"seed={seed}"])))
    return out


def quickstart_runs(out: str | Path, seeds: int = 3, overrides: list[str] | None = None) -> list[SweepRun]:
    """The quickstart's runs for hetsim.sweep.run_all: OUT/runs/<policy>-s<seed>-<config hash>. The hash
    keeps a run of a changed config (another --set) from resuming or reusing one of the old config."""
    return [SweepRun({}, spec.seed, spec, Path(out) / "runs" / f"{name}-{config_hash(spec)}")
            for name, spec in quickstart_specs(seeds, overrides)]
