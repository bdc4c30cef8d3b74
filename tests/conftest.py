import copy
from pathlib import Path

import pytest

from hetsim.resolve import spec_from_dict  # checked as a run needs it (hetsim.config checks the schema only)

ROOT = Path(__file__).resolve().parents[1]

# Two constant-speed device groups and a synthetic task: every time is known in closed form.
TINY = {
    "name": "tiny",
    "seed": 0,
    "workload": {"name": "synthetic", "n_train": 256, "n_test": 128, "n_features": 8, "n_classes": 3},
    "cluster": {
        "devices": [
            {"kind": "cpu", "count": 1, "step_time": {"dist": "constant", "mean_s": 0.01}},
            {"kind": "gpu", "count": 2, "step_time": {"dist": "constant", "mean_s": 0.002}},
        ],
        "network": {"collective": "ring_allreduce", "bandwidth_GBps": 1.0, "latency_s": 1e-4},
    },
    "scheduler": {"name": "fixed", "params": {"per_kind": {"cpu": 1, "gpu": 5}}},
    "sampler": {"name": "uniform"},
    "aggregator": {"name": "mean"},
    "optim": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 8},
    "stop": {"max_rounds": 4, "target_accuracy": 0.5},
    "eval": {"every_rounds": 1, "every_epochs": 0},
}


@pytest.fixture
def tiny_dict():
    return copy.deepcopy(TINY)


@pytest.fixture
def tiny_spec():
    def make(*overrides: str):
        return spec_from_dict(TINY, source="tiny", overrides=list(overrides))
    return make
