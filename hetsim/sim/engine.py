"""A SimPy model of a cluster: real SGD math for every worker, a virtual clock for time.

Each round reads like the protocol it models::

    plan   = scheduler decides local steps (or a time budget) for every worker
    device k:  repeat: sample a batch, one real SGD step, yield env.timeout(step time from k's profile)
    barrier:   wait for all devices (the fast ones are idle meanwhile)
    exchange:  yield env.timeout(collective cost: latency + bytes / bandwidth)
    aggregate: the aggregator combines the replicas; loss scores are merged
    evaluate:  when due, yield env.timeout(eval time) and test the global model

The math of a round depends only on the plan, never on event order (workers sample from the loss
scores as of the round's start), so the same seed gives the same run, bit for bit.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import simpy

from hetsim.cluster import DeviceModel, device_model, exchange_time
from hetsim.config import Spec
from hetsim.policies import RoundPlan
from hetsim.results import (RunResult, RunWriter, time_to_accuracy, trace_event, trace_thread_names, versions,
                            worker_names)
from hetsim.seeding import numpy_rng
from hetsim.training import TrainingCore
from hetsim.workloads import Workload

ProgressFn = Callable[[dict], None]


class Simulation:
    def __init__(self, spec: Spec, run_dir=None, progress: ProgressFn | None = None,
                 workload: Workload | None = None):
        self.spec = spec
        self.devices: list[DeviceModel] = [
            device_model(d, spec.workload.name, spec.optim.batch_size, f"cluster.devices[{i}]")
            for i, d in enumerate(spec.cluster.devices) for _ in range(d.count)]
        self.core = TrainingCore(spec, workload, [d.step_time.mean_s for d in self.devices])
        self.evaluator = int(np.argmin([d.step_time.mean_s for d in self.devices]))
        self.clock_rngs = [numpy_rng(spec.seed, "clock", k) for k in range(len(self.devices))]
        self.exchange_s = exchange_time(spec.cluster.network, self.devices, self.core.model_bytes)
        self.names = worker_names(spec.worker_kinds())
        self.writer = RunWriter(run_dir, spec)
        self.writer.trace.extend(trace_thread_names(self.names))
        self.progress = progress
        self.env = simpy.Environment()
        self.busy_s = [0.0] * len(self.devices)
        self._finished = [0.0] * len(self.devices)
        self.round = 0
        self.stopped_by = ""
        self._next_eval_epoch = spec.eval.every_epochs

    # -- budgets -------------------------------------------------------------------------------

    def progress_fraction(self) -> float:
        """How far through the run's budget we are (drives the lr schedule)."""
        s = self.spec.stop
        parts = []
        if s.max_rounds:
            parts.append(self.round / s.max_rounds)
        if s.max_time_s:
            parts.append(self.env.now / s.max_time_s)
        if s.max_epochs:
            parts.append(self.core.epochs / s.max_epochs)
        return max(parts)

    def _stop_reason(self, reached_target: bool) -> str:
        s = self.spec.stop
        if s.stop_at_target and reached_target:
            return "target_accuracy"
        if s.max_rounds and self.round >= s.max_rounds:
            return "max_rounds"
        if s.max_time_s and self.env.now >= s.max_time_s:
            return "max_time_s"
        if s.max_epochs and self.core.epochs >= s.max_epochs:
            return "max_epochs"
        return ""

    def _eval_due(self) -> bool:
        e = self.spec.eval
        due = bool(e.every_rounds) and self.round % e.every_rounds == 0
        if e.every_epochs and self.core.epochs >= self._next_eval_epoch:
            due = True
            while self._next_eval_epoch <= self.core.epochs:
                self._next_eval_epoch += e.every_epochs
        return due

    # -- processes -----------------------------------------------------------------------------

    def device(self, k: int, plan: RoundPlan, round_start: float):
        """Device k's local work for one round: real SGD steps, each taking a profiled step time."""
        target = plan.local_steps[k]
        steps = 0
        while (steps < target) if target is not None else (steps == 0 or self.env.now - round_start < plan.time_budget_s):
            self.core.local_step(k)
            dt = self.devices[k].step_time.sample(self.clock_rngs[k])
            yield self.env.timeout(dt)
            self.core.record_step_time(k, dt)
            steps += 1
        self.busy_s[k] += self.env.now - round_start
        self._finished[k] = self.env.now
        self._trace("compute", k, round_start, self.env.now, steps=steps)

    def _trace(self, kind: str, k: int, start: float, end: float, **args) -> None:
        limit = self.spec.trace.max_rounds
        if (not limit or self.round <= limit) and end > start:
            self.writer.trace.append(trace_event(kind, k, start, end, round=self.round, **args))

    def _evaluate(self) -> tuple[float, float]:
        """Evaluate the global model on the fastest device; the others wait for the next round."""
        start = self.env.now
        eval_s = self.devices[self.evaluator].eval_time_s
        if eval_s > 0:
            yield self.env.timeout(eval_s)
            for k in range(len(self.devices)):
                self._trace("eval" if k == self.evaluator else "idle", k, start, self.env.now)
        return self.core.evaluate()

    def coordinator(self):
        n = len(self.devices)
        # the initial model's accuracy anchors the curves; it is not charged to the clock
        test_loss, test_acc = self.core.evaluate()
        self._row(float("nan"), test_loss, test_acc, self.core.set_lr(0.0))
        while True:
            reached = self.writer.rows[-1]["test_acc"] >= self.spec.stop.target_accuracy  # NaN: False
            self.stopped_by = self._stop_reason(reached)
            if self.stopped_by:
                return
            lr = self.core.set_lr(self.progress_fraction())  # progress = share of the budget already used
            self.round += 1
            plan = self.core.plan(self.round)
            start = self.env.now
            devices = [self.env.process(self.device(k, plan, start)) for k in range(n)]
            yield self.env.all_of(devices)
            barrier = self.env.now
            for k in range(n):  # fast devices wait for the slowest at the synchronisation point
                self._trace("idle", k, self._finished[k], barrier)
            if self.exchange_s > 0:
                yield self.env.timeout(self.exchange_s)
                for k in range(n):
                    self._trace("comm", k, barrier, self.env.now, bytes=self.core.model_bytes)
            record = self.core.aggregate(self.round, plan.time_budget_s)
            self.writer.decisions.append(record.as_json())
            test_loss = test_acc = float("nan")
            if self._eval_due() or self._stop_reason(False):
                test_loss, test_acc = yield from self._evaluate()
            self._row(record.train_loss, test_loss, test_acc, lr)

    def _row(self, train_loss: float, test_loss: float, test_acc: float, lr: float) -> None:
        row = {"round": self.round, "time_s": self.env.now, "epoch": self.core.epochs,
               "samples": self.core.samples_total, "lr": lr, "train_loss": train_loss,
               "test_loss": test_loss, "test_acc": test_acc}
        self.writer.add_row(row)
        if self.progress:
            self.progress(row)

    # -- run -----------------------------------------------------------------------------------

    def run(self) -> RunResult:
        wall0 = time.perf_counter()
        self.env.process(self.coordinator())
        self.env.run()
        return self.writer.finish(self.summary(time.perf_counter() - wall0))

    def summary(self, wall_s: float) -> dict:
        rows = self.writer.rows
        evaluated = [r for r in rows if not math.isnan(r["test_acc"])]
        target = self.spec.stop.target_accuracy
        tta = time_to_accuracy([r["time_s"] for r in evaluated], [r["test_acc"] for r in evaluated], target)
        hit = next((r for r in evaluated if r["test_acc"] >= target), None)
        total = self.env.now
        return {
            "name": self.spec.name, "engine": "sim", "fidelity": "emulated", "seed": self.spec.seed,
            "workload": self.spec.workload.name, "n_workers": len(self.devices),
            "scheduler": self.spec.scheduler.name, "sampler": self.spec.sampler.name,
            "aggregator": self.spec.aggregator.name,
            "target_accuracy": target, "time_to_accuracy_s": tta,
            "rounds_to_accuracy": hit["round"] if hit else None, "epochs_to_accuracy": hit["epoch"] if hit else None,
            "final_test_acc": evaluated[-1]["test_acc"], "best_test_acc": max(r["test_acc"] for r in evaluated),
            "final_train_loss": rows[-1]["train_loss"], "rounds": self.round, "time_s": total,
            "epochs": self.core.epochs, "samples": self.core.samples_total, "stopped_by": self.stopped_by,
            "exchange_s": self.exchange_s, "model_bytes": self.core.model_bytes,
            "utilization": {name: (busy / total if total else 0.0) for name, busy in zip(self.names, self.busy_s)},
            "device_sources": {name: d.source for name, d in zip(self.names, self.devices)},
            "wall_time_s": wall_s, "versions": versions(),
        }


def simulate(spec: Spec, out: str | None = None, progress: ProgressFn | None = None) -> RunResult:
    """Run `spec` in the simulator; with `out`, write the run directory there.

    Example::

        result = simulate(load_spec("examples/digits.toml"), out="runs/digits")
        result.summary["time_to_accuracy_s"]
    """
    return Simulation(spec, out, progress).run()
