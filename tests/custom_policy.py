"""A user's own scheduler, plugged in by import path in tests (`custom_policy:EveryOther`)."""

from dataclasses import dataclass

from hetsim.policies import NameRef, RoundPlan, Scheduler


@dataclass(frozen=True)
class EveryOther(Scheduler):
    steps: int = 2

    def plan(self, round, workers):
        return RoundPlan(tuple(self.steps if w.index % 2 == 0 else 1 for w in workers))


@dataclass(frozen=True)
class Pinned(Scheduler):
    """A user's scheduler whose parameters name a kind, workers, a device and a file (all checked on load)."""
    kind: str = "gpu"
    workers: tuple[int, ...] = ()
    device: str = "cpu"
    steps_file: str = ""

    name_refs = {"kind": NameRef("kind"), "workers": NameRef("worker"), "device": NameRef("device"),
                 "steps_file": NameRef("file")}

    def plan(self, round, workers):
        return RoundPlan(tuple(2 if w.index in self.workers else 1 for w in workers))


@dataclass(frozen=True)
class MisDeclared(Scheduler):
    """A plug-in that declares a name reference for a parameter it does not have."""
    steps: int = 1

    name_refs = {"kinds": NameRef("kind")}

    def plan(self, round, workers):
        return RoundPlan(tuple(self.steps for _ in workers))
