"""The learning-curve surrogate records what it was fitted on; a time-only run of another policy is warned."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

from hetsim.analysis import Run
from hetsim.config import spec_to_dict, to_toml
from hetsim.errors import HetsimError, HetsimWarning
from hetsim.surrogate import LearningCurve, fit

from conftest import TINY


def run(path, config):
    """A finished emulated run with a known learning curve, acc = 0.9 - 0.5 exp(-e), without simulating."""
    e = np.linspace(0.0, 4.0, 9)
    metrics = {"time_s": e * 10, "epoch": e, "test_acc": 0.9 - 0.5 * np.exp(-e)}
    return Run(path, config, {}, metrics)


def biased(**changes):
    config = {**TINY, "sampler": {"name": "loss_topk", "params": {"kinds": ["cpu"]}}}
    return {**config, **changes}


def curve_file(tmp_path, runs):
    curve = fit(runs)
    curve.save(tmp_path / "curve.json")
    return tmp_path / "curve.json"


def time_only(tiny_spec, curve, *overrides):
    return tiny_spec("sim.fidelity='time_only'", f"sim.surrogate='{curve}'", *overrides)


def test_the_curve_records_workload_policies_optimiser_and_cluster_shapes(tmp_path):
    bigger = biased(cluster={**TINY["cluster"], "devices": [{**d, "count": 4} for d in TINY["cluster"]["devices"]]})
    data = json.loads(curve_file(tmp_path, [run(tmp_path / "a", biased()), run(tmp_path / "b", bigger)]).read_text())
    rec = data["fitted_for"]
    assert rec["sampler"] == {"name": "loss_topk", "params": {"kinds": ["cpu"]}}
    assert rec["scheduler"] == TINY["scheduler"] and rec["aggregator"] == {"name": "mean", "params": {}}
    assert rec["workload"] == {k: v for k, v in TINY["workload"].items() if k != "n_test"}
    assert rec["optim"] == TINY["optim"]
    assert rec["cluster_shapes"] == [[["cpu", 1], ["gpu", 2]], [["cpu", 4], ["gpu", 4]]]


def test_a_curve_is_fitted_on_runs_of_one_policy(tmp_path):
    with pytest.raises(HetsimError, match=r"runs of one policy, these differ: sampler: .*/a 'loss_topk', .*/b 'uniform'"):
        fit([run(tmp_path / "a", biased()), run(tmp_path / "b", dict(TINY))])


def test_the_same_policy_on_a_larger_cluster_is_not_warned(tiny_spec, tmp_path):
    curve = curve_file(tmp_path, [run(tmp_path / "a", biased())])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # defaults written out or left out are the same policy; the cluster may grow: that is the point
        time_only(tiny_spec, curve, "sampler={name='loss_topk', params={kinds=['cpu'], sample_ratio=4.0}}",
                  "cluster.devices.1.count=200")


@pytest.mark.parametrize("overrides, difference", [
    (["sampler={name='uniform'}"], "sampler: fitted 'loss_topk', here 'uniform'"),
    (["sampler={name='loss_topk', params={kinds=['*']}}"], "sampler.kinds: fitted ('cpu',), here ('*',)"),
    (["sampler={name='loss_topk', params={kinds=['cpu']}}", "aggregator={name='biased'}"],
     "aggregator: fitted 'mean', here 'biased'"),
    (["sampler={name='loss_topk', params={kinds=['cpu']}}", "optim.lr=0.5"], "optim.lr: fitted 0.1, here 0.5"),
    (["sampler={name='loss_topk', params={kinds=['cpu']}}", "protocol={name='semi_sync', params={k=2}}"],
     "protocol: fitted 'sync', here 'semi_sync'"),
    (["sampler={name='loss_topk', params={kinds=['cpu']}}", "data={name='iid'}"], "data: fitted 'shared', here 'iid'"),
    (["sampler={name='loss_topk', params={kinds=['cpu']}}", "selector={name='uniform', params={k=2}}"],
     "selector: fitted 'all', here 'uniform'"),
])
def test_a_time_only_spec_of_another_policy_is_warned(tiny_spec, tmp_path, overrides, difference):
    curve = curve_file(tmp_path, [run(tmp_path / "a", biased())])
    with pytest.warns(HetsimWarning, match=r"sim.surrogate: .*curve.json: fitted on runs of another policy"):
        time_only(tiny_spec, curve, *overrides)
    with pytest.warns(HetsimWarning) as record:
        time_only(tiny_spec, curve, *overrides)
    assert difference in str(record[0].message)


def test_an_old_curve_without_the_record_is_warned_as_unchecked(tiny_spec, tmp_path):
    old = {"format": "hetsim-learning-curve/1", "a": 0.9, "b": 0.5, "c": 1.0, "epochs_min": 0.0, "epochs_max": 4.0,
           "fitted_on": ["runs/a"]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert LearningCurve.load(tmp_path / "old.json").fitted_for is None
    with pytest.warns(HetsimWarning, match=r"does not record which workload and policies it was fitted on .* cannot "
                                           r"be checked"):
        time_only(tiny_spec, tmp_path / "old.json")


def test_the_cli_prints_the_warning_as_one_line(tiny_spec, tmp_path):
    curve = curve_file(tmp_path, [run(tmp_path / "a", biased())])
    config = tmp_path / "t.toml"
    with pytest.warns(HetsimWarning):
        config.write_text(to_toml(spec_to_dict(time_only(tiny_spec, curve, "sampler={name='uniform'}"))))
    proc = subprocess.run([sys.executable, "-m", "hetsim.cli", "simulate", str(config), "--quiet", "--out",
                           str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stderr.startswith("hetsim: warning: sim.surrogate: ") and proc.stderr.count("\n") == 1
    assert "sampler: fitted 'loss_topk', here 'uniform'" in proc.stderr


def test_a_curve_whose_record_is_not_a_table_is_a_one_line_error(tiny_spec, tmp_path):
    from hetsim.errors import SpecError

    bad = {"format": "hetsim-learning-curve/1", "a": 0.9, "b": 0.5, "c": 1.0, "epochs_min": 0.0, "epochs_max": 4.0,
           "fitted_for": "digits"}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(SpecError, match=r"bad.json: fitted_for: expected a table, got 'digits'$"):
        time_only(tiny_spec, tmp_path / "bad.json")


def test_a_curve_recorded_before_protocols_selectors_and_placements_means_their_defaults(tiny_spec, tmp_path):
    curve = json.loads(curve_file(tmp_path, [run(tmp_path / "a", biased())]).read_text())
    for key in ("selector", "protocol", "data"):
        assert curve["fitted_for"].pop(key) is not None
    (tmp_path / "old.json").write_text(json.dumps(curve))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        time_only(tiny_spec, tmp_path / "old.json", "sampler={name='loss_topk', params={kinds=['cpu']}}")
    with pytest.warns(HetsimWarning, match="protocol: fitted 'sync', here 'async'"):
        time_only(tiny_spec, tmp_path / "old.json", "sampler={name='loss_topk', params={kinds=['cpu']}}",
                  "protocol={name='async'}")
