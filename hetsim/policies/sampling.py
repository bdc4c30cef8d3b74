"""Mini-batch selection: uniform, and the paper's loss-biased top-k for chosen device kinds.

State lives in two explicit objects the runner owns, checkpoints and (in the real backend) merges:

- `EpochStream`: one worker's pass over the training set, a fresh permutation per epoch, so uniform
  sampling is without replacement within an epoch.
- `LossScores`: the last observed training loss of every sample (unseen = +inf, so unseen samples
  are picked first). Merge rule 'latest' keeps the newest observation; 'min' keeps the running
  minimum, as the reference code's Allreduce(MIN) does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from hetsim.policies.base import Batch, NameRef, Sampler, WorkerInfo, register

SCORE_RULES = ("latest", "min")


class EpochStream:
    """Sample indices of one worker, without replacement within each epoch and within each `take`.

    A take that crosses an epoch boundary gets the tail of epoch e and the head of epoch e+1; the head
    is drawn from the indices not in that tail (the next epoch's permutation moves them to its front,
    keeping their random order), so one batch or candidate pool never holds an index twice, and every
    epoch is still a permutation of all n indices.

    Example::

        s = EpochStream(10, np.random.default_rng(0))
        s.take(4), s.take(8)     # 12 indices: all of epoch 0, then 2 of epoch 1 (not among the last 6)
    """

    def __init__(self, n: int, rng: np.random.Generator):
        self.n = n
        self.rng = rng
        self.epoch = 0
        self._perm = rng.permutation(n)
        self._pos = 0

    def take(self, k: int) -> np.ndarray:
        """The next k indices, all distinct (k <= n)."""
        if k > self.n:
            raise ValueError(f"cannot take {k} distinct indices from a stream of {self.n}")
        part = self._perm[self._pos:self._pos + k]
        self._pos += len(part)
        if len(part) == k:
            return part
        self._next_epoch(avoid=part, head=k - len(part))
        self._pos = k - len(part)
        return np.concatenate([part, self._perm[:self._pos]])

    def _next_epoch(self, avoid: np.ndarray, head: int) -> None:
        """A fresh permutation whose first `head` entries are not in `avoid` (the current take's tail)."""
        self.epoch += 1
        perm = self.rng.permutation(self.n)
        if len(avoid):
            front = np.flatnonzero(~np.isin(perm, avoid))[:head]
            perm = np.concatenate([perm[front], np.delete(perm, front)])
        self._perm = perm

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "perm": self._perm.copy(), "pos": self._pos,
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self._perm, self._pos = state["epoch"], np.asarray(state["perm"]), state["pos"]
        self.rng.bit_generator.state = state["rng"]


class LossScores:
    """Last seen per-sample training loss; +inf marks a sample never seen.

    Example::

        s = LossScores(4, rule="min")
        s.merge(np.array([0, 1]), np.array([2.0, 3.0]))
        s.merge(np.array([0]), np.array([5.0]))   # min keeps 2.0; 'latest' would keep 5.0
    """

    def __init__(self, n: int, rule: str = "latest"):
        if rule not in SCORE_RULES:
            raise ValueError(f"score rule: expected one of {SCORE_RULES}, got {rule!r}")
        self.rule = rule
        self.values = np.full(n, np.inf)

    def merge(self, indices: np.ndarray, losses: np.ndarray) -> None:
        """Fold observations in, in order (for 'latest' a later duplicate index wins)."""
        indices = np.asarray(indices)
        losses = np.asarray(losses, dtype=np.float64)
        if self.rule == "min":
            np.minimum.at(self.values, indices, losses)
            return
        # keep the last occurrence of each index: numpy does not promise an order for repeated
        # indices in a fancy assignment.
        rev_unique, rev_pos = np.unique(indices[::-1], return_index=True)
        self.values[rev_unique] = losses[::-1][rev_pos]

    def merge_all(self, observations: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        """Fold a worker's observations of a round in, in order (one merge of the concatenation)."""
        if observations:
            self.merge(np.concatenate([o[0] for o in observations]), np.concatenate([o[1] for o in observations]))


@register("sampler", "uniform")
@dataclass(frozen=True)
class Uniform(Sampler):
    """Uniform sampling without replacement within each epoch of the worker's own stream.

    Example::

        Uniform().batch(worker, 32, stream, scores, None)[0].indices   # the next 32 indices of the stream
    """

    uses_scores = False
    static_bias = True  # never biased

    def batch(self, worker: WorkerInfo, batch_size: int, stream: EpochStream, scores: LossScores,
              state: None) -> tuple[Batch, None]:
        return Batch(stream.take(batch_size), 0), state


@register("sampler", "loss_topk")
@dataclass(frozen=True)
class LossBiasedTopK(Sampler):
    """Biased sampling (paper §'biased sampling'; reference `feeders/feeder_cifar.py`).

    On a worker whose kind is in `kinds`, each local step draws a uniform candidate pool of
    ceil(sample_ratio · k) indices from the worker's stream (k = batch size; the pool is capped at
    the data-set size) and keeps the k with the highest stored loss; never-seen samples (+inf) come
    first, ties keep the pool's random order. Other workers sample uniformly. The reference code picks
    its top-k once per reshuffle window rather than per step; the selection rule is the same.

    Args:
        sample_ratio: candidate pool size / k (reference: 4). 1 = uniform.
        kinds: device kinds that sample biased (reference: the slow 'cpu' workers); ["*"] = all. Each
            must be a kind of the cluster (checked on load).
        score_rule: 'latest' loss per sample, or the reference code's running 'min'.

    Example::

        LossBiasedTopK(sample_ratio=4, kinds=("cpu",)).batch(cpu_worker, 64, stream, scores, None)
    """

    sample_ratio: float = 4.0
    kinds: tuple[str, ...] = ("cpu",)
    score_rule: str = "latest"

    name_refs = {"kinds": NameRef("kind", wildcard=True)}  # a kind the cluster lacks would bias no one

    def __post_init__(self) -> None:
        if not self.sample_ratio >= 1:
            raise ValueError(f"sample_ratio: expected a number >= 1, got {self.sample_ratio!r}")
        if self.score_rule not in SCORE_RULES:
            raise ValueError(f"score_rule: expected one of {list(SCORE_RULES)}, got {self.score_rule!r}")
        if not self.kinds:
            raise ValueError("kinds: expected at least one device kind (or '*')")

    def biased_for(self, worker: WorkerInfo) -> bool:
        return "*" in self.kinds or worker.kind in self.kinds

    def biased_per_step(self, worker: WorkerInfo, batch_size: int) -> int:
        return batch_size if self.biased_for(worker) else 0

    uses_scores = True
    static_bias = True  # by kind

    def batch(self, worker: WorkerInfo, batch_size: int, stream: EpochStream, scores: LossScores,
              state: None) -> tuple[Batch, None]:
        if not self.biased_for(worker):
            return Batch(stream.take(batch_size), 0), state
        pool = stream.take(min(stream.n, max(batch_size, math.ceil(self.sample_ratio * batch_size))))
        order = np.argsort(-scores.values[pool], kind="stable")
        chosen = pool[order[:batch_size]]
        return Batch(chosen, len(chosen)), state
