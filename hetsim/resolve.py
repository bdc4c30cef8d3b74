"""Resolve a spec into what a run needs: the devices' time models (and, in time, the policies and
the workload), built once. `hetsim.config` holds the spec as data; this module is where it meets the
rest of the package."""

from __future__ import annotations

from typing import Any, NamedTuple

from hetsim import policies
from hetsim.cluster import DeviceModel, device_model
from hetsim.config import Spec


class Policies(NamedTuple):
    scheduler: Any
    sampler: Any
    aggregator: Any


def build_policies(spec: Spec) -> Policies:
    """The run's three policy objects, built from the spec's names and parameters."""
    return Policies(*(policies.build(c, getattr(spec, c), where=c) for c in ("scheduler", "sampler", "aggregator")))


def build_devices(spec: Spec) -> list[DeviceModel]:
    """One time model per device group (profiles read once), repeated for each device of the group."""
    return [m for m, d in zip(build_groups(spec), spec.cluster.devices) for _ in range(d.count)]


def build_groups(spec: Spec) -> list[DeviceModel]:
    """The time model of each device group."""
    return [device_model(d, spec.workload.name, spec.optim.batch_size, f"cluster.devices[{i}]")
            for i, d in enumerate(spec.cluster.devices)]
