"""The real backend (CPU, gloo on loopback): equivalence with the simulator, torchrun, faults, profiler."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hetsim.analysis import compare_runs, load_run
from hetsim.results import read_decisions, read_trace
from hetsim.config import spec_to_dict, to_toml
from hetsim.errors import HetsimError
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
    kinds = {e["name"] for e in read_trace(tmp_path / "real" / "trace.json") if e["ph"] == "X"}
    assert {"compute", "comm", "eval"} <= kinds


def test_emulated_slowdown_pads_steps(tiny_spec, tmp_path):
    spec = tiny_spec(*TWO[:1], "scheduler={name='fixed', params={local_steps=20}}", "stop.max_rounds=3",
                     "cluster.devices.0.emulated_slowdown=4.0")
    real = run(spec, tmp_path)
    events = [e for e in real.trace if e.get("name") == "compute"]
    slow = sum(e["dur"] for e in events if e["tid"] == 0)
    fast = sum(e["dur"] for e in events if e["tid"] == 1)
    assert slow > 2.5 * fast  # 4x padded; loose bound for a noisy machine


def test_a_crashing_worker_names_device_and_round_and_keeps_results(tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "crash:1:4")
    t0 = time.time()
    with pytest.raises(HetsimError, match=r"device gpu0 \(rank 1\) failed in round 4: RuntimeError: injected crash"):
        run(tiny_spec(*TWO, "run.fault_timeout_s=20"), tmp_path)
    assert time.time() - t0 < 30
    rounds = [line.split(",")[0] for line in (tmp_path / "metrics.csv").read_text().splitlines()[1:]]
    assert rounds == ["0", "1", "2", "3"]


def test_a_hanging_worker_ends_the_run_within_the_timeout(tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "hang:0:2")
    t0 = time.time()
    with pytest.raises(HetsimError, match=r"device cpu0 \(rank 0\) made no progress for 3 s in round 2"):
        run(tiny_spec(*TWO, "run.fault_timeout_s=3"), tmp_path)
    assert time.time() - t0 < 15


def test_a_hang_keeps_every_finished_round_on_disk(tiny_spec, tmp_path, monkeypatch):
    # rank 1 hangs in round 3; rank 0 waits at the barrier until the launcher kills it: no flush at exit
    # runs, so rounds 0-2 are there only if each was written when it finished
    monkeypatch.setenv(FAULT_ENV, "hang:1:3")
    with pytest.raises(HetsimError, match="made no progress"):
        run(tiny_spec(*TWO, "run.fault_timeout_s=3"), tmp_path)
    rounds = [line.split(",")[0] for line in (tmp_path / "metrics.csv").read_text().splitlines()[1:]]
    assert rounds == ["0", "1", "2"]
    assert [d["round"] for d in read_decisions(tmp_path / "decisions.bin")] == [1, 2]


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
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[:3000]
    sim = simulate(spec)
    real = load_run(tmp_path / "tr")
    assert [d["local_steps"] for d in real.decisions] == [d["local_steps"] for d in sim.decisions]
    assert np.allclose(real.metrics["test_acc"], sim.metrics["test_acc"], atol=1e-6, equal_nan=True)


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
    from hetsim.policies import Contribution
    from hetsim.policies.aggregation import Mean

    params = [torch.randn(8, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.start_processes(_average_with_torch, args=(f"tcp://127.0.0.1:{free_port()}", params, out), nprocs=2,
                       start_method="spawn")
    ours, _ = Mean().combine(torch.zeros(8), torch.stack(params), [Contribution(k, "cpu", 1, 1, 0.0) for k in (0, 1)])
    for rank in (0, 1):
        assert torch.allclose(out[rank], ours, atol=1e-7)


def test_profiler_writes_a_profile_the_simulator_reads(tiny_spec, tmp_path):
    from backends.torchmp.profiler import profile_device, write_profile

    measured = profile_device("synthetic", 8, "cpu", threads=1, warmup=3, min_steps=10, max_steps=40, max_seconds=5)
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


def test_backend_resume_continues_to_the_uninterrupted_result(tiny_spec, tmp_path, monkeypatch):
    spec = tiny_spec(*TWO, "run.checkpoint_every=2", "run.fault_timeout_s=20")
    whole = run(spec, tmp_path / "whole")
    monkeypatch.setenv(FAULT_ENV, "crash:1:6")
    with pytest.raises(HetsimError, match="failed in round 6"):
        run(spec, tmp_path / "cut")
    monkeypatch.delenv(FAULT_ENV)
    resumed = run(spec, tmp_path / "cut", resume=True)
    assert resumed.decisions == whole.decisions or [d["local_steps"] for d in resumed.decisions] == \
        [d["local_steps"] for d in whole.decisions]
    assert len(resumed.decisions) == 8
    assert np.allclose(resumed.metrics["train_loss"][1:], whole.metrics["train_loss"][1:], atol=1e-6)
    assert np.allclose(resumed.metrics["test_acc"], whole.metrics["test_acc"], equal_nan=True)


def test_concurrent_profiling_of_a_configs_devices(tiny_spec, tmp_path):
    from backends.torchmp.profiler import profile_cluster

    paths = profile_cluster(tiny_spec(*TWO), tmp_path, max_seconds=2.0)
    assert set(paths) == {"cpu", "gpu"}
    cpu, gpu = (json.loads(paths[k].read_text())["entries"][0] for k in ("cpu", "gpu"))
    assert cpu["concurrent_with"] == 1 and cpu["step_time"]["dist"] == "empirical"
    assert cpu["median_s"] > 1.5 * gpu["median_s"]  # the cpu device is emulated 2x slower


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
