"""Model aggregation: how replicas combine into the next global model.

The reference code replaces every replica by the plain unweighted mean (all parameters and BN
statistics). The paper adds *biased aggregation* — non-uniform weights — whose exact formula we do
not know (see ../shared/paper-notes.md); `Biased` is a documented family containing the plausible
choices, with the uniform mean as its zero-strength case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from hetsim.policies.base import Aggregator, Contribution, Contributions, register


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / x.sum()


@register("aggregator", "mean")
@dataclass(frozen=True)
class Mean(Aggregator):
    """x = (1/n) Σ_k x_k, the reference code's `average_model`.

    Example::

        Mean().weights(contributions)   # [0.25, 0.25, 0.25, 0.25] for four workers
    """

    def weights(self, contributions: Sequence[Contribution]) -> np.ndarray:
        n = len(contributions)
        return np.full(n, 1.0 / n)


@register("aggregator", "samples")
@dataclass(frozen=True)
class SampleWeighted(Aggregator):
    """x = Σ_k (m_k / Σ_j m_j) x_k with m_k the samples worker k processed this round (FedAvg weights)."""

    def weights(self, contributions: Sequence[Contribution]) -> np.ndarray:
        return _normalise(Contributions.of(contributions).samples)


@register("aggregator", "fednova")
@dataclass(frozen=True)
class FedNova(Aggregator):
    """Normalised averaging (Wang et al. 2020, FedNova, eq. 6 with vanilla SGD).

    x⁺ = x − τ_eff Σ_k p_k (x − x_k) / τ_k,  p_k = m_k / Σ m_j,  τ_eff = Σ_k p_k τ_k,
    where τ_k is worker k's local steps and m_k its samples. Each worker's update is divided by its
    own number of steps, so workers that did many steps do not dominate the direction. As a linear
    combination x⁺ = (1 − Σ c_k) x + Σ c_k x_k with c_k = τ_eff p_k / τ_k; the c_k are the logged
    weights. Momentum buffers are not renormalised.
    """

    def weights(self, contributions: Sequence[Contribution]) -> np.ndarray:
        c = Contributions.of(contributions)
        m, tau = c.samples, c.local_steps
        p = m / m.sum()
        return (p * tau).sum() * p / tau

    def coefficients(self, contributions: Sequence[Contribution]) -> tuple[float, np.ndarray]:
        c = self.weights(contributions)
        return 1.0 - float(c.sum()), c


@register("aggregator", "biased")
@dataclass(frozen=True)
class Biased(Aggregator):
    """Biased aggregation: w_k ∝ b_k ** strength, normalised to sum to 1.

    The bias basis b_k is 'steps' (local steps this round: weight toward replicas that did more work,
    i.e. the fast devices) or 'loss' (mean training loss this round: weight toward replicas that
    trained on harder samples). strength = 0 is the uniform mean; strength = 1 with basis 'steps' is
    weighting by work done (equal to `samples` at equal batch sizes); larger values bias further.
    This family is our assumption: the paper's exact formula is unknown to us.

    Example::

        # steps 1 and 3, strength 1  ->  weights [0.25, 0.75]
        Biased(strength=1.0, basis="steps").weights(contributions)
    """

    strength: float = 1.0
    basis: str = "steps"

    def __post_init__(self) -> None:
        if not self.strength >= 0:
            raise ValueError(f"strength: expected a number >= 0, got {self.strength!r}")
        if self.basis not in ("steps", "loss"):
            raise ValueError(f"basis: expected 'steps' or 'loss', got {self.basis!r}")

    def weights(self, contributions: Sequence[Contribution]) -> np.ndarray:
        c = Contributions.of(contributions)
        if self.basis == "steps":
            b = c.local_steps
        else:
            b = np.maximum(c.mean_loss, 1e-12)  # a replica with zero loss keeps a (tiny) weight
        return _normalise(b ** self.strength)
