"""Data placement: which training samples each worker streams (`data = {name = ..., params = {...}}`).

- `shared` (default): every worker streams the whole training set, each in its own seeded order (the
  paper's IID data-parallel setting; what hetsim always did).
- `iid`: one seeded permutation cut into disjoint shards of equal size (sizes differ by at most one;
  every sample is in exactly one shard), as Flower's `IidPartitioner`.
- `dirichlet`: label skew, the standard partitioner of Hsu et al. 2019 ("Measuring the effects of
  non-identical data distribution", as FedLab's `hetero_dir_partition` and Flower's
  `DirichletPartitioner` implement it): for each class, proportions p ~ Dir(alpha · 1_N) over the N
  workers, and the class's shuffled samples are cut at the cumulative proportions. Small alpha: each
  worker holds few classes; alpha -> inf: near-IID.
- `per_kind`: devices of a kind share a given part of the data: `shares = {cpu = 0.1, gpu = 0.9}` (the
  fractions of one seeded permutation, summing to 1) or `labels = {cpu = [0, 1], gpu = [2, 3, 4]}` (the
  samples of those classes); within a kind, the devices split their part into disjoint equal shards.
- `authors`: the reference code's exact data path (see `Authors`): reshuffle windows, the slow
  workers' top-k picked once per window, the uniform arm's disjoint slices of one permutation.

Every placement is deterministic per seed (the `placement` stream of hetsim.seeding; `authors` draws
its windows from `placement-window`). A worker's stream (hetsim.policies.sampling.EpochStream) runs
over its shard, so uniform and loss-biased sampling pick within it; epochs stay samples / n_train (the
whole training set). Every shard must hold at least one batch (the sampler draws a batch without
replacement): a placement that leaves a worker less is a one-line SpecError naming the worker.

    placement = build_placement(PolicySpec("dirichlet", {"alpha": 0.3}))
    shards = placement.shards(labels, ["cpu", "gpu", "gpu"], batch_size=32, rng=numpy_rng(0, "placement"))
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from hetsim.config import PolicySpec, Spec, build_dataclass, worker_names
from hetsim.errors import SpecError

#: draws of the Dirichlet proportions before a placement that leaves some worker less than a batch is
#: refused (Flower and FedLab redraw until every partition has its minimum size; they differ on a cap)
MAX_DIRICHLET_DRAWS = 100
#: workers listed one by one in summary.json; more: a bounded summary (sizes' min/median/max, and the
#: histograms of this many workers spread evenly over the cluster)
SUMMARY_WORKERS = 32


class Placement(ABC):
    """Which samples each worker streams. A frozen dataclass: its fields are `data.params`."""

    def check(self, spec: Spec) -> None:
        """What the spec alone can refute (the kinds a parameter names, ...): a SpecError naming the key."""

    def sizes(self, n_train: int, kinds: Sequence[str]) -> list[int] | None:
        """Every worker's shard size, when known without the labels (None: it depends on them)."""
        return None

    @abstractmethod
    def shards(self, labels: np.ndarray, kinds: Sequence[str], batch_size: int,
               rng: np.random.Generator) -> list[np.ndarray] | None:
        """Each worker's sample indices (None: every worker streams the whole set). `labels`: the class
        of every training sample; `kinds`: every worker's device kind, in worker order."""


@dataclass(frozen=True)
class Shared(Placement):
    """Every worker streams the whole training set in its own seeded order (the default)."""

    def sizes(self, n_train: int, kinds: Sequence[str]) -> list[int]:
        return [n_train] * len(kinds)

    def shards(self, labels, kinds, batch_size, rng):
        return None


@dataclass(frozen=True)
class IID(Placement):
    """Disjoint shards of one seeded permutation, sizes n // N or n // N + 1 (the first n % N workers
    hold one more), covering every sample.

    Example::

        IID().shards(np.zeros(10), ["cpu"] * 3, 2, rng)   # 4, 3 and 3 of the 10 indices, disjoint
    """

    def sizes(self, n_train: int, kinds: Sequence[str]) -> list[int]:
        n, parts = n_train, len(kinds)
        return [n // parts + (1 if k < n % parts else 0) for k in range(parts)]

    def shards(self, labels, kinds, batch_size, rng):
        return _cut(rng.permutation(len(labels)), self.sizes(len(labels), kinds))


@dataclass(frozen=True)
class Dirichlet(Placement):
    """Label skew (Hsu et al. 2019): for each class c, proportions p_c ~ Dir(alpha, ..., alpha) over the
    N workers; the class's samples, in a seeded random order, are cut at floor(cumsum(p_c) · n_c), so
    worker k gets about p_c[k] · n_c of them.

    Every shard must hold at least one batch. As FedLab and Flower do for their minimum partition size,
    the proportions of every class are drawn again until each worker holds at least `batch_size`
    samples; after 100 draws that all leave someone short, it is a SpecError (raise alpha, or use
    fewer workers or a smaller batch). The draws are seeded, so the result is deterministic per seed.

    Args:
        alpha: the Dirichlet concentration, > 0. 0.1: each worker holds mostly one or two classes;
            1000: every worker's class mix is close to the data set's.

    Example::

        Dirichlet(alpha=0.3).shards(labels, ["gpu"] * 10, 32, numpy_rng(0, "placement"))
    """

    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not self.alpha > 0:
            raise ValueError(f"alpha: expected a number > 0 (the Dirichlet concentration), got {self.alpha!r}")

    def shards(self, labels, kinds, batch_size, rng):
        labels = _class_labels(labels, "dirichlet")
        n, parts = len(labels), len(kinds)
        classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        owner = np.empty(n, dtype=np.int64)
        for _ in range(MAX_DIRICHLET_DRAWS):
            for members in classes:
                order = rng.permutation(members)
                p = rng.dirichlet(np.full(parts, self.alpha))
                cuts = (np.cumsum(p) * len(order)).astype(np.int64)[:-1]
                owner[order] = np.searchsorted(cuts, np.arange(len(order)), side="right")
            sizes = np.bincount(owner, minlength=parts)
            if sizes.min() >= batch_size:
                return _cut(np.argsort(owner, kind="stable"), sizes.tolist())
        short = int(np.argmin(sizes))
        raise SpecError(f"data.params.alpha: {MAX_DIRICHLET_DRAWS} draws of the Dirichlet proportions (alpha = "
                        f"{self.alpha}) all left a worker fewer samples than a batch (optim.batch_size = "
                        f"{batch_size}; worker {worker_names(kinds)[short]} held {sizes[short]} in the last); "
                        f"raise alpha, or use fewer workers or a smaller batch")


@dataclass(frozen=True)
class PerKind(Placement):
    """The devices of a kind share a given part of the data; within a kind, disjoint equal shards (as
    `iid`, in worker order). Give exactly one of:

    Args:
        shares: fraction of the training set per device kind, > 0, summing to 1, e.g. ``{cpu = 0.1,
            gpu = 0.9}``: one seeded permutation is cut in the cluster's kind order, kind k taking
            round(cumulative share · n) - (the previous cut) samples.
        labels: class labels per device kind, e.g. ``{cpu = [0, 1], gpu = [2, 3, 4]}``: the samples of
            class c are split evenly (in a seeded order) among the devices of every kind that lists c;
            classes no kind lists are not used.

    Every kind of the cluster must be listed (its devices would have no data), and only those.

    Example::

        PerKind(shares={"cpu": 0.25, "gpu": 0.75}).sizes(100, ["cpu", "gpu", "gpu"])   # [25, 38, 37]
    """

    shares: Mapping[str, Any] = field(default_factory=dict)
    labels: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if bool(self.shares) == bool(self.labels):
            raise ValueError("expected exactly one of `shares` (fractions of the data per kind) or `labels` "
                             "(classes per kind)")
        for kind, share in self.shares.items():
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
                raise ValueError(f"shares.{kind}: expected a fraction in (0, 1], got {share!r}")
        if self.shares and not math.isclose(sum(self.shares.values()), 1.0, abs_tol=1e-9):
            raise ValueError(f"shares: expected fractions that sum to 1, got {sum(self.shares.values())!r}")
        for kind, classes in self.labels.items():
            if not (isinstance(classes, (list, tuple)) and classes and all(
                    isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in classes)):
                raise ValueError(f"labels.{kind}: expected a non-empty list of class labels (integers >= 0), "
                                 f"got {classes!r}")
            if len(set(classes)) != len(classes):
                raise ValueError(f"labels.{kind}: expected distinct class labels, got {list(classes)!r}")

    def check(self, spec: Spec) -> None:
        key = "shares" if self.shares else "labels"
        _check_kinds(spec, f"data.params.{key}", list(getattr(self, key)), every=True)

    def sizes(self, n_train: int, kinds: Sequence[str]) -> list[int] | None:
        if not self.shares:
            return None
        order = list(dict.fromkeys(kinds))
        cuts = [round(c * n_train) for c in np.cumsum([self.shares[k] for k in order])]
        cuts[-1] = n_train  # shares sum to 1 within round-off
        per_kind = dict(zip(order, np.diff([0] + cuts).tolist()))
        sizes = [0] * len(kinds)
        for kind, total in per_kind.items():
            members = [k for k, x in enumerate(kinds) if x == kind]
            for j, k in enumerate(members):
                sizes[k] = total // len(members) + (1 if j < total % len(members) else 0)
        return sizes

    def shards(self, labels, kinds, batch_size, rng):
        if self.shares:
            return _cut_by_worker(rng.permutation(len(labels)), self.sizes(len(labels), kinds), kinds)
        labels = _class_labels(labels, "per_kind")
        present = set(np.unique(labels).tolist())
        for kind, classes in self.labels.items():
            missing = sorted(set(classes) - present)
            if missing:
                raise SpecError(f"data.params.labels.{kind}: expected classes of the training set "
                                f"({', '.join(map(str, sorted(present)))}), got {missing[0]}")
        parts: list[list[np.ndarray]] = [[] for _ in kinds]
        for c in sorted(present):
            members = [k for k, x in enumerate(kinds) if c in self.labels[x]]
            if not members:
                continue
            share = np.array_split(rng.permutation(np.flatnonzero(labels == c)), len(members))
            for k, s in zip(members, share):
                parts[k].append(s)
        return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


@dataclass(frozen=True)
class Authors(Placement):
    """The reference code's data path (jjihyunh/BiasedLocalSGD; /work/shared/paper-notes.md §1b and
    'hetsim against the authors' code'), rule by rule:

    1. Reshuffle windows (`train.py`: `count % shuffle_rounds`; `feeder_cifar.py`: `shuffle_rounds =
       50000 // (B·(nC·Ic + nG·Ig))`): every `window_rounds` rounds the data are dealt anew; 0 takes the
       reference's rule n_train // (B · Σ_workers steps), steps from the `fixed` scheduler. In a window
       worker k reads a slice of window_rounds · steps_k · B indices in order (`num_samples_per_CPU`,
       `num_samples_per_GPU`; `DataLoader(shuffle=False)`), so a window is at most one pass.
    2. Uniform arm (`biased = false`; the reference's `biased=0`): one seeded permutation per window,
       cut into disjoint consecutive slices in worker order (the reference broadcasts one permutation
       and slices it, CPU replicas first).
    3. Biased arm (`biased = true`; `biased=1`): the workers of `kinds` (the reference's CPU group) get
       the top-k: a pool of int(k · sample_ratio) indices drawn uniformly without replacement from the
       whole set (`biased_sample`: `rng.choice(..., replace=False)`), k = the sum of their slices; the
       k with the highest scores (never-seen samples, +inf, first; ties in the pool's random order),
       shuffled, cut into their slices in worker order. The other workers read consecutive blocks of a
       fresh permutation from offset 0 (`shuffled_index`, reshuffled locally), so their samples may
       overlap the top-k set.
    4. Scores (`WindowScores`): the training forward pass's per-sample loss; ranked as they were at the
       window start; during a window a rank's latest loss overwrites its entry, and at the reshuffle
       the ranks are merged by MIN (`Allreduce(score, MIN)`). A rank is a device kind (the reference
       runs one process per group: rank 0 the CPU replicas, rank 1 the GPU replicas).

    It needs the `fixed` scheduler (the reference's hand-set intervals, which size the slices), the
    `uniform` sampler (it reads each worker's slice in order; the biased arm's top-k is this data
    path's), the `sync` protocol (a window counts rounds), and the emulated fidelity (it is data).

    Args:
        biased: the top-k arm (true) or the uniform arm (false).
        kinds: the device kinds that take the top-k (the reference's CPU group).
        sample_ratio: candidate pool / k (reference: 4, hard-coded in its feeder); at most n_train / k.
        window_rounds: rounds per reshuffle window; 0 = the reference's rule above.

    Example::

        data = {name = "authors", params = {kinds = ["cpu"], sample_ratio = 4}}
        scheduler = {name = "fixed", params = {per_kind = {cpu = 1, gpu = 32}}}
    """

    biased: bool = True
    kinds: tuple[str, ...] = ("cpu",)
    sample_ratio: float = 4.0
    window_rounds: int = 0

    def __post_init__(self) -> None:
        if not self.sample_ratio >= 1:
            raise ValueError(f"sample_ratio: expected a number >= 1 (candidate pool / top-k), got {self.sample_ratio!r}")
        if self.window_rounds < 0:
            raise ValueError(f"window_rounds: expected an integer >= 0 (0 = the reference's rule), got "
                             f"{self.window_rounds!r}")
        if self.biased and not self.kinds:
            raise ValueError("kinds: expected the device kinds that take the top-k (the biased arm needs one)")

    def check(self, spec: Spec) -> None:
        if self.biased:
            _check_kinds(spec, "data.params.kinds", list(self.kinds), every=False)
        for key, name, expected in (("scheduler", spec.scheduler.name, "fixed"), ("sampler", spec.sampler.name, "uniform"),
                                    ("protocol", spec.protocol.name, "sync")):
            if name != expected:
                raise SpecError(f"{key}.name: data 'authors' needs {expected!r} (its slices follow the reference's "
                                f"fixed intervals, read in order, in rounds of a barrier), got {name!r}")
        if spec.sim.fidelity == "time_only":
            raise SpecError("data.name: 'authors' is a data path and a time-only run reads no data; use the "
                            "emulated fidelity, or data 'shared' (a placement changes no time)")

    def shards(self, labels, kinds, batch_size, rng):
        return None  # dealt per window by AuthorsWindows

    def windows(self, spec: Spec, steps: Sequence[int], n_train: int) -> "AuthorsWindows":
        """The run's window dealer, for workers taking steps[k] local steps per round (the fixed plan)."""
        b = spec.optim.batch_size
        kinds = spec.worker_kinds()
        reference = n_train // (b * sum(steps))
        if reference < 1:
            raise SpecError(f"data: 'authors' deals a window of at least one round, window_rounds x "
                            f"{b * sum(steps)} samples (batch x every worker's steps), from the {n_train} "
                            f"training samples: too few")
        if self.window_rounds > reference:
            raise SpecError(f"data.params.window_rounds: expected at most {reference} (a window's slices, "
                            f"window_rounds x {b * sum(steps)} samples, must fit in the {n_train} training "
                            f"samples), got {self.window_rounds}")
        w = self.window_rounds or reference
        biased = np.array([self.biased and kind in self.kinds for kind in kinds])
        sizes = [w * s * b for s in steps]
        k = sum(s for s, x in zip(sizes, biased) if x)
        pool = int(k * self.sample_ratio)
        if pool > n_train:
            raise SpecError(f"data.params.sample_ratio: the candidate pool, {self.sample_ratio} x the {k} top-k "
                            f"samples of a window, exceeds the {n_train} training samples; expected at most "
                            f"{n_train / k:.4g}")
        return AuthorsWindows(n_train, w, sizes, biased, pool, worker_names(kinds))


class AuthorsWindows:
    """Deals each window's slices (rules 1-3 of `Authors`). The core calls `deal` once per window, at
    its first round, with the scores merged at that reshuffle; the draws come from one seeded generator
    (the core's, checkpointed with it), so every process of a real run deals the same slices."""

    def __init__(self, n_train: int, window_rounds: int, sizes: Sequence[int], biased: np.ndarray, pool: int,
                 names: Sequence[str]):
        self.n_train, self.window_rounds = n_train, window_rounds
        self.sizes, self.biased, self.pool, self.names = list(sizes), np.asarray(biased, dtype=bool), pool, list(names)
        self.window = -1  # the window dealt last (-1: none yet)

    @property
    def top_k(self) -> int:
        return int(sum(s for s, x in zip(self.sizes, self.biased) if x))

    def window_of(self, rounds_done: int) -> int:
        return rounds_done // self.window_rounds

    def deal(self, window: int, scores: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """Every worker's slice for `window`, in worker order; `scores`: the loss scores merged at this
        reshuffle (read by the biased arm only)."""
        self.window = window
        if not self.biased.any():  # the uniform arm: one permutation, consecutive slices
            return _cut(rng.permutation(self.n_train), self.sizes, strict=False)
        candidates = rng.choice(self.n_train, size=self.pool, replace=False)
        top = candidates[np.argsort(-scores[candidates], kind="stable")[:self.top_k]]
        top = rng.permutation(top)
        others = rng.permutation(self.n_train)
        out: list[np.ndarray] = []
        at = {True: 0, False: 0}
        for size, biased in zip(self.sizes, self.biased.tolist()):
            source = top if biased else others
            out.append(source[at[biased]:at[biased] + size])
            at[biased] += size
        return out

    def summary(self) -> dict[str, Any]:
        return {"window_rounds": self.window_rounds, "windows_dealt": self.window + 1,
                "candidate_pool": self.pool if self.biased.any() else None,
                "top_k": self.top_k if self.biased.any() else None,
                "slice_sizes": _by_worker(self.names, self.sizes),
                "top_k_workers": [n for n, b in zip(self.names, self.biased.tolist()) if b]}


PLACEMENTS: dict[str, type[Placement]] = {"shared": Shared, "iid": IID, "dirichlet": Dirichlet, "per_kind": PerKind,
                                          "authors": Authors}


def build_placement(spec: PolicySpec) -> Placement:
    """The placement `data` names, its parameters checked (a SpecError naming `data.params.<key>`)."""
    if spec.name not in PLACEMENTS:
        raise SpecError(f"data.name: expected one of {sorted(PLACEMENTS)}, got {spec.name!r}")
    return build_dataclass(PLACEMENTS[spec.name], spec.params, "data.params")


def check_placement(spec: Spec, n_train: int | None, scheduler: Any) -> Placement:
    """Every check of `data` that needs no data: its name and parameters, the kinds it names, and (when the
    training-set size `n_train` is known) a batch per shard where the sizes do not depend on labels, and
    the authors' windows. `scheduler`: the run's built scheduler (the authors' slices follow its steps)."""
    placement = build_placement(spec.data)
    placement.check(spec)
    if isinstance(placement, Authors):
        if n_train is not None:
            placement.windows(spec, fixed_steps(spec, scheduler), n_train)
    elif n_train is not None:
        kinds = spec.worker_kinds()
        sizes = placement.sizes(n_train, kinds)
        if sizes is not None:
            check_shard_sizes(sizes, kinds, spec.optim.batch_size, spec.data.name)
        elif len(kinds) * spec.optim.batch_size > n_train:  # disjoint shards of a batch each cannot fit
            raise SpecError(f"data: {spec.data.name!r} gives each of the {len(kinds)} workers a disjoint shard of "
                            f"at least one batch (optim.batch_size = {spec.optim.batch_size}), more than the "
                            f"{n_train} training samples")
    return placement


def fixed_steps(spec: Spec, scheduler: Any) -> list[int]:
    """Every worker's local steps per round under the `fixed` scheduler (checked by `Authors.check`)."""
    return [scheduler.per_kind.get(kind, scheduler.local_steps) for kind in spec.worker_kinds()]


def check_shard_sizes(sizes: Sequence[int], kinds: Sequence[str], batch_size: int, name: str) -> None:
    """A SpecError naming the first worker whose shard holds less than one batch."""
    short = next((k for k, s in enumerate(sizes) if s < batch_size), None)
    if short is not None:
        raise SpecError(f"data: {name!r} gives worker {worker_names(kinds)[short]} a shard of {sizes[short]} "
                        f"samples, fewer than one batch (optim.batch_size = {batch_size})")


def shard_summary(name: str, params: Mapping[str, Any], shards: list[np.ndarray] | None, labels: np.ndarray,
                  n_classes: int, kinds: Sequence[str]) -> dict[str, Any]:
    """summary.json's `data`: the placement, every shard's size and label histogram; with more than 32
    workers, the sizes' min/median/max and the histograms of 32 workers spread evenly over the cluster
    (bounded at any scale). Histograms are None for sequence targets (no class per sample)."""
    n, names = len(labels), worker_names(kinds)
    sizes = np.full(len(kinds), n) if shards is None else np.array([len(s) for s in shards])
    one_class = labels.ndim == 1
    whole = np.bincount(labels, minlength=n_classes).tolist() if one_class else None
    shown = range(len(kinds)) if len(kinds) <= SUMMARY_WORKERS else \
        np.unique(np.linspace(0, len(kinds) - 1, SUMMARY_WORKERS).round().astype(int)).tolist()

    def histogram(k: int) -> list[int] | None:
        if not one_class:
            return None
        return whole if shards is None else np.bincount(labels[shards[k]], minlength=n_classes).tolist()

    return {"placement": name, "params": dict(params), "n_train": n,
            "shard_size": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max()),
                           "total": int(sizes.sum())},
            "shards_listed": "all" if len(shown) == len(kinds) else f"{len(shown)} of {len(kinds)}, spread evenly",
            "shards": {names[k]: {"size": int(sizes[k]), "labels": histogram(k)} for k in shown}}


def time_only_summary(spec: Spec) -> dict[str, Any]:
    """summary.json's `data` for a time-only run: the placement as configured; no shards are built."""
    return {"placement": spec.data.name, "params": dict(spec.data.params), "shards": None,
            "note": "time-only: no data are read, so no shards are built; the placement changes no time, and "
                    "epochs are samples / n_train as in every run"}


# -- helpers -----------------------------------------------------------------------------------------


def _class_labels(labels: np.ndarray, name: str) -> np.ndarray:
    if labels.ndim != 1:
        raise SpecError(f"data.name: {name!r} needs one class label per training sample; this workload's "
                        f"targets have shape {tuple(labels.shape[1:])} per sample")
    return labels


def _check_kinds(spec: Spec, key: str, named: list[str], every: bool) -> None:
    kinds = list(dict.fromkeys(spec.worker_kinds()))
    for kind in named:
        if kind not in kinds:
            raise SpecError(f"{key}: expected device kinds of this cluster ({', '.join(map(repr, kinds))}), got {kind!r}")
    missing = [k for k in kinds if k not in named]
    if every and missing:
        raise SpecError(f"{key}: expected every device kind of this cluster ({', '.join(map(repr, kinds))}); "
                        f"{missing[0]!r} is missing (its devices would have no data)")


def _cut(order: np.ndarray, sizes: Sequence[int], strict: bool = True) -> list[np.ndarray]:
    """Consecutive pieces of `order` of the given sizes (strict: they cover it)."""
    ends = np.cumsum(sizes)
    if strict and ends[-1] != len(order):
        raise AssertionError(f"pieces of {ends[-1]} for {len(order)} indices")
    return [order[e - s:e] for s, e in zip(sizes, ends.tolist())]


def _cut_by_worker(order: np.ndarray, sizes: Sequence[int], kinds: Sequence[str]) -> list[np.ndarray]:
    """Consecutive pieces of `order`: the kinds in cluster order, within a kind its workers in order."""
    out: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(kinds)
    at = 0
    for kind in dict.fromkeys(kinds):
        for k in (k for k, x in enumerate(kinds) if x == kind):
            out[k] = order[at:at + sizes[k]]
            at += sizes[k]
    return out


def _by_worker(names: Sequence[str], values: Sequence[int]) -> dict[str, Any]:
    """Per-worker values as a table, bounded as the shards are (min/median/max beyond 32 workers)."""
    if len(names) <= SUMMARY_WORKERS:
        return {n: int(v) for n, v in zip(names, values)}
    a = np.asarray(values)
    return {"min": int(a.min()), "median": float(np.median(a)), "max": int(a.max())}
