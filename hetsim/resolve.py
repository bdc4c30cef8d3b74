"""Resolve a spec into what a run needs, built once: the devices' time models, the policies, the
evaluating device, the surrogate curve and (lazily) the workload. `hetsim.config` holds the spec as
data and checks what the spec alone decides; this module is where it meets the rest of the package,
so every check that needs cluster, policies, workloads or the surrogate lives here, with the same
one-line `SpecError`s.

    spec = load_spec("examples/digits.toml", overrides=["seed=1"])   # schema + check: every error on load
    experiment = resolve(spec)
    experiment.devices[0].step_time.mean_s, experiment.evaluator, experiment.policies.scheduler
    experiment.workload                                                # loads the data on first use
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Sequence

from hetsim import config, policies
from hetsim.cluster import COLLECTIVES, DeviceModel, device_model
from hetsim.config import Spec, _require, worker_names
from hetsim.errors import SpecError
from hetsim.policies import base as registry
from hetsim.protocols import build_protocol
from hetsim.workloads import build_workload, check_batch_fits, check_workload, known_train_size
from hetsim.workloads.placement import check_placement

if TYPE_CHECKING:
    from hetsim.protocol import Protocol
    from hetsim.surrogate import LearningCurve
    from hetsim.workloads import Workload


class Policies(NamedTuple):
    scheduler: Any
    sampler: Any
    aggregator: Any
    selector: Any


@dataclass(frozen=True)
class Experiment:
    """A checked spec with what it resolves to. `workload` loads the data on first access only: a
    time-only run never reads it."""

    spec: Spec
    groups: tuple[DeviceModel, ...]    # the time model of each device group
    devices: tuple[DeviceModel, ...]   # one per device (a group's model repeated)
    policies: Policies
    evaluator: int                     # the device that evaluates the global model (eval.on)
    curve: LearningCurve | None        # sim.surrogate's learning curve, if one is set
    protocol: Protocol                 # when the server combines (hetsim.protocols)

    @functools.cached_property
    def workload(self) -> Workload:
        return build_workload(self.spec.workload)


def resolve(spec: Spec) -> Experiment:
    """Check `spec` (see `check`) and build everything a run of it needs, once."""
    return _resolve(spec)


def check(spec: Spec) -> None:
    """Every check of a spec that needs the rest of the package: the workload and its data files, batch
    sizes, profiles, the collective, the surrogate curve, the policies and the names their parameters
    give, eval.on. Raises a one-line SpecError naming the key (the caller prefixes the file)."""
    _resolve(spec)


def _resolve(spec: Spec) -> Experiment:
    w = spec.workload
    check_workload(w, need_files=spec.sim.fidelity != "time_only")
    check_batch_fits(w, spec.optim.batch_size)
    if spec.sim.fidelity == "time_only" and not w.n_train and known_train_size(w) is None:
        # epochs are samples / training-set size: a guessed size would make every epoch figure wrong
        raise SpecError(f"workload.n_train: expected the training-set size for a time-only run of "
                        f"{w.name} (it depends on data files a time-only run does not read), got 0")
    groups = tuple(build_groups(spec))  # validates every profile (positive step times, an entry, ...)
    net = spec.cluster.network
    _require(net.collective in COLLECTIVES, "cluster.network.collective", f"one of {sorted(COLLECTIVES)}",
             net.collective)
    curve = None
    if spec.sim.surrogate:
        from hetsim.surrogate import LearningCurve

        curve = LearningCurve.load(spec.sim.surrogate)
    built = build_policies(spec)
    _check_selector(spec, built.selector)
    protocol = build_protocol(spec)
    check_placement(spec, known_train_size(w), built.scheduler)
    kinds = list(dict.fromkeys(d.kind for d in spec.cluster.devices))
    device_names = list(dict.fromkeys(d.device for d in spec.cluster.devices))
    for category, policy in zip(Policies._fields, built):
        # parameters naming kinds, devices, workers or files must name ones this spec has: a misspelt
        # kind would silently switch the policy off
        registry.check_names(policy, f"{category}.params", kinds, device_names, spec.n_workers)
        if isinstance(policy, policies.ServerOptimizer):  # the base aggregator it builds from base_params, too
            registry.check_names(policy.base_aggregator, f"{category}.params.base_params", kinds, device_names,
                                 spec.n_workers)
    if curve is not None:  # once the policies are known valid: the warning compares them with the curve's
        curve.warn_if_not_fitted_for(spec)
    devices = tuple(m for m, d in zip(groups, spec.cluster.devices) for _ in range(d.count))
    evaluator = evaluator_index(spec, [d.step_time.mean_s for d in devices])
    return Experiment(spec, groups, devices, built, evaluator, curve, protocol)


#: protocols that dispatch every online worker as soon as it is free: nobody is left out of a round
EVERYONE_PROTOCOLS = ("async", "buffered_async")


def _check_selector(spec: Spec, selector: Any) -> None:
    """The selector fits the cluster (k <= its workers) and the protocol (one with rounds)."""
    try:
        selector.check_workers(spec.n_workers)
    except ValueError as e:
        raise SpecError(f"selector.params.{e}") from None
    if spec.protocol.name in EVERYONE_PROTOCOLS:
        _require(spec.selector.name == "all", "selector.name",
                 f"'all' under protocol {spec.protocol.name!r} (it has no rounds to select for)", spec.selector.name)


def evaluator_index(spec: Spec, mean_step_times_s: Sequence[float]) -> int:
    """The device `eval.on` names: `fastest` is the lowest profiled mean step time (ties: the lowest
    index), else a worker name as in the results (`cpu0`, `gpu1`); any other name is a SpecError."""
    names = worker_names(spec.worker_kinds())
    on = spec.eval.on
    _require(on == "fastest" or on in names, "eval.on", f"'fastest' or a worker of this cluster "
             f"({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})", on)
    if on != "fastest":
        return names.index(on)
    return min(range(len(mean_step_times_s)), key=lambda k: (mean_step_times_s[k], k))


def build_policies(spec: Spec) -> Policies:
    """The run's policy objects, built from the spec's names and parameters."""
    return Policies(*(policies.build(c, getattr(spec, c), where=c) for c in Policies._fields))


def build_devices(spec: Spec) -> list[DeviceModel]:
    """One time model per device group (profiles read once), repeated for each device of the group."""
    return [m for m, d in zip(build_groups(spec), spec.cluster.devices) for _ in range(d.count)]


def build_groups(spec: Spec) -> list[DeviceModel]:
    """The time model of each device group."""
    return [device_model(d, spec.workload.name, spec.optim.batch_size, f"cluster.devices[{i}]", spec.protocol.name)
            for i, d in enumerate(spec.cluster.devices)]


# --------------------------------------------------------------------------------------------
# Loading a spec to run: the schema (hetsim.config), then every check above
# --------------------------------------------------------------------------------------------


def spec_from_dict(data: Mapping[str, Any], source: str = "<dict>", base: Path | None = None,
                   overrides: Sequence[str] = ()) -> Spec:
    """Build and check a Spec from a raw table: relative paths (policy parameters naming files
    included) against `base` (default: the working folder); errors are prefixed with `source`."""
    raw = copy.deepcopy(dict(data))
    try:
        config.apply_overrides(raw, overrides)
        config.resolve_paths(raw, base or Path.cwd())
        _resolve_policy_files(raw, base or Path.cwd())
        spec = config.build_spec(raw)
        check(spec)
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None
    return spec


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> Spec:
    """Read, override and check a TOML spec. Raises SpecError with file, key and expectation."""
    path = Path(path)
    return spec_from_dict(config.read_toml(path), source=str(path), base=path.parent, overrides=overrides)


def replace(spec: Spec, overrides: Sequence[str]) -> Spec:
    """A copy of `spec` with `--set`-style overrides applied, and checked."""
    return spec_from_dict(config.spec_to_dict(spec), source=spec.name, overrides=overrides)


def _resolve_policy_files(data: dict[str, Any], base: Path) -> None:
    """Policy parameters declared as naming files (`NameRef('file')`) are relative to the config's folder too."""

    def absolute(v: Any) -> Any:
        return str((base / Path(v).expanduser()).resolve()) if isinstance(v, str) and v else v

    for category in Policies._fields:
        table = data.get(category)
        if not (isinstance(table, dict) and isinstance(table.get("name"), str)
                and isinstance(table.get("params"), dict)):
            continue
        try:
            cls = registry.policy_class(category, table["name"], category)
        except SpecError:
            continue  # the check reports the unknown name
        params = table["params"]
        nested = [(cls, params)]
        if issubclass(cls, policies.ServerOptimizer):  # and the base aggregator it builds from base_params
            name = params.get("base", next(f.default for f in dataclasses.fields(cls) if f.name == "base"))
            if isinstance(name, str) and isinstance(params.get("base_params"), dict):
                try:
                    nested.append((registry.policy_class("aggregator", name, "base"), params["base_params"]))
                except SpecError:
                    pass  # the check reports it
        for policy_cls, table_params in nested:
            for key, ref in policy_cls.name_refs.items():
                value = table_params.get(key)
                if ref.to == "file" and value is not None:
                    table_params[key] = [absolute(v) for v in value] if isinstance(value, list) else absolute(value)
