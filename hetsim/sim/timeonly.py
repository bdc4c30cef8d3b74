"""The time-only fidelity: the simulator's clock and the policies' decisions, without training math.

Used for clusters far larger than this machine. What replaces the math, stated in every run's
summary (`fidelity_notes`):

- A device's local work in a round is one clock advance: the sum of its k step times is drawn as
  one lognormal with the sum's exact mean and variance (Fenton-Wilkinson; exact for constant step
  times), the slowdown factor is the one in force when the round starts, and stragglers add
  Binomial(k, p) x (factor - 1) x mean step time. A time budget B gives max(1, ceil(B / mean step)).
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

from hetsim.cluster import DeviceModel
from hetsim.config import Spec
from hetsim.training import DecisionCore, Tallies
from hetsim.workloads import nominal_train_size

FIDELITY_NOTES = ("time-only: step sums drawn as one moment-matched lognormal per device and round; "
                  "slowdown taken at round start; no losses (stand-in mean loss 1.0); no accuracy")
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
        self._ks = np.zeros(0, dtype=np.int64)
        self._steps = np.zeros(0, dtype=np.int64)
        self._biased = np.zeros(0, dtype=np.int64)

    def set_lr(self, lr: float) -> float:
        return lr

    def pull(self, ks: Sequence[int]) -> None:
        pass  # no replicas: nothing to take

    def train(self, ks: Sequence[int], steps: Sequence[int]) -> None:
        b = self.spec.optim.batch_size
        infos, per_step = self.infos, self.sampler.biased_per_step
        self._ks = np.asarray(ks, dtype=np.int64)
        self._steps = np.asarray(steps, dtype=np.int64)
        self._biased = np.array([n * per_step(infos[k], b) for k, n in zip(ks, steps)], dtype=np.int64)

    def tallies(self, ks: Sequence[int]) -> Tallies:
        samples = self._steps * self.spec.optim.batch_size
        return Tallies(self._ks, self._steps, samples, self._biased, samples * STAND_IN_LOSS)

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
            return {"batched": False}
        return {"batched": False, "surrogate": self.spec.sim.surrogate,
                "surrogate_epochs": [self.curve.epochs_min, self.curve.epochs_max],
                "surrogate_refused_after_epoch": self.refused_after}

    def state_dict(self) -> dict:
        return {"infos": [tuple(i) for i in self.infos], "samples_total": self.samples_total,
                "refused_after": self.refused_after}

    def load_state_dict(self, state: dict) -> None:
        self.load_infos(state["infos"])
        self.samples_total = state["samples_total"]
        self.refused_after = state["refused_after"]


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
            factor = m.slowdown_at(t)
            mean = m.step_time.mean_s * factor
            std = m.step_time.std_s * factor
            k = steps[sel] if steps is not None else np.full(len(sel), max(1, math.ceil(budget_s / mean - 1e-12)))
            total_mean = k * mean
            if std > 0:
                sigma2 = np.log1p(std ** 2 / (k * mean ** 2))
                total = self.rng.lognormal(np.log(total_mean) - sigma2 / 2, np.sqrt(sigma2))
            else:
                total = total_mean.astype(np.float64)
            if m.straggler_prob > 0:
                total = total + self.rng.binomial(k, m.straggler_prob) * (m.straggler_factor - 1) * mean
            durations[sel] = total
            steps_out[sel] = k
        return durations, steps_out
