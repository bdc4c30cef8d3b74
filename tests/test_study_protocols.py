"""The protocols study's decisions (studies/protocols/run.py): which runs it plans, how it checks the
paper's claim (plateau rule, target, speedup) and how it rewrites its README section. No run is
simulated: the runs are built by hand, the expectations computed by hand."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from hetsim.analysis import Run

_spec = importlib.util.spec_from_file_location("protocols_study", ROOT / "studies" / "protocols" / "run.py")
study = importlib.util.module_from_spec(_spec)
sys.modules["protocols_study"] = study  # its dataclasses look their module up while being defined
_spec.loader.exec_module(study)

FASHION = Path("/usr/share/datasets/fashion-mnist")


def fake_run(seed: int, epochs: list[float], times: list[float], accs: list[float]) -> Run:
    n = len(epochs)
    metrics = {"round": np.arange(n, dtype=float), "time_s": np.array(times, dtype=float),
               "epoch": np.array(epochs, dtype=float), "test_acc": np.array(accs, dtype=float)}
    return Run(Path(f"/nonexistent/s{seed}"), {"name": "x", "seed": seed}, {}, metrics)


def test_per_seed_speedups_pair_runs_by_seed_and_skip_seeds_that_missed():
    base = [fake_run(0, [0, 1], [0, 4.0], [0.1, 0.9]), fake_run(1, [0, 1], [0, 6.0], [0.1, 0.9]),
            fake_run(2, [0, 1], [0, 5.0], [0.1, 0.9])]
    # seed order differs from the baseline's; seed 2 never reaches 0.8
    other = [fake_run(1, [0, 1], [0, 2.0], [0.1, 0.85]), fake_run(0, [0, 1], [0, 0.5], [0.1, 0.8]),
             fake_run(2, [0, 1], [0, 1.0], [0.1, 0.7])]
    assert study.per_seed_speedups(base, other, 0.8) == [3.0, 8.0]  # 6/2 (seed 1), 4/0.5 (seed 0)


def test_claim_report_checks_the_plateau_over_the_last_fifth_and_targets_final_minus_half_a_point():
    # budget 10 epochs: the plateau is judged from the last evaluation at or before epoch 8
    sync = [fake_run(0, [0, 4, 8, 9, 10], [0, 4, 8, 9, 10], [0.1, 0.80, 0.880, 0.882, 0.883]),
            fake_run(1, [0, 4, 8, 9, 10], [0, 4, 8, 9, 10], [0.1, 0.80, 0.886, 0.887, 0.889])]
    # target: mean(0.883, 0.889) - 0.005 = 0.881; sync reaches it at t = 9 (seed 0) and 8 (seed 1)
    biased = [fake_run(0, [0, 5, 10], [0, 0.5, 1.0], [0.1, 0.879, 0.8815]),
              fake_run(1, [0, 5, 10], [0, 0.5, 1.0], [0.1, 0.884, 0.885])]
    r = study.claim_report({"sync-sgd": sync, "biased-local-sgd": biased}, 10.0)
    assert r["sync_gain_last_20pct_points"] == pytest.approx([0.3, 0.3])
    assert not r["plateaued"]
    assert r["target"] == pytest.approx(0.881)
    assert r["sync_tta_mean_s"] == pytest.approx(8.5)
    assert r["biased_reached"] == 2
    assert r["biased_tta_mean_s"] == pytest.approx(0.75)  # seed 0 at 1.0, seed 1 at 0.5
    assert r["speedup"] == pytest.approx(8.5 / 0.75)
    assert sorted(r["speedup_per_seed"]) == pytest.approx([9.0, 16.0])
    # at biased local SGD's own level, mean(0.8815, 0.885) - 0.005 = 0.87825: sync at 8 and 8, biased at 0.5 and 0.5
    assert r["own_target"] == pytest.approx(0.87825)
    assert r["own_speedup"] == pytest.approx(16.0)
    assert "not plateaued" in study.claim_markdown(r)


def test_claim_report_plateaued_and_not_reached():
    sync = [fake_run(0, [0, 8, 10], [0, 8, 10], [0.1, 0.889, 0.890])]
    biased = [fake_run(0, [0, 10], [0, 1.0], [0.1, 0.86])]
    r = study.claim_report({"sync-sgd": sync, "biased-local-sgd": biased}, 10.0)
    assert r["plateaued"] and r["sync_gain_last_20pct_points_mean"] == pytest.approx(0.1)
    assert r["biased_reached"] == 0 and r["speedup"] is None
    text = study.claim_markdown(r)
    assert "does not reach it" in text and "3.0 points below sync SGD" in text


def test_readme_section_is_replaced_between_its_markers_and_the_rest_kept(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("# Studies\n\nintro\n")
    monkeypatch.setattr(study, "README", readme)
    study.update_readme("first\n")
    assert readme.read_text() == f"# Studies\n\nintro\n\n## Protocols (measured here)\n\n{study.BEGIN}\nfirst\n{study.END}\n"
    readme.write_text(readme.read_text() + "\nhand-written summary\n")
    study.update_readme("second\n")
    assert readme.read_text() == (f"# Studies\n\nintro\n\n## Protocols (measured here)\n\n{study.BEGIN}\nsecond\n"
                                  f"{study.END}\n\nhand-written summary\n")


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
def test_every_method_of_the_study_builds_in_this_checkout(tmp_path):
    planned, skipped = study.plan(["paper", "digits", "claim"], 1, tmp_path, 5.0)
    assert skipped == {}
    labels = {(p.part, p.data, p.label) for p in planned}
    # 9 methods on shared data (the authors' data path only there), 8 on Dirichlet, 2 in the claim
    assert len(labels) == 2 * (9 + 8) + 2
    gpus = next(p for p in planned if (p.part, p.data, p.label) == ("paper", "shared", "sync-sgd-gpus"))
    spec = gpus.runs[0].spec
    assert [(d.kind, d.count) for d in spec.cluster.devices] == [("gpu", 8)]
    fedbuff = next(p for p in planned if (p.part, p.data, p.label) == ("digits", "dirichlet", "fedbuff")).runs[0].spec
    assert (fedbuff.protocol.name, fedbuff.protocol.params["k"]) == ("buffered_async", 4)
    assert (fedbuff.data.name, fedbuff.data.params["alpha"]) == ("dirichlet", 0.3)
    assert fedbuff.scheduler.params["local_steps"] == 8  # digits' H
    claim = next(p for p in planned if (p.part, p.label) == ("claim", "biased-local-sgd")).runs[0].spec
    assert claim.stop.max_epochs == 5.0 and claim.scheduler.params["per_kind"] == {"cpu": 1, "gpu": 32}


@pytest.mark.parametrize("name, protocol, data", [
    ("async.toml", ("async", {"alpha": 0.6, "staleness": "polynomial", "a": 0.5}), "shared"),
    ("semi_sync.toml", ("semi_sync", {"k": 8, "late": "keep", "staleness": "polynomial", "a": 0.5}), "shared"),
    ("buffered_async.toml", ("buffered_async", {"k": 4, "alpha": 1.0, "staleness": "polynomial", "a": 0.5}),
     "dirichlet"),
])
def test_protocol_examples_load_with_their_protocol(name, protocol, data):
    from hetsim.resolve import load_spec

    spec = load_spec(ROOT / "examples" / name)
    assert (spec.protocol.name, dict(spec.protocol.params)) == protocol
    assert spec.data.name == data and spec.n_workers == 10
