"""A user's own policies, plugged in by import path in tests (`custom_policy:EveryOther`)."""

from dataclasses import dataclass

import numpy as np

from hetsim.policies import Aggregator, NameRef, RoundPlan, Scheduler


@dataclass(frozen=True)
class EveryOther(Scheduler):
    """Written against the OLD contract (plan(round, workers) -> RoundPlan, no state, no rng): kept as
    the example that `policies.build` adapts, with a warning."""

    steps: int = 2

    def plan(self, round, workers):
        return RoundPlan(tuple(self.steps if w.index % 2 == 0 else 1 for w in workers))


@dataclass(frozen=True)
class StepsAtRound(Scheduler):
    """`steps` local steps for every worker, and `special` steps in round `at` only."""

    steps: int = 1
    at: int = 3
    special: int = 2

    def plan(self, round, workers, rng, state):
        return RoundPlan(tuple(self.special if round == self.at else self.steps for _ in workers)), state


@dataclass(frozen=True)
class NanWhenSteps(Aggregator):
    """The plain mean, except in a round where a worker took `steps` local steps: then every weight is
    NaN, so the new global model is NaN. A stand-in for SGD blowing up in a known round, stateless so a
    resumed run and every process of the real backend see it alike."""

    steps: int = 2

    def weights(self, arrivals):
        n = len(arrivals)
        return np.full(n, np.nan if any(a.local_steps == self.steps for a in arrivals) else 1.0 / n)


@dataclass(frozen=True)
class Pinned(Scheduler):
    """A user's scheduler whose parameters name a kind, workers, a device and a file (all checked on load)."""
    kind: str = "gpu"
    workers: tuple[int, ...] = ()
    device: str = "cpu"
    steps_file: str = ""

    name_refs = {"kind": NameRef("kind"), "workers": NameRef("worker"), "device": NameRef("device"),
                 "steps_file": NameRef("file")}

    def plan(self, round, workers, rng, state):
        return RoundPlan(tuple(2 if w.index in self.workers else 1 for w in workers)), state


@dataclass(frozen=True)
class MisDeclared(Scheduler):
    """A plug-in that declares a name reference for a parameter it does not have."""
    steps: int = 1

    name_refs = {"kinds": NameRef("kind")}

    def plan(self, round, workers, rng, state):
        return RoundPlan(tuple(self.steps for _ in workers)), state


@dataclass(frozen=True)
class SitOut(Scheduler):
    """`steps` local steps for every worker, except worker `worker`, which sits out (0 steps) every
    round divisible by `every`: a non-participant in known rounds."""

    steps: int = 2
    worker: int = 0
    every: int = 2

    name_refs = {"worker": NameRef("worker")}

    def plan(self, round, workers, rng, state):
        out = round % self.every == 0
        return RoundPlan(tuple(0 if out and w.index == self.worker else self.steps for w in workers)), state


@dataclass(frozen=True)
class RandomSitOut(Scheduler):
    """`steps` local steps for every worker but one, drawn from the scheduler's rng each round, that
    sits out. Stateful: the state counts how often each worker sat out (so a resumed run must restore
    both the rng and the state to plan alike)."""

    steps: int = 2

    stateful = True

    def init_state(self, workers):
        return {"sat_out": [0] * len(workers)}

    def plan(self, round, workers, rng, state):
        out = workers[int(rng.integers(len(workers)))].index
        sat_out = list(state["sat_out"])
        sat_out[out] += 1
        return RoundPlan(tuple(0 if w.index == out else self.steps for w in workers)), {"sat_out": sat_out}
