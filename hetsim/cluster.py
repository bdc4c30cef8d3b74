"""Devices, speed profiles and links: where the simulator's clock comes from.

A *profile* is what `hetsim profile` measures on a real device: for each (workload, batch size)
the distribution of one local step's duration, and the cost of an evaluation. The file format
is documented in `hetsim/profiles/FORMAT.md`; built-in profiles are referenced as `builtin:NAME`.
The exchange cost model is the standard alpha-beta model of collectives:

- ring all-reduce over n workers, model of S bytes, slowest link B bytes/s, per-hop latency a:
  T = 2(n-1)·a + 2(n-1)/n · S/B   (reduce-scatter then all-gather; Patarasuk & Yuan 2009)
- parameter server, server link B_s, slowest worker link B_w:
  T = 2·a + 2·max(n·S/B_s, S/B_w)  (every worker pushes and pulls S through the server)
- tree all-reduce (reduce then broadcast along a binary tree, pipelined as NCCL's trees):
  T = 2·ceil(log2 n)·a + 2(n-1)/n · S/B  (latency grows with log n instead of n)

Under the event-driven protocols (semi_sync, async, buffered_async) the models go through the server
whatever `collective` says (as in the real backend: each arrival pushes its replica to the server and
pulls the global model back), so an update combining n arrivals costs the parameter-server time above,
with n = the arrivals: one arrival pays 2·a + 2·S/B, not nothing.

Every combine also pays the backend's own per-combine overhead, which the alpha-beta terms do not see
(control broadcasts, the tally gather, the aggregator's Python, the server's turnaround):
  O = fixed + per_arrival·n
measured on the real backend by `hetsim profile --config --exchange` per protocol (the profile entry's
in_run[protocol].overhead), or set per device group (overhead_s, overhead_per_arrival_s); the largest of the
participating groups' is charged. It is charged when n = 1 too: a world of one process still pays its
round's bookkeeping.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hetsim.config import DeviceSpec, NetworkSpec, StepTimeSpec, convert
from hetsim.errors import SpecError

PROFILE_FORMAT = "hetsim-profile/1"
BUILTIN_PROFILES = Path(__file__).parent / "profiles"
COLLECTIVES = ("ring_allreduce", "tree_allreduce", "parameter_server")
DISTRIBUTIONS = ("constant", "lognormal", "empirical")
#: Largest std/mean (coefficient of variation, cv) of a lognormal step time. A moment-matched lognormal
#: has median mean/sqrt(1 + cv²), and the sum of n steps has std/mean cv/sqrt(n): the mean is carried by
#: rare huge steps. At cv = 3 the typical step is 0.32 x the mean and a round of 9 local steps still
#: varies by ±100%; beyond that the declared mean says little about any round. (Measured step times have
#: cv well under 1; rare slow steps are modelled by straggler_prob / straggler_factor.)
MAX_STEP_TIME_CV = 3.0


@dataclass(frozen=True)
class StepTimeModel:
    """A distribution of positive durations in seconds. `sample` never returns a value <= 0."""

    dist: str
    mean_s: float
    std_s: float = 0.0
    samples_s: tuple[float, ...] = ()

    def scaled(self, factor: float) -> "StepTimeModel":
        """The same distribution, every step `factor` times as long."""
        return StepTimeModel(self.dist, self.mean_s * factor, self.std_s * factor,
                             tuple(x * factor for x in self.samples_s))

    @classmethod
    def from_spec(cls, spec: StepTimeSpec, where: str) -> "StepTimeModel":
        if spec.dist not in DISTRIBUTIONS:
            raise SpecError(f"{where}.dist: expected one of {list(DISTRIBUTIONS)}, got {spec.dist!r}")
        if spec.dist == "empirical":
            if not spec.samples_s:
                raise SpecError(f"{where}.samples_s: expected a non-empty list of step times for dist 'empirical'")
            bad = [s for s in spec.samples_s if not s > 0]
            if bad:
                raise SpecError(f"{where}.samples_s: expected step times > 0, got {bad[0]!r}")
            samples = tuple(float(s) for s in spec.samples_s)
            return cls("empirical", float(np.mean(samples)), float(np.std(samples)), samples)
        if not spec.mean_s > 0:
            raise SpecError(f"{where}.mean_s: expected a step time > 0 seconds, got {spec.mean_s!r}")
        if spec.std_s < 0:
            raise SpecError(f"{where}.std_s: expected a number >= 0, got {spec.std_s!r}")
        if spec.dist == "constant":
            if spec.std_s:
                raise SpecError(f"{where}.std_s: expected 0 for dist 'constant' (did you mean dist = 'lognormal'?), "
                                f"got {spec.std_s!r}")
            return cls("constant", spec.mean_s, 0.0)
        cv = spec.std_s / spec.mean_s
        if cv > MAX_STEP_TIME_CV:
            raise SpecError(f"{where}.std_s: expected at most {MAX_STEP_TIME_CV:g} x mean_s = "
                            f"{MAX_STEP_TIME_CV * spec.mean_s:.6g} (a lognormal with std/mean = {cv:.3g} has half its "
                            f"steps below {1 / math.sqrt(1 + cv * cv):.2g} x mean, its mean carried by rare huge steps; "
                            f"model rare slow steps with straggler_prob/straggler_factor), got {spec.std_s!r}")
        return cls("lognormal", spec.mean_s, spec.std_s)

    def sample(self, rng: np.random.Generator) -> float:
        if self.dist == "constant" or (self.dist == "lognormal" and self.std_s == 0):
            return self.mean_s
        if self.dist == "lognormal":
            # Moment-matched: E[X] = mean_s, Std[X] = std_s.
            sigma2 = math.log1p((self.std_s / self.mean_s) ** 2)
            return float(rng.lognormal(math.log(self.mean_s) - sigma2 / 2, math.sqrt(sigma2)))
        return self.samples_s[int(rng.integers(len(self.samples_s)))]

    def sample_many(self, rng: np.random.Generator, shape: int | tuple[int, ...]) -> np.ndarray:
        """Independent draws of `sample`'s distribution in an array of `shape` (one numpy call, so not
        the same stream of numbers as calling `sample` that many times)."""
        if self.dist == "constant" or (self.dist == "lognormal" and self.std_s == 0):
            return np.full(shape, self.mean_s)
        if self.dist == "lognormal":
            sigma2 = math.log1p((self.std_s / self.mean_s) ** 2)
            # exp(mu + sigma Z), as rng.lognormal draws it, but with numpy's vectorised exp (faster on arrays)
            d = rng.standard_normal(shape)
            d *= math.sqrt(sigma2)
            d += math.log(self.mean_s) - sigma2 / 2
            return np.exp(d, out=d)
        return np.asarray(self.samples_s)[rng.integers(len(self.samples_s), size=shape)]


def _piecewise(pairs: Sequence[Sequence[float]], t: float, default: float) -> float:
    """Value of a piecewise-constant schedule [[time, value], ...] at time t."""
    value = default
    for start, v in pairs:
        if start > t:
            break
        value = v
    return value


@dataclass(frozen=True)
class DeviceModel:
    """One device's time model for one workload and batch size, resolved from its spec/profile,
    with its changing conditions (slowdowns over time, stragglers, offline windows)."""

    kind: str
    step_time: StepTimeModel
    eval_time_s: float
    bandwidth_Bps: float | None  # None = the network's
    latency_s: float | None
    source: str  # where the numbers come from: 'inline', 'assumed: ...', 'measured: <hardware>'
    slowdown: tuple[tuple[float, float], ...] = ()
    straggler_prob: float = 0.0
    straggler_factor: float = 1.0
    offline: tuple[tuple[float, float], ...] = ()
    overhead_s: float = 0.0  # per combine, beyond the alpha-beta exchange (module docstring)
    overhead_per_arrival_s: float = 0.0

    def slowdown_at(self, t: float) -> float:
        return _piecewise(self.slowdown, t, 1.0)

    def online_at(self, t: float) -> bool:
        return not any(start <= t < end for start, end in self.offline)

    def back_online(self, t: float) -> float:
        """When a device offline at t returns (t itself if it is online)."""
        return next((end for start, end in self.offline if start <= t < end), t)

    def draw_step(self, rng: np.random.Generator, t: float) -> float:
        """Duration of one local step starting at time t."""
        d = self.step_time.sample(rng) * self.slowdown_at(t)
        if self.straggler_prob > 0 and rng.random() < self.straggler_prob:
            d *= self.straggler_factor
        return d

    def draw_steps(self, rng: np.random.Generator, shape: int | tuple[int, ...], t: float) -> np.ndarray:
        """Durations of independent local steps in an array of `shape`: `draw_step`'s distribution (the
        profile's draw x the slowdown in force at time t x a straggler factor drawn per step)."""
        d = self.step_time.sample_many(rng, shape) * self.slowdown_at(t)
        if self.straggler_prob > 0:
            d = np.where(rng.random(shape) < self.straggler_prob, d * self.straggler_factor, d)
        return d

    def step_moments(self, t: float) -> tuple[float, float]:
        """(mean, std) of one step's duration drawn at time t (`draw_step`), stragglers included."""
        factor = self.slowdown_at(t)
        m, s = self.step_time.mean_s * factor, self.step_time.std_s * factor
        p, f = self.straggler_prob, self.straggler_factor
        mean = m * (1 - p + p * f)
        second = (s * s + m * m) * (1 - p + p * f * f)  # E[X^2] of the two-point mixture
        return mean, math.sqrt(max(second - mean * mean, 0.0))


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container's cpuset, a batch job's share,
    taskset), not the host's count, which would oversubscribe a node whose job got only part of it."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


BUDGET_RTOL = 1e-9


def within_budget(elapsed_s: float, budget_s: float) -> bool:
    """Whether a worker with a time budget starts another step: while less than the budget has elapsed
    since its round began. A relative tolerance absorbs float drift: summing a constant step time k times
    can land a hair below k x the step (0.04 + 0.04 < 0.08 is False, but 0.1 + 0.1 + 0.1 < 0.3 is True),
    which would add a step the budget does not allow."""
    return elapsed_s < budget_s * (1 - BUDGET_RTOL)


def read_slowdown_trace(path: str, where: str) -> tuple[tuple[float, float], ...]:
    """A recorded speed trace: CSV with a header naming columns time_s and factor."""
    import csv

    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        pairs = tuple((float(r["time_s"]), float(r["factor"])) for r in rows)
    except FileNotFoundError:
        raise SpecError(f"{where}: no such trace file {path!r}") from None
    except (KeyError, ValueError, TypeError) as e:
        raise SpecError(f"{where}: {path}: expected CSV columns time_s,factor with numbers ({e})") from None
    times = [p[0] for p in pairs]
    if not pairs or times != sorted(times) or any(p[1] <= 0 for p in pairs) or times[0] < 0:
        raise SpecError(f"{where}: {path}: expected increasing times >= 0 and factors > 0")
    return pairs


def network_bandwidth_at(network: NetworkSpec, t: float) -> float:
    """The network's bandwidth in GB/s at time t."""
    return _piecewise(network.bandwidth_schedule, t, network.bandwidth_GBps)


def _profile_path(ref: str) -> Path:
    if ref.startswith("builtin:"):
        return BUILTIN_PROFILES / f"{ref.removeprefix('builtin:')}.json"
    return Path(ref)


def builtin_profiles() -> list[str]:
    return sorted(f"builtin:{p.stem}" for p in BUILTIN_PROFILES.glob("*.json"))


def load_profile(ref: str) -> dict[str, Any]:
    """Read and check a profile file's structure (not yet its entries)."""
    path = _profile_path(ref)
    if not path.is_file():
        hint = f" (built-ins: {', '.join(builtin_profiles())})" if ref.startswith("builtin:") else ""
        raise SpecError(f"{ref}: no such profile file{hint}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SpecError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise SpecError(f"{path}: format: expected {PROFILE_FORMAT!r}")
    if not isinstance(data.get("entries"), list):
        raise SpecError(f"{path}: entries: expected a list of {{workload, batch_size, step_time}}")
    return data


def profile_entry(ref: str, workload: str, batch_size: int, protocol: str = "sync"
                  ) -> tuple[StepTimeModel, float, str, tuple[float, float]]:
    """(step-time model, eval time, source label, (overhead fixed_s, per_arrival_s)) of a profile's entry for
    workload and batch size.

    An entry measured with `hetsim profile --config --exchange` also holds, per protocol, what a real run
    of the config showed (`in_run[protocol]`): `factor`, how much longer (or shorter) the device's steps took
    there than in the profile's tight loop (cold caches after each pull, the collectives' wake-ups, the other
    processes' load), so the run's steps are the profile's times that factor, and the label says so; and
    `overhead`, the per-combine overhead (fixed_s + per_arrival_s x arrivals) beyond the alpha-beta
    exchange. (0, 0) where the entry has none for the protocol."""
    data = load_profile(ref)
    path = _profile_path(ref)
    available = []
    for i, entry in enumerate(data["entries"]):
        where = f"{path}: entries[{i}]"
        if not isinstance(entry, dict):
            raise SpecError(f"{where}: expected a table")
        available.append(f"{entry.get('workload')}@{entry.get('batch_size')}")
        if entry.get("workload") != workload or entry.get("batch_size") != batch_size:
            continue
        step = convert(StepTimeSpec, entry.get("step_time", {}), f"{where}.step_time")
        model = StepTimeModel.from_spec(step, f"{where}.step_time")
        eval_time = _positive(entry.get("eval_time_s", 0.0), f"{where}.eval_time_s")
        label = f"{data.get('source', 'measured')}: {data.get('hardware', 'unknown hardware')}"
        in_run = entry.get("in_run") or {}
        if not isinstance(in_run, dict) or not isinstance(in_run.get(protocol, {}), dict):
            raise SpecError(f"{where}.in_run: expected a table of protocols, each a table")
        m = in_run.get(protocol)
        overhead = (0.0, 0.0)
        if m:
            factor = _positive(m.get("factor"), f"{where}.in_run.{protocol}.factor", strict=True)
            model = model.scaled(factor)
            label += f"; steps x{factor:.3f} as in a real {protocol} run"
            ov = m.get("overhead") or {}
            overhead = (_positive(ov.get("fixed_s", 0.0), f"{where}.in_run.{protocol}.overhead.fixed_s"),
                        _positive(ov.get("per_arrival_s", 0.0), f"{where}.in_run.{protocol}.overhead.per_arrival_s"))
        return model, eval_time, label, overhead
    raise SpecError(f"{ref}: no entry for workload {workload!r} at batch size {batch_size} "
                    f"(has: {', '.join(available) or 'none'}); profile that pair or give step_time inline")


def _positive(v: Any, where: str, strict: bool = False) -> float:
    """A profile's number (not a bool) >= 0, or > 0 when strict; else a one-line SpecError naming `where`."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 if strict else v >= 0):
        raise SpecError(f"{where}: expected a number {'>' if strict else '>='} 0, got {v!r}")
    return float(v)


def device_model(d: DeviceSpec, workload: str, batch_size: int, where: str, protocol: str = "sync") -> DeviceModel:
    if d.profile:
        try:
            step, eval_time, source, overhead = profile_entry(d.profile, workload, batch_size, protocol)
        except SpecError as e:
            raise SpecError(f"{where}.profile: {e}") from None
    else:
        assert d.step_time is not None
        step, eval_time, source = StepTimeModel.from_spec(d.step_time, f"{where}.step_time"), 0.0, "inline"
        overhead = (0.0, 0.0)
    if d.eval_time_s is not None:
        eval_time = d.eval_time_s
    bandwidth_GBps, latency = d.bandwidth_GBps, d.latency_s
    if d.profile:  # a measured link (hetsim profile --exchange) unless the config overrides it
        link = load_profile(d.profile).get("link") or {}
        bandwidth_GBps = bandwidth_GBps if bandwidth_GBps is not None else link.get("bandwidth_GBps")
        latency = latency if latency is not None else link.get("latency_s")
    overhead = (d.overhead_s if d.overhead_s is not None else overhead[0],
                d.overhead_per_arrival_s if d.overhead_per_arrival_s is not None else overhead[1])
    bandwidth = bandwidth_GBps * 1e9 if bandwidth_GBps is not None else None
    slowdown = (read_slowdown_trace(d.slowdown_trace, f"{where}.slowdown_trace") if d.slowdown_trace
                else tuple((float(a), float(b)) for a, b in d.slowdown))
    return DeviceModel(d.kind, step, eval_time, bandwidth, latency, source, slowdown, d.straggler_prob,
                       d.straggler_factor, tuple((float(a), float(b)) for a, b in d.offline), *overhead)


def exchange_time(network: NetworkSpec, devices: Sequence[DeviceModel], model_bytes: int, t: float = 0.0,
                  n: int | None = None, through_server: bool = False) -> float:
    """Seconds for one model exchange among `devices` starting at time t (formulas in the module
    docstring; the network's bandwidth follows its bandwidth_schedule). With `n`, `devices` need only
    hold one model per device group present (the slowest link and latency are the same) and n is the
    number of participants. through_server: the models go through a server (the event-driven protocols),
    the parameter-server formula whatever the collective, and a single participant pays it too.
    Plus the per-combine overhead O = fixed + per_arrival·n (module docstring), one worker included."""
    n = len(devices) if n is None else n
    if n < 1:
        return 0.0
    overhead = combine_overhead(devices, n)
    if n == 1 and not through_server:  # one worker all-reducing with itself exchanges nothing
        return overhead
    net_bw = network_bandwidth_at(network, t) * 1e9
    link_bw = min(d.bandwidth_Bps or net_bw for d in devices)
    latency = max(d.latency_s if d.latency_s is not None else network.latency_s for d in devices)
    if network.collective == "ring_allreduce" and not through_server:
        return overhead + 2 * (n - 1) * latency + 2 * (n - 1) / n * model_bytes / link_bw
    if network.collective == "tree_allreduce" and not through_server:
        return overhead + 2 * math.ceil(math.log2(n)) * latency + 2 * (n - 1) / n * model_bytes / link_bw
    return overhead + 2 * latency + 2 * max(n * model_bytes / net_bw, model_bytes / link_bw)


def combine_overhead(devices: Sequence[DeviceModel], n: int) -> float:
    """The per-combine overhead of n arrivals from `devices` (their groups): the largest fixed part plus
    the largest per-arrival part times n (module docstring)."""
    return max(d.overhead_s for d in devices) + n * max(d.overhead_per_arrival_s for d in devices)
