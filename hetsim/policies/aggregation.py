"""Model aggregation: how replicas combine into the next global model.

The reference code replaces every replica by the plain unweighted mean (all parameters and BN
statistics). The paper adds *biased aggregation* — non-uniform weights — whose exact formula we do
not know (see ../shared/paper-notes.md); `Biased` is a documented family containing the plausible
choices, with the uniform mean as its zero-strength case. `Median` and `TrimmedMean` are the
coordinate-wise robust statistics (Yin et al. 2018).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hetsim.policies.base import Aggregator, Arrivals, Contributions, register


class Averaging(Aggregator):
    """A weighted average of the participants: w_k ∝ basis_k over the arrivals that did at least one
    local step, 0 for a 0-step row (a worker that sat the round out). Subclasses give the basis."""

    @abstractmethod
    def unnormalised_weights(self, arrivals: Contributions) -> np.ndarray:
        """The basis of every row (> 0; only the participants' entries are read)."""

    def weights(self, arrivals: Arrivals) -> np.ndarray:
        c = Contributions.of(arrivals)
        active = c.active
        if not active.any():
            # all-zero weights would make the next global model the zero vector
            raise ValueError(f"{type(self).__name__}: no arrival did a local step "
                             "(the driver combines participants only)")
        b = np.where(active, self.unnormalised_weights(c), 0.0)
        return b / b.sum()


@register("aggregator", "mean")
@dataclass(frozen=True)
class Mean(Averaging):
    """x = (1/n) Σ_k x_k over the n participants, the reference code's `average_model`.

    Example::

        Mean().weights(arrivals)   # [0.25, 0.25, 0.25, 0.25] for four workers that took steps
    """

    work_weights = True  # (declared: see hetsim.policies.base)

    def unnormalised_weights(self, arrivals: Contributions) -> np.ndarray:
        return np.ones(len(arrivals))


@register("aggregator", "samples")
@dataclass(frozen=True)
class SampleWeighted(Averaging):
    """x = Σ_k (m_k / Σ_j m_j) x_k with m_k the samples worker k processed this round (FedAvg weights)."""

    work_weights = True  # (declared: see hetsim.policies.base)

    def unnormalised_weights(self, arrivals: Contributions) -> np.ndarray:
        return arrivals.samples


@register("aggregator", "fednova")
@dataclass(frozen=True)
class FedNova(Aggregator):
    """Normalised averaging (Wang et al. 2020, FedNova, eq. 6 with vanilla SGD).

    x⁺ = x − τ_eff Σ_k p_k (x − x_k) / τ_k,  p_k = m_k / Σ m_j,  τ_eff = Σ_k p_k τ_k,
    where τ_k is worker k's local steps and m_k its samples, the sums over the participants (τ_k > 0;
    a 0-step row has weight 0). Each worker's update is divided by its own number of steps, so
    workers that did many steps do not dominate the direction. As a linear combination
    x⁺ = (1 − Σ c_k) x + Σ c_k x_k with c_k = τ_eff p_k / τ_k; the c_k are the logged weights.
    Momentum buffers are not renormalised.
    """

    work_weights = True  # (declared: see hetsim.policies.base)

    needs_previous_global = True  # x enters with weight 1 − Σ c_k

    def weights(self, arrivals: Arrivals) -> np.ndarray:
        c = Contributions.of(arrivals)
        active = c.active
        if not active.any():
            raise ValueError("FedNova: no arrival did a local step (the driver combines participants only)")
        m, tau = np.where(active, c.samples, 0.0), np.where(active, c.local_steps, 1.0)  # 1: no 0/0 on idle rows
        p = m / m.sum()
        return (p * tau).sum() * p / tau

    def coefficients(self, arrivals: Arrivals) -> tuple[float, np.ndarray]:
        c = self.weights(arrivals)
        return 1.0 - float(c.sum()), c


@register("aggregator", "biased")
@dataclass(frozen=True)
class Biased(Averaging):
    """Biased aggregation: w_k ∝ b_k ** strength over the participants, normalised to sum to 1.

    The bias basis b_k is 'steps' (local steps this round: weight toward replicas that did more work,
    i.e. the fast devices) or 'loss' (mean training loss this round: weight toward replicas that
    trained on harder samples). strength = 0 is the uniform mean; strength = 1 with basis 'steps' is
    weighting by work done (equal to `samples` at equal batch sizes); larger values bias further.
    A 0-step row gets weight 0 at every strength. This family is our assumption: the paper's exact
    formula is unknown to us.

    Example::

        # steps 1 and 3, strength 1  ->  weights [0.25, 0.75]
        Biased(strength=1.0, basis="steps").weights(arrivals)
    """

    work_weights = True  # (declared: see hetsim.policies.base)

    strength: float = 1.0
    basis: str = "steps"

    def __post_init__(self) -> None:
        if not self.strength >= 0:
            raise ValueError(f"strength: expected a number >= 0, got {self.strength!r}")
        if self.basis not in ("steps", "loss"):
            raise ValueError(f"basis: expected 'steps' or 'loss', got {self.basis!r}")

    def unnormalised_weights(self, arrivals: Contributions) -> np.ndarray:
        if self.basis == "steps":
            return arrivals.local_steps ** self.strength
        return np.maximum(arrivals.mean_loss, 1e-12) ** self.strength  # a replica with zero loss keeps a (tiny) weight


#: how many replica values a robust aggregator sorts at once (bounds its extra memory to ~16 bytes each)
SORT_ELEMENTS = 1 << 22


class _OrderStatistic(Aggregator):
    """A coordinate-wise robust statistic of the participants' replicas (Yin et al. 2018, "Byzantine-Robust
    Distributed Learning: Towards Optimal Statistical Rates", §3): each coordinate of the next global model
    is computed from that coordinate's values alone, after sorting them. Not linear: it reads every replica
    (an all_gather in a backend).

    The logged weight of a replica is the share of the model's coordinates it contributed to: for each
    coordinate, the values kept (the median's one or two, the trimmed mean's middle m) count 1/(their
    number) each; the weights sum to 1, and a 0-step row gets 0.
    """

    linear = False

    @abstractmethod
    def kept(self, n: int) -> tuple[int, int]:
        """Of n sorted values, the positions [lo, hi) that are averaged."""

    def combine(self, global_params: torch.Tensor | None, arrivals: Arrivals,
                state: Any) -> tuple[torch.Tensor, np.ndarray, Any]:
        active = Contributions.of(arrivals).active
        if not active.any():
            raise ValueError(f"{type(self).__name__}: no arrival did a local step "
                             "(the driver combines participants only)")
        rows = np.flatnonzero(active)
        x = arrivals.replicas
        if len(rows) < len(active):
            x = x[torch.as_tensor(rows, device=x.device)]
        n, size = x.shape
        lo, hi = self.kept(n)
        combined = torch.empty(size, dtype=x.dtype, device=x.device)
        counts = torch.zeros(n, dtype=torch.int64, device=x.device)
        # in slices of coordinates: a sort holds its values and int64 indices, 3x the replicas at once
        # otherwise (a 100M-parameter model of 10 workers: 12 GB more)
        width = max(1, SORT_ELEMENTS // n)
        for j in range(0, size, width):
            values, order = torch.sort(x[:, j:j + width], dim=0)
            combined[j:j + width] = values[lo:hi].mean(dim=0)
            counts += torch.bincount(order[lo:hi].reshape(-1), minlength=n)
        w = np.zeros(len(active))
        # a model without coordinates (the time-only fidelity's): by symmetry every participant an equal share
        w[rows] = counts.cpu().numpy() / ((hi - lo) * size) if size else 1.0 / len(rows)
        return combined, w, state


@register("aggregator", "median")
@dataclass(frozen=True)
class Median(_OrderStatistic):
    """The coordinate-wise median of the participants' replicas (Yin et al. 2018, Definition 1): for an
    even number of them, the mean of the two middle values (numpy's median; torch.median would take the
    lower one). Robust to fewer than half of the replicas being arbitrarily wrong.

    Example::

        # replicas [0, 10], [1, 20], [5, 30]  ->  [1, 20]
        Median().combine(None, arrivals, None)[0]
    """

    def kept(self, n: int) -> tuple[int, int]:
        return (n - 1) // 2, n // 2 + 1


@register("aggregator", "trimmed_mean")
@dataclass(frozen=True)
class TrimmedMean(_OrderStatistic):
    """The coordinate-wise β-trimmed mean (Yin et al. 2018, Definition 2): for each coordinate, drop the
    ⌊β·n⌋ largest and the ⌊β·n⌋ smallest of the n participants' values and average the rest (as
    scipy.stats.trim_mean). β = 0 is the plain mean.

    Args:
        beta: the fraction trimmed from each side, 0 <= beta < 0.5.

    Example::

        # aggregator = {name = "trimmed_mean", params = {beta = 0.2}}: of 5 values, the middle 3 are averaged
        TrimmedMean(beta=0.2)
    """

    beta: float = 0.1

    def __post_init__(self) -> None:
        if not 0 <= self.beta < 0.5:
            raise ValueError(f"beta: expected a number in [0, 0.5) (the fraction trimmed from each side), "
                             f"got {self.beta!r}")

    def kept(self, n: int) -> tuple[int, int]:
        cut = int(math.floor(self.beta * n))
        return cut, n - cut
