"""Policies the backend tests plug in by import path (`backend_policies:SitOutInTurn`)."""

from dataclasses import dataclass

from hetsim.policies import RoundPlan, Scheduler


@dataclass(frozen=True)
class SitOutInTurn(Scheduler):
    """Stateful and seeded: plan after plan, worker 0, then worker 1, ..., then nobody sits the round
    out (0 steps), counted in the state rather than read from `round` (so a resume that lost the state
    plans differently); the others take 1 to 3 steps drawn from the scheduler's RNG."""

    stateful = True

    def init_state(self, workers):
        return {"planned": 0}

    def plan(self, round, workers, rng, state):
        out = state["planned"] % (len(workers) + 1)
        steps = tuple(0 if i == out else int(rng.integers(1, 4)) for i in range(len(workers)))
        return RoundPlan(steps), {"planned": state["planned"] + 1}
