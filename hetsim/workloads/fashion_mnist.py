"""Fashion-MNIST (Xiao et al. 2017) from its IDX files, with a small CNN.

Reads `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
`t10k-labels-idx1-ubyte`, each optionally gzipped, from `workload.path` (default: where Debian's
`dataset-fashion-mnist` installs them). The same reader serves MNIST files.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hetsim.config import WorkloadSpec
from hetsim.workloads.base import Workload, WorkloadEntry, data_path, register_workload
from hetsim.workloads.models import small_cnn
from hetsim.workloads.transforms import normalise, random_crop_flip

DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MEAN, STD = (0.2860,), (0.3530,)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (LeCun's format: magic 0x0000 + dtype 0x08 + ndim, big-endian sizes, data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path.name}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path.name}: header says {shape} but holds {data.size} bytes")
    return data.reshape(shape)


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{name}[.gz] not in {root}")


def build(spec: WorkloadSpec) -> Workload:
    root = data_path(spec)
    xtr, ytr, xte, yte = (read_idx(_find(root, f)) for f in FILES)
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ValueError("image and label files have different lengths")
    augment = spec.augment

    def prepare(xb: torch.Tensor, train: bool, gen: torch.Generator | None) -> torch.Tensor:
        x = normalise(xb, MEAN, STD)
        return random_crop_flip(x, 2, gen) if (train and augment) else x

    return Workload(
        name="fashion_mnist",
        train_x=torch.from_numpy(xtr.copy()).unsqueeze(1), train_y=torch.from_numpy(ytr.astype(np.int64)),
        test_x=torch.from_numpy(xte.copy()).unsqueeze(1), test_y=torch.from_numpy(yte.astype(np.int64)),
        n_classes=10, make_model=lambda: model(spec), prepare=prepare,
    )


def model(spec: WorkloadSpec) -> nn.Module:
    return small_cnn(1, 10, 28)


register_workload("fashion_mnist", WorkloadEntry(
    build, model, default_path=DEFAULT_PATH, required_files=tuple((f, f"{f}.gz") for f in FILES),
    description="IDX files; on Debian: apt-get install dataset-fashion-mnist", n_train=60000))
