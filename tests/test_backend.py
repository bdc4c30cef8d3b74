"""The real backend (CPU, gloo on loopback): equivalence with the simulator, torchrun, faults, profiler."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hetsim.analysis import compare_runs, load_run
from hetsim.results import read_decisions, read_trace
from hetsim.config import spec_to_dict, to_toml
from hetsim.errors import HetsimError, SpecError
from hetsim.sim import simulate

from backends.torchmp import run
from backends.torchmp.worker import FAULT_ENV

TWO = ["cluster.devices=[{kind='cpu', count=1, step_time={dist='constant', mean_s=0.004}, threads=1, "
       "emulated_slowdown=2.0}, {kind='gpu', count=1, step_time={dist='constant', mean_s=0.002}, threads=1}]",
       "scheduler={name='fixed', params={per_kind={cpu=2, gpu=4}}}",
       "sampler={name='loss_topk', params={kinds=['cpu'], sample_ratio=2}}",
       "aggregator={name='fednova'}", "stop.max_rounds=8", "eval.every_rounds=2"]


def test_backend_makes_the_simulators_decisions_and_accuracy(tiny_spec, tmp_path):
    spec = tiny_spec(*TWO)
    real = run(spec, tmp_path / "real")
    sim = simulate(spec, tmp_path / "sim")
    assert real.decisions == sim.decisions or all(
        {k: a[k] for k in ("workers", "local_steps", "samples", "biased_samples")} ==
        {k: b[k] for k in ("workers", "local_steps", "samples", "biased_samples")}
        and np.allclose(a["weights"], b["weights"]) for a, b in zip(real.decisions, sim.decisions))
    assert len(real.decisions) == 8
    # the math is shared: only float summation order differs (all-reduce vs matmul)
    assert np.allclose(real.metrics["train_loss"][1:], sim.metrics["train_loss"][1:], atol=1e-4)
    assert np.allclose(real.metrics["test_acc"], sim.metrics["test_acc"], atol=1e-6, equal_nan=True)
    s = real.summary
    assert s["engine"] == "torchmp" and s["emulated_slowdown"] == {"cpu0": 2.0}
    assert s["device_sources"]["cpu0"].startswith("emulated")
    report = compare_runs(load_run(tmp_path / "sim"), load_run(tmp_path / "real"))
    assert report["same_decisions"] is True and report["accuracy_abs_diff_max"] <= 1e-6
    events = [e for e in read_trace(tmp_path / "real" / "trace.json") if e["ph"] == "X"]
    assert {"compute", "comm", "eval"} <= {e["name"] for e in events}
    # evaluated where the simulator charges it: the fastest device (gpu0, rank 1), not rank 0
    assert {e["tid"] for e in events if e["name"] == "eval"} == {1} and s["evaluator"] == "gpu0"
    assert not (tmp_path / "real" / "logs").exists()  # the workers' logs stayed empty and were removed


class _RecordingClock:
    """The wall clock's `time` module, recording every monotonic reading and every sleep requested (and
    not sleeping): what the padding decides, whatever the machine's load."""

    def __init__(self):
        self.events = []

    def monotonic(self):
        t = time.monotonic()
        self.events.append(("t", t))
        return t

    def sleep(self, seconds):
        self.events.append(("sleep", seconds))


def _worker_with_recorded_clock(rank, world, spec, run_dir, init, out):
    import backends.torchmp.clock
    import backends.torchmp.worker as worker

    clock = _RecordingClock()
    backends.torchmp.clock.time = clock
    worker.worker_main(rank, world, spec, run_dir, init)
    (out / f"rank{rank}.json").write_text(json.dumps(clock.events))
    worker.exit_now(0)


def test_emulated_slowdown_pads_each_step_by_k_minus_1_times_its_measured_time(tiny_spec, tmp_path):
    import torch.multiprocessing as mp

    from backends.torchmp.launcher import free_port

    spec = tiny_spec(*TWO[:1], "scheduler={name='fixed', params={local_steps=20}}", "stop.max_rounds=3",
                     "cluster.devices.0.emulated_slowdown=4.0")
    mp.start_processes(_worker_with_recorded_clock, nprocs=2, start_method="spawn",
                       args=(2, spec, str(tmp_path / "run"), f"tcp://127.0.0.1:{free_port()}", tmp_path))
    slow, fast = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    sleeps = [i for i, (kind, _) in enumerate(slow) if kind == "sleep"]
    assert len(sleeps) == 20 * 3  # one pad per local step
    for i in sleeps:
        (a, t_step), (b, t_end) = slow[i - 2], slow[i - 1]  # the step's start and end readings
        assert a == b == "t" and t_end >= t_step
        assert slow[i][1] == (4.0 - 1) * (t_end - t_step)
    assert not [e for e in fast if e[0] == "sleep"]  # the device without a slowdown is not padded


def test_a_crashing_worker_names_device_and_round_and_keeps_results(tiny_spec, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(FAULT_ENV, "crash:1:4")
    # the crash itself is reported (not the peer's broken connection, nor a timeout: 60 s is never reached)
    log = tmp_path / "logs" / "rank1.log"
    with pytest.raises(HetsimError, match=r"device gpu0 \(rank 1\) failed in round 4: RuntimeError: injected crash"
                                          rf".*; details in {re.escape(str(log))};"):
        run(tiny_spec(*TWO, "run.fault_timeout_s=60"), tmp_path)
    rounds = [line.split(",")[0] for line in (tmp_path / "metrics.csv").read_text().splitlines()[1:]]
    assert rounds == ["0", "1", "2", "3"]
    # the tracebacks are in the run's logs, not on the console
    assert "Traceback" in log.read_text() and "injected crash" in log.read_text()
    assert "Traceback" not in capfd.readouterr().err


def test_a_hanging_worker_ends_the_run_within_the_timeout(tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "hang:0:2")
    # the message says the launcher's watchdog stopped it: a peer's gloo timeout (2 x 5 s) would name gpu0
    with pytest.raises(HetsimError, match=r"device cpu0 \(rank 0\) made no progress for 5 s in round 2"):
        run(tiny_spec(*TWO, "run.fault_timeout_s=5"), tmp_path)


def _proc_stat(pid):
    """(state, parent pid) of a process from /proc, or None once it is gone."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name before ')' may hold spaces
    return fields[0], int(fields[1])


def _children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _proc_stat(d)
            if st and st[1] == pid:
                out.append(int(d))
    return out


def _alive(pid):
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")  # an unreaped zombie has ended


def _metrics_rounds(run_dir):
    path = run_dir / "metrics.csv"
    return [int(line.split(",")[0]) for line in path.read_text().splitlines()[1:]] if path.is_file() else []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process table from /proc")
@pytest.mark.parametrize("how", ["SIGTERM to the launcher", "Ctrl+C (SIGINT to the process group)",
                                 "SIGKILL to the launcher"])
def test_stopping_hetsim_run_ends_its_workers(tiny_spec, tmp_path, how):
    spec = tiny_spec(*TWO, "stop.max_rounds=1000000", "eval.every_rounds=50")  # hours, unless stopped
    cfg = tmp_path / "long.toml"
    cfg.write_text(to_toml(spec_to_dict(spec)))
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    proc = subprocess.Popen([sys.executable, "-m", "hetsim.cli", "run", str(cfg), "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    workers = []
    try:
        deadline = time.time() + 300
        while len(_metrics_rounds(out)) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)  # rounds are being written (every few seconds)
        assert proc.poll() is None, proc.stderr.read()
        seen = _metrics_rounds(out)
        assert len(seen) >= 3
        workers = [pid for pid in _children(proc.pid)
                   if "spawn_main" in open(f"/proc/{pid}/cmdline").read().replace("\0", " ")]
        assert len(workers) == 2
        if how.startswith("SIGTERM"):
            proc.send_signal(signal.SIGTERM)
        elif how.startswith("Ctrl+C"):
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.kill()
        _, err = proc.communicate(timeout=120)
        deadline = time.time() + 60
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if _alive(w)], f"workers still running after {how}"
        if how.startswith("SIGTERM"):
            assert proc.returncode == 128 + signal.SIGTERM
        elif how.startswith("Ctrl+C"):
            assert proc.returncode == 128 + signal.SIGINT
        if not how.startswith("SIGKILL"):
            sig = "SIGTERM" if how.startswith("SIGTERM") else "SIGINT"
            assert re.fullmatch(rf"hetsim: error: interrupted by {sig} in round \d+; the 2 worker processes were "
                                rf"ended, finished rounds are in {re.escape(str(out))}\n", err), err
        rounds = _metrics_rounds(out)
        assert rounds == list(range(len(rounds))) and len(rounds) >= len(seen)  # nothing written was lost
    finally:
        for pid in workers + [proc.pid]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def test_run_interrupted_survives_pickling():
    import pickle

    from backends.torchmp.launcher import RunInterrupted

    e = pickle.loads(pickle.dumps(RunInterrupted(signal.SIGTERM, "interrupted by SIGTERM in round 3")))
    assert (e.signum, str(e)) == (signal.SIGTERM, "interrupted by SIGTERM in round 3")


def test_a_cuda_device_on_a_cpu_only_torch_is_refused_before_any_process_starts(tiny_spec, tmp_path, monkeypatch):
    from backends.torchmp.launcher import check_devices

    spec = tiny_spec(*TWO, "cluster.devices.1.device='cuda:0'")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    with pytest.raises(HetsimError, match=r"cluster.devices\[1\].device = 'cuda:0': this torch .* is built without "
                                          r"CUDA"):
        run(spec, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # a CUDA build with one GPU: cuda:0 is there, cuda:1 is not
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_devices(spec)
    with pytest.raises(HetsimError, match=r"cluster.devices\[1\].device = 'cuda:1': only 1 CUDA device visible"):
        check_devices(tiny_spec(*TWO, "cluster.devices.1.device='cuda:1'"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(HetsimError, match=r"'cuda': no CUDA devices visible"):
        check_devices(tiny_spec(*TWO, "cluster.devices.1.device='cuda'"))
    # simulating the GPU config needs no GPU
    assert len(simulate(spec).decisions) == 8


def test_two_devices_on_one_gpu_over_nccl_are_refused_before_any_process_starts(tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpus = ("cluster.devices=[{kind='gpu', count=2, device='cuda:1', step_time={dist='constant', mean_s=0.002}}, "
            "{kind='big', count=1, device='cuda', step_time={dist='constant', mean_s=0.001}}]")
    # every device a GPU: nccl, which refuses two ranks on one GPU at the first collective, mid-start
    with pytest.raises(HetsimError, match=r"^devices gpu0 and gpu1 both run on cuda:1: nccl \(used when every device "
                                          r"is a GPU\) needs one GPU per process; give each device its own"):
        run(tiny_spec(gpus, "scheduler={name='sync'}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    one_each = gpus.replace("count=2, device='cuda:1'", "count=1, device='cuda:1'")
    with pytest.raises(HetsimError, match=r"^devices gpu0 and big0 both run on cuda:0"):  # 'cuda' is cuda:0
        run(tiny_spec(one_each.replace("device='cuda:1'", "device='cuda:0'"), "scheduler={name='sync'}"),
            tmp_path / "run")
    from backends.torchmp.launcher import check_one_gpu_per_process

    check_one_gpu_per_process(tiny_spec(one_each, "scheduler={name='sync'}"))  # cuda:1 and cuda: one GPU each
    # with a CPU in the cluster the run is over gloo, where devices may share a GPU
    check_one_gpu_per_process(tiny_spec(*TWO, "cluster.devices.1.device='cuda:0'", "cluster.devices.1.count=2"))


def test_a_cuda_device_on_a_cpu_only_torch_is_refused_under_torchrun_too(tiny_spec, tmp_path, monkeypatch, capsys):
    from hetsim.cli import main

    cfg = tmp_path / "gpu.toml"
    cfg.write_text(to_toml(spec_to_dict(tiny_spec(*TWO, "cluster.devices.1.device='cuda:0'"))))
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", str(cfg), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hetsim: error: cluster.devices[1].device = 'cuda:0': this torch") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_hang_keeps_every_finished_round_on_disk(tiny_spec, tmp_path, monkeypatch):
    # rank 1 hangs in round 3; rank 0 waits at the barrier until the launcher kills it: no flush at exit
    # runs, so rounds 0-2 are there only if each was written when it finished
    monkeypatch.setenv(FAULT_ENV, "hang:1:3")
    with pytest.raises(HetsimError, match="made no progress"):
        run(tiny_spec(*TWO, "run.fault_timeout_s=3"), tmp_path)
    rounds = [line.split(",")[0] for line in (tmp_path / "metrics.csv").read_text().splitlines()[1:]]
    assert rounds == ["0", "1", "2"]
    assert [d["round"] for d in read_decisions(tmp_path / "decisions.bin")] == [1, 2]


def test_a_hang_in_an_evaluation_names_the_evaluator_not_a_rank_waiting_for_it(tiny_spec, tmp_path):
    from types import SimpleNamespace

    import backends.torchmp.worker as worker
    from backends.torchmp.launcher import _watch

    spec = tiny_spec(*TWO, "run.fault_timeout_s=5")  # evaluated on the fastest device: gpu0, rank 1
    heartbeat = [0.0] * 6  # (round, phase, time) of ranks 0 and 1
    hooks = worker._Hooks(heartbeat, 1)
    worker._beat(heartbeat, 0, 4, 1)  # both ranks did round 4's work; rank 0 waits for the evaluation
    hooks.work_done(4)
    hooks.evaluating(4)  # what the driver calls on the evaluator's process around its evaluation
    # both ranks silent for a minute while rank 1 evaluates, rank 0 waiting for its result: the launcher's watch
    heartbeat[2] = heartbeat[5] = time.time() - 60
    with pytest.raises(HetsimError) as e:
        _watch(spec, tmp_path, ["cpu0", "gpu0"], [SimpleNamespace(exitcode=None)] * 2, heartbeat, {}, 0.0)
    assert str(e.value) == (f"device gpu0 (rank 1) made no progress for 5 s in round 4; the run was stopped, "
                            f"finished rounds are in {tmp_path}")  # not cpu0, the lowest of the ranks in phase 1
    hooks.evaluated(4)
    assert heartbeat[3:5] == [4, 1]  # evaluated: waiting like the others


def test_simulator_only_conditions_are_refused(tiny_spec, tmp_path):
    with pytest.raises(HetsimError, match="simulator conditions"):
        run(tiny_spec(*TWO, "cluster.devices.0.straggler_prob=0.1"), tmp_path)


def test_torchrun_runs_the_same_entry_point(tiny_spec, tmp_path):
    spec = tiny_spec(*TWO)
    cfg = tmp_path / "two.toml"
    cfg.write_text(to_toml(spec_to_dict(spec)))
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "hetsim.cli", "run", str(cfg), "--out", str(tmp_path / "tr")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[:3000]
    sim = simulate(spec)
    real = load_run(tmp_path / "tr")
    assert [d["local_steps"] for d in real.decisions] == [d["local_steps"] for d in sim.decisions]
    assert np.allclose(real.metrics["test_acc"], sim.metrics["test_acc"], atol=1e-6, equal_nan=True)
    assert not (tmp_path / "tr" / "logs").exists()  # the ranks' logs stayed empty and were removed


def test_a_crash_under_torchrun_is_one_line_per_rank_and_a_log(tiny_spec, tmp_path):
    cfg = tmp_path / "two.toml"
    cfg.write_text(to_toml(spec_to_dict(tiny_spec(*TWO, "run.fault_timeout_s=60"))))
    env = dict(os.environ, **{FAULT_ENV: "crash:1:4"})
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "hetsim.cli", "run", str(cfg), "--out", str(tmp_path / "tr")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0
    log = tmp_path / "tr" / "logs" / "rank1.log"
    line = (f"hetsim: error: device gpu0 (rank 1) failed in round 4: RuntimeError: injected crash ({FAULT_ENV}="
            f"crash:1:4); details in {log}; finished rounds are in {tmp_path / 'tr'}")
    assert line in proc.stderr.splitlines()
    # torchrun adds its own summary; the worker's traceback (which quotes the crash) is only in the log
    assert proc.stderr.count("injected crash") == 1
    assert "Traceback" in log.read_text() and 'raise RuntimeError(f"injected crash' in log.read_text()


def _average_with_torch(rank, init, params, out):
    import torch.distributed as dist
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(params[rank], model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # the averager averages only parameters that have gradients
    PeriodicModelAverager(period=2, warmup_steps=0).average_parameters(list(model.parameters()))  # averages at step 0
    out[rank] = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    dist.destroy_process_group()


def test_mean_aggregation_agrees_with_torch_model_averager():
    import torch.multiprocessing as mp

    from backends.torchmp.launcher import free_port
    from hetsim.policies import Arrivals, Contribution
    from hetsim.policies.aggregation import Mean

    params = [torch.randn(8, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.start_processes(_average_with_torch, args=(f"tcp://127.0.0.1:{free_port()}", params, out), nprocs=2,
                       start_method="spawn")
    arrivals = Arrivals.of_replicas([Contribution(k, "cpu", 1, 1, 0.0) for k in (0, 1)], torch.stack(params))
    ours, _, _ = Mean().combine(None, arrivals, None)
    for rank in (0, 1):
        assert torch.allclose(out[rank], ours, atol=1e-7)


def test_profiler_writes_a_profile_the_simulator_reads(tiny_spec, tmp_path):
    from backends.torchmp.profiler import profile_device, write_profile

    measured = profile_device("synthetic", 8, "cpu", threads=1, warmup=3, min_steps=10, max_steps=40, max_seconds=60)
    path = tmp_path / "cpu.json"
    write_profile(path, "cpu", measured)
    data = json.loads(path.read_text())
    entry = data["entries"][0]
    assert data["source"] == "measured" and entry["step_time"]["dist"] == "empirical"
    assert 10 <= len(entry["step_time"]["samples_s"]) <= 40 and all(x > 0 for x in entry["step_time"]["samples_s"])
    r = simulate(tiny_spec(f"cluster.devices=[{{kind='cpu', count=2, profile='{path}'}}]",
                           "scheduler={name='sync'}"))
    assert r.summary["device_sources"]["cpu0"].startswith("measured")
    assert r.metrics["time_s"][-1] > 0


SIT_OUT = ["scheduler={name='backend_policies:SitOutInTurn'}"]


def _same_decisions(a, b):
    keys = ("round", "workers", "local_steps", "samples", "biased_samples")
    return len(a) == len(b) and all({k: x[k] for k in keys} == {k: y[k] for k in keys} and
                                    np.allclose(x["weights"], y["weights"], rtol=1e-12) for x, y in zip(a, b))


def test_backend_resume_restores_policy_state_to_the_uninterrupted_decisions(tiny_spec, tmp_path, monkeypatch):
    # a stateful, seeded scheduler that sits a worker out every round but one in three, and a server
    # optimizer with momentum: a resume that lost either state decides or computes differently
    spec = tiny_spec(*TWO, *SIT_OUT, "aggregator={name='outer_sgd', params={outer_lr=0.7, momentum=0.9}}",
                     "run.checkpoint_every=2", "run.fault_timeout_s=20")
    whole = run(spec, tmp_path / "whole")
    sim = simulate(spec)
    assert _same_decisions(whole.decisions, sim.decisions)
    assert [d["workers"] for d in whole.decisions][:3] == [[1], [0], [0, 1]]  # the sit-outs did happen
    assert np.allclose(whole.metrics["train_loss"][1:], sim.metrics["train_loss"][1:], atol=1e-4)
    monkeypatch.setenv(FAULT_ENV, "crash:1:6")
    with pytest.raises(HetsimError, match="failed in round 6"):
        run(spec, tmp_path / "cut")
    monkeypatch.delenv(FAULT_ENV)
    resumed = run(spec, tmp_path / "cut", resume=True)  # from round 4's checkpoint
    assert len(resumed.decisions) == 8 and _same_decisions(resumed.decisions, whole.decisions)
    assert np.allclose(resumed.metrics["train_loss"][1:], whole.metrics["train_loss"][1:], atol=1e-6)
    assert np.allclose(resumed.metrics["test_acc"], whole.metrics["test_acc"], equal_nan=True)
    assert np.isfinite(resumed.metrics["train_loss"][1:]).all()
    # the wall clock continues the checkpoint's time (its common zero is the resumed elapsed time)
    assert (np.diff(resumed.metrics["time_s"]) > 0).all()
    assert resumed.summary["time_s"] >= resumed.metrics["time_s"][-1] > resumed.metrics["time_s"][4]


def _worker_without_pickles(rank, world, spec, run_dir, init):
    """A backend process in which every pickling collective raises: the hot path must not need one."""
    import torch.distributed as dist

    import backends.torchmp.worker as worker

    def refuse(*a, **kw):
        raise AssertionError("a pickling collective (all_gather_object & co.) in the backend")
    for name in ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list"):
        setattr(dist, name, refuse)
    worker.worker_main(rank, world, spec, run_dir, init)
    worker.exit_now(0)


@pytest.mark.parametrize("aggregator", ["{name='mean'}", "{name='biased', params={strength=2.0}}",
                                        "{name='fednova'}",
                                        "{name='outer_sgd', params={outer_lr=0.7, momentum=0.9, nesterov=true}}"],
                         ids=["mean", "biased", "fednova", "outer_sgd"])
def test_a_worker_sitting_a_round_out_idles_its_rank_as_in_the_simulator(tiny_spec, tmp_path, aggregator):
    import torch.multiprocessing as mp

    spec = tiny_spec(*TWO, *SIT_OUT, f"aggregator={aggregator}", "stop.max_rounds=6",
                     "eval.on='cpu0'")
    mp.start_processes(_worker_without_pickles, nprocs=2, start_method="spawn",
                       args=(2, spec, str(tmp_path / "run"), f"file://{tmp_path}/store"))
    real, sim = load_run(tmp_path / "run"), simulate(spec)
    assert _same_decisions(real.decisions, sim.decisions)
    rounds_alone = [d for d in real.decisions if len(d["workers"]) == 1]
    assert len(rounds_alone) == 4 and all(d["weights"] == [1.0] for d in rounds_alone)
    assert np.isfinite(real.metrics["train_loss"][1:]).all()
    assert np.allclose(real.metrics["train_loss"][1:], sim.metrics["train_loss"][1:], atol=1e-4)
    assert np.allclose(real.metrics["test_acc"], sim.metrics["test_acc"], atol=1e-6, equal_nan=True)
    assert real.summary["rounds_participated"] == {"cpu0": 4, "gpu0": 4}
    # eval.on names the device that evaluates
    events = [e for e in read_trace(tmp_path / "run" / "trace.json") if e["ph"] == "X"]
    assert {e["tid"] for e in events if e["name"] == "eval"} == {0} and real.summary["evaluator"] == "cpu0"
    # the rank that sat a round out did no work in it
    computed = {(e["args"]["round"], e["tid"]) for e in events if e["name"] == "compute"}
    assert computed == {(d["round"], k) for d in real.decisions for k in d["workers"]}


def test_backend_divergence_stops_every_rank_where_the_simulator_does_and_exits_3(tiny_spec, tmp_path, capsys):
    from hetsim.cli import main

    # the NaN model comes from the aggregator in round 3, the only round with 2 local steps
    nan_at_3 = ["scheduler={name='custom_policy:StepsAtRound', params={steps=1, at=3, special=2}}",
                "aggregator={name='custom_policy:NanWhenSteps', params={steps=2}}", "run.fault_timeout_s=30"]
    spec = tiny_spec(*TWO, *nan_at_3)
    assert simulate(spec).summary["diverged_at_round"] == 3
    config = tmp_path / "nan.toml"
    config.write_text(to_toml(spec_to_dict(spec)))
    assert main(["run", str(config), "--out", str(tmp_path / "real")]) == 3
    assert "hetsim: the run diverged at round 3" in capsys.readouterr().err
    summary = json.loads((tmp_path / "real" / "summary.json").read_text())
    assert summary["diverged_at_round"] == 3 and summary["stopped_by"] == "diverged" and summary["rounds"] == 3


def test_concurrent_profiling_of_a_configs_devices(tiny_spec, tmp_path):
    from backends.torchmp.profiler import profile_cluster

    paths = profile_cluster(tiny_spec(*TWO), tmp_path, max_seconds=2.0)
    assert set(paths) == {"cpu", "gpu"}
    cpu, gpu = (json.loads(paths[k].read_text()) for k in ("cpu", "gpu"))
    for data in (cpu, gpu):
        entry = data["entries"][0]
        assert entry["concurrent_with"] == 1 and entry["step_time"]["dist"] == "empirical"
        assert len(entry["step_time"]["samples_s"]) == entry["n_samples"] > 0
        assert "1 torch threads" in data["hardware"]  # TWO gives each device threads=1
    # the cpu device was measured with its emulated 2x slowdown (what that padding does: the test below)
    assert cpu["hardware"].endswith("emulated 2x slowdown") and "emulated" not in gpu["hardware"]


def test_a_cpu_profile_names_the_cpu_model(tmp_path):
    from backends.torchmp.profiler import cpu_name

    (tmp_path / "cpuinfo").write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n"
                                      "model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu\n")
    assert cpu_name(tmp_path / "cpuinfo") == "Intel(R) Xeon(R) Processor"
    import platform

    assert cpu_name(tmp_path / "missing") == f"{platform.processor() or platform.machine()} CPU"


def test_concurrent_profiling_gives_each_device_the_threads_a_run_gives_it(tiny_spec, monkeypatch):
    from backends.torchmp.profiler import _device_kwargs

    # a job given 8 of a 64-core host's cores, three devices without `threads`: 8 // 3 = 2 threads each, as the
    # launcher's run gives them (not 64 // 3 = 21, which would profile 63 threads on 8 cores)
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert [kw["threads"] for kw in _device_kwargs(tiny_spec(), 2.0)] == [2, 2, 2]
    assert [kw["threads"] for kw in _device_kwargs(tiny_spec("cluster.devices.1.threads=3"), 2.0)] == [2, 3, 3]


def test_profiler_measures_the_exchange_with_the_backends_own_sync():
    from backends.torchmp.profiler import measure_exchange

    link = measure_exchange(1000, repeats=2)  # at least 4 MB: the bandwidth term dominates
    assert link["large_bytes"] == 4 << 20
    assert link["allreduce_large_s"] > 0 and link["latency_s"] >= 0 and link["bandwidth_GBps"] > 0


def test_profiler_pads_each_step_by_k_minus_1_times_its_measured_time(monkeypatch):
    from types import SimpleNamespace

    import backends.torchmp.profiler as profiler

    class Clock:  # advanced only by the fake steps and the requested sleeps
        def __init__(self):
            self.t, self.sleeps = 100.0, []

        def perf_counter(self):
            return self.t

        def sleep(self, s):
            self.sleeps.append(s)
            self.t += s

    clock = Clock()
    durations = iter([0.01, 0.03] * 1000)

    def local_step(k):
        clock.t += next(durations)

    core = SimpleNamespace(step=local_step, workers=[SimpleNamespace(tally=SimpleNamespace(observations=[]))])
    monkeypatch.setattr(profiler, "time", clock)
    samples = profiler.measure_steps(core, torch.device("cpu"), 3.0, warmup=2, min_steps=10, max_steps=40,
                                     max_seconds=1e9)
    # steps of 0.01, 0.03, 0.01, ... padded to 3x: the warmup needs 9 of them for 0.5 s (0.48 s after 8); the
    # samples then alternate 0.09, 0.03, whose halves' medians first agree at 20 samples (0.06 = 0.06)
    assert clock.sleeps == pytest.approx([2 * 0.01, 2 * 0.03] * 14 + [2 * 0.01])
    assert samples == pytest.approx([3 * 0.03, 3 * 0.01] * 10)


def test_compare_command_reports_and_plots(tiny_spec, tmp_path, capsys):
    from hetsim.cli import main

    spec = tiny_spec(*TWO)
    simulate(spec, tmp_path / "a")
    simulate(tiny_spec(*TWO, "cluster.devices.0.step_time.mean_s=0.005"), tmp_path / "b")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    # cpu 2 steps x 0.004 vs 0.005 dominates (gpu 4 x 0.002): every round is 0.002 s longer
    assert report["same_decisions"] is True and report["accuracy_abs_diff_max"] == 0.0
    e = report["total_time_measured_s"] / 8 - 0.010
    assert report["round_time_rel_error_median"] == pytest.approx(0.002 / (0.010 + e), rel=1e-6)
    assert (tmp_path / "cmp" / "predicted_vs_measured.png").is_file()
    assert "per-round time error" in capsys.readouterr().out


def test_run_repeat_writes_n_runs_and_their_noise_floor(tiny_spec, tmp_path, capsys):
    from hetsim.analysis import compare_runs, load_run
    from hetsim.cli import main

    config = tmp_path / "two.toml"
    config.write_text(to_toml(spec_to_dict(tiny_spec(*TWO, "stop.max_rounds=3"))))
    assert main(["run", str(config), "--out", str(tmp_path / "reps"), "--repeat", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(tmp_path / "reps")
    assert "noise floor (2 runs, 1 pairs, medians): per-round" in captured.err
    nf = json.loads((tmp_path / "reps" / "noise_floor.json").read_text())
    # the one pair, compared as `hetsim compare` compares a prediction (the later run) with a measurement
    pair = compare_runs(load_run(tmp_path / "reps" / "rep2"), load_run(tmp_path / "reps" / "rep1"))
    assert nf["pairs"] == 1 and nf["round_time_rel_error_median"] == pair["round_time_rel_error_median"]
    assert nf["round_time_ks"] == pair["round_time_ks"]


@pytest.mark.parametrize("extra, message", [
    (["--repeat", "0"], "--repeat 0: expected a number of runs >= 1"),
    (["--repeat", "2", "--resume", "x"], "--repeat N runs the config afresh N times; it does not --resume"),
])
def test_run_repeat_refuses_bad_input_in_one_line(tiny_spec, tmp_path, capsys, extra, message):
    from hetsim.cli import main

    config = tmp_path / "two.toml"
    config.write_text(to_toml(spec_to_dict(tiny_spec(*TWO))))
    assert main(["run", str(config), "--out", str(tmp_path / "reps"), *extra]) == 2
    assert capsys.readouterr().err == f"hetsim: error: {message}\n"
    assert not (tmp_path / "reps").exists()


def test_run_repeat_into_a_run_directory_is_refused(tiny_spec, tmp_path, capsys):
    from hetsim.cli import main

    config = tmp_path / "two.toml"
    config.write_text(to_toml(spec_to_dict(tiny_spec(*TWO, "stop.max_rounds=2"))))
    simulate(tiny_spec(*TWO, "stop.max_rounds=2"), tmp_path / "run")
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--repeat", "2"]) == 2
    assert "is a run directory; --repeat N writes N runs into OUT/rep1 ... OUT/repN" in capsys.readouterr().err
    assert not (tmp_path / "run" / "rep1").exists()


def _fake_run(decisions, times=None, evaluated=()):
    from types import SimpleNamespace

    rounds = [0] + [d["round"] for d in decisions]
    times = times or [0.0] * len(rounds)
    return SimpleNamespace(decisions=decisions, metrics={
        "round": rounds, "time_s": times,
        "test_acc": [0.1] + [0.5 if r in evaluated else float("nan") for r in rounds[1:]]})


def test_a_sync_rounds_overhead_is_its_duration_less_its_longest_work_and_the_exchange():
    from hetsim.cluster import DeviceModel, StepTimeModel
    from hetsim.config import NetworkSpec
    from backends.torchmp.profiler import combine_overheads

    link = DeviceModel("cpu", StepTimeModel("constant", 0.01), 0.0, 1e9, 1e-4, "inline")
    net = NetworkSpec(collective="ring_allreduce")
    run = _fake_run([  # work on each worker's own clock (rank 1 started 2 ms later than rank 0's zero)
        {"round": 1, "workers": [0, 1], "start_s": [0.0, 0.002], "finish_s": [0.10, 0.122]},   # longest 0.12
        {"round": 2, "workers": [0, 1], "start_s": [0.13, 0.133], "finish_s": [0.20, 0.253]},  # longest 0.12
        {"round": 3, "workers": [1], "start_s": [0.26], "finish_s": [0.30]},  # evaluated: skipped
        {"round": 4, "workers": [0, 1], "start_s": [0.50, 0.50], "finish_s": [0.60, 0.61]},   # longest 0.11
    ], times=[0.0, 0.13, 0.265, 0.40, 0.53], evaluated={3})
    # ring of 2 over 1 GB/s with 0.1 ms latency, 1000 bytes: 2a + S/B = 0.2 ms + 1 us
    ab = 2 * 1e-4 + 1000 / 1e9
    got = combine_overheads(run, net, [link], [0, 0], 1000, event_driven=False)
    assert [n for n, _ in got] == [2, 2, 2]
    assert [o for _, o in got] == pytest.approx([0.13 - 0.12 - ab, 0.135 - 0.12 - ab, 0.13 - 0.11 - ab])


def test_an_async_arrivals_overhead_runs_to_its_workers_next_start():
    from hetsim.cluster import DeviceModel, StepTimeModel
    from hetsim.config import NetworkSpec
    from backends.torchmp.profiler import combine_overheads

    link = DeviceModel("cpu", StepTimeModel("constant", 0.01), 0.0, 1e9, 1e-4, "inline")
    net = NetworkSpec()
    run = _fake_run([
        {"round": 1, "workers": [1], "start_s": [0.0], "finish_s": [0.05]},
        {"round": 2, "workers": [1], "start_s": [0.06], "finish_s": [0.11]},   # worker 1 again: 0.06 - 0.05
        {"round": 3, "workers": [0], "start_s": [0.0], "finish_s": [0.2]},     # worker 0 never again: skipped
        {"round": 4, "workers": [1], "start_s": [0.125], "finish_s": [0.17]},  # 0.125 - 0.11
        {"round": 5, "workers": [1], "start_s": [0.18], "finish_s": [0.22]},
    ])
    ab = 2 * 1e-4 + 2 * 1000 / 1e9  # through the server: a push and a pull of one model
    got = combine_overheads(run, net, [link], [0, 0], 1000, event_driven=True)
    assert [n for n, _ in got] == [1, 1, 1]
    assert [o for _, o in got] == pytest.approx([0.01 - ab, 0.015 - ab, 0.01 - ab])


def test_the_overhead_fit_goes_through_the_medians_per_arrival_count():
    from backends.torchmp.profiler import fit_overhead

    # medians 7 ms at n = 1 and 9 ms at n = 2 (an outlier of 1 s does not move a median): 5 ms + 2 ms x n
    fit = fit_overhead([(1, 0.006), (1, 0.007), (1, 0.008), (2, 0.009), (2, 0.009), (2, 1.0)])
    assert fit["fixed_s"] == pytest.approx(0.005) and fit["per_arrival_s"] == pytest.approx(0.002)
    assert fit["combines"] == 6
    # one arrival count: all of it is fixed; a falling line is noise, not a negative per-arrival cost
    assert fit_overhead([(2, 0.004), (2, 0.006)])["fixed_s"] == pytest.approx(0.005)
    falling = fit_overhead([(1, 0.009), (2, 0.007)])
    assert falling["per_arrival_s"] == 0.0 and falling["fixed_s"] == pytest.approx(0.008)
    with pytest.raises(HetsimError, match="no combine"):
        fit_overhead([])


def test_profile_config_exchange_stores_the_protocols_overhead_and_the_simulator_charges_it(tmp_path):
    from backends.torchmp.profiler import profile_cluster
    from hetsim.resolve import spec_from_dict, build_groups

    spec = spec_from_dict({
        "name": "ov", "workload": {"name": "digits"},
        "cluster": {"devices": [{"kind": "a", "count": 1, "step_time": {"mean_s": 1.0}, "threads": 1},
                                {"kind": "b", "count": 1, "step_time": {"mean_s": 1.0}, "threads": 1}]},
        "scheduler": {"name": "fixed", "params": {"local_steps": 2}}, "optim": {"batch_size": 16},
        "stop": {"max_rounds": 2}, "eval": {"every_rounds": 1, "every_epochs": 0}}, source="test")
    paths = profile_cluster(spec, tmp_path / "p", max_seconds=0.5, exchange=True)
    entry = json.loads(paths["a"].read_text())["entries"][0]
    in_run = entry["in_run"]["sync"]
    ov = in_run["overhead"]
    assert ov["combines"] > 0 and ov["world"] == 2 and ov["p10_s"] <= ov["p90_s"]
    assert set(ov["median_s_by_arrivals"]) == {"2"}  # the run as it will run: both devices every round
    assert in_run["rounds"] > 0
    # the simulator reads both for a sync run of devices on that profile
    d = spec_from_dict({**spec_to_dict(spec), "cluster": {"devices": [
        {"kind": "a", "count": 1, "profile": str(paths["a"])}, {"kind": "b", "count": 1, "profile": str(paths["b"])}]}},
        source="test")
    groups = build_groups(d)
    assert groups[0].overhead_s == pytest.approx(ov["fixed_s"])
    assert groups[0].overhead_per_arrival_s == pytest.approx(ov["per_arrival_s"])
    assert groups[0].step_time.samples_s == pytest.approx([x * in_run["factor"] for x in entry["step_time"]["samples_s"]])
    assert "as in a real sync run" in groups[0].source
    # under another protocol neither applies (measured for sync only)
    other = build_groups(spec_from_dict({**spec_to_dict(d), "protocol": {"name": "async"}}, source="test"))
    assert other[0].overhead_s == 0 and other[0].step_time.samples_s == pytest.approx(entry["step_time"]["samples_s"])


def test_a_profiles_in_run_calibration_is_checked_on_load(tmp_path):
    from hetsim.cluster import profile_entry

    def entry_with(in_run):
        p = tmp_path / "p.json"
        p.write_text(json.dumps({"format": "hetsim-profile/1", "entries": [
            {"workload": "digits", "batch_size": 16, "step_time": {"dist": "constant", "mean_s": 0.01},
             "in_run": in_run}]}))
        return str(p)

    step, _, label, overhead = profile_entry(entry_with({"sync": {"factor": 1.5, "overhead": {
        "fixed_s": 0.002, "per_arrival_s": 0.0005}}}), "digits", 16)
    assert step.mean_s == pytest.approx(0.015) and overhead == (0.002, 0.0005) and "x1.500" in label
    for bad, key in (({"sync": {"factor": 0}}, "factor"), ({"sync": {"factor": 1, "overhead": {"fixed_s": -1}}},
                                                            "overhead.fixed_s"),
                     ({"sync": {"factor": 1, "overhead": {"per_arrival_s": "x"}}}, "overhead.per_arrival_s")):
        with pytest.raises(SpecError, match=rf"in_run.sync.{key}: expected a number"):
            profile_entry(entry_with(bad), "digits", 16)
    with pytest.raises(SpecError, match="in_run: expected a table"):
        profile_entry(entry_with({"sync": 3}), "digits", 16)


def test_a_calibration_run_measures_against_the_measured_link_and_keeps_the_decisions(tmp_path, tiny_spec):
    from backends.torchmp.profiler import calibration_spec

    spec = tiny_spec("cluster.devices.0.latency_s=0.5", "cluster.network.collective='parameter_server'",
                     "stop.max_time_s=30", "trace.decisions=false")
    for kind in ("cpu", "gpu"):
        (tmp_path / f"{kind}.json").write_text(json.dumps({"format": "hetsim-profile/1", "entries": [
            {"workload": "synthetic", "batch_size": 8, "step_time": {"dist": "constant", "mean_s": 0.01}}]}))
    cal = calibration_spec(spec, {"cpu": tmp_path / "cpu.json", "gpu": tmp_path / "gpu.json"}, 7)
    assert cal.cluster.devices[0].latency_s is None and cal.cluster.network.collective == "ring_allreduce"
    assert cal.stop.max_rounds == 7 and cal.stop.max_time_s > 1e6  # the time budget's broadcast is paid
    assert cal.trace.decisions and cal.eval.every_rounds == 7


def test_concurrent_profiling_measures_the_configs_workload_as_configured(tiny_spec):
    # n_test sizes the evaluation whose time is profiled (and charged): the config's [workload] goes along whole
    from backends.torchmp.profiler import _device_kwargs, _spec

    kw = _device_kwargs(tiny_spec("workload.n_test=17"), 2.0)[0]
    assert kw["workload_table"]["n_test"] == 17 and kw["workload_table"]["name"] == "synthetic"
    spec = _spec(kw["workload"], kw["batch_size"], kw["device"], kw["data_path"], kw["kind"], None,
                 kw["workload_table"])
    assert spec.workload.n_test == 17 and spec.workload.n_features == 8
