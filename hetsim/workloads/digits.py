"""The embedded default: scikit-learn's bundled 8x8 handwritten digits (1,797 images) and an MLP.

Real data that ships inside scikit-learn, so the quickstart needs no download. A fixed stratified
80/20 split (1,437 train / 360 test), independent of the run's seed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hetsim.config import WorkloadSpec
from hetsim.workloads.base import Workload, WorkloadEntry, register_workload
from hetsim.workloads.models import mlp

SPLIT_SEED = 20250811


def build(spec: WorkloadSpec) -> Workload:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=SPLIT_SEED, stratify=y)
    return Workload(
        name="digits",
        train_x=torch.from_numpy(x_tr), train_y=torch.from_numpy(y_tr),
        test_x=torch.from_numpy(x_te), test_y=torch.from_numpy(y_te),
        n_classes=10,
        make_model=lambda: model(spec),
        prepare=lambda xb, train, gen: xb,
    )


def model(spec: WorkloadSpec) -> nn.Module:
    return mlp(64, 64, 10)


register_workload("digits", WorkloadEntry(build, model, description="scikit-learn's bundled digits", n_train=1437))
