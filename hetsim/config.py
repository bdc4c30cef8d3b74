"""The experiment spec as data: frozen dataclasses, TOML in and out, `--set` overrides, paths and types.

A spec describes one run completely: workload, cluster, the three policies, optimisation, stop
criteria, evaluation and seed. This module knows nothing else of hetsim: it converts every value to
its declared type and checks what the spec alone decides (ranges, enumerations, at least one budget);
any problem raises `SpecError` with one line naming the file, the key and what was expected.

What needs the rest of the package (known workloads and data files, profiles, policies and their
parameters, the surrogate curve, `eval.on`) is checked by `hetsim.resolve`, which builds it once. Every
user-facing entry point loads a spec through `hetsim.load_spec` (`hetsim.resolve.load_spec`), which
does both; `load_spec` / `spec_from_dict` here stop at the schema (and leave a policy parameter that
names a file as written: only the policy registry knows which parameters do).

Example::

    spec = load_spec("examples/digits.toml", overrides=["optim.lr=0.05", "seed=3"])
    spec.cluster.devices[0].kind   # 'cpu'
"""

from __future__ import annotations

import copy
import dataclasses
from collections import abc
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from hetsim.errors import SpecError

# --------------------------------------------------------------------------------------------
# Spec dataclasses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadSpec:
    """Which model and data set every worker trains.

    name: a registered workload (`digits`, `fashion_mnist`, `cifar10`, `synthetic`).
    path: data directory for workloads that read local files ("" = the workload's default).
    n_train / n_test: use only the first n samples (0 = all), for quick experiments. A time-only run of
        a workload whose size depends on its files (shakespeare) needs n_train: the size it assumes.
    augment: random crop/flip on image workloads that support it.
    n_features / n_classes: shape of the synthetic task (ignored by the others).
    """

    name: str = "digits"
    path: str = ""
    n_train: int = 0
    n_test: int = 0
    augment: bool = True
    n_features: int = 32
    n_classes: int = 4


@dataclass(frozen=True)
class StepTimeSpec:
    """An inline step-time distribution (seconds per local step).

    dist: `constant` (always mean_s), `lognormal` (mean_s and std_s, moment-matched; never <= 0;
    std_s at most 3 x mean_s, see cluster.MAX_STEP_TIME_CV), or `empirical` (resample samples_s
    uniformly with replacement).
    """

    dist: str = "constant"
    mean_s: float = 0.0
    std_s: float = 0.0
    samples_s: tuple[float, ...] = ()


@dataclass(frozen=True)
class DeviceSpec:
    """A group of identical devices.

    kind: a label that policies may key on (`cpu`, `gpu`, ...).
    count: how many devices of this group.
    profile: a profile JSON file (`hetsim/profiles/FORMAT.md`) or `builtin:NAME`; its entry for the
        run's workload and batch size gives the step time. Exclusive with `step_time`.
    step_time: an inline step-time distribution instead of a profile.
    eval_time_s: seconds to evaluate the global model (the evaluating device's, eval.on, is charged); unset = the
        profile's, else 0.
    bandwidth_GBps / latency_s: this group's link; unset = the network's.
    overhead_s / overhead_per_arrival_s: what a combine costs beyond the alpha-beta exchange (the
        backend's control messages, tally gathers and Python, measured by `hetsim profile --config
        --exchange` for the run's protocol): fixed_s + per_arrival_s x the arrivals combined, charged at
        every combine (a world of one device too); unset = the profile's measurement, else 0.

    Changing conditions (both fidelities):
    slowdown: [[time_s, factor], ...] — from time_s on, every step takes `factor` x its profiled time
        (piecewise constant; 1 before the first entry).
    slowdown_trace: a CSV file with columns time_s,factor (a recorded trace); exclusive with slowdown.
    straggler_prob / straggler_factor: each step independently takes straggler_factor x longer with
        probability straggler_prob.
    offline: [[start_s, end_s], ...] — windows when the device is away. A device offline when a round
        starts sits that round out (it neither trains nor is averaged) and rejoins, with the latest
        global model, at the first round that starts after end_s.

    Real backend (`hetsim run`), one process per device:
    device: `cpu` or `cuda:i`.
    threads: torch threads of a cpu device's process (0 = this machine's cores / processes).
    emulated_slowdown: pad every step to this factor x its measured time, to make a heterogeneous
        cluster out of identical cores; results mark such devices as emulated.
    """

    kind: str = "cpu"
    count: int = 1
    profile: str = ""
    step_time: StepTimeSpec | None = None
    eval_time_s: float | None = None
    bandwidth_GBps: float | None = None
    latency_s: float | None = None
    overhead_s: float | None = None
    overhead_per_arrival_s: float | None = None
    slowdown: tuple[tuple[float, ...], ...] = ()
    slowdown_trace: str = ""
    straggler_prob: float = 0.0
    straggler_factor: float = 1.0
    offline: tuple[tuple[float, ...], ...] = ()
    device: str = "cpu"
    threads: int = 0
    emulated_slowdown: float = 1.0


@dataclass(frozen=True)
class NetworkSpec:
    """The model exchange. collective: `ring_allreduce`, `tree_allreduce` or `parameter_server` (formulas
    in cluster.py).

    bandwidth_schedule: [[time_s, GBps], ...] — from time_s on the network's bandwidth is GBps
    (piecewise constant; bandwidth_GBps before the first entry). Devices with their own
    bandwidth_GBps keep it.
    """

    collective: str = "ring_allreduce"
    bandwidth_GBps: float = 10.0
    latency_s: float = 20e-6
    bandwidth_schedule: tuple[tuple[float, ...], ...] = ()


@dataclass(frozen=True)
class ClusterSpec:
    name: str = ""
    devices: tuple[DeviceSpec, ...] = ()
    network: NetworkSpec = field(default_factory=NetworkSpec)


@dataclass(frozen=True)
class PolicySpec:
    """A policy by registered name (or `package.module:Class`) with its constructor parameters."""

    name: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimSpec:
    """Per-replica SGD. lr_schedule: `constant`, `step` (x gamma at each milestone, given as fractions of
    the run's budget, as the reference code's 60%/80%) or `cosine`."""

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 32
    lr_schedule: str = "constant"
    milestones: tuple[float, ...] = (0.6, 0.8)
    gamma: float = 0.1


@dataclass(frozen=True)
class StopSpec:
    """A run stops at the first budget reached. 0 = that budget is not set; at least one must be.

    target_accuracy: the accuracy for time_to_accuracy_s; with stop_at_target the run ends there.
    on_divergence: what to do when a round's training loss or global model becomes non-finite (NaN or
        inf; checked once per aggregation; time-only runs have no math to check). `stop` (default) ends
        the run after that round; `continue` runs on to the budget (to see what the curves do). Either
        way summary.json records `diverged_at_round` and `hetsim simulate` / `hetsim run` exit with
        status 3. (No `error` mode: a diverged run is a result, e.g. one row of a sweep.)
    """

    max_rounds: int = 0
    max_time_s: float = 0.0
    max_epochs: float = 0.0
    target_accuracy: float = 0.9
    stop_at_target: bool = False
    on_divergence: str = "stop"


@dataclass(frozen=True)
class EvalSpec:
    """Evaluate the global model every `every_rounds` rounds and/or each time another `every_epochs`
    of training samples has been processed (0 = off); the final model is always evaluated.

    on: where the global model is evaluated, and whose evaluation time is charged to the clock (the
        others wait): `fastest` (the device with the lowest profiled mean step time; ties: the first) or
        a worker name as in the results (`cpu0`, `gpu1`: the kind and the index within the kind).
        Every engine honours it; the real backend evaluates on that rank."""

    every_rounds: int = 0
    every_epochs: float = 0.25
    on: str = "fastest"


@dataclass(frozen=True)
class TraceSpec:
    """What goes to trace.json and decisions.bin (`[trace]`). The defaults keep both bounded at any
    scale: the trace holds about max_rounds x max_devices x 3 events (~1.5 MB), however long the run
    and large the cluster; the decisions are complete (a compressed record per round).

    max_rounds: keep trace events of the first N rounds only (0 = every round: grows with the run).
    max_devices: keep trace events of at most N devices, spread evenly over the cluster, plus the
        device that evaluates (0 = every device: grows with the cluster).
    decisions: write the per-worker decisions log (every round's workers, local steps, samples,
        biased samples, weights); parity checks and replays need it.
    """

    max_rounds: int = 100
    max_devices: int = 32
    decisions: bool = True


@dataclass(frozen=True)
class SimSpec:
    """How the simulator computes.

    fidelity: `emulated` runs every worker's real SGD math (accuracy is real); `time_only` runs the
        same model and policies without math, for clusters far larger than this machine (no accuracy;
        see hetsim/sim/engine.py for the stand-ins it uses).
    batched: run the local steps of replicas that share an architecture as one batched computation
        (torch.func.vmap over stacked parameters); equal to the per-replica loop within float
        round-off. Models with BatchNorm fall back to the loop.
    surrogate: a learning curve (`hetsim surrogate`, hetsim/surrogate.py) that gives a time-only run an
        accuracy at each evaluation, within the epochs it was fitted on (NaN beyond: no extrapolation).
    threads: torch threads of a simulated run (0 = one). The models are tiny: more threads than one
        oversubscribe the cores and spin (measured: the quickstart took 143-353 s on 2 cores beside one
        other busy process with torch's default, 33 s with one thread), and a sweep runs one per core.
    """

    fidelity: str = "emulated"
    batched: bool = False
    surrogate: str = ""
    threads: int = 0


@dataclass(frozen=True)
class RunSpec:
    """The real backend.

    fault_timeout_s: a worker that makes no progress for this long (a hang, or a crashed peer) ends
        the run with an error naming the device and the round.
    checkpoint_every: rounds between checkpoints (0 = none); `--resume RUN_DIR` continues from the last.
    """

    fault_timeout_s: float = 120.0
    checkpoint_every: int = 0


@dataclass(frozen=True)
class Spec:
    name: str = "run"
    seed: int = 0
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    scheduler: PolicySpec = field(default_factory=lambda: PolicySpec("proportional"))
    sampler: PolicySpec = field(default_factory=lambda: PolicySpec("uniform"))
    aggregator: PolicySpec = field(default_factory=lambda: PolicySpec("mean"))
    # when the server combines: sync (a barrier), semi_sync, async, buffered_async (hetsim.protocols)
    protocol: PolicySpec = field(default_factory=lambda: PolicySpec("sync"))
    # who takes part in a round: all, uniform k of n, speed-aware, utility (hetsim.policies.selection)
    selector: PolicySpec = field(default_factory=lambda: PolicySpec("all"))
    # where each worker's training data comes from: shared, iid, dirichlet, per_kind, authors
    # (hetsim.workloads.placement)
    data: PolicySpec = field(default_factory=lambda: PolicySpec("shared"))
    optim: OptimSpec = field(default_factory=OptimSpec)
    stop: StopSpec = field(default_factory=StopSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    trace: TraceSpec = field(default_factory=TraceSpec)
    sim: SimSpec = field(default_factory=SimSpec)
    run: RunSpec = field(default_factory=RunSpec)

    @property
    def n_workers(self) -> int:
        return sum(d.count for d in self.cluster.devices)

    def worker_kinds(self) -> list[str]:
        return [d.kind for d in self.cluster.devices for _ in range(d.count)]

    def worker_devices(self) -> list[DeviceSpec]:
        return [d for d in self.cluster.devices for _ in range(d.count)]


# --------------------------------------------------------------------------------------------
# Generic conversion: a TOML table -> a frozen dataclass, checking keys and types
# --------------------------------------------------------------------------------------------


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a table"
    if origin in (dict, abc.Mapping) or tp in (dict, abc.Mapping):
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def convert(tp: Any, value: Any, where: str) -> Any:
    """Convert a TOML value to type `tp`; `where` names the key for the error message."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for a in args:
            try:
                return convert(a, value, where)
            except SpecError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise SpecError(f"{where}: expected a table, got {value!r}")
        return build_dataclass(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{where}: expected {_describe(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, abc.Mapping) or tp in (dict, abc.Mapping):
        if not isinstance(value, Mapping):
            raise SpecError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise SpecError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported spec type {tp!r} at {where}")  # a bug in hetsim, not in the config


def build_dataclass(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise SpecError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        expected = (f"expected one of: {', '.join(sorted(names))}" if names
                    else f"{getattr(cls, 'registered_name', cls.__name__)} takes no parameters")
        raise SpecError(f"{key}: unknown key ({expected})")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = convert(hints[name], value, key)
    required = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in data
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:  # a parameter without a default (a selector's k): named, not a TypeError's text
        key = f"{where}.{required[0]}" if where else required[0]
        raise SpecError(f"{key}: required ({getattr(cls, 'registered_name', cls.__name__)} has no default for it)")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        # policies raise "param: expected ..." (or "param.key: ..." below a table parameter); join it to the
        # key path: "sampler.params.param: ..."
        field_name = str(e).split(":", 1)[0].split(".", 1)[0]
        sep = "." if field_name in names and where else ": "
        raise SpecError(f"{where or cls.__name__}{sep}{e}") from None


# --------------------------------------------------------------------------------------------
# Checks the spec decides alone (hetsim.resolve checks what needs the rest of the package)
# --------------------------------------------------------------------------------------------


def _require(cond: bool, key: str, expected: str, got: Any) -> None:
    if not cond:
        raise SpecError(f"{key}: expected {expected}, got {got!r}")


def _check_schedule(pairs: Sequence[Sequence[float]], key: str, what: str) -> None:
    """[[time_s, value], ...] with increasing times >= 0 and values > 0."""
    _require(all(len(p) == 2 for p in pairs), key, f"a list of [time_s, {what}] pairs", [list(p) for p in pairs])
    times = [p[0] for p in pairs]
    _require(all(t >= 0 for t in times) and times == sorted(times) and len(set(times)) == len(times), key,
             "strictly increasing times >= 0", times)
    _require(all(p[1] > 0 for p in pairs), key, f"every {what} > 0", [p[1] for p in pairs])


def _check_windows(windows: Sequence[Sequence[float]], key: str) -> None:
    _require(all(len(w) == 2 and 0 <= w[0] < w[1] for w in windows), key,
             "a list of [start_s, end_s] windows with 0 <= start < end", [list(w) for w in windows])
    _require(all(a[1] <= b[0] for a, b in zip(windows, windows[1:])), key, "ordered, non-overlapping windows",
             [list(w) for w in windows])


def check_schema(spec: Spec) -> None:
    """Every check the spec decides alone (ranges, enumerations, budgets); hetsim.resolve.check does the
    rest, after these."""
    _require(spec.seed >= 0, "seed", "an integer >= 0", spec.seed)
    # before the profiles, which are per batch size: a batch size of 0 would otherwise be reported as a
    # profile without an entry for it
    _require(spec.optim.batch_size >= 1, "optim.batch_size", "an integer >= 1", spec.optim.batch_size)

    devices = spec.cluster.devices
    _require(len(devices) > 0, "cluster.devices", "at least one device group", list(devices))
    for i, d in enumerate(devices):
        key = f"cluster.devices[{i}]"
        _require(d.count >= 1, f"{key}.count", "an integer >= 1", d.count)
        _require(bool(d.kind), f"{key}.kind", "a non-empty label such as 'cpu' or 'gpu'", d.kind)
        _require(d.bandwidth_GBps is None or d.bandwidth_GBps > 0, f"{key}.bandwidth_GBps", "a number > 0",
                 d.bandwidth_GBps)
        _require(d.latency_s is None or d.latency_s >= 0, f"{key}.latency_s", "a number >= 0", d.latency_s)
        for field in ("overhead_s", "overhead_per_arrival_s"):
            v = getattr(d, field)
            _require(v is None or v >= 0, f"{key}.{field}", "a number >= 0 (seconds)", v)
        _require(d.eval_time_s is None or d.eval_time_s >= 0, f"{key}.eval_time_s", "a number >= 0",
                 d.eval_time_s)
        _require(bool(d.profile) != (d.step_time is not None), f"{key}",
                 "exactly one of 'profile' or 'step_time'", {"profile": d.profile, "step_time": d.step_time})
        _require(0 <= d.straggler_prob <= 1, f"{key}.straggler_prob", "a probability in [0, 1]", d.straggler_prob)
        _require(d.straggler_factor >= 1, f"{key}.straggler_factor", "a factor >= 1", d.straggler_factor)
        _require(not (d.slowdown and d.slowdown_trace), f"{key}", "at most one of 'slowdown' or 'slowdown_trace'",
                 d.slowdown_trace)
        _check_schedule(d.slowdown, f"{key}.slowdown", "factor")
        _require(d.device == "cpu" or (d.device.startswith("cuda") and d.device[4:5] in ("", ":")),
                 f"{key}.device", "'cpu' or 'cuda:INDEX'", d.device)
        _require(d.threads >= 0, f"{key}.threads", "an integer >= 0", d.threads)
        _require(d.emulated_slowdown >= 1, f"{key}.emulated_slowdown", "a factor >= 1", d.emulated_slowdown)
        _check_windows(d.offline, f"{key}.offline")
    net = spec.cluster.network
    _require(net.bandwidth_GBps > 0, "cluster.network.bandwidth_GBps", "a number > 0", net.bandwidth_GBps)
    _require(net.latency_s >= 0, "cluster.network.latency_s", "a number >= 0", net.latency_s)
    _check_schedule(net.bandwidth_schedule, "cluster.network.bandwidth_schedule", "bandwidth in GB/s")
    _require(spec.sim.fidelity in ("emulated", "time_only"), "sim.fidelity", "'emulated' or 'time_only'",
             spec.sim.fidelity)
    _require(spec.sim.threads >= 0, "sim.threads", "an integer >= 0 (0 = one per simulated run)", spec.sim.threads)
    if spec.sim.surrogate:
        _require(spec.sim.fidelity == "time_only", "sim.surrogate", "fidelity 'time_only' (emulated runs have "
                 "real accuracy)", spec.sim.fidelity)

    o = spec.optim
    _require(o.lr > 0, "optim.lr", "a number > 0", o.lr)
    _require(0 <= o.momentum < 1, "optim.momentum", "a number in [0, 1)", o.momentum)
    _require(o.weight_decay >= 0, "optim.weight_decay", "a number >= 0", o.weight_decay)
    _require(o.lr_schedule in ("constant", "step", "cosine"), "optim.lr_schedule",
             "one of 'constant', 'step', 'cosine'", o.lr_schedule)
    _require(all(0 < m < 1 for m in o.milestones) and list(o.milestones) == sorted(o.milestones),
             "optim.milestones", "increasing fractions of the budget in (0, 1)", list(o.milestones))
    _require(0 < o.gamma <= 1, "optim.gamma", "a number in (0, 1]", o.gamma)

    s = spec.stop
    _require(s.max_rounds >= 0, "stop.max_rounds", "an integer >= 0", s.max_rounds)
    _require(s.max_time_s >= 0, "stop.max_time_s", "a number >= 0", s.max_time_s)
    _require(s.max_epochs >= 0, "stop.max_epochs", "a number >= 0", s.max_epochs)
    _require(s.max_rounds > 0 or s.max_time_s > 0 or s.max_epochs > 0, "stop",
             "at least one of max_rounds, max_time_s, max_epochs > 0", dict(dataclasses.asdict(s)))
    _require(0 < s.target_accuracy <= 1, "stop.target_accuracy", "a number in (0, 1]", s.target_accuracy)
    _require(s.on_divergence in ("stop", "continue"), "stop.on_divergence", "'stop' or 'continue'", s.on_divergence)

    e = spec.eval
    _require(e.every_rounds >= 0, "eval.every_rounds", "an integer >= 0", e.every_rounds)
    _require(e.every_epochs >= 0, "eval.every_epochs", "a number >= 0", e.every_epochs)
    _require(e.every_rounds > 0 or e.every_epochs > 0, "eval",
             "every_rounds > 0 or every_epochs > 0", dataclasses.asdict(e))
    _require(spec.trace.max_rounds >= 0, "trace.max_rounds", "an integer >= 0", spec.trace.max_rounds)
    _require(spec.trace.max_devices >= 0, "trace.max_devices", "an integer >= 0", spec.trace.max_devices)
    _require(spec.run.fault_timeout_s > 0, "run.fault_timeout_s", "a number of seconds > 0", spec.run.fault_timeout_s)
    _require(spec.run.checkpoint_every >= 0, "run.checkpoint_every", "an integer >= 0", spec.run.checkpoint_every)


def worker_names(kinds: Sequence[str]) -> list[str]:
    """cpu0, cpu1, gpu0, ... in worker order (the names results use)."""
    seen: dict[str, int] = {}
    out = []
    for kind in kinds:
        out.append(f"{kind}{seen.get(kind, 0)}")
        seen[kind] = seen.get(kind, 0) + 1
    return out


# --------------------------------------------------------------------------------------------
# Loading, overrides, paths
# --------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.0.c=value` -> (['a', 'b', '0', 'c'], value); the value is read as TOML, else as a string."""
    if "=" not in text:
        raise SpecError(f"--set {text!r}: expected KEY=VALUE, e.g. optim.lr=0.05")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise SpecError(f"--set {text!r}: expected a dotted key such as optim.lr")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set dotted keys in a raw spec table; list items are addressed by index (cluster.devices.1.count)."""
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise SpecError(f"--set {text}: {where}: expected an index below {len(node)}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise SpecError(f"--set {text}: {where}: {'.'.join(parts[:depth])} is not a table")
    return data


def resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make relative data, profile, trace and surrogate paths absolute, relative to the config file's folder
    (hetsim.resolve does the policy parameters that name files)."""
    for table, key in (("workload", "path"), ("sim", "surrogate")):
        t = data.get(table)
        if isinstance(t, dict) and isinstance(t.get(key), str) and t[key]:
            t[key] = str((base / Path(t[key]).expanduser()).resolve())
    cluster = data.get("cluster")
    if isinstance(cluster, dict) and isinstance(cluster.get("devices"), list):
        for d in cluster["devices"]:
            p = d.get("profile") if isinstance(d, dict) else None
            if isinstance(p, str) and p and not p.startswith("builtin:"):
                d["profile"] = str((base / Path(p).expanduser()).resolve())
            t = d.get("slowdown_trace") if isinstance(d, dict) else None
            if isinstance(t, str) and t:
                d["slowdown_trace"] = str((base / Path(t).expanduser()).resolve())


def spec_from_dict(data: Mapping[str, Any], source: str = "<dict>", base: Path | None = None,
                   overrides: Sequence[str] = ()) -> Spec:
    """Build a Spec from a raw table and check its schema; errors are prefixed with `source`. A spec to
    run goes through hetsim.resolve.spec_from_dict, which checks the rest too."""
    raw = copy.deepcopy(dict(data))
    try:
        apply_overrides(raw, overrides)
        resolve_paths(raw, base or Path.cwd())
        return build_spec(raw)
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None


def build_spec(raw: Mapping[str, Any]) -> Spec:
    """The dataclasses of a raw table whose overrides and paths are applied, schema checked."""
    spec = build_dataclass(Spec, raw)
    check_schema(spec)
    return spec


def parse_spec(config: Mapping[str, Any], source: str = "<dict>") -> Spec:
    """A run folder's config.toml as a Spec: types converted, nothing checked. It was checked when the
    run started; reading the run back must not need its data, profiles or policy code (they may be gone)."""
    try:
        return build_dataclass(Spec, copy.deepcopy(dict(config)))
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """A config file's raw tables; a missing file or bad TOML raises SpecError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such config file")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> Spec:
    """Read, override and schema-check a TOML spec (hetsim.load_spec checks everything)."""
    path = Path(path)
    return spec_from_dict(read_toml(path), source=str(path), base=path.parent, overrides=overrides)


def spec_to_dict(spec: Spec) -> dict[str, Any]:
    """The fully resolved spec as plain tables (None values dropped: TOML has no null)."""

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return clean(dataclasses.asdict(spec))


def replace(spec: Spec, overrides: Sequence[str]) -> Spec:
    """A copy of `spec` with `--set`-style overrides applied, schema checked (hetsim.resolve.replace: all)."""
    return spec_from_dict(spec_to_dict(spec), source=spec.name, overrides=overrides)


# --------------------------------------------------------------------------------------------
# A minimal TOML writer for resolved specs (tables, arrays of tables, scalars, lists of scalars)
# --------------------------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        escaped = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def to_toml(data: Mapping[str, Any]) -> str:
    lines: list[str] = []

    def is_table_list(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    def emit(table: Mapping[str, Any], prefix: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and not is_table_list(v)}
        for k, v in scalars.items():
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in table.items():
            name = f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k)
            if isinstance(v, dict):
                lines.append("")
                lines.append(f"[{name}]")
                emit(v, name)
            elif is_table_list(v):
                for item in v:
                    lines.append("")
                    lines.append(f"[[{name}]]")
                    emit(item, name)

    emit(data, "")
    return "\n".join(lines).lstrip("\n") + "\n"
