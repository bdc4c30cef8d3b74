"""A user's own scheduler, plugged in by import path in tests (`custom_policy:EveryOther`)."""

from dataclasses import dataclass

from hetsim.policies import RoundPlan, Scheduler


@dataclass(frozen=True)
class EveryOther(Scheduler):
    steps: int = 2

    def plan(self, round, workers):
        return RoundPlan(tuple(self.steps if w.index % 2 == 0 else 1 for w in workers))
