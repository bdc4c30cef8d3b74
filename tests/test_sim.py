"""The simulator end to end on tiny data: closed-form clocks, the shared math, determinism, outputs."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hetsim.config import load_spec
from hetsim.results import read_decisions, read_trace
from hetsim.seeding import derive
from hetsim.resolve import build_policies
from hetsim.sim import Simulation, simulate
from hetsim.training import TrainingCore, lr_at
from hetsim.policies.sampling import EpochStream

# TINY: cpu step 0.01 s x 1 step, 2 gpus 0.002 s x 5 steps; ring of 3, latency 1e-4, 1 GB/s.


def exchange(core_bytes, n=3, latency=1e-4, bw=1e9):
    return 2 * (n - 1) * latency + 2 * (n - 1) / n * core_bytes / bw


def test_constant_speed_cluster_time_is_the_closed_form_sum_of_its_rounds(tiny_spec):
    result = simulate(tiny_spec())
    e = exchange(result.summary["model_bytes"])
    # every round: max(cpu 1 x 0.01, gpu 5 x 0.002) = 0.01 s compute, then the exchange
    expected = [r * (0.01 + e) for r in range(5)]
    assert result.metrics["round"] == [0, 1, 2, 3, 4]
    assert result.metrics["time_s"] == pytest.approx(expected, rel=1e-12)
    assert result.summary["exchange_s"] == pytest.approx(e)
    # every device computes 0.01 s of every round
    for u in result.summary["utilization"].values():
        assert u == pytest.approx(0.01 / (0.01 + e))


def test_slowest_device_sets_the_round_time(tiny_spec):
    result = simulate(tiny_spec("scheduler.params.per_kind.gpu=8"))  # gpu 8 x 0.002 = 0.016 > cpu 0.01
    e = result.summary["exchange_s"]
    assert result.metrics["time_s"][-1] == pytest.approx(4 * (0.016 + e))
    assert result.summary["utilization"]["cpu0"] == pytest.approx(0.01 / (0.016 + e))


def test_eval_time_is_charged_on_the_fastest_device(tiny_spec):
    result = simulate(tiny_spec("cluster.devices.1.eval_time_s=0.003", "eval.every_rounds=2"))
    e = result.summary["exchange_s"]
    # evaluations after rounds 2 and 4 cost 0.003 s each; the initial evaluation is free
    assert result.metrics["time_s"] == pytest.approx(
        [0, 0.01 + e, 2 * (0.01 + e) + 0.003, 3 * (0.01 + e) + 0.003, 4 * (0.01 + e) + 0.006])
    evals = [ev for ev in result.trace if ev.get("name") == "eval"]
    assert {ev["tid"] for ev in evals} == {1} and len(evals) == 2


def test_time_budget_turns_into_steps_as_they_complete(tiny_spec):
    # budget 0.01: gpu steps at 0.002 end at 0.002..0.010 -> 5 steps; cpu 0.01 -> 1 step;
    # with 0.003 s steps a worker starts steps at 0, .003, .006, .009 -> 4 steps ending at 0.012
    result = simulate(tiny_spec("scheduler={name='time_budget', params={budget_s=0.01}}",
                                "cluster.devices.1.step_time.mean_s=0.003"))
    assert result.decisions[0]["local_steps"] == [1, 4, 4]
    assert result.decisions[0]["time_budget_s"] == 0.01
    assert result.metrics["time_s"][1] == pytest.approx(0.012 + result.summary["exchange_s"])


def test_sync_with_mean_equals_large_batch_sgd(tiny_spec):
    """One step + plain mean per round = mini-batch SGD on the union of the workers' batches."""
    spec = tiny_spec("scheduler={name='sync'}", "stop.max_rounds=6")
    sim = Simulation(spec)
    w = sim.core.workload
    reference = w.make_model()
    reference.load_state_dict(sim.core.global_model.state_dict())
    sim.run()
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    streams = [EpochStream(w.n_train, np.random.default_rng(derive(spec.seed, "data", k))) for k in range(3)]
    for r in range(6):
        idx = torch.from_numpy(np.concatenate([s.take(8) for s in streams]))
        opt.zero_grad()
        F.cross_entropy(reference(w.train_x[idx]), w.train_y[idx]).backward()
        opt.step()
    ref = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    assert torch.allclose(sim.core.global_flat.get(), ref, atol=1e-6)


def test_same_seed_gives_identical_files_and_another_seed_does_not(tiny_spec, tmp_path):
    spec = tiny_spec("sampler={name='loss_topk', params={kinds=['*']}}", "aggregator={name='biased'}",
                     "cluster.devices.1.step_time={dist='lognormal', mean_s=0.002, std_s=0.001}")
    simulate(spec, tmp_path / "a")
    simulate(spec, tmp_path / "b")
    simulate(tiny_spec("seed=1", "sampler={name='loss_topk', params={kinds=['*']}}", "aggregator={name='biased'}",
                       "cluster.devices.1.step_time={dist='lognormal', mean_s=0.002, std_s=0.001}"), tmp_path / "c")
    for name in ("metrics.csv", "decisions.bin", "trace.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "metrics.csv").read_bytes() != (tmp_path / "c" / "metrics.csv").read_bytes()


def test_run_directory_contents(tiny_spec, tmp_path):
    spec = tiny_spec("sampler={name='loss_topk', params={sample_ratio=2, kinds=['cpu']}}")
    result = simulate(spec, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.toml", "metrics.csv", "decisions.bin",
                                                    "trace.json", "summary.json"}
    assert load_spec(tmp_path / "config.toml") == spec
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert header == "round,time_s,epoch,samples,lr,train_loss,test_loss,test_acc"
    decisions = list(read_decisions(tmp_path / "decisions.bin"))
    assert len(decisions) == 4
    assert decisions[0]["local_steps"] == [1, 5, 5]
    assert decisions[0]["samples"] == [8, 40, 40]
    assert decisions[0]["biased_samples"] == [8, 0, 0]  # only the cpu samples biased
    assert decisions[0]["weights"] == pytest.approx([1 / 3] * 3)
    trace = read_trace(tmp_path / "trace.json")
    kinds = {e["name"] for e in trace if e["ph"] == "X"}
    assert kinds == {"compute", "comm", "idle"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("time_to_accuracy_s", "final_test_acc", "utilization", "seed", "versions", "wall_time_s"):
        assert key in summary
    assert summary["samples"] == 4 * 88 and result.metrics["samples"][-1] == 4 * 88


def test_time_to_accuracy_is_the_first_evaluation_at_target(tiny_spec):
    result = simulate(tiny_spec("stop.max_rounds=10"))
    target = result.summary["target_accuracy"]
    hits = [t for t, a in zip(result.metrics["time_s"], result.metrics["test_acc"]) if a >= target]
    assert hits, "the tiny task should reach 50% accuracy"
    assert result.summary["time_to_accuracy_s"] == hits[0]


def test_stop_at_target_ends_the_run_there(tiny_spec):
    result = simulate(tiny_spec("stop.max_rounds=50", "stop.stop_at_target=true"))
    assert result.summary["stopped_by"] == "target_accuracy"
    assert result.metrics["test_acc"][-1] >= 0.5
    assert all(a < 0.5 for a in result.metrics["test_acc"][:-1])


def test_max_time_and_epoch_budgets(tiny_spec):
    r = simulate(tiny_spec("stop.max_rounds=0", "stop.max_time_s=0.03"))
    assert r.summary["stopped_by"] == "max_time_s" and r.metrics["time_s"][-2] < 0.03 <= r.metrics["time_s"][-1]
    r = simulate(tiny_spec("stop.max_rounds=0", "stop.max_epochs=1"))  # 88 samples per round, 256 per epoch
    assert r.summary["stopped_by"] == "max_epochs" and r.summary["rounds"] == 3


def test_eval_every_epochs(tiny_spec):
    r = simulate(tiny_spec("eval.every_rounds=0", "eval.every_epochs=0.5", "stop.max_rounds=6"))
    evaluated = [rd for rd, a in zip(r.metrics["round"], r.metrics["test_acc"]) if not math.isnan(a)]
    # 88 samples per round, 128 per half epoch: crossings after rounds 2, 3, 5, 6 (and the last round)
    assert evaluated == [0, 2, 3, 5, 6]


def test_step_lr_schedule_follows_the_budget(tiny_spec):
    spec = tiny_spec("optim.lr_schedule='step'", "stop.max_rounds=10")
    assert [lr_at(spec.optim, p) for p in (0.0, 0.59, 0.6, 0.8)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    r = simulate(spec)
    # progress at the start of round r is (r-1)/10: rounds 1..6 at 0.1, 7..8 at 0.01, 9..10 at 0.001
    assert r.metrics["lr"][1:] == pytest.approx([0.1] * 6 + [0.01] * 2 + [0.001] * 2)


def test_biased_aggregation_weights_follow_local_steps(tiny_spec):
    r = simulate(tiny_spec("aggregator={name='biased', params={strength=1.0}}"))
    assert r.decisions[0]["weights"] == pytest.approx([1 / 11, 5 / 11, 5 / 11])


def test_trace_can_be_limited_to_the_first_rounds(tiny_spec):
    r = simulate(tiny_spec("trace.max_rounds=1"))
    assert {e["args"]["round"] for e in r.trace if e["ph"] == "X"} == {1}


def test_progress_callback_sees_every_row(tiny_spec):
    rows = []
    simulate(tiny_spec(), progress=rows.append)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]


# -- divergence --------------------------------------------------------------------------------

NAN_AT_ROUND_3 = ("scheduler={name='custom_policy:StepsAtRound', params={steps=1, at=3, special=2}}",
                  "aggregator={name='custom_policy:NanWhenSteps', params={steps=2}}", "stop.max_rounds=6")


def test_a_run_that_does_not_diverge_records_null(tiny_spec):
    s = simulate(tiny_spec()).summary
    assert s["diverged_at_round"] is None and s["stopped_by"] == "max_rounds"


def test_divergence_stops_the_run_after_the_round_that_made_the_model_non_finite(tiny_spec):
    # the aggregator turns the global model into NaN in round 3 (the only round with 2 local steps)
    r = simulate(tiny_spec(*NAN_AT_ROUND_3))
    assert r.summary["diverged_at_round"] == 3 and r.summary["stopped_by"] == "diverged"
    assert r.summary["rounds"] == 3 and r.metrics["round"] == [0, 1, 2, 3]
    assert all(math.isfinite(x) for x in r.metrics["train_loss"][1:])  # round 3's loss came before the NaN model


def test_on_divergence_continue_runs_to_the_budget_and_still_records_the_round(tiny_spec):
    r = simulate(tiny_spec(*NAN_AT_ROUND_3, "stop.on_divergence='continue'"))
    assert r.summary["diverged_at_round"] == 3 and r.summary["stopped_by"] == "max_rounds"
    assert r.summary["rounds"] == 6
    assert all(math.isnan(x) for x in r.metrics["train_loss"][4:])  # training from a NaN model


def test_divergence_round_of_a_huge_learning_rate_is_the_first_non_finite_global_model(tiny_spec):
    spec = tiny_spec("optim.lr=1e6", "stop.max_rounds=20")
    # the same math driven by hand (1 cpu step, 5 gpu steps, the plain mean of the replicas), with the
    # test's own finiteness check of the global parameters and the training loss
    core = TrainingCore(spec, build_policies(spec))
    core.set_lr(1e6)
    ks = [0, 1, 2]
    expected = None
    for r in range(1, 21):
        core.pull(ks)
        core.train(ks, [1, 5, 5])
        new = core.replicas(ks).mean(0)
        core.install(new)
        t = core.tallies(ks)
        if not (torch.isfinite(new).all() and math.isfinite(t.loss_sum.sum() / t.samples.sum())):
            expected = r
            break
    assert expected is not None
    result = simulate(spec)
    assert result.summary["diverged_at_round"] == expected and result.summary["rounds"] == expected


def test_on_divergence_is_validated(tiny_spec):
    from hetsim.errors import SpecError

    with pytest.raises(SpecError, match=r"stop.on_divergence: expected 'stop' or 'continue', got 'halt'"):
        tiny_spec("stop.on_divergence='halt'")


def test_a_simulated_run_uses_one_torch_thread_unless_sim_threads_says(tiny_spec, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # the caller's setting: not what a run should use, and restored after it
    try:
        assert simulate(tiny_spec("stop.max_rounds=1")).summary["torch_threads"] == 1
        assert torch.get_num_threads() == 3
        simulate(tiny_spec("stop.max_rounds=1", "sim.threads=2"), tmp_path / "r")
        assert json.loads((tmp_path / "r" / "summary.json").read_text())["torch_threads"] == 2
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_negative_sim_threads_is_rejected(tiny_spec):
    from hetsim.errors import SpecError

    with pytest.raises(SpecError, match=r"sim.threads: expected an integer >= 0 \(0 = one per simulated run\), got -1"):
        tiny_spec("sim.threads=-1")


def test_eval_every_epochs_after_a_round_covering_many_epochs_is_due_once_and_waits_for_the_next_multiple(tiny_spec):
    from hetsim.training import RunSchedule

    schedule = RunSchedule(tiny_spec("eval.every_epochs=0.25", "eval.every_rounds=0"))
    assert schedule.eval_due(1, 1_000_000.1)          # 4 million multiples crossed in one round: one evaluation
    assert schedule.next_eval_epoch == pytest.approx(1_000_000.25)  # the next multiple after 1,000,000.1
    assert not schedule.eval_due(2, 1_000_000.2)
    assert schedule.eval_due(3, 1_000_000.25)
    assert schedule.next_eval_epoch == pytest.approx(1_000_000.5)
    # small steps keep the exact sums of before: 0.25 + 0.25 + ... stays on the multiples
    small = RunSchedule(tiny_spec("eval.every_epochs=0.25", "eval.every_rounds=0"))
    assert [small.eval_due(r, e) for r, e in enumerate([0.2, 0.25, 0.3, 0.74, 0.76, 1.3], 1)] == \
        [False, True, False, True, True, True]
    assert small.next_eval_epoch == 1.5
