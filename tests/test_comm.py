"""The backend's Comm port (backends/torchmp/comm.py): two gloo processes on the CPU against values
computed here, and the nccl placement rule with a mocked device."""

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist

import backends.torchmp.comm as comm_module
from backends.torchmp.comm import TorchComm
from hetsim.protocol import Work
from hetsim.training import RoundTally, Tallies

COUNTED = ("all_gather", "all_reduce", "broadcast")
WORLD = 3  # three ranks, so that a rank can sit a round out between two that work


def _tally(k):
    obs = {0: [(np.array([5, 7]), np.array([1.5, 2.5])), (np.array([2**40 + 1]), np.array([3.25]))],
           1: [(np.arange(3) + 100, np.array([0.1, 0.2, 0.3]))], 2: []}[k]
    return RoundTally(k + 1, 10 * (k + 1), k, 0.5 + k, obs)


def _work(k):
    return Work([k + 1], np.array([k + 0.25]), np.array([2.0 * k + 1.125]))


def _replica(k):
    return torch.arange(5, dtype=torch.float32) * (k + 1) + k


def _counting(calls, name):
    real = getattr(dist, name)

    def wrapped(*a, **kw):
        calls[name] = calls.get(name, 0) + 1
        return real(*a, **kw)
    return wrapped


def _ranks(rank, init, out):
    """One process of the gloo test: run every Comm call and write what came back."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    calls = {}
    for name in COUNTED:
        setattr(dist, name, _counting(calls, name))

    def no_pickles(*a, **kw):
        raise AssertionError("all_gather_object on the hot path")
    dist.all_gather_object = no_pickles
    comm = TorchComm(rank, WORLD, torch.device("cpu"))
    res = {"local": comm.local, "leader": comm.leader, "summary": comm.summary_fields()}
    res["agree"] = comm.agree([1.5, -2.0] if rank == 0 else [0.0, 0.0])
    res["share1"] = comm.share(1, [10.0 * rank + 1])

    def delta(before):
        return {n: calls.get(n, 0) - before.get(n, 0) for n in COUNTED}

    for name, ks in (("all", [0, 1, 2]), ("without_1", [0, 2]), ("none", [])):
        mine = [rank] if rank in ks else []
        work = _work(rank) if mine else Work([], np.zeros(0), np.zeros(0))
        before = dict(calls)
        tallies, all_work = comm.gather_tallies(ks, Tallies.of(mine, [_tally(k) for k in mine]), work)
        res[name] = {"calls": delta(before), "workers": tallies.workers.tolist(), "steps": tallies.steps.tolist(),
                     "samples": tallies.samples.tolist(), "biased": tallies.biased.tolist(),
                     "loss_sum": tallies.loss_sum.tolist(),
                     "observations": [[o[0].tolist(), o[1].tolist(), str(o[0].dtype)] for o in tallies.observations],
                     "work": [type(all_work).__name__, list(all_work.steps), all_work.start.tolist(),
                              all_work.finish.tolist()]}

    def replicas(ks):
        return torch.stack([_replica(k) for k in ks])

    for name, ks in (("all", [0, 1, 2]), ("without_1", [0, 2])):
        weighted_sum, gather = comm.arrivals_source(ks, replicas, linear=True)
        before = dict(calls)
        res[f"sum_{name}"] = weighted_sum(np.arange(len(ks)) + 0.5).tolist()
        res[f"sum_calls_{name}"] = delta(before)
        res[f"linear_gather_{name}"] = gather
        weighted_sum, gather = comm.arrivals_source(ks, replicas, linear=False)
        before = dict(calls)
        res[f"replicas_{name}"] = gather().tolist()
        res[f"replicas_again_{name}"] = gather().tolist()  # gathered once
        res[f"replicas_calls_{name}"] = delta(before)

    # a small model rides in the tally gather once attached: one collective for the whole round
    fused = TorchComm(rank, WORLD, torch.device("cpu"))
    fused.attach(replicas)
    ks = [0, 2]
    mine = [rank] if rank in ks else []
    work = _work(rank) if mine else Work([], np.zeros(0), np.zeros(0))
    before = dict(calls)
    tallies, _ = fused.gather_tallies(ks, Tallies.of(mine, [_tally(k) for k in mine]), work)
    weighted_sum, _ = fused.arrivals_source(ks, replicas, linear=True)
    res["fused_sum"] = weighted_sum(np.arange(len(ks)) + 0.5).tolist()
    res["fused_workers"] = tallies.workers.tolist()
    _, gather = fused.arrivals_source(ks, replicas, linear=False)  # a later combine: the rows were this round's
    res["fused_again"] = gather().tolist()
    res["fused_calls"] = delta(before)
    before = dict(calls)  # a second round: the observations find their room, the replica sits after it
    tallies, _ = fused.gather_tallies(ks, Tallies.of(mine, [_tally(k) for k in mine]), work)
    weighted_sum, _ = fused.arrivals_source(ks, replicas, linear=True)
    res["fused2_sum"] = weighted_sum(np.array([2.0, -1.0])).tolist()
    res["fused2_observations"] = [[o[0].tolist(), o[1].tolist()] for o in tallies.observations]
    res["fused2_calls"] = delta(before)
    # a protocol's own replicas (not the attached core's) are never swapped for the gathered rows
    fused.gather_tallies(ks, Tallies.of(mine, [_tally(k) for k in mine]), work)
    before = dict(calls)
    weighted_sum, _ = fused.arrivals_source(ks, lambda ks_: replicas(ks_) * 0, linear=True)
    res["own_replicas_sum"] = weighted_sum(np.array([1.0, 1.0])).tolist()
    res["own_replicas_calls"] = delta(before)

    if rank == 0:
        comm.send(torch.tensor([1.0, 2.0, 3.0]), 0, 2)
        res["recv"] = comm.recv(torch.zeros(2), 2, 0).tolist()
    elif rank == 2:
        res["recv"] = comm.recv(torch.zeros(3), 0, 2).tolist()
        comm.send(torch.tensor([7.0, 8.0]), 2, 0)
    comm.barrier()
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    d = tmp_path_factory.mktemp("comm")
    mp.start_processes(_ranks, nprocs=WORLD, start_method="spawn", args=(f"file://{d}/store", d))
    return [json.loads((d / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_agree_gives_the_leaders_values_and_share_the_holders(ranks):
    for r, res in enumerate(ranks):
        assert res["local"] == [r] and res["leader"] == (r == 0) and res["summary"] == {"backend": "gloo"}
        assert res["agree"] == [1.5, -2.0]
        assert res["share1"] == [11.0]  # worker 1 lives on rank 1


def _expected_tallies(ks):
    ts = [_tally(k) for k in ks]
    return {"workers": ks, "steps": [t.steps for t in ts], "samples": [t.samples for t in ts],
            "biased": [t.biased for t in ts], "loss_sum": [t.loss_sum for t in ts],
            # one (indices, losses) pair per worker that observed any; the index 2**40 + 1 survives float64
            "observations": [[np.concatenate([o[0] for o in t.observations]).tolist(),
                              np.concatenate([o[1] for o in t.observations]).tolist(), "int64"]
                             for t in ts if t.observations],
            "work": ["Work", [k + 1 for k in ks], [k + 0.25 for k in ks], [2.0 * k + 1.125 for k in ks]]}


def test_gather_tallies_gives_every_participants_tally_and_work_in_order(ranks):
    for res in ranks:
        for name, ks in (("all", [0, 1, 2]), ("without_1", [0, 2])):
            got = dict(res[name])
            # nothing pickled. The first gather has no room for observations yet: the stats row, then one
            # padded gather of them; the next finds room sized by the first (the same on every rank): one gather
            gathers = 2 if name == "all" else 1
            assert got.pop("calls") == {"all_gather": gathers, "all_reduce": 0, "broadcast": 0}
            assert got == _expected_tallies(ks)
        assert res["none"]["calls"] == {"all_gather": 0, "all_reduce": 0, "broadcast": 0}
        assert res["none"]["workers"] == [] and res["none"]["work"] == ["Work", [], [], []]


def test_weighted_sum_is_one_all_reduce_and_replicas_one_all_gather(ranks):
    x = {k: _replica(k) for k in range(WORLD)}
    for res in ranks:
        for name, ks in (("all", [0, 1, 2]), ("without_1", [0, 2])):
            expected = sum((i + 0.5) * x[k] for i, k in enumerate(ks))
            assert np.allclose(res[f"sum_{name}"], expected.tolist(), rtol=1e-6)
            assert res[f"sum_calls_{name}"] == {"all_gather": 0, "all_reduce": 1, "broadcast": 0}
            assert res[f"linear_gather_{name}"] is None  # a linear aggregator gets no replicas
            assert res[f"replicas_{name}"] == res[f"replicas_again_{name}"] == [x[k].tolist() for k in ks]
            assert res[f"replicas_calls_{name}"] == {"all_gather": 1, "all_reduce": 0, "broadcast": 0}


def test_an_attached_small_model_travels_with_the_tallies_in_one_collective(ranks):
    x = {k: _replica(k) for k in range(WORLD)}
    expected = (0.5 * x[0] + 1.5 * x[2]).tolist()
    for res in ranks:
        assert res["fused_workers"] == [0, 2]
        assert np.allclose(res["fused_sum"], expected, rtol=1e-6)
        assert res["fused_sum"] == ranks[0]["fused_sum"]  # the same bits in every process
        # the first gather of this comm has no room for observations yet: the rows, then the observations;
        # Σ w x from the gathered rows (no all_reduce); a second arrivals_source gathers the replicas afresh
        assert res["fused_again"] == [x[k].tolist() for k in (0, 2)]
        assert res["fused_calls"] == {"all_gather": 3, "all_reduce": 0, "broadcast": 0}
        assert np.allclose(res["fused2_sum"], (2.0 * x[0] - 1.0 * x[2]).tolist(), rtol=1e-6)
        assert res["fused2_observations"] == [o[:2] for o in _expected_tallies([0, 2])["observations"]]
        assert res["fused2_calls"] == {"all_gather": 1, "all_reduce": 0, "broadcast": 0}
        assert res["own_replicas_sum"] == [0.0] * 5 and res["own_replicas_calls"]["all_reduce"] == 1


def test_send_and_recv_address_workers(ranks):
    assert ranks[2]["recv"] == [1.0, 2.0, 3.0]
    assert ranks[0]["recv"] == [7.0, 8.0]


# -- nccl: every communicated tensor on the communication device ---------------------------------

FAKE_CUDA = torch.device("meta")  # stands in for cuda:i: tensors exist there, but not on the CPU


@pytest.fixture
def fake_nccl(monkeypatch):
    """torch.distributed's collectives replaced by a world of 2 that asserts every tensor it is handed
    lives on FAKE_CUDA (nccl rejects CPU tensors), and records what it was called with."""
    seen = []

    def check(*tensors):
        for t in tensors:
            assert t.device == FAKE_CUDA, f"a tensor on {t.device} reached a collective; comm device {FAKE_CUDA}"
            seen.append(t)

    def all_gather(out, t, *a, **kw):
        check(t, *out)
        for o in out:
            o.copy_(t)

    monkeypatch.setattr(dist, "broadcast", lambda t, src, *a, **kw: check(t))
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **kw: check(t))
    monkeypatch.setattr(dist, "all_gather", all_gather)
    monkeypatch.setattr(dist, "send", lambda t, dst, *a, **kw: check(t))
    monkeypatch.setattr(dist, "recv", lambda t, src, *a, **kw: check(t))
    monkeypatch.setattr(dist, "barrier", lambda *a, **kw: None)

    def no_pickles(*a, **kw):
        raise AssertionError("all_gather_object pickles on the CPU; nccl cannot")
    monkeypatch.setattr(dist, "all_gather_object", no_pickles)
    # meta tensors hold no values: reading one back gives ones (one observation per worker, so the
    # padded gather of observations runs too)
    monkeypatch.setattr(comm_module, "_host", lambda t: np.ones(t.shape))
    return seen


def test_the_mocked_nccl_rejects_a_cpu_control_tensor(fake_nccl):
    # the old worker broadcast its round control values and start time as CPU tensors: the guard fails them
    with pytest.raises(AssertionError, match="on cpu reached a collective"):
        dist.broadcast(torch.zeros(2, dtype=torch.float64), 0)


def test_every_tensor_the_comm_communicates_lives_on_the_comm_device(fake_nccl):
    comm = TorchComm(0, 2, FAKE_CUDA)
    comm.agree([0.0, 0.5])
    comm.share(1, [0.9])
    tally = RoundTally(2, 16, 0, 1.0, [(np.array([1]), np.array([0.5]))])
    comm.gather_tallies([0, 1], Tallies.of([0], [tally]), Work([2], np.array([0.0]), np.array([1.0])))
    replica = torch.ones(4, device=FAKE_CUDA)  # the replicas live on the GPU too
    weighted_sum, replicas = comm.arrivals_source([0, 1], lambda ks: replica.expand(len(ks), 4), linear=False)
    assert weighted_sum(np.array([0.5, 0.5])).device == FAKE_CUDA
    assert replicas().shape == (2, 4)
    comm.send(replica, 0, 1)
    comm.recv(torch.empty(4, device=FAKE_CUDA), 1, 0)
    # broadcast x2, the all_gathers of stats and of observations (1 + 2 tensors each), all_reduce, the
    # replicas' all_gather (1 + 2), send, recv
    assert len(fake_nccl) == 2 + 3 + 3 + 1 + 3 + 2


def test_a_rank_sitting_the_round_out_takes_part_from_the_comm_device(fake_nccl):
    comm = TorchComm(1, 2, FAKE_CUDA)  # worker 1 planned 0 steps: not among the participants [0]
    tallies, work = comm.gather_tallies([0], Tallies.of([], []), Work([], np.zeros(0), np.zeros(0)))
    assert tallies.workers.tolist() == [0] and len(work.steps) == 1
    replica = torch.ones(4, device=FAKE_CUDA)
    weighted_sum, replicas = comm.arrivals_source([0], lambda ks: replica.expand(len(ks), 4), linear=False)
    assert weighted_sum(np.array([1.0])).device == FAKE_CUDA  # its zeros are built on the comm device
    assert replicas().shape == (1, 4)
    # the stats and observations all_gathers (1 + 2 tensors each), the all_reduce, the replicas' all_gather
    assert len(fake_nccl) == 3 + 3 + 1 + 3


def test_the_wall_clocks_start_agrees_on_the_comm_device(fake_nccl):
    from backends.torchmp.clock import WallClock

    clock = WallClock(FAKE_CUDA, TorchComm(1, 2, FAKE_CUDA))
    clock.start()  # the resumed time is the leader's, broadcast on the comm device (was a CPU tensor, t0)
    assert len(fake_nccl) == 1


def test_the_nccl_barrier_names_the_ranks_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "barrier", lambda *a, **kw: calls.append(kw))
    TorchComm(1, 2, torch.device("cuda:1")).barrier()
    TorchComm(1, 2, torch.device("cpu")).barrier()
    assert calls == [{"device_ids": [1]}, {}]
    assert TorchComm(1, 2, torch.device("cuda:1")).summary_fields() == {"backend": "nccl"}


def test_bad_inputs_are_named():
    comm = TorchComm(0, 2, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"rank 0 passed 0 tallies and work for 1 workers; it holds 1 of the "
                                         r"participants \[0, 1\]"):
        comm.gather_tallies([0, 1], Tallies.of([], []), Work([1], np.zeros(1), np.zeros(1)))
    weighted_sum, _ = comm.arrivals_source([0, 1], lambda ks: torch.ones(len(ks), 2), linear=True)
    with pytest.raises(ValueError, match=r"expected 2 weights \(one per arrival\), got shape \(3,\)"):
        weighted_sum(np.ones(3))
    with pytest.raises(ValueError, match="send: worker 1 does not live on rank 0"):
        comm.send(torch.ones(1), 1, 0)
    with pytest.raises(ValueError, match="recv: worker 1 does not live on rank 0"):
        comm.recv(torch.ones(1), 0, 1)


# -- threads per rank follow the ranks on this node ------------------------------------------------

def test_threads_split_the_nodes_cores_among_its_local_ranks(tiny_spec, monkeypatch):
    from backends.torchmp.worker import _threads, local_world_size

    spec = tiny_spec()  # three devices, no `threads` set
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    # torchrun over 2 nodes: 3 ranks in all, 1 on this node, which keeps all 16 cores (not 16 // 3)
    assert local_world_size("env://", 3, {"LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "3"}) == 1
    assert _threads(spec, 2, local_world_size("env://", 3, {"LOCAL_WORLD_SIZE": "1"})) == 16
    # the spawn launcher runs every rank on this node, whatever the environment says
    assert local_world_size("tcp://127.0.0.1:1", 3, {"LOCAL_WORLD_SIZE": "1"}) == 3
    assert _threads(spec, 2, 3) == 5
    assert local_world_size("env://", 3, {}) == 3  # env:// without torchrun's variable: one node
    assert _threads(tiny_spec("cluster.devices.1.threads=2"), 2, 1) == 2  # the device's own setting wins
    with pytest.raises(ValueError, match=r"LOCAL_WORLD_SIZE='4': expected an integer in \[1, 3\]"):
        local_world_size("env://", 3, {"LOCAL_WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match=r"LOCAL_WORLD_SIZE='²': expected an integer in \[1, 3\]"):
        local_world_size("env://", 3, {"LOCAL_WORLD_SIZE": "²"})  # a digit to str.isdigit, not to int()


def test_threads_split_the_cores_this_process_may_use_not_the_hosts(tiny_spec, monkeypatch):
    from backends.torchmp.worker import _threads

    # a batch job (or container) given 8 of a 64-core host's cores, 2 ranks on the node: 4 threads each,
    # not 32 (which would run 64 threads on 8 cores)
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8, 16)))
    assert _threads(tiny_spec(), 0, 2) == 4
    assert _threads(tiny_spec(), 0, 16) == 1  # at least one


def test_a_gpu_rank_selects_its_gpu_before_the_process_group_starts(tiny_spec, monkeypatch):
    import backends.torchmp.worker as worker

    class GroupStarted(Exception):
        pass

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(torch.device(d)))))

    def init_process_group(backend, **kw):
        calls.append(("init_process_group", backend))
        raise GroupStarted  # what follows needs a GPU; the order up to here is the point
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    spec = tiny_spec("cluster.devices=[{kind='gpu', count=1, device='cuda:0', step_time={dist='constant', "
                     "mean_s=0.002}}, {kind='gpu', count=1, device='cuda:1', step_time={dist='constant', "
                     "mean_s=0.002}}]", "scheduler={name='fixed', params={local_steps=1}}")
    with pytest.raises(GroupStarted):
        worker._run(1, 2, spec, None, "env://", None, resume=False)
    # nccl binds the communicator to the current GPU: rank 1's must be cuda:1 by then, not cuda:0
    assert calls == [("set_device", "cuda:1"), ("init_process_group", "nccl")]


# -- the fault injection the launcher tests use ----------------------------------------------------

def test_a_fault_to_inject_is_read_or_refused_in_one_line():
    from backends.torchmp.worker import FAULT_ENV, _inject_fault, fault_to_inject

    assert fault_to_inject({}) is None and fault_to_inject({FAULT_ENV: ""}) is None
    assert fault_to_inject({FAULT_ENV: "hang:1:12"}) == ("hang", 1, 12)
    fault = fault_to_inject({FAULT_ENV: "crash:1:4"})
    _inject_fault(fault, 0, 4)  # another rank: nothing
    _inject_fault(fault, 1, 3)  # another round: nothing
    with pytest.raises(RuntimeError, match=rf"injected crash \({FAULT_ENV}=crash:1:4\)"):
        _inject_fault(fault, 1, 4)
    # a typo neither passes silently nor hangs (an unknown kind used to be a hang)
    for bad in ("crash:1", "boom:1:4", "crash:one:4", "crash:1:4:5", "hang:-1:2"):
        with pytest.raises(ValueError, match=rf"^{FAULT_ENV}='{bad}': expected 'crash:RANK:ROUND' or "
                                             r"'hang:RANK:ROUND' \(RANK and ROUND non-negative integers\)$"):
            fault_to_inject({FAULT_ENV: bad})


# -- the wall clock ----------------------------------------------------------------------------------

class FakeTime:
    """The clock module's `time`: a monotonic clock that moves only when told (a step's duration, a
    sleep), and no time.time() to compare across hosts."""

    def __init__(self, t=1000.0):
        self.t = t
        self.sleeps = []

    def monotonic(self):
        return self.t

    def sleep(self, s):
        self.sleeps.append(s)
        self.t += s


class OneRank:
    """What the wall clock asks of the comm: the leader's values (here `leader_time`) and a barrier,
    which takes 7 s of waiting for the slowest rank (not on the timeline)."""

    def __init__(self, fake_time, leader_time=0.0):
        self.fake_time, self.leader_time = fake_time, leader_time
        self.agreed, self.barriers = [], []

    def agree(self, values):
        self.agreed.append(list(values))
        return [self.leader_time]

    def barrier(self):
        self.barriers.append(self.fake_time.t)
        self.fake_time.t += 7.0


@pytest.fixture
def fake_time(monkeypatch):
    import backends.torchmp.clock as clock_module

    fake = FakeTime()
    monkeypatch.setattr(clock_module, "time", fake)
    return fake


def _finish(gen):
    """Run a wall-clock generator to its return value; it must not yield."""
    try:
        next(gen)
    except StopIteration as e:
        return e.value
    raise AssertionError("the wall clock yielded")


def _stepper(fake, durations):
    done = []

    def step(k):
        done.append(k)
        fake.t += durations[k]
    return step, done


def test_the_timeline_starts_at_the_common_barrier_plus_the_resumed_time(fake_time):
    from backends.torchmp.clock import WallClock

    comm = OneRank(fake_time, leader_time=12.5)
    clock = WallClock(torch.device("cpu"), comm)
    with pytest.raises(RuntimeError, match="before start"):
        clock.now()
    clock.load_state_dict({"time_s": 12.25})  # this rank checkpointed a little before the leader
    clock.start()
    assert comm.agreed == [[12.25]] and comm.barriers == [1000.0]
    fake_time.t += 3.0
    assert clock.now() == 12.5 + 3.0  # from the barrier, on the leader's resumed time
    assert clock.state_dict() == {"time_s": 15.5}


def test_local_work_runs_each_planned_step_and_pads_an_emulated_slowdown(fake_time):
    from backends.torchmp.clock import WallClock
    from hetsim.policies import RoundPlan

    clock = WallClock(torch.device("cpu"), OneRank(fake_time), slowdown=3.0)
    clock.start()
    step, done = _stepper(fake_time, {0: 0.5, 2: 0.25})
    work = _finish(clock.local_work([2, 0], RoundPlan((4, 0)), None, step))
    assert done == [2, 2, 2, 2]  # worker 0 planned 0 steps idles: no step, no time
    assert fake_time.sleeps == [2 * 0.25] * 4  # (k - 1) x each step's measured time
    assert work.steps == [4, 0]
    assert work.start.tolist() == [0.0, 3.0] and work.finish.tolist() == [3.0, 3.0]  # 4 x 0.25 x 3


def test_a_time_budget_that_is_a_multiple_of_the_step_time_gives_exactly_budget_over_step(fake_time):
    from backends.torchmp.clock import WallClock
    from hetsim.policies import RoundPlan

    fake_time.t = 0.3  # so that the float sums drift below the budget: `elapsed < budget` would take a 3rd step
    assert (0.3 + 0.04 + 0.04) - 0.3 < 0.08
    clock = WallClock(torch.device("cpu"), OneRank(fake_time))
    clock.start()
    step, done = _stepper(fake_time, {0: 0.04, 1: 0.5})
    work = _finish(clock.local_work([0, 1], RoundPlan((None, None), time_budget_s=0.08), None, step))
    assert work.steps == [2, 1]  # 0.08 / 0.04; a step longer than the budget still runs once


def test_cuda_steps_are_synchronised_before_they_are_timed(fake_time, monkeypatch):
    from backends.torchmp.clock import WallClock
    from hetsim.policies import RoundPlan

    events = []

    def synchronize(device):
        events.append(("sync", str(device)))
        fake_time.t += 0.25  # the kernels the step queued
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    clock = WallClock(torch.device("cuda:1"), OneRank(fake_time), slowdown=2.0)
    clock.start()
    step, done = _stepper(fake_time, {1: 0.125})
    work = _finish(clock.local_work([1], RoundPlan((2,)), None, step))
    assert events == [("sync", "cuda:1")] * 2
    assert fake_time.sleeps == [0.375, 0.375]  # the padding counts the queued kernels too
    assert work.finish.tolist() == [1.5]


def test_exchange_and_evaluation_advance_nothing_and_never_yield(fake_time):
    from backends.torchmp.clock import WallClock

    clock = WallClock(torch.device("cpu"), OneRank(fake_time))
    clock.start()
    assert _finish(clock.exchange([0, 1], 10**6)) is None and _finish(clock.evaluation(1)) is None
    assert clock.now() == 0.0 and clock.online([2, 0]) == [2, 0]
