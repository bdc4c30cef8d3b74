"""The shared training core: replicas, local steps, loss scores, evaluation.

It knows no clock, no comm and builds no policies: the driver (hetsim.protocol) owns the run and calls
the core the same way in every engine. A worker's local work, as the driver runs it::

    core.pull(ks)                 # the workers take the current global model and a fresh tally
    core.train(ks, steps)         # (or core.step(k) per step) sampler picks batches, SGD steps, losses kept
    core.tallies(ks), core.replicas(ks)   # what the Comm carries to the aggregator
    core.install(new_global); core.merge_scores(observations)
    core.test_metrics()           # when an evaluation is due

A round's math depends only on how many steps each worker takes, never on the order in which the
engine interleaves them: every worker samples from its own stream with the loss scores as they were
when it pulled. So the simulator may run the steps worker by worker, or step by step across workers as
one batched computation (`hetsim.batched`), with the same result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hetsim.config import OptimSpec, Spec, worker_names
from hetsim.losses import per_sample_loss
from hetsim.errors import HetsimError, SpecError
from hetsim.policies import Batch, WorkerInfo
from hetsim.policies.sampling import EpochStream, LossScores, WindowScores, WindowStream
from hetsim.seeding import derive, numpy_rng, torch_generator
from hetsim.workloads import Workload, build_workload, check_batch_fits
from hetsim.workloads.placement import Authors, build_placement, check_shard_sizes, fixed_steps, shard_summary


class FlatParams:
    """A model's floating-point parameters and buffers as one flat vector (what is exchanged).

    Integer buffers (BatchNorm's num_batches_tracked) are not exchanged and stay local.
    """

    def __init__(self, model: nn.Module):
        self.tensors = [t for t in model.state_dict(keep_vars=True).values() if t.is_floating_point()]
        self.numel = sum(t.numel() for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def get(self) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1) for t in self.tensors])

    @torch.no_grad()
    def set(self, flat: torch.Tensor) -> None:
        offset = 0
        for t in self.tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


def lr_at(optim: OptimSpec, progress: float) -> float:
    """Learning rate at `progress` in [0, 1] of the run's budget."""
    if optim.lr_schedule == "step":
        return optim.lr * optim.gamma ** sum(progress >= m for m in optim.milestones)
    if optim.lr_schedule == "cosine":
        return optim.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return optim.lr


@torch.no_grad()
def test_metrics(model: nn.Module, workload: Workload, batch_size: int = 1000) -> tuple[float, float]:
    """(mean test loss, test accuracy) of `model` on the workload's test set; for sequence targets
    both are per predicted position (next-character accuracy for a language model)."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for start in range(0, len(workload.test_y), batch_size):
        x = workload.prepare(workload.test_x[start:start + batch_size], False, None)
        y = workload.test_y[start:start + batch_size]
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        n += y.numel()
    model.train()
    return loss_sum / n, correct / n


test_metrics.__test__ = False  # a library function, not a test, wherever pytest finds its name


@dataclass
class RoundTally:
    """What one worker did since it last pulled the global model."""

    steps: int = 0
    samples: int = 0
    biased: int = 0
    loss_sum: float = 0.0
    observations: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


@dataclass
class Tallies:
    """Several workers' tallies as columns, in worker order (what the Comm gathers and the driver reads).

    observations: every (sample indices, per-sample losses) pair of these workers, worker by worker (empty
    when the sampler keeps no loss scores); merged into the loss-score store in this order.
    """

    workers: np.ndarray
    steps: np.ndarray
    samples: np.ndarray
    biased: np.ndarray
    loss_sum: np.ndarray
    observations: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    @classmethod
    def of(cls, ks: Sequence[int], tallies: Sequence[RoundTally]) -> "Tallies":
        return cls(np.asarray(ks, dtype=np.int64), np.array([t.steps for t in tallies], dtype=np.int64),
                   np.array([t.samples for t in tallies], dtype=np.int64),
                   np.array([t.biased for t in tallies], dtype=np.int64),
                   np.array([t.loss_sum for t in tallies], dtype=np.float64),
                   [o for t in tallies for o in t.observations])

    def mean_loss(self) -> np.ndarray:
        """Each worker's mean training loss over its samples (0 for a worker without samples)."""
        return np.divide(self.loss_sum, self.samples, out=np.zeros(len(self.samples)), where=self.samples > 0)


class Worker:
    """One replica: model, SGD optimiser (its momentum stays local, as the reference), data stream,
    augmentation generator, the sampler's state for this worker, and its tally since it last pulled.

    stream: the worker's data stream (default: the whole training set in its own seeded order; the
    core passes one over the worker's shard, or a window stream, under another data placement)."""

    def __init__(self, index: int, workload: Workload, spec: Spec, init: torch.Tensor,
                 device: torch.device | str = "cpu", sampler_state: Any = None,
                 stream: EpochStream | WindowStream | None = None):
        self.model = workload.make_model().to(device)
        self.flat = FlatParams(self.model)
        self.flat.set(init.to(device))
        o = spec.optim
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum,
                                         weight_decay=o.weight_decay)
        self.stream = stream if stream is not None else EpochStream(workload.n_train, numpy_rng(spec.seed, "data", index))
        self.gen = torch_generator(spec.seed, "augment", index)
        self.sampler_state = sampler_state
        self.tally = RoundTally()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train_step(self, workload: Workload, indices: np.ndarray, per_sample: bool) -> tuple[float, np.ndarray | None]:
        """One SGD step on the given samples. Returns the summed loss of the forward pass and, when
        `per_sample`, each sample's loss (for the loss-score store)."""
        idx = torch.from_numpy(indices).to(workload.train_x.device)
        x = workload.prepare(workload.train_x[idx], True, self.gen)
        y = workload.train_y[idx]
        out = self.model(x)
        loss = F.cross_entropy(out, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        losses = None
        if per_sample:
            with torch.no_grad():
                losses = per_sample_loss(out.detach(), y).cpu().numpy().astype(np.float64)
        return loss.item() * len(indices), losses


@dataclass(frozen=True)
class RoundRecord:
    """A round's decisions and outcome, as written to the decisions log and metrics."""

    round: int
    workers: tuple[int, ...]          # the participating workers, in order
    local_steps: tuple[int, ...]
    samples: tuple[int, ...]
    biased_samples: tuple[int, ...]
    weights: tuple[float, ...]
    train_loss: float
    time_budget_s: float | None
    diverged: bool = False            # the round's training loss or new global model is not finite
    # per arrival (as `workers`; empty in records made without them): the version it pulled, its staleness
    # (version at the combine - pulled), when it started (pulled) and arrived, in s on the run's timeline
    staleness: tuple[int, ...] = ()
    pulled: tuple[int, ...] = ()
    start_s: tuple[float, ...] = ()
    finish_s: tuple[float, ...] = ()
    version: int = 0                  # the global model's version after this update
    # late work discarded in this update (semi_sync, late = "drop"): workers, steps and arrival times
    dropped: tuple[int, ...] = ()
    dropped_steps: tuple[int, ...] = ()
    dropped_finish_s: tuple[float, ...] = ()
    digest: str = ""                  # hetsim.results.model_digest of the new global model ("" in time-only)

    def as_json(self) -> dict[str, Any]:
        return {"round": self.round, "workers": list(self.workers), "local_steps": list(self.local_steps),
                "samples": list(self.samples),
                "biased_samples": list(self.biased_samples), "weights": [float(w) for w in self.weights],
                "time_budget_s": self.time_budget_s, "staleness": list(self.staleness), "pulled": list(self.pulled),
                "start_s": list(self.start_s), "finish_s": list(self.finish_s), "version": self.version,
                "dropped": list(self.dropped), "dropped_steps": list(self.dropped_steps),
                "dropped_finish_s": list(self.dropped_finish_s), "digest": self.digest}


class DecisionCore:
    """What every core shares: the policies it was given and what they know of each worker.

    TrainingCore adds the replicas and their math; the simulator's time-only core adds tallies only.
    Both present one interface to the driver (hetsim.protocol): pull, train / step, tallies, replicas,
    global_params / install, merge_scores, test_metrics, state_dict.
    """

    def __init__(self, spec: Spec, policies: Any, profile_step_times: Sequence[float] | None = None):
        """policies: the run's scheduler, sampler and aggregator (`hetsim.resolve.build_policies`)."""
        self.spec = spec
        self.sampler = policies.sampler
        kinds = spec.worker_kinds()
        times = profile_step_times or [1.0] * len(kinds)
        self.infos = [WorkerInfo(k, kind, float(times[k])) for k, kind in enumerate(kinds)]
        self.samples_total = 0   # samples combined into the global model so far (the driver counts them)
        self.n_train = 1         # a core sets its training set's size: epochs = samples_total / n_train

    @property
    def epochs(self) -> float:
        return self.samples_total / self.n_train

    def load_infos(self, infos: Sequence[Sequence[Any]]) -> None:
        """Restore what the policies know of each worker (from a checkpoint); a checkpoint of a cluster
        with another number of workers does not fit (a ValueError, reported by the runner)."""
        if len(infos) != len(self.infos):
            raise ValueError(f"it holds {len(infos)} workers, this config has {len(self.infos)}")
        self.infos = [WorkerInfo(*i) for i in infos]

    def observe_step_times(self, ks: Sequence[int], mean_step_s: Sequence[float]) -> None:
        """The mean step time each worker measured in its latest local work: what policies see as its
        `observed_step_time_s` (a real system's most recent throughput estimate). Only workers that took
        steps are observed (the driver never passes a non-participant)."""
        make = tuple.__new__  # WorkerInfo(index, kind, profile, observed, n) without NamedTuple's slower paths
        infos = self.infos
        for k, t in zip(ks, mean_step_s):
            i = infos[k]
            infos[k] = make(WorkerInfo, (i[0], i[1], i[2], t, i[4] + 1))

    def summary_fields(self) -> dict[str, Any]:
        return {}


class TrainingCore(DecisionCore):
    """Replicas, local steps, loss scores and evaluation of all workers of a spec, without a clock."""

    def __init__(self, spec: Spec, policies: Any, workload: Workload | None = None,
                 profile_step_times: Sequence[float] | None = None, local: Sequence[int] | None = None,
                 device: torch.device | str = "cpu"):
        """`local`: the workers whose replicas live in this process (all by default; a real backend's
        process holds one). `device`: where the local replicas, the global model and the data live."""
        super().__init__(spec, policies, profile_step_times)
        self.workload = workload or build_workload(spec.workload)
        self.n_train = self.workload.n_train
        # checked on load where the size is known without the data; here for data-dependent sizes
        check_batch_fits(spec.workload, spec.optim.batch_size, self.workload.n_train)
        labels = self.workload.train_y.cpu().numpy()  # before the data move to `device`
        streams = self._place(spec, policies, labels)
        if str(device) != "cpu":
            for name in ("train_x", "train_y", "test_x", "test_y"):
                setattr(self.workload, name, getattr(self.workload, name).to(device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive(spec.seed, "init"))
            self.global_model = self.workload.make_model().to(device)
        self.global_flat = FlatParams(self.global_model)
        init = self.global_flat.get()
        kinds = spec.worker_kinds()
        local_set = set(range(len(kinds)) if local is None else local)
        self.local = sorted(local_set)
        self.workers: list[Worker] = [
            Worker(k, self.workload, spec, init, device, self.sampler.init_state(self.infos[k]), streams(k))
            if k in local_set else None for k in range(len(kinds))]  # type: ignore[misc]
        # filled only for a sampler that declares it reads it (uses_scores), or the authors' biased data path;
        # otherwise it stays unseen (+inf) and the steps compute no per-sample losses
        windows_biased = self.windows is not None and bool(self.windows.biased.any())
        self.scores: LossScores | WindowScores = (
            WindowScores(self.workload.n_train, groups=len(set(kinds))) if windows_biased
            else LossScores(self.workload.n_train, self.sampler.score_rule))
        self.keep_scores = bool(self.sampler.uses_scores) or windows_biased
        self.batched = None
        if spec.sim.batched:
            from hetsim.batched import BatchedSteps

            self.batched = BatchedSteps.create([self.workers[k] for k in self.local], self.workload)

    def _place(self, spec: Spec, policies: Any, labels: np.ndarray):
        """Build the data placement (hetsim.workloads.placement) and return each worker's stream maker;
        shards that depend on the labels are checked here (the rest were checked on load)."""
        kinds, b, n = spec.worker_kinds(), spec.optim.batch_size, self.workload.n_train
        placement = build_placement(spec.data)
        self.updates = 0       # combines so far: the authors' windows count them (rounds, under sync)
        self.windows = None
        shards = None
        if isinstance(placement, Authors):
            self.windows = placement.windows(spec, fixed_steps(spec, policies.scheduler), n)
            self.window_rng = numpy_rng(spec.seed, "placement-window")
        else:
            try:  # checked against the data now: the run's name says which config, as a load's path does
                shards = placement.shards(labels, kinds, b, numpy_rng(spec.seed, "placement"))
                if shards is not None:
                    check_shard_sizes([len(s) for s in shards], kinds, b, spec.data.name)
            except SpecError as e:
                raise SpecError(f"{spec.name}: {e}") from None
            self._data_summary = shard_summary(spec.data.name, spec.data.params, shards, labels,
                                               self.workload.n_classes, kinds)
        names = worker_names(kinds)

        def stream(k: int) -> EpochStream | WindowStream:
            if self.windows is not None:
                return WindowStream(names[k])
            rng = numpy_rng(spec.seed, "data", k)
            return EpochStream(n, rng) if shards is None else EpochStream(len(shards[k]), rng, indices=shards[k])

        return stream

    def _deal_window(self) -> None:
        """The authors' reshuffle (hetsim.workloads.placement.Authors), at the first pull of a window: merge
        the window's scores, deal every worker's slice."""
        assert self.windows is not None
        window = self.windows.window_of(self.updates)
        if window == self.windows.window:
            return
        biased = self.windows.biased
        if isinstance(self.scores, WindowScores):
            self.scores.close_window()
        slices = self.windows.deal(window, self.scores.values, self.window_rng)
        for k in self.local:
            self.workers[k].stream.set_window(window, slices[k], by_loss=bool(biased[k]))

    @property
    def model_bytes(self) -> int:
        return self.global_flat.nbytes

    def set_lr(self, lr: float) -> float:
        for k in self.local:
            self.workers[k].set_lr(lr)
        return lr

    def pull(self, ks: Sequence[int]) -> None:
        """Local workers ks start work: each takes the current global model and a fresh tally (and, under
        the authors' data path, the first pull of a window deals its slices to every local worker)."""
        if self.windows is not None:
            self._deal_window()
        new = self.global_flat.get()
        for k in ks:
            w = self.workers[k]
            w.flat.set(new)
            w.tally = RoundTally()

    def step(self, k: int) -> None:
        """Worker k samples a batch with the shared sampler and takes one SGD step on its replica."""
        indices, n_biased = self.sample(k)
        loss_sum, losses = self.workers[k].train_step(self.workload, indices, self.keep_scores)
        self.record(k, indices, n_biased, loss_sum, losses)

    def sample(self, k: int) -> tuple[np.ndarray, int]:
        w = self.workers[k]
        out = self.sampler.batch(self.infos[k], self.spec.optim.batch_size, w.stream, self.scores, w.sampler_state)
        if type(out) is not tuple or len(out) != 2 or not isinstance(out[0], Batch):
            got = f"a tuple of {len(out)}" if type(out) is tuple else f"a {type(out).__name__}"
            raise HetsimError(f"sampler {self.spec.sampler.name!r}: batch returned {got}; expected (Batch, state) "
                              f"(see README.md, 'Write your own policy')")
        batch, w.sampler_state = out
        return batch.indices, batch.n_biased

    def record(self, k: int, indices: np.ndarray, n_biased: int, loss_sum: float, losses: np.ndarray | None) -> None:
        """Tally one step of worker k; per-sample `losses` (when the sampler uses scores) are merged
        into the loss-score store when the work is combined."""
        t = self.workers[k].tally
        t.steps += 1
        t.samples += len(indices)
        t.biased += n_biased
        t.loss_sum += loss_sum
        if losses is not None:
            t.observations.append((indices, losses))

    def train(self, ks: Sequence[int], steps: Sequence[int]) -> None:
        """Run local work in one go (worker ks[i] takes steps[i]), batched where configured."""
        if self.batched is not None:
            self.batched.run(self, dict(zip(ks, steps)))
            return
        for k, n in zip(ks, steps):
            for _ in range(n):
                self.step(k)

    def tallies(self, ks: Sequence[int]) -> Tallies:
        return Tallies.of(ks, [self.workers[k].tally for k in ks])

    def replicas(self, ks: Sequence[int]) -> torch.Tensor:
        """The local replicas of ks as rows [len(ks), P]."""
        return torch.stack([self.workers[k].flat.get() for k in ks])

    def global_params(self) -> torch.Tensor:
        return self.global_flat.get()

    def install(self, new_global: torch.Tensor) -> None:
        """The new global model (workers take it when they next pull)."""
        self.global_flat.set(new_global)
        self.updates += 1

    def merge_scores(self, observations: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        if self.keep_scores:
            self.scores.merge_all(observations)

    def test_metrics(self) -> tuple[float, float]:
        return test_metrics(self.global_model, self.workload)

    def summary_fields(self) -> dict[str, Any]:
        data = self._data_summary if self.windows is None else {
            "placement": self.spec.data.name, "params": dict(self.spec.data.params), "n_train": self.n_train,
            **self.windows.summary()}
        return {"batched": self.batched is not None, "data": data}

    # -- checkpoints: everything a round boundary needs to continue bit for bit ---------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "global_model": self.global_model.state_dict(),
            "infos": [tuple(i) for i in self.infos],
            "scores": self.scores.values.copy(),
            "samples_total": self.samples_total,
            "workers": {k: {"model": self.workers[k].model.state_dict(),
                            "optimizer": self.workers[k].optimizer.state_dict(),
                            "stream": self.workers[k].stream.state_dict(),
                            "gen": self.workers[k].gen.get_state(),
                            "sampler": self.workers[k].sampler_state} for k in self.local},
            "data": {"updates": self.updates, **({} if self.windows is None else {
                "window": self.windows.window, "window_rng": self.window_rng.bit_generator.state}),
                **({"scores": self.scores.state_dict()} if isinstance(self.scores, WindowScores) else {})},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_infos(state["infos"])
        self.global_model.load_state_dict(state["global_model"])
        self.scores.values[:] = state["scores"]
        self.samples_total = state["samples_total"]
        for k in self.local:
            w, ws = self.workers[k], state["workers"][k]
            w.model.load_state_dict(ws["model"])
            w.optimizer.load_state_dict(ws["optimizer"])
            w.stream.load_state_dict(ws["stream"])
            w.gen.set_state(ws["gen"])
            w.sampler_state = ws["sampler"]
        data = state.get("data", {"updates": 0})  # a checkpoint of before data placements: shared data
        self.updates = data["updates"]
        if self.windows is not None:
            self.windows.window = data["window"]
            self.window_rng.bit_generator.state = data["window_rng"]
            if isinstance(self.scores, WindowScores):
                self.scores.load_state_dict(data["scores"])


class RunSchedule:
    """The run's budgets, lr progress and evaluation schedule: the same in every runner, which
    supplies its own clock (simulated or wall) as `time_s`."""

    def __init__(self, spec: Spec):
        self.stop = spec.stop
        self.eval = spec.eval
        self.next_eval_epoch = spec.eval.every_epochs
        self.diverged_at_round: int | None = None

    def check_divergence(self, record: RoundRecord) -> None:
        """Remember the first round whose training loss or global model is not finite (NaN or inf): SGD
        diverged, and every later round computes on garbage. With stop.on_divergence = "stop" the run
        ends after that round (`stop_reason` "diverged"); with "continue" it runs to its budget."""
        if record.diverged and self.diverged_at_round is None:
            self.diverged_at_round = record.round

    def state_dict(self) -> dict[str, Any]:
        return {"next_eval_epoch": self.next_eval_epoch, "diverged_at_round": self.diverged_at_round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_eval_epoch = state["next_eval_epoch"]
        self.diverged_at_round = state["diverged_at_round"]

    def progress(self, rounds_done: int, time_s: float, epochs: float) -> float:
        """Share of the budget already used, in [0, 1] (the largest over the budgets that are set)."""
        s = self.stop
        parts = [rounds_done / s.max_rounds if s.max_rounds else 0.0, time_s / s.max_time_s if s.max_time_s else 0.0,
                 epochs / s.max_epochs if s.max_epochs else 0.0]
        return max(parts)

    def stop_reason(self, rounds_done: int, time_s: float, epochs: float, reached_target: bool) -> str:
        s = self.stop
        if self.diverged_at_round is not None and s.on_divergence == "stop":
            return "diverged"
        if s.stop_at_target and reached_target:
            return "target_accuracy"
        if s.max_rounds and rounds_done >= s.max_rounds:
            return "max_rounds"
        if s.max_time_s and time_s >= s.max_time_s:
            return "max_time_s"
        if s.max_epochs and epochs >= s.max_epochs:
            return "max_epochs"
        return ""

    def eval_due(self, round: int, epochs: float) -> bool:
        """Whether to evaluate after `round` (every_rounds, or each new multiple of every_epochs)."""
        e = self.eval
        due = bool(e.every_rounds) and round % e.every_rounds == 0
        if e.every_epochs and epochs >= self.next_eval_epoch:
            due = True
            # a round of 10^4 devices can cover thousands of multiples: jump over all but the last ones
            # (one step at a time, as before, when a round covers fewer than two)
            skip = math.floor((epochs - self.next_eval_epoch) / e.every_epochs) - 1
            if skip > 0:
                self.next_eval_epoch += skip * e.every_epochs
            while self.next_eval_epoch <= epochs:
                self.next_eval_epoch += e.every_epochs
        return due
