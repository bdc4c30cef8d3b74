"""Selection, scheduling, sampling and aggregation policies (importing this package registers the built-ins)."""

from hetsim.policies import aggregation, sampling, scheduling, selection, server  # noqa: F401  (registration)
from hetsim.policies.base import (Aggregator, Arrivals, Batch, Contribution, Contributions, NameRef, Policy, RoundPlan,
                                  Sampler, Scheduler, Selector, WorkerInfo, build, check_names, names, register)
from hetsim.policies.server import ServerOptimizer

__all__ = ["Aggregator", "Arrivals", "Batch", "Contribution", "Contributions", "NameRef", "Policy", "RoundPlan",
           "Sampler", "Scheduler", "Selector", "ServerOptimizer", "WorkerInfo", "build", "check_names", "names",
           "register"]
