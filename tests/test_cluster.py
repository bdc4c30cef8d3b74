"""Step-time distributions, profiles and the exchange cost model against closed forms."""

import json

import numpy as np
import pytest

from hetsim.cluster import DeviceModel, StepTimeModel, exchange_time, load_profile, profile_entry
from hetsim.config import NetworkSpec, StepTimeSpec
from hetsim.errors import SpecError


def model(**kw):
    return StepTimeModel.from_spec(StepTimeSpec(**kw), "step_time")


def test_constant_is_constant():
    m = model(dist="constant", mean_s=0.25)
    rng = np.random.default_rng(0)
    assert {m.sample(rng) for _ in range(10)} == {0.25}


def test_lognormal_matches_mean_and_std_and_stays_positive():
    m = model(dist="lognormal", mean_s=0.01, std_s=0.005)
    rng = np.random.default_rng(1)
    x = np.array([m.sample(rng) for _ in range(20000)])
    assert x.min() > 0
    assert x.mean() == pytest.approx(0.01, rel=0.03)
    assert x.std() == pytest.approx(0.005, rel=0.05)


def test_empirical_resamples_the_recorded_times():
    m = model(dist="empirical", samples_s=(0.1, 0.2, 0.4))
    rng = np.random.default_rng(0)
    assert {m.sample(rng) for _ in range(100)} == {0.1, 0.2, 0.4}
    assert m.mean_s == pytest.approx(0.7 / 3)


@pytest.mark.parametrize("kw, message", [
    ({"dist": "constant", "mean_s": 0.0}, "step_time.mean_s: expected a step time > 0"),
    ({"dist": "lognormal", "mean_s": -1.0}, "step_time.mean_s: expected a step time > 0"),
    ({"dist": "lognormal", "mean_s": 1.0, "std_s": -0.1}, "step_time.std_s: expected a number >= 0"),
    ({"dist": "empirical", "samples_s": ()}, "step_time.samples_s: expected a non-empty list"),
    ({"dist": "empirical", "samples_s": (0.1, 0.0)}, r"step_time.samples_s: expected step times > 0, got 0.0"),
    ({"dist": "normal", "mean_s": 1.0}, r"step_time.dist: expected one of"),
    # std/mean above 3: half the steps below 1/sqrt(1 + 3.5²) = 0.27 x mean
    ({"dist": "lognormal", "mean_s": 0.01, "std_s": 0.035},
     r"step_time.std_s: expected at most 3 x mean_s = 0.03 \(a lognormal with std/mean = 3.5 has half its steps "
     r"below 0.27 x mean"),
    ({"dist": "constant", "mean_s": 0.01, "std_s": 0.002}, r"step_time.std_s: expected 0 for dist 'constant'"),
])
def test_impossible_profiles_are_rejected(kw, message):
    with pytest.raises(SpecError, match=message):
        model(**kw)


def test_lognormal_spread_up_to_three_times_the_mean_is_accepted():
    assert model(dist="lognormal", mean_s=0.01, std_s=0.03).std_s == 0.03


def test_a_profile_entry_with_an_absurd_spread_is_rejected(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"format": "hetsim-profile/1", "entries": [
        {"workload": "digits", "batch_size": 16, "step_time": {"dist": "lognormal", "mean_s": 0.001, "std_s": 0.01}}]}))
    with pytest.raises(SpecError, match=r"entries\[0\].step_time.std_s: expected at most 3 x mean_s"):
        profile_entry(str(p), "digits", 16)


def dev(bw=None, lat=None):
    return DeviceModel("x", StepTimeModel("constant", 1.0), 0.0, bw, lat, "inline")


def test_ring_allreduce_closed_form():
    # n = 4, S = 1 MB, B = 1 GB/s, a = 10 us: 2*3*1e-5 + 2*3/4 * 1e-3 = 1.56e-3 s
    net = NetworkSpec("ring_allreduce", bandwidth_GBps=1.0, latency_s=1e-5)
    assert exchange_time(net, [dev()] * 4, 1_000_000) == pytest.approx(1.56e-3)


def test_ring_is_bounded_by_the_slowest_link():
    net = NetworkSpec("ring_allreduce", bandwidth_GBps=1.0, latency_s=0.0)
    devices = [dev(), dev(), dev(bw=0.5e9), dev()]
    assert exchange_time(net, devices, 1_000_000) == pytest.approx(2 * 3 / 4 * 1e-3 * 2)


def test_parameter_server_closed_form():
    # 2a + 2 max(n S / B_server, S / B_worker) = 2e-5 + 2 * max(4e-3, 1e-3)
    net = NetworkSpec("parameter_server", bandwidth_GBps=1.0, latency_s=1e-5)
    assert exchange_time(net, [dev()] * 4, 1_000_000) == pytest.approx(8.02e-3)


def test_tree_allreduce_closed_form():
    # n = 10: ceil(log2 10) = 4 -> 2*4*1e-5 + 2*9/10 * 1e-3
    net = NetworkSpec("tree_allreduce", bandwidth_GBps=1.0, latency_s=1e-5)
    assert exchange_time(net, [dev()] * 10, 1_000_000) == pytest.approx(8e-5 + 1.8e-3)


def test_single_device_needs_no_exchange():
    assert exchange_time(NetworkSpec(), [dev()], 10**9) == 0.0


def test_builtin_profiles_are_well_formed():
    data = load_profile("builtin:assumed-gpu")
    assert data["source"] == "assumed" and "ASSUMED" in data["hardware"]
    step, eval_time, label, overhead = profile_entry("builtin:assumed-gpu", "digits", 16)
    assert overhead == (0.0, 0.0)  # assumed speeds: no measured per-combine overhead
    assert step.mean_s > 0 and eval_time == 0.0 and label.startswith("assumed")


def test_profile_file_errors(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"format": "other"}))
    with pytest.raises(SpecError, match="format: expected 'hetsim-profile/1'"):
        load_profile(str(p))
    with pytest.raises(SpecError, match="no such profile file"):
        load_profile(str(tmp_path / "none.json"))
    p.write_text(json.dumps({"format": "hetsim-profile/1", "entries": [
        {"workload": "digits", "batch_size": 16, "step_time": {"dist": "constant", "mean_s": 0}}]}))
    with pytest.raises(SpecError, match=r"entries\[0\].step_time.mean_s: expected a step time > 0"):
        profile_entry(str(p), "digits", 16)
