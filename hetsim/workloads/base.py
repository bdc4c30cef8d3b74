"""The workload interface and registry. A module of its own: the built-in workloads register here
without importing the package's __init__, which imports them (an import cycle otherwise)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from hetsim.config import WorkloadSpec


@dataclass
class Workload:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    n_classes: int
    make_model: Callable[[], nn.Module]
    #: (raw batch, train?, generator) -> model input; augmentation only when train is True
    prepare: Callable[[torch.Tensor, bool, torch.Generator | None], torch.Tensor]

    @property
    def n_train(self) -> int:
        return len(self.train_y)


@dataclass(frozen=True)
class WorkloadEntry:
    build: Callable[[WorkloadSpec], Workload]
    model: Callable[[WorkloadSpec], nn.Module]   # the architecture, without loading any data
    default_path: str = ""        # "" = needs no files
    required_files: tuple[tuple[str, ...], ...] = ()  # alternatives per needed file
    description: str = ""
    n_train: int = 0              # training-set size, known without loading (for the time-only fidelity)
    required_glob: str = ""       # at least one file matching this pattern must be in the data folder


WORKLOADS: dict[str, WorkloadEntry] = {}


def register_workload(name: str, entry: WorkloadEntry) -> None:
    WORKLOADS[name] = entry


def data_path(spec: WorkloadSpec) -> Path:
    return Path(spec.path or WORKLOADS[spec.name].default_path)
