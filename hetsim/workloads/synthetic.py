"""A synthetic classification task for fast tests: Gaussian classes in n_features dimensions.

Class centres are drawn once from a fixed seed; samples are centre + unit noise, so the task is
learnable but not trivially separable. Defaults: 2,048 train / 512 test samples.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hetsim.config import WorkloadSpec
from hetsim.workloads.base import Workload, WorkloadEntry, register_workload
from hetsim.workloads.models import mlp

DATA_SEED = 7


def build(spec: WorkloadSpec) -> Workload:
    rng = np.random.default_rng(DATA_SEED)
    n_train = spec.n_train or 2048
    n_test = spec.n_test or 512
    centres = rng.normal(0.0, 1.5 / np.sqrt(spec.n_features) * 2, (spec.n_classes, spec.n_features))

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = rng.integers(0, spec.n_classes, n)
        x = centres[y] + rng.normal(0.0, 1.0, (n, spec.n_features)) * 0.8
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    return Workload("synthetic", x_tr, y_tr, x_te, y_te, spec.n_classes,
                    make_model=lambda: model(spec),
                    prepare=lambda xb, train, gen: xb)


def model(spec: WorkloadSpec) -> nn.Module:
    return mlp(spec.n_features, 32, spec.n_classes)


register_workload("synthetic", WorkloadEntry(build, model, description="Gaussian classes, generated"))
