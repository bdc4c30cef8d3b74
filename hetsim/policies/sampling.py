"""Mini-batch selection: uniform, and the paper's loss-biased top-k for chosen device kinds.

State lives in two explicit objects the runner owns, checkpoints and (in the real backend) merges:

- `EpochStream`: one worker's pass over its data (the whole training set, or its shard under a data
  placement, hetsim.workloads.placement), a fresh permutation per epoch, so uniform sampling is without
  replacement within an epoch.
- `WindowStream`: one worker's slice of a reshuffle window under the authors' data path (data
  'authors'), read in order.
- `LossScores`: the last observed training loss of every sample (unseen = +inf, so unseen samples
  are picked first). Merge rule 'latest' keeps the newest observation; 'min' keeps the running
  minimum, as the reference code's Allreduce(MIN) does.
- `WindowScores`: the reference code's exact score store (data 'authors'): frozen during a window,
  merged by MIN across its process groups at the reshuffle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from hetsim.errors import HetsimError
from hetsim.policies.base import Batch, NameRef, Sampler, WorkerInfo, register

SCORE_RULES = ("latest", "min")


class EpochStream:
    """Sample indices of one worker, without replacement within each epoch and within each `take`.

    `indices`: the worker's shard (global sample indices; None = all n samples, 0..n-1). The stream
    permutes positions 0..n-1 and returns `indices[position]`, so with a shard of n samples it behaves
    exactly as a stream over n samples, mapped into the shard.

    A take that crosses an epoch boundary gets the tail of epoch e and the head of epoch e+1; the head
    is drawn from the indices not in that tail (the next epoch's permutation moves them to its front,
    keeping their random order), so one batch or candidate pool never holds an index twice, and every
    epoch is still a permutation of all n indices.

    Example::

        s = EpochStream(10, np.random.default_rng(0))
        s.take(4), s.take(8)     # 12 indices: all of epoch 0, then 2 of epoch 1 (not among the last 6)
        EpochStream(3, rng, indices=np.array([7, 2, 9])).take(3)   # 7, 2 and 9 in a random order
    """

    #: the indices are picked by loss (the authors' top-k window slices): a uniform sampler's batch
    #: counts them as biased samples
    by_loss = False

    def __init__(self, n: int, rng: np.random.Generator, indices: np.ndarray | None = None):
        if indices is not None and len(indices) != n:
            raise ValueError(f"indices: expected {n} sample indices, got {len(indices)}")
        self.n = n
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
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
        if len(part) < k:
            self._next_epoch(avoid=part, head=k - len(part))
            self._pos = k - len(part)
            part = np.concatenate([part, self._perm[:self._pos]])
        return part if self.indices is None else self.indices[part]

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
        if len(state["perm"]) != self.n:  # the shard is rebuilt from the config: a changed placement does not fit
            raise ValueError(f"a data stream over {len(state['perm'])} samples, this config's holds {self.n}")
        self.epoch, self._perm, self._pos = state["epoch"], np.asarray(state["perm"]), state["pos"]
        self.rng.bit_generator.state = state["rng"]


class WindowStream:
    """One worker's slice of the current reshuffle window (data 'authors'), read in order, as the
    reference code's `DataLoader(shuffle=False)` over the slice; the data path hands a new slice at
    every reshuffle (`set_window`), and whatever is left of the old one is dropped.

    Under the fixed scheduler a worker reads exactly its slice in a window (window_rounds x its steps x
    the batch size); reading past it would train a sample twice in one window, which the reference
    never does, so it is an error.

    Example::

        s = WindowStream("cpu0")
        s.set_window(0, np.array([5, 1, 4, 2]), by_loss=True)
        s.take(2), s.take(2)     # [5, 1], [4, 2]; a third take raises
    """

    def __init__(self, name: str):
        self.name = name
        self.window = -1
        self.indices = np.zeros(0, dtype=np.int64)
        self.by_loss = False
        self._pos = 0

    @property
    def n(self) -> int:
        return len(self.indices)

    def set_window(self, window: int, indices: np.ndarray, by_loss: bool) -> None:
        self.window, self.indices, self.by_loss, self._pos = window, np.asarray(indices, dtype=np.int64), by_loss, 0

    def take(self, k: int) -> np.ndarray:
        if self._pos + k > len(self.indices):
            raise HetsimError(f"data 'authors': worker {self.name} needs {k} more samples in window {self.window}, "
                              f"its slice has {len(self.indices) - self._pos} left of {len(self.indices)} (a "
                              f"window's slice is window_rounds x the worker's fixed steps x the batch size)")
        part = self.indices[self._pos:self._pos + k]
        self._pos += k
        return part

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "indices": self.indices.copy(), "by_loss": self.by_loss, "pos": self._pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_window(state["window"], state["indices"], state["by_loss"])
        self._pos = state["pos"]


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


class WindowScores:
    """The reference code's loss scores (data 'authors'), exactly: `values` is what the top-k ranks and
    stays frozen during a reshuffle window; the window's observations are folded in at the reshuffle.

    The reference keeps one score array per MPI process (its 'ranks': one per group of replicas, here
    one per device kind). During a window a rank overwrites a sample's entry with the latest loss it
    observed for it (`solvers/localsgd.py`, `round`); at the reshuffle the arrays are combined by
    `Allreduce(MIN)` (`train.py`) and every rank starts the next window from the result. Within a
    window a rank trains each sample at most once (its replicas' slices are disjoint and each is read
    once: see `WindowStream`), so its entry for a sample is either that one loss or the merged value of
    the previous reshuffle. Hence, with `groups` ranks, at the reshuffle:

        seen by every rank:       values[i] = min of this window's losses of i
        seen by some, or by none: values[i] = min(values[i], this window's losses of i)

    which is what `close_window` computes from the window's minimum and count per sample. (So a score
    is not the running minimum of every loss ever seen: a sample every rank trained in one window
    forgets its older, lower score.)

    Example::

        s = WindowScores(3, groups=2)
        s.merge(np.array([0, 1]), np.array([2.0, 5.0]))   # rank A's losses
        s.merge(np.array([1]), np.array([4.0]))           # rank B's
        s.values                                          # still [inf, inf, inf] (frozen)
        s.close_window(); s.values                        # [2.0, 4.0, inf]
    """

    rule = "window_min"

    def __init__(self, n: int, groups: int):
        if groups < 1:
            raise ValueError(f"groups: expected at least one process group, got {groups}")
        self.groups = groups
        self.values = np.full(n, np.inf)
        self._window_min = np.full(n, np.inf)
        self._window_count = np.zeros(n, dtype=np.int64)

    def merge(self, indices: np.ndarray, losses: np.ndarray) -> None:
        """Fold observations of the current window in (they change `values` only at the reshuffle)."""
        indices = np.asarray(indices, dtype=np.int64)
        np.minimum.at(self._window_min, indices, np.asarray(losses, dtype=np.float64))
        np.add.at(self._window_count, indices, 1)

    def merge_all(self, observations: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        if observations:
            self.merge(np.concatenate([o[0] for o in observations]), np.concatenate([o[1] for o in observations]))

    def close_window(self) -> None:
        """The reshuffle's Allreduce(MIN) over the ranks' arrays; the next window starts from it."""
        every_rank = self._window_count >= self.groups
        self.values = np.where(every_rank, self._window_min, np.minimum(self.values, self._window_min))
        self._window_min.fill(np.inf)
        self._window_count.fill(0)

    def state_dict(self) -> dict[str, Any]:
        return {"values": self.values.copy(), "window_min": self._window_min.copy(),
                "window_count": self._window_count.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["values"]) != len(self.values):
            raise ValueError(f"loss scores of {len(state['values'])} samples, this config has {len(self.values)}")
        self.values = np.asarray(state["values"], dtype=np.float64).copy()
        self._window_min = np.asarray(state["window_min"], dtype=np.float64).copy()
        self._window_count = np.asarray(state["window_count"], dtype=np.int64).copy()


@register("sampler", "uniform")
@dataclass(frozen=True)
class Uniform(Sampler):
    """Uniform sampling without replacement within each epoch of the worker's own stream.

    Example::

        Uniform().batch(worker, 32, stream, scores, None)[0].indices   # the next 32 indices of the stream
    """

    uses_scores = False

    def batch(self, worker: WorkerInfo, batch_size: int, stream: EpochStream, scores: LossScores,
              state: None) -> tuple[Batch, None]:
        indices = stream.take(batch_size)
        return Batch(indices, len(indices) if stream.by_loss else 0), state


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

    def batch(self, worker: WorkerInfo, batch_size: int, stream: EpochStream, scores: LossScores,
              state: None) -> tuple[Batch, None]:
        if not self.biased_for(worker):
            return Batch(stream.take(batch_size), 0), state
        pool = stream.take(min(stream.n, max(batch_size, math.ceil(self.sample_ratio * batch_size))))
        order = np.argsort(-scores.values[pool], kind="stable")
        chosen = pool[order[:batch_size]]
        return Batch(chosen, len(chosen)), state
