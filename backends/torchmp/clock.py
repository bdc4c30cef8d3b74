"""The wall clock: the Clock port of a real process, where time is what passes.

Durations are measured per rank with `time.monotonic()` and placed on one timeline that starts at a
barrier every rank passes before round 1: t = 0 there (plus the time a resumed run had already
used). Different hosts' `time.time()` are never compared, so the timeline holds across nodes under
torchrun, up to the barrier's release skew (a network latency, not a clock offset).

Example::

    clock = WallClock(torch.device("cpu"), comm, slowdown=2.0)
    clock.start()                                   # t = 0 in every process, after a barrier
    work = run_to_end(clock.local_work([rank], plan, core.train, core.step))
"""

from __future__ import annotations

import time
from typing import Any, Callable, Generator, Mapping, Sequence

import numpy as np
import torch

from hetsim.cluster import within_budget
from hetsim.policies import RoundPlan
from hetsim.protocol import Clock, Comm, Work, run_to_end


class WallClock(Clock):
    """Real time on one rank.

    device: where the rank computes (CUDA steps are synchronised before they are timed).
    comm: the ranks' Comm (its barrier starts the timeline).
    slowdown: an emulated slowdown k pads each step with a sleep of (k - 1) x its measured time, so
    a step takes k times as long as the device's own (`cluster.devices[].emulated_slowdown`).
    summary: what summary.json says of the devices (all ranks': devices, threads, ...).
    """

    def __init__(self, device: torch.device, comm: Comm, slowdown: float = 1.0,
                 summary: Mapping[str, Any] | None = None):
        self.device = torch.device(device)
        self.comm = comm
        self.slowdown = slowdown
        self.summary = dict(summary or {})
        self._elapsed = 0.0  # a resumed run's time at its checkpoint
        self._t0: float | None = None

    def start(self) -> None:
        """Start the common timeline: every rank leaves a barrier together, at t = the leader's time of
        the checkpoint resumed from (0 in a fresh run), so the ranks' clocks agree from there on."""
        elapsed, = self.comm.agree([self._elapsed])
        self.comm.barrier()
        self._t0 = time.monotonic() - elapsed

    def now(self) -> float:
        if self._t0 is None:
            raise RuntimeError("WallClock.now() before start(): the timeline begins at the ranks' common barrier")
        return time.monotonic() - self._t0

    def online(self, ks: Sequence[int]) -> list[int]:
        # a real device is there for the whole run: the launcher refuses the simulator's offline windows
        return list(ks)

    def until_online(self) -> Generator:
        raise RuntimeError("the wall clock has no offline devices to wait for")

    def local_work(self, ks: Sequence[int], plan: RoundPlan, train: Callable[[list[int], list[int]], None],
                   step: Callable[[int], None]) -> Generator[None, None, Work]:
        """Run the round's local steps of this process's workers ks (plan.local_steps[i] for ks[i]),
        one `step(k)` at a time, each timed; returns their Work on the common timeline.

        Every step is timed, so the round runs step by step: `train` (a whole round at once) is for
        clocks that charge time without watching it. Under a time budget a worker starts another step
        while `within_budget(elapsed, budget)` holds (at least one step)."""
        if len(plan.local_steps) != len(ks):
            raise ValueError(f"local_work: a plan for {len(plan.local_steps)} workers, {len(ks)} to run")
        budget = plan.time_budget_s
        steps, start, finish = [], [], []
        for k, target in zip(ks, plan.local_steps):
            began = self.now()
            n = 0
            while (n < target) if target is not None else (n == 0 or within_budget(self.now() - began, budget)):
                t = time.monotonic()
                step(k)
                if self.device.type == "cuda":  # kernels run asynchronously: wait for them before timing
                    torch.cuda.synchronize(self.device)
                if self.slowdown > 1:
                    time.sleep((self.slowdown - 1) * (time.monotonic() - t))
                n += 1
            steps.append(n)
            start.append(began)
            finish.append(self.now())
        return Work(steps, np.array(start), np.array(finish))
        yield  # a generator, as the port's contract says; the wall clock never yields

    def drive(self, steps: Generator) -> None:
        run_to_end(steps)

    def summary_fields(self) -> dict[str, Any]:
        return {"fidelity": "real", **self.summary}

    def state_dict(self) -> dict[str, Any]:
        return {"time_s": self.now()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._elapsed = float(state["time_s"])

    def exchange(self, ks: Sequence[int], nbytes: int) -> Generator:
        """Nothing to advance: the exchange itself takes the real time it takes."""
        return
        yield

    def evaluation(self, evaluator: int) -> Generator:
        """Nothing to advance: the evaluation itself takes the real time it takes."""
        return
        yield
