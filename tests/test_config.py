"""The spec: loading, validation with clear errors, overrides, round trip."""

import dataclasses
from pathlib import Path

import pytest

from hetsim.config import Spec, spec_to_dict, to_toml
from hetsim.resolve import check, load_spec, replace, resolve, spec_from_dict
from hetsim.errors import SpecError

from conftest import ROOT, TINY


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "spec.toml"
    p.write_text(text)
    return p


def test_tiny_spec_loads(tiny_spec):
    spec = tiny_spec()
    assert spec.n_workers == 3
    assert spec.worker_kinds() == ["cpu", "gpu", "gpu"]
    assert spec.scheduler.params == {"per_kind": {"cpu": 1, "gpu": 5}}


@pytest.mark.parametrize("name", ["digits.toml", "synthetic.toml", "paper_cluster.toml"])
def test_examples_load(name):
    spec = load_spec(ROOT / "examples" / name)
    assert spec.n_workers >= 2


def test_fashion_example_loads_where_the_data_is_installed():
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("dataset-fashion-mnist not installed")
    assert load_spec(ROOT / "examples" / "fashion_mnist.toml").workload.name == "fashion_mnist"


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", r"optim.lrr: unknown key \(expected one of: .*lr"),
    ("optim.lr='fast'", r"optim.lr: expected a number, got 'fast'"),
    ("optim.lr=-1", r"optim.lr: expected a number > 0, got -1.0"),
    ("optim.batch_size=2.5", r"optim.batch_size: expected an integer, got 2.5"),
    ("cluster.devices.0.count=0", r"cluster.devices\[0\].count: expected an integer >= 1, got 0"),
    ("cluster.devices.0.step_time.mean_s=-0.01", r"cluster.devices\[0\].step_time.mean_s: expected a step time > 0"),
    ("cluster.devices=[]", r"cluster.devices: expected at least one device group"),
    ("stop.max_rounds=0", r"stop: expected at least one of max_rounds, max_time_s, max_epochs > 0"),
    ("scheduler.name='warp'", r"scheduler.name: expected one of \["),
    ("sampler.params.sample_ratio=0.5", r"sampler.params.sample_ratio: expected a number >= 1, got 0.5"),
    ("cluster.network.collective='mesh'", r"cluster.network.collective: expected one of"),
    ("stop.target_accuracy=1.5", r"stop.target_accuracy: expected a number in \(0, 1\]"),
])
def test_bad_values_name_file_key_and_expectation(override, message):
    with pytest.raises(SpecError, match=r"^tiny: " + message):
        spec_from_dict(TINY, source="tiny", overrides=[override, "sampler.name='loss_topk'"]
                       if "sample_ratio" in override else [override])


def test_error_names_the_file(tmp_path):
    p = write(tmp_path, "seed = 'one'\n")
    with pytest.raises(SpecError, match=rf"^{p}: seed: expected an integer, got 'one'$"):
        load_spec(p)


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(write(tmp_path, "seed = = 1"))
    with pytest.raises(SpecError, match="no such config file"):
        load_spec(tmp_path / "absent.toml")


def test_missing_data_path_is_rejected_on_load():
    with pytest.raises(SpecError, match=r"workload.path: data directory '/nonexistent/cifar' for cifar10 does not exist"):
        spec_from_dict(TINY, source="tiny", overrides=["workload.name='cifar10'", "workload.path='/nonexistent/cifar'"])


def test_device_needs_exactly_one_time_source():
    with pytest.raises(SpecError, match=r"cluster.devices\[0\]: expected exactly one of 'profile' or 'step_time'"):
        spec_from_dict(TINY, source="tiny", overrides=["cluster.devices.0.profile='builtin:assumed-cpu'"])


def test_profile_without_an_entry_for_the_workload_is_rejected():
    with pytest.raises(SpecError, match=r"no entry for workload 'synthetic' at batch size 8 \(has: "):
        spec_from_dict(TINY, source="tiny", overrides=["cluster.devices.0={kind='cpu', profile='builtin:assumed-cpu'}"])


def test_overrides_reach_nested_keys_and_list_items(tiny_spec):
    spec = tiny_spec("optim.lr=0.05", "cluster.devices.1.count=4", "scheduler.params.per_kind.gpu=7", "name=x y")
    assert spec.optim.lr == 0.05
    assert spec.cluster.devices[1].count == 4
    assert spec.scheduler.params["per_kind"]["gpu"] == 7
    assert spec.name == "x y"  # not TOML: read as a string


@pytest.mark.parametrize("override, message", [
    ("optim.lr", "expected KEY=VALUE"),
    ("cluster.devices.5.count=1", r"cluster.devices.5: expected an index below 2"),
    ("seed.x=1", r"seed.x: seed is not a table"),
])
def test_bad_overrides(override, message):
    with pytest.raises(SpecError, match=message):
        spec_from_dict(TINY, source="tiny", overrides=[override])


def test_resolved_config_round_trips_through_toml(tiny_spec, tmp_path):
    spec = tiny_spec("workload.n_train=100")
    p = write(tmp_path, to_toml(spec_to_dict(spec)))
    assert load_spec(p) == spec


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "data").mkdir()
    p = write(tmp_path, to_toml({**TINY, "workload": {"name": "synthetic", "path": "data"}}))
    assert load_spec(p).workload.path == str((tmp_path / "data").resolve())


def test_spec_is_frozen(tiny_spec):
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny_spec().seed = 3  # type: ignore[misc]


def test_defaults_are_a_valid_default_spec_shape():
    assert Spec().optim.lr_schedule == "constant"


# -- parameters that name things of the cluster, and sizes --------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["sampler={name='loss_topk', params={kinds=['cpus']}}"],
     r"sampler.params.kinds: expected device kinds of this cluster \('cpu', 'gpu'\) or '\*', got 'cpus'$"),
    (["scheduler.params.per_kind={cpus=1, gpu=5}"],
     r"scheduler.params.per_kind: expected keys that are device kinds of this cluster \('cpu', 'gpu'\), got 'cpus'$"),
    # a real kind, but not of this cluster: the policy under study would silently do nothing
    (["cluster.devices=[{kind='gpu', count=2, step_time={mean_s=0.002}}]", "scheduler={name='sync'}",
      "sampler={name='loss_topk', params={kinds=['cpu']}}"],
     r"sampler.params.kinds: expected device kinds of this cluster \('gpu'\) or '\*', got 'cpu'$"),
])
def test_policy_parameters_naming_kinds_must_name_the_clusters_kinds(overrides, message):
    with pytest.raises(SpecError, match=r"^tiny: " + message):
        spec_from_dict(TINY, source="tiny", overrides=overrides)


def test_kind_names_that_exist_and_the_documented_wildcard_load(tiny_spec):
    assert tiny_spec("sampler={name='loss_topk', params={kinds=['*']}}").sampler.params["kinds"] == ["*"]
    assert tiny_spec("sampler={name='loss_topk', params={kinds=['gpu', 'cpu']}}").sampler.name == "loss_topk"
    with pytest.raises(SpecError, match=r"per_kind: expected keys that are device kinds .* got '\*'"):
        tiny_spec("scheduler.params.per_kind={'*'=1}")  # per_kind documents no wildcard


@pytest.mark.parametrize("params, message", [
    ("{kind='tpu'}", r"scheduler.params.kind: expected device kinds of this cluster \('cpu', 'gpu'\), got 'tpu'$"),
    ("{workers=[0, 3]}", r"scheduler.params.workers: expected worker indices 0..2 of this cluster, got 3$"),
    ("{workers=[-1]}", r"scheduler.params.workers: expected worker indices 0..2 of this cluster, got -1$"),
    ("{device='cuda:1'}", r"scheduler.params.device: expected devices of this cluster \('cpu'\), got 'cuda:1'$"),
    ("{steps_file='absent.csv'}", r"scheduler.params.steps_file: expected an existing file, got '.*absent.csv'$"),
])
def test_a_plugin_policys_declared_names_are_checked_like_the_builtins(params, message):
    with pytest.raises(SpecError, match=r"^tiny: " + message):
        spec_from_dict(TINY, source="tiny", overrides=[f"scheduler={{name='custom_policy:Pinned', params={params}}}"])


def test_a_plugin_file_parameter_is_relative_to_the_config_folder(tmp_path):
    (tmp_path / "steps.csv").write_text("1\n")
    p = write(tmp_path, to_toml({**TINY, "scheduler": {"name": "custom_policy:Pinned",
                                                       "params": {"steps_file": "steps.csv", "workers": [2]}}}))
    assert load_spec(p).scheduler.params["steps_file"] == str((tmp_path / "steps.csv").resolve())


def test_a_plugin_declaring_a_parameter_it_lacks_is_named():
    with pytest.raises(SpecError, match=r"scheduler.params: MisDeclared.name_refs declares 'kinds', which is not one "
                                        r"of its parameters \(steps\)"):
        spec_from_dict(TINY, source="tiny", overrides=["scheduler={name='custom_policy:MisDeclared'}"])


@pytest.mark.parametrize("overrides, message", [
    # digits: 1797 images, 80% (1437) for training
    (["workload={name='digits'}", "optim.batch_size=1438"],
     r"optim.batch_size: expected at most the 1437 training samples of digits, got 1438$"),
    # synthetic without n_train: 2048 generated samples
    (["workload.n_train=0", "optim.batch_size=4096"],
     r"optim.batch_size: expected at most the 2048 training samples of synthetic, got 4096$"),
    (["workload.n_train=5"],
     r"workload.n_train: expected at least one batch \(optim.batch_size = 8 samples\), got 5$"),
    # time-only configs need no data files: the size is known without them
    (["workload={name='cifar10', path='/nonexistent', n_train=4}", "sim.fidelity='time_only'"],
     r"workload.n_train: expected at least one batch \(optim.batch_size = 8 samples\), got 4$"),
])
def test_a_batch_must_fit_in_the_training_set(overrides, message):
    with pytest.raises(SpecError, match=r"^tiny: " + message):
        spec_from_dict(TINY, source="tiny", overrides=overrides)


@pytest.mark.parametrize("batch_size", [0, -3])
def test_a_batch_size_below_one_is_named_before_the_profiles(batch_size):
    # builtin profiles have entries per batch size; the error must name optim.batch_size, not the profile
    with pytest.raises(SpecError, match=rf"digits.toml: optim.batch_size: expected an integer >= 1, got {batch_size}$"):
        load_spec(ROOT / "examples" / "digits.toml", overrides=[f"optim.batch_size={batch_size}"])


def test_a_batch_of_the_whole_training_set_loads(tiny_spec):
    assert tiny_spec("workload.n_train=8").workload.n_train == 8
    assert tiny_spec("workload={name='digits'}", "optim.batch_size=1437").optim.batch_size == 1437


def test_a_time_only_run_of_a_workload_whose_size_depends_on_its_files_needs_n_train():
    with pytest.raises(SpecError, match=r"^tiny: workload.n_train: expected the training-set size for a time-only "
                                        r"run of shakespeare .*, got 0$"):
        spec_from_dict(TINY, source="tiny", overrides=["workload={name='shakespeare'}", "sim.fidelity='time_only'"])
    spec = spec_from_dict(TINY, source="tiny", overrides=["workload={name='shakespeare', n_train=5000}",
                                                          "sim.fidelity='time_only'"])
    assert spec.workload.n_train == 5000


# -- the spec as data (hetsim.config) and its resolution (hetsim.resolve) ----------------------------

def test_the_schema_alone_checks_only_what_the_spec_decides(tiny_spec):
    import hetsim.config as schema

    # an unknown policy and a profile that does not exist are for hetsim.resolve to find ...
    spec = schema.spec_from_dict(TINY, source="tiny", overrides=[
        "scheduler={name='warp'}", "cluster.devices.0={kind='cpu', profile='/nonexistent/cpu.json'}"])
    assert spec.scheduler.name == "warp"
    with pytest.raises(SpecError, match=r"^cluster.devices\[0\].profile: /nonexistent/cpu.json: no such profile file$"):
        check(spec)
    with pytest.raises(SpecError, match=r"^scheduler.name: expected one of \["):
        check(dataclasses.replace(spec, cluster=tiny_spec().cluster))
    # ... types and ranges are the schema's
    with pytest.raises(SpecError, match=r"^tiny: optim.lr: expected a number > 0, got -1.0$"):
        schema.spec_from_dict(TINY, source="tiny", overrides=["optim.lr=-1"])


def test_the_public_load_spec_checks_everything(tmp_path):
    import hetsim

    p = write(tmp_path, to_toml({**TINY, "scheduler": {"name": "warp"}}))
    with pytest.raises(SpecError, match=rf"^{p}: scheduler.name: expected one of \["):
        hetsim.load_spec(p)
    with pytest.raises(SpecError, match=r"^tiny: sampler.params.sample_ratio: expected a number >= 1, got 0.5$"):
        hetsim.spec_from_dict(TINY, source="tiny", overrides=["sampler={name='loss_topk', params={sample_ratio=0.5}}"])


def test_replace_checks_the_result_like_a_load(tiny_spec):
    import hetsim.config as schema

    unchecked = schema.replace(tiny_spec(), ["scheduler.params.per_kind={tpu=1}"])
    assert unchecked.scheduler.params == {"per_kind": {"tpu": 1}}
    with pytest.raises(SpecError, match=r"^tiny: scheduler.params.per_kind: expected keys that are device kinds"):
        replace(tiny_spec(), ["scheduler.params.per_kind={tpu=1}"])


@pytest.mark.parametrize("on, message", [
    ("gpu2", r"^tiny: eval.on: expected 'fastest' or a worker of this cluster \(cpu0, gpu0, gpu1\), got 'gpu2'$"),
    ("slowest", r"^tiny: eval.on: expected 'fastest' or a worker of this cluster \(cpu0, gpu0, gpu1\), got 'slowest'$"),
])
def test_eval_on_must_name_a_worker_of_the_cluster(on, message):
    import hetsim.config as schema

    assert schema.spec_from_dict(TINY, overrides=[f"eval.on='{on}'"]).eval.on == on  # the schema cannot tell
    with pytest.raises(SpecError, match=message):
        spec_from_dict(TINY, source="tiny", overrides=[f"eval.on='{on}'"])


def test_eval_on_lists_only_the_first_eight_workers_of_a_large_cluster():
    with pytest.raises(SpecError, match=r"eval.on: expected 'fastest' or a worker of this cluster \(cpu0, gpu0, gpu1, "
                                        r"gpu2, gpu3, gpu4, gpu5, gpu6, \.\.\.\), got 'tpu0'$"):
        spec_from_dict(TINY, source="tiny", overrides=["cluster.devices.1.count=40", "eval.on='tpu0'"])


@pytest.mark.parametrize("on, evaluator", [("fastest", 1), ("cpu0", 0), ("gpu0", 1), ("gpu1", 2)])
def test_resolve_builds_devices_policies_and_the_evaluator(tiny_spec, on, evaluator):
    # TINY: cpu at 0.01 s a step, two gpus at 0.002 s: the fastest is a tie of the gpus, the first wins
    experiment = resolve(tiny_spec(f"eval.on='{on}'"))
    assert [d.step_time.mean_s for d in experiment.devices] == [0.01, 0.002, 0.002]
    assert [d.kind for d in experiment.groups] == ["cpu", "gpu"]
    assert experiment.evaluator == evaluator
    assert type(experiment.policies.scheduler).__name__ == "FixedSteps"
    assert experiment.curve is None


def test_resolve_loads_the_workload_only_when_asked(tiny_spec):
    # time-only needs no data: a cifar10 folder that does not exist resolves, and fails only if loaded
    experiment = resolve(tiny_spec("workload={name='cifar10', path='/nonexistent/cifar', n_train=64}",
                                   "sim.fidelity='time_only'"))
    with pytest.raises(SpecError, match="data directory '/nonexistent/cifar' for cifar10 does not exist"):
        experiment.workload
    emulated = resolve(tiny_spec())
    assert emulated.workload.n_train == 256
    assert emulated.workload is emulated.workload  # built once


def test_importing_the_schema_imports_nothing_else_of_hetsim():
    import subprocess
    import sys

    code = "import sys, hetsim.config; print(sorted(m for m in sys.modules if m.startswith('hetsim')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == str(["hetsim", "hetsim._version", "hetsim.config", "hetsim.errors"])


def test_the_fastest_evaluator_is_the_lowest_mean_step_time_ties_to_the_lowest_index(tiny_spec):
    from hetsim.resolve import evaluator_index

    spec = tiny_spec()
    assert evaluator_index(spec, [0.3, 0.1, 0.1]) == 1
    assert evaluator_index(spec, [0.3, 0.2, 0.1]) == 2
    assert evaluator_index(spec, [0.05, 0.1, 0.1]) == 0
    assert evaluator_index(tiny_spec("eval.on='gpu1'"), [0.05, 0.1, 0.1]) == 2  # a name overrides speed
    assert resolve(tiny_spec("cluster.devices.0.step_time.mean_s=0.001")).evaluator == 0
