"""The time-only fidelity: the simulator's clock and the policies' decisions, without training math.

Used for clusters far larger than this machine. What replaces the math, stated in every run's
summary (`fidelity_notes`):

- A device's local work in a round is one clock advance (`VectorClock`), with the slowdown factor in
  force when the round starts (the emulated clock reads it at every step). With planned steps, the sum
  of its k step times is drawn as one lognormal with the sum's exact mean and variance
  (Fenton-Wilkinson; exact for constant step times), and stragglers add Binomial(k, p) x (factor - 1)
  x mean step time. With a time budget B the steps are drawn one by one, as the emulated clock does
  (profile distribution x slowdown x a straggler factor per step; another step starts while
  `within_budget(elapsed, B)`), vectorised: a block of steps per device, its running sums, the first
  past the budget. A budget of many steps first skips the steps that end 6 standard deviations short
  of it (64 or more), drawn as one moment-matched lognormal sum. Both match the emulated mean round
  time within 3% on every shipped example, and its times exactly on constant speeds
  (tests/test_timeonly.py; studies/bench_sim.py).
- There are no losses: loss-biased samplers log how many samples they would pick by loss
  (`Sampler.biased_per_step`), and aggregators see a stand-in mean loss of 1.0 for every replica
  (so loss-based weights reduce to uniform; step- and sample-based weights are exact).
- There is no accuracy: `test_acc` stays empty and time-to-accuracy is not defined, unless a learning
  curve (`sim.surrogate`, hetsim/surrogate.py) supplies accuracy as a function of epochs done.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from hetsim.cluster import DeviceModel, within_budget
from hetsim.config import Spec
from hetsim.policies import WorkerInfo
from hetsim.training import DecisionCore, Tallies
from hetsim.workloads import nominal_train_size
from hetsim.workloads.placement import time_only_summary

FIDELITY_NOTES = ("time-only: planned steps' sums drawn as one moment-matched lognormal per device and round, "
                  "time budgets' steps drawn one by one; slowdown taken at round start; no losses "
                  "(stand-in mean loss 1.0); no accuracy")
STAND_IN_LOSS = 1.0


class TimeOnlyCore(DecisionCore):
    """The TrainingCore's interface with tallies instead of math: an empty parameter vector (so the
    aggregator's combine runs as in every engine and its weights are exact), stand-in losses, and the
    surrogate learning curve's accuracy where one is configured."""

    def __init__(self, spec: Spec, policies: Any, profile_step_times: Sequence[float], model_bytes: int):
        """model_bytes: the size of the model an emulated run would exchange (from a model built once)."""
        super().__init__(spec, policies, profile_step_times)
        self.n_train = nominal_train_size(spec.workload)
        self.model_bytes = model_bytes
        self.curve = None
        self.refused_after: float | None = None
        if spec.sim.surrogate:
            from hetsim.surrogate import LearningCurve

            self.curve = LearningCurve.load(spec.sim.surrogate)
        self.scores = None
        self._global = torch.zeros(0)
        # each worker's steps and loss-biased samples in its latest local work (what `tallies` reports)
        self._steps = np.zeros(len(self.infos), dtype=np.int64)
        self._biased = np.zeros(len(self.infos), dtype=np.int64)
        # a sampler that declares `static_bias` is asked once per worker, not once per worker and round
        b = spec.optim.batch_size
        self._bias_per_step = (np.array([self.sampler.biased_per_step(i, b) for i in self.infos], dtype=np.int64)
                               if self.sampler.static_bias else None)

    # What the policies know of each worker, as columns: a round observes every participant, and
    # rebuilding 10^5 WorkerInfo tuples per round cost more than the rest of a time-only round. The list
    # of WorkerInfo (the contract's view) is built from the columns when something reads it.

    @property
    def infos(self) -> list[WorkerInfo]:
        if self._infos is None:
            make = tuple.__new__  # as DecisionCore.observe_step_times: the same tuples, without NamedTuple's checks
            observed = self._observed.tolist()
            for k in np.flatnonzero(~self._has_observed).tolist():
                observed[k] = None
            self._infos = [make(WorkerInfo, row) for row in
                           zip(self._index, self._kind, self._profile, observed, self._rounds.tolist())]
        return self._infos

    @infos.setter
    def infos(self, infos: Sequence[WorkerInfo]) -> None:
        self._infos = list(infos)
        self._index = [i[0] for i in self._infos]
        self._kind = [i[1] for i in self._infos]
        self._profile = [i[2] for i in self._infos]
        self._has_observed = np.array([i[3] is not None for i in self._infos], dtype=bool)
        self._observed = np.array([math.nan if i[3] is None else i[3] for i in self._infos], dtype=np.float64)
        self._rounds = np.array([i[4] for i in self._infos], dtype=np.int64)

    def observe_step_times(self, ks: Sequence[int], mean_step_s: Sequence[float]) -> None:
        """DecisionCore.observe_step_times on the columns (the same values: float64 in, Python floats out)."""
        at = np.asarray(ks, dtype=np.int64)
        self._observed[at] = mean_step_s
        self._has_observed[at] = True
        self._rounds[at] += 1
        if self._infos is not None and len(at) * 8 <= len(self._infos):
            # a few workers (an asynchronous arrival): their entries, not the whole list again
            make, infos = tuple.__new__, self._infos
            for k, t, r in zip(at.tolist(), self._observed[at].tolist(), self._rounds[at].tolist()):
                i = infos[k]
                infos[k] = make(WorkerInfo, (i[0], i[1], i[2], t, r))
        else:
            self._infos = None

    def set_lr(self, lr: float) -> float:
        return lr

    def pull(self, ks: Sequence[int]) -> None:
        pass  # no replicas: nothing to take

    def train(self, ks: Sequence[int], steps: Sequence[int]) -> None:
        at = np.asarray(ks, dtype=np.int64)
        self._steps[at] = steps
        if self._bias_per_step is not None:
            self._biased[at] = self._steps[at] * self._bias_per_step[at]
            return
        b = self.spec.optim.batch_size
        infos, per_step = self.infos, self.sampler.biased_per_step
        self._biased[at] = [n * per_step(infos[k], b) for k, n in zip(at.tolist(), self._steps[at].tolist())]

    def tallies(self, ks: Sequence[int]) -> Tallies:
        at = np.asarray(ks, dtype=np.int64)
        steps = self._steps[at]
        samples = steps * self.spec.optim.batch_size
        return Tallies(at, steps, samples, self._biased[at], samples * STAND_IN_LOSS)

    def replicas(self, ks: Sequence[int]) -> torch.Tensor:
        return torch.zeros(len(ks), 0)

    def global_params(self) -> torch.Tensor:
        return self._global

    def install(self, new_global: torch.Tensor) -> None:
        pass  # always the empty vector

    def merge_scores(self, observations: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        pass  # no losses, no scores

    def test_metrics(self) -> tuple[None, float | None]:
        """No loss; the surrogate learning curve's accuracy at the epochs done, if one is configured.
        None = not computed (an empty metrics cell): always for the loss, and for the accuracy without a
        curve or outside its fitted range (the first such epoch is remembered for the summary)."""
        if self.curve is None:
            return None, None
        acc = self.curve.predict(self.epochs)
        if math.isnan(acc) and self.epochs > self.curve.epochs_max and self.refused_after is None:
            self.refused_after = self.epochs
        return None, None if math.isnan(acc) else acc

    def summary_fields(self) -> dict[str, Any]:
        if self.curve is None:
            return {"batched": False, "data": time_only_summary(self.spec)}
        return {"batched": False, "data": time_only_summary(self.spec), "surrogate": self.spec.sim.surrogate,
                "surrogate_epochs": [self.curve.epochs_min, self.curve.epochs_max],
                "surrogate_refused_after_epoch": self.refused_after}

    def state_dict(self) -> dict:
        return {"infos": [tuple(i) for i in self.infos], "samples_total": self.samples_total,
                "refused_after": self.refused_after}

    def load_state_dict(self, state: dict) -> None:
        self.load_infos(state["infos"])
        self.samples_total = state["samples_total"]
        self.refused_after = state["refused_after"]


#: Most step times a time-budget round draws at once (8 MB per float64 array): the draws go in chunks of
#: devices, so memory stays bounded however many devices and steps a round has.
MAX_BLOCK_DRAWS = 1 << 20
#: A time budget of more than JUMP_MIN_STEPS steps draws the steps that end JUMP_SIGMAS standard deviations
#: short of the budget as one sum (`VectorClock._budget_round`). Below, every step is drawn: exact.
JUMP_MIN_STEPS = 64
JUMP_SIGMAS = 6.0


def by_time(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(argsort(times, kind="stable"), the times in that order): the order by time, ties in their order in
    `times`. Sorted by numpy's default (unstable, ~5x faster on 10^5 times); where times tie (a device group
    of constant speed: many), each run of equal times is put in position order by one sort of (run,
    position) as integers (which moves only equal times: the ordered times stay)."""
    order = np.argsort(times)
    ordered = times[order]
    tie = ordered[1:] == ordered[:-1]
    if not tie.any():
        return order, ordered
    n = len(times)
    run = np.concatenate([[0], np.cumsum(~tie)])
    return np.sort(run * n + order) % n, ordered


def earliest(finish: np.ndarray, count: int, deadline: float | None, now: float) -> tuple[np.ndarray, float]:
    """The clock's next arrivals: the workers of the earliest `count` finite times of `finish` (ties in time:
    lower index first), by one partition, cut at `deadline` (absolute; None: none), in arrival order; and the
    time the clock goes to (the last of them, the deadline if it comes first, or `now` when none)."""
    if count == 1:
        i = int(np.argmin(finish))  # the first minimum: the lowest index among ties
        chosen = np.array([i] if np.isfinite(finish[i]) else [], dtype=np.int64)
    else:
        m = min(count, int(np.isfinite(finish).sum()))
        chosen = np.zeros(0, dtype=np.int64)
        if m:
            v = np.partition(finish, m - 1)[m - 1]
            below = np.flatnonzero(finish < v)
            chosen = np.concatenate([below, np.flatnonzero(finish == v)[:m - len(below)]])
            # by time, ties by index: chosen is in index order within each time (below: ascending; the ties
            # at v, ascending, after them), so an order by time that keeps ties in place is enough
            chosen = chosen[by_time(finish[chosen])[0]]
    until = float(finish[chosen[-1]]) if len(chosen) else now
    if deadline is not None and (not len(chosen) or until > deadline):
        chosen = chosen[finish[chosen] <= deadline]
        until = deadline
    return chosen, until


def timeout_until(env: Any, t: float) -> Any:
    """Wait (yield from) until exactly time t (> env.now). SimPy schedules at now + delay, and no delay may
    give exactly t (t - now rounded, then added back, can miss t by an ulp, and by a different ulp from a
    different `now`): two paths waiting for the same arrival from different moments would disagree in the
    last digit. So wait for the largest delay that does not pass t, then set the clock to t: nothing can be
    scheduled within that last ulp."""
    delay = t - env.now
    while delay > 0 and env.now + delay > t:
        delay = math.nextafter(delay, -math.inf)
    yield env.timeout(delay)
    if env.now < t:
        env._now = t  # (SimPy's clock, a plain float: there is no public way to land on t)


class VectorClock:
    """Round durations of many devices at once, drawn per device group (see the module docstring)."""

    def __init__(self, models: Sequence[DeviceModel], group: np.ndarray, rng: np.random.Generator):
        """models: the time model of each device group; group[k]: device k's group."""
        self.models = list(models)
        self.group = np.asarray(group)
        self.rng = rng

    def round(self, ks: np.ndarray, steps: np.ndarray | None, budget_s: float | None,
              t: float) -> tuple[np.ndarray, np.ndarray]:
        """(durations, steps) of devices `ks` for a round starting at t; steps None = run for budget_s."""
        durations = np.empty(len(ks))
        steps_out = np.empty(len(ks), dtype=np.int64)
        groups = self.group[ks]
        for g, m in enumerate(self.models):
            sel = np.flatnonzero(groups == g)
            if not len(sel):
                continue
            if steps is None:
                durations[sel], steps_out[sel] = self._budget_round(m, len(sel), budget_s, t)
            else:
                k = np.asarray(steps[sel], dtype=np.int64)
                durations[sel], steps_out[sel] = self._fixed_round(m, k, t), k
        return durations, steps_out

    def _fixed_round(self, m: DeviceModel, k: np.ndarray, t: float) -> np.ndarray:
        """Sums of k[i] step times: one moment-matched lognormal each (Fenton-Wilkinson), plus stragglers."""
        factor = m.slowdown_at(t)
        mean = m.step_time.mean_s * factor
        std = m.step_time.std_s * factor
        total = k * mean
        if std > 0:
            run = slice(None) if k.all() else k > 0  # 0 planned steps take no time (and have no lognormal)
            kr = k[run]
            sigma2 = np.log1p(std ** 2 / (kr * mean ** 2))
            total[run] = self.rng.lognormal(np.log(kr * mean) - sigma2 / 2, np.sqrt(sigma2))
        if m.straggler_prob > 0:
            total = total + self.rng.binomial(k, m.straggler_prob) * (m.straggler_factor - 1) * mean
        return total

    def _budget_round(self, m: DeviceModel, n: int, budget_s: float, t: float) -> tuple[np.ndarray, np.ndarray]:
        """(durations, steps) of n devices that start steps while within_budget(elapsed, budget_s), as the
        emulated clock's device process does: the same renewal process, each step drawn. A block of steps
        per device that most devices finish within (mean + 3 std of the count), its cumulative sums,
        the first sum past the budget; the few devices still inside it draw another block.

        A budget of many steps first skips the steps that end JUMP_SIGMAS standard deviations short of it:
        their sum is one moment-matched lognormal (exact mean and variance, stragglers included), so a
        round costs a few draws per device however long its budget; the steps near the budget, which
        decide the count and the overshoot, are still drawn one by one."""
        mean, std = m.step_moments(t)
        elapsed = np.zeros(n)
        taken = np.zeros(n, dtype=np.int64)
        # the most steps whose sum stays JUMP_SIGMAS std below the budget: k mean + z std sqrt(k) <= budget
        z_std = JUMP_SIGMAS * std
        root = (-z_std + math.sqrt(z_std * z_std + 4 * mean * budget_s)) / (2 * mean)
        skip = int(root * root) - 1
        if skip >= JUMP_MIN_STEPS:
            taken[:] = skip
            if std > 0:
                sigma2 = math.log1p(std ** 2 / (skip * mean ** 2))
                elapsed[:] = self.rng.lognormal(math.log(skip * mean) - sigma2 / 2, math.sqrt(sigma2), n)
            else:
                elapsed[:] = skip * mean
        todo = np.flatnonzero(within_budget(elapsed, budget_s)) if skip >= JUMP_MIN_STEPS else np.arange(n)
        while todo.size:
            left = max(budget_s - float(elapsed[todo].min()), 0.0) / mean  # steps the furthest behind needs
            block = min(MAX_BLOCK_DRAWS, math.ceil(left + 3 * std / mean * math.sqrt(left)) + 1)
            rows = max(1, MAX_BLOCK_DRAWS // block)
            unfinished = []
            for lo in range(0, todo.size, rows):
                idx = todo[lo:lo + rows]
                cum = elapsed[idx, None] + np.cumsum(m.draw_steps(self.rng, (len(idx), block), t), axis=1)
                over = ~within_budget(cum, budget_s)  # non-decreasing along a row: steps are > 0
                crossed = over[:, -1]
                first = over[crossed].argmax(axis=1)  # the step that ends the device's round
                done = idx[crossed]
                taken[done] += first + 1
                elapsed[done] = cum[crossed, first]
                rest = idx[~crossed]
                taken[rest] += block
                elapsed[rest] = cum[~crossed, -1]
                unfinished.append(rest)
            todo = np.concatenate(unfinished)
        return elapsed, taken
