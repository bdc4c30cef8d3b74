"""The shared training core: replicas, local steps, loss scores, aggregation, evaluation.

It knows no clock. The simulator drives it on a virtual clock, a real backend on the wall clock;
both call the same methods in the same order, so with fixed local steps they make the same decisions
and compute the same numbers.

A round, as every runner executes it::

    plan = core.plan(round)                       # scheduler: local steps (or a time budget)
    for each worker k, while its plan says so:
        core.local_step(k)                        # sampler picks a batch, one SGD step, losses recorded
    record = core.aggregate(round)                # aggregator combines replicas; loss scores merged
    core.evaluate()                               # when due
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hetsim import policies
from hetsim.config import OptimSpec, Spec
from hetsim.policies import Contribution, RoundPlan, WorkerInfo
from hetsim.policies.sampling import EpochStream, LossScores
from hetsim.seeding import derive, numpy_rng, torch_generator
from hetsim.workloads import Workload, build_workload


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
def evaluate(model: nn.Module, workload: Workload, batch_size: int = 1000) -> tuple[float, float]:
    """(mean test loss, test accuracy) of `model` on the workload's test set."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(workload.test_y), batch_size):
        x = workload.prepare(workload.test_x[start:start + batch_size], False, None)
        y = workload.test_y[start:start + batch_size]
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
    model.train()
    n = len(workload.test_y)
    return loss_sum / n, correct / n


@dataclass
class RoundTally:
    """What one worker did in the current round."""

    steps: int = 0
    samples: int = 0
    biased: int = 0
    loss_sum: float = 0.0
    observations: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


class Worker:
    """One replica: model, SGD optimiser (its momentum stays local, as the reference), data stream,
    augmentation generator, and its tally for the current round."""

    def __init__(self, info: WorkerInfo, workload: Workload, spec: Spec, init: torch.Tensor):
        self.info = info
        self.model = workload.make_model()
        self.flat = FlatParams(self.model)
        self.flat.set(init)
        o = spec.optim
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum,
                                         weight_decay=o.weight_decay)
        self.stream = EpochStream(workload.n_train, numpy_rng(spec.seed, "data", info.index))
        self.gen = torch_generator(spec.seed, "augment", info.index)
        self.tally = RoundTally()
        self.step_time_sum = 0.0
        self.step_time_count = 0

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train_step(self, workload: Workload, indices: np.ndarray) -> np.ndarray:
        """One SGD step on the given samples; returns the per-sample losses of the forward pass."""
        idx = torch.from_numpy(indices)
        x = workload.prepare(workload.train_x[idx], True, self.gen)
        losses = F.cross_entropy(self.model(x), workload.train_y[idx], reduction="none")
        self.optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        self.optimizer.step()
        return losses.detach().numpy().astype(np.float64)


@dataclass(frozen=True)
class RoundRecord:
    """A round's decisions and outcome, as written to the decisions log and metrics."""

    round: int
    local_steps: tuple[int, ...]
    samples: tuple[int, ...]
    biased_samples: tuple[int, ...]
    weights: tuple[float, ...]
    train_loss: float
    time_budget_s: float | None

    def as_json(self) -> dict[str, Any]:
        return {"round": self.round, "local_steps": list(self.local_steps), "samples": list(self.samples),
                "biased_samples": list(self.biased_samples), "weights": [float(w) for w in self.weights],
                "time_budget_s": self.time_budget_s}


class TrainingCore:
    """The protocol of biased local SGD over all workers of a spec, without a clock."""

    def __init__(self, spec: Spec, workload: Workload | None = None,
                 profile_step_times: Sequence[float] | None = None):
        self.spec = spec
        self.workload = workload or build_workload(spec.workload)
        self.scheduler = policies.build("scheduler", spec.scheduler)
        self.sampler = policies.build("sampler", spec.sampler)
        self.aggregator = policies.build("aggregator", spec.aggregator)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive(spec.seed, "init"))
            self.global_model = self.workload.make_model()
        self.global_flat = FlatParams(self.global_model)
        init = self.global_flat.get()
        kinds = spec.worker_kinds()
        times = profile_step_times or [1.0] * len(kinds)
        self.workers = [Worker(WorkerInfo(k, kind, float(times[k])), self.workload, spec, init)
                        for k, kind in enumerate(kinds)]
        self.scores = LossScores(self.workload.n_train, getattr(self.sampler, "score_rule", "latest"))
        self.samples_total = 0

    @property
    def model_bytes(self) -> int:
        return self.global_flat.nbytes

    @property
    def epochs(self) -> float:
        return self.samples_total / self.workload.n_train

    def worker_infos(self) -> list[WorkerInfo]:
        infos = []
        for w in self.workers:
            observed = w.step_time_sum / w.step_time_count if w.step_time_count else None
            infos.append(WorkerInfo(w.info.index, w.info.kind, w.info.profile_step_time_s, observed))
        return infos

    def plan(self, round: int) -> RoundPlan:
        plan = self.scheduler.plan(round, self.worker_infos())
        if len(plan.local_steps) != len(self.workers):
            raise ValueError(f"scheduler planned {len(plan.local_steps)} workers, cluster has {len(self.workers)}")
        return plan

    def set_lr(self, progress: float) -> float:
        lr = lr_at(self.spec.optim, progress)
        for w in self.workers:
            w.set_lr(lr)
        return lr

    def local_step(self, k: int) -> None:
        """Worker k samples a batch with the shared sampler and takes one SGD step on its replica."""
        w = self.workers[k]
        batch = self.sampler.batch(w.info, self.spec.optim.batch_size, w.stream, self.scores)
        losses = w.train_step(self.workload, batch.indices)
        t = w.tally
        t.steps += 1
        t.samples += len(batch.indices)
        t.biased += batch.n_biased
        t.loss_sum += float(losses.sum())
        t.observations.append((batch.indices, losses))

    def record_step_time(self, k: int, seconds: float) -> None:
        """What the worker's clock measured for one step (feeds WorkerInfo.observed_step_time_s)."""
        self.workers[k].step_time_sum += seconds
        self.workers[k].step_time_count += 1

    def aggregate(self, round: int, time_budget_s: float | None = None) -> RoundRecord:
        """Combine the replicas with the aggregator, merge loss scores, reset every replica to the new
        global model, and return the round's record."""
        tallies = [w.tally for w in self.workers]
        contributions = [Contribution(w.info.index, w.info.kind, t.steps, t.samples,
                                      t.loss_sum / t.samples if t.samples else 0.0)
                         for w, t in zip(self.workers, tallies)]
        replicas = torch.stack([w.flat.get() for w in self.workers])
        new_global, weights = self.aggregator.combine(self.global_flat.get(), replicas, contributions)
        self.global_flat.set(new_global)
        for w in self.workers:
            w.flat.set(new_global)
        for t in tallies:  # worker order: deterministic, the same in every runner
            self.scores.merge_all(t.observations)
        samples = sum(t.samples for t in tallies)
        self.samples_total += samples
        record = RoundRecord(
            round=round,
            local_steps=tuple(t.steps for t in tallies),
            samples=tuple(t.samples for t in tallies),
            biased_samples=tuple(t.biased for t in tallies),
            weights=tuple(float(x) for x in weights),
            train_loss=sum(t.loss_sum for t in tallies) / samples if samples else float("nan"),
            time_budget_s=time_budget_s,
        )
        for w in self.workers:
            w.tally = RoundTally()
        return record

    def evaluate(self) -> tuple[float, float]:
        return evaluate(self.global_model, self.workload)
