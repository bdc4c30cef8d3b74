"""Model aggregation: how replicas combine into the next global model.

The reference code replaces every replica by the plain unweighted mean (all parameters and BN
statistics). The paper adds *biased aggregation* — non-uniform weights — whose exact formula we do
not know (see ../shared/paper-notes.md); `Biased` is a documented family containing the plausible
choices, with the uniform mean as its zero-strength case.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import numpy as np

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

    def unnormalised_weights(self, arrivals: Contributions) -> np.ndarray:
        return np.ones(len(arrivals))


@register("aggregator", "samples")
@dataclass(frozen=True)
class SampleWeighted(Averaging):
    """x = Σ_k (m_k / Σ_j m_j) x_k with m_k the samples worker k processed this round (FedAvg weights)."""

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
