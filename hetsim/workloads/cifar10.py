"""CIFAR-10 from a local copy in the standard python-batches format, with ResNet-20 (the paper's workload).

`workload.path` is the `cifar-10-batches-py` folder: `data_batch_1` ... `data_batch_5` and `test_batch`,
each a pickle of {b"data": uint8 [N, 3072], b"labels": [N]}. CIFAR-10 cannot be downloaded here;
point the path at a copy. Augmentation as the reference: RandomCrop(32, padding 4) + horizontal flip,
normalised with mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hetsim.config import WorkloadSpec
from hetsim.workloads.base import Workload, WorkloadEntry, data_path, register_workload
from hetsim.workloads.models import ResNet20
from hetsim.workloads.transforms import normalise, random_crop_flip

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    data = np.asarray(d[b"data"], dtype=np.uint8)
    labels = np.asarray(d[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"{path.name}: expected data [N, 3072] and N labels, got {data.shape} / {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def build(spec: WorkloadSpec) -> Workload:
    root = data_path(spec)
    parts = [read_batch(root / f) for f in TRAIN_FILES]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = read_batch(root / TEST_FILE)
    augment = spec.augment

    def prepare(xb: torch.Tensor, train: bool, gen: torch.Generator | None) -> torch.Tensor:
        x = normalise(xb, MEAN, STD)
        return random_crop_flip(x, 4, gen) if (train and augment) else x

    return Workload("cifar10", torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte),
                    torch.from_numpy(yte), 10, make_model=lambda: model(spec), prepare=prepare)


def model(spec: WorkloadSpec) -> nn.Module:
    return ResNet20(10)


register_workload("cifar10", WorkloadEntry(
    build, model, default_path="data/cifar-10-batches-py",
    required_files=tuple((f,) for f in (*TRAIN_FILES, TEST_FILE)),
    description="the cifar-10-batches-py folder of the python version of CIFAR-10", n_train=50000))
