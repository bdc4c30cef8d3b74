"""A user's own policy that breaks the contract is one line naming the policy and what it broke, not a
traceback from deep in the run: a wrong `init_state`, a state a checkpoint cannot hold, a method that
returns the wrong shape. (Found by trying hetsim from the README as a newcomer.)"""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from hetsim.config import PolicySpec
from hetsim.errors import HetsimError, SpecError
from hetsim.policies import Aggregator, Batch, RoundPlan, Sampler, Scheduler, build
from hetsim.results import unsavable
from hetsim.sim import simulate

ME = "test_policy_contract"  # this module, importable as a plug-in ('module:Class') from tests/


@dataclass(frozen=True)
class InitWithoutWorkers(Scheduler):
    stateful = True

    def init_state(self):  # the contract passes the workers
        return {"count": 0}

    def plan(self, round, workers, rng, state):
        return RoundPlan(tuple(1 for _ in workers)), state


@dataclass(frozen=True)
class SetFromStart(Scheduler):
    """Remembers the rounds it planned in a set: a checkpoint cannot hold one."""

    stateful = True

    def init_state(self, workers):
        return {"seen": set()}

    def plan(self, round, workers, rng, state):
        return RoundPlan(tuple(1 for _ in workers)), {"seen": state["seen"] | {round}}


@dataclass(frozen=True)
class SetFromRound(Scheduler):
    """Plain state until round `at`, then a set in it: only the checkpoint after that round can see it."""

    at: int = 3
    stateful = True

    def init_state(self, workers):
        return {"rounds": [0]}

    def plan(self, round, workers, rng, state):
        rounds = list(state["rounds"]) + [round]
        return RoundPlan(tuple(1 for _ in workers)), {"rounds": set(rounds) if round >= self.at else rounds}


class Counter:
    def __init__(self, n):
        self.n = n


@dataclass(frozen=True)
class ObjectStateSampler(Sampler):
    uses_scores = False
    stateful = True

    def init_state(self, worker):
        return {"calls": [Counter(0)]}

    def batch(self, worker, batch_size, stream, scores, state):
        return Batch(stream.take(batch_size), 0), {"calls": [Counter(state["calls"][0].n + 1)]}


@dataclass(frozen=True)
class GeneratorStateMean(Aggregator):
    stateful = True

    def init_state(self, global_params):
        return {"rng": np.random.default_rng(0)}

    def weights(self, arrivals):
        return np.full(len(arrivals), 1.0 / len(arrivals))


@dataclass(frozen=True)
class ForgetsState(Scheduler):
    def plan(self, round, workers, rng, state):
        return RoundPlan(tuple(1 for _ in workers))  # the contract returns (plan, state)


@dataclass(frozen=True)
class ForgetsStateMean(Aggregator):
    def combine(self, global_params, arrivals, state):
        w = np.full(len(arrivals), 1.0 / len(arrivals))
        return arrivals.weighted_sum(w), w  # the contract returns (new global, weights, state)


@dataclass(frozen=True)
class OneWeightTooMany(Aggregator):
    def combine(self, global_params, arrivals, state):
        w = np.full(len(arrivals), 1.0 / len(arrivals))
        return arrivals.weighted_sum(w), np.append(w, 0.0), state


@dataclass(frozen=True)
class ForgetsStateSampler(Sampler):
    uses_scores = False

    def batch(self, worker, batch_size, stream, scores, state=None):
        return Batch(stream.take(batch_size), 0)  # the contract returns (batch, state)


def files(path):
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


# -- init_state's signature, checked when the spec is built ----------------------------------------

def test_an_init_state_that_does_not_take_the_contracts_argument_is_a_spec_error_on_build():
    with pytest.raises(SpecError, match=rf"^scheduler.name: {ME}:InitWithoutWorkers: "
                                        r"InitWithoutWorkers.init_state\(self\) must take one argument \(workers\)$"):
        build("scheduler", PolicySpec(f"{ME}:InitWithoutWorkers"))


# -- state a checkpoint cannot hold ---------------------------------------------------------------

def test_where_a_state_holds_what_a_checkpoint_cannot_store():
    assert unsavable({"a": 1, "seen": set()}) == "state['seen'] is of type set"
    assert unsavable([1, {"x": Counter(0)}]) == f"state[1]['x'] is of type {ME}.Counter"
    assert unsavable({"o": np.array([object()])}) == "state['o'] is a numpy array of dtype object"
    assert unsavable({frozenset(): 1}) == "a key of state is of type frozenset"
    assert unsavable({"r": np.random.default_rng(0)}) == "state['r'] is of type numpy.random._generator.Generator"
    assert unsavable({"x": np.zeros(3), "t": torch.ones(2), 0: (1, 2.0, "s", None, [True]), "f": np.float64(1)}) is None


def test_a_schedulers_first_state_that_a_checkpoint_cannot_hold_is_one_line_before_anything_is_written(
        tiny_spec, tmp_path):
    spec = tiny_spec(f"scheduler={{name='{ME}:SetFromStart'}}", "run.checkpoint_every=2")
    with pytest.raises(HetsimError, match=rf"^scheduler '{ME}:SetFromStart': its state cannot be saved in a "
                                          r"checkpoint: state\['seen'\] is of type set; a policy's state holds "
                                          r"tensors, numpy arrays and plain data only"):
        simulate(spec, out=tmp_path / "run")
    assert files(tmp_path / "run") == []


def test_without_checkpoints_a_state_of_any_type_runs(tiny_spec, tmp_path):
    # the restriction is the checkpoint's (loaded without unpickling code); a run that saves none is free
    result = simulate(tiny_spec(f"scheduler={{name='{ME}:SetFromStart'}}"), out=tmp_path / "run")
    assert result.summary["rounds"] == 4


def test_a_state_that_becomes_unsavable_mid_run_is_one_line_at_the_checkpoint_naming_the_policy(tiny_spec, tmp_path):
    spec = tiny_spec(f"scheduler={{name='{ME}:SetFromRound', params={{at=3}}}}", "run.checkpoint_every=2",
                     "stop.max_rounds=6")
    with pytest.raises(HetsimError, match=rf"^scheduler '{ME}:SetFromRound': its state cannot be saved in a "
                                          r"checkpoint: state\['rounds'\] is of type set;"):
        simulate(spec, out=tmp_path / "run")
    # the checkpoint after round 2 stays; rounds 0..4 were written (round 4's checkpoint failed)
    rounds = [line.split(",")[0] for line in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]]
    assert rounds == ["0", "1", "2", "3", "4"]
    assert (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_samplers_state_that_a_checkpoint_cannot_hold_names_the_sampler_and_the_worker(tiny_spec, tmp_path):
    spec = tiny_spec(f"sampler={{name='{ME}:ObjectStateSampler'}}", "run.checkpoint_every=1")
    with pytest.raises(HetsimError, match=rf"^sampler '{ME}:ObjectStateSampler' \(worker cpu0\): its state cannot be "
                                          rf"saved in a checkpoint: state\['calls'\]\[0\] is of type {ME}.Counter;"):
        simulate(spec, out=tmp_path / "run")
    assert files(tmp_path / "run") == []


def test_an_aggregators_state_that_a_checkpoint_cannot_hold_names_the_aggregator(tiny_spec, tmp_path):
    spec = tiny_spec(f"aggregator={{name='{ME}:GeneratorStateMean'}}", "run.checkpoint_every=1")
    with pytest.raises(HetsimError, match=rf"^aggregator '{ME}:GeneratorStateMean': its state cannot be saved in a "
                                          r"checkpoint: state\['rng'\] is of type numpy.random._generator.Generator;"):
        simulate(spec, out=tmp_path / "run")


def test_the_time_only_fidelity_checks_the_schedulers_state_too(tiny_spec, tmp_path):
    spec = tiny_spec(f"scheduler={{name='{ME}:SetFromStart'}}", "run.checkpoint_every=2", "sim.fidelity='time_only'")
    with pytest.raises(HetsimError, match=rf"^scheduler '{ME}:SetFromStart': its state cannot be saved"):
        simulate(spec, out=tmp_path / "run")


# -- a method that returns the wrong shape --------------------------------------------------------

def test_a_plan_that_returns_no_state_is_one_line_naming_the_scheduler(tiny_spec):
    with pytest.raises(HetsimError, match=rf"^scheduler '{ME}:ForgetsState': plan returned a RoundPlan; expected "
                                          r"\(RoundPlan, state\) \(see README.md, 'Write your own policy'\)$"):
        simulate(tiny_spec(f"scheduler={{name='{ME}:ForgetsState'}}"))


def test_a_combine_that_returns_no_state_is_one_line_naming_the_aggregator(tiny_spec):
    with pytest.raises(HetsimError, match=rf"^aggregator '{ME}:ForgetsStateMean': combine returned a tuple of 2 "
                                          r"\(Tensor, ndarray\) for 3 arrivals; expected \(new global model, 3 weights, "
                                          r"state\)"):
        simulate(tiny_spec(f"aggregator={{name='{ME}:ForgetsStateMean'}}"))


def test_a_combine_with_a_weight_per_arrival_too_many_is_one_line(tiny_spec):
    # the decisions log would otherwise record 4 weights for 3 workers
    with pytest.raises(HetsimError, match=rf"^aggregator '{ME}:OneWeightTooMany': combine returned a tuple of 3 "
                                          r"\(Tensor, ndarray, NoneType\) for 3 arrivals; expected \(new global model, "
                                          r"3 weights, state\)"):
        simulate(tiny_spec(f"aggregator={{name='{ME}:OneWeightTooMany'}}"))


def test_a_batch_that_returns_no_state_is_one_line_naming_the_sampler(tiny_spec):
    with pytest.raises(HetsimError, match=rf"^sampler '{ME}:ForgetsStateSampler': batch returned a Batch; expected "
                                          r"\(Batch, state\)"):
        simulate(tiny_spec(f"sampler={{name='{ME}:ForgetsStateSampler'}}"))


# -- the README's contract table says what the code calls -----------------------------------------

def test_the_readme_names_each_contracts_init_state_argument_and_every_workerinfo_field():
    import inspect
    import re

    from conftest import ROOT
    from hetsim.policies import WorkerInfo

    readme = (ROOT / "README.md").read_text()
    for cls in (Scheduler, Sampler, Aggregator):
        arg = list(inspect.signature(cls.init_state).parameters)[1]
        assert re.search(rf"^\| `{cls.__name__}` \|.*\| `init_state\({arg}\)` \|$", readme, flags=re.M), cls
    described = readme[readme.index("is a `WorkerInfo`:"):]
    described = described[:described.index("What a policy remembers")]
    assert set(re.findall(r"`(\w+)`", described)) >= set(WorkerInfo._fields)
