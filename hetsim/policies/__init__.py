"""Scheduling, sampling and aggregation policies (importing this package registers the built-ins)."""

from hetsim.policies import aggregation, sampling, scheduling  # noqa: F401  (registration)
from hetsim.policies.base import (Aggregator, Batch, Contribution, Contributions, NameRef, Policy, RoundPlan, Sampler,
                                  Scheduler, WorkerInfo, build, check_names, names, register)

__all__ = ["Aggregator", "Batch", "Contribution", "Contributions", "NameRef", "Policy", "RoundPlan", "Sampler",
           "Scheduler", "WorkerInfo", "build", "check_names", "names", "register"]
