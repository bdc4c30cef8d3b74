"""Run identity and the run folder: which runs are one experiment, and where a run may write."""

import json
import os
import shutil
import subprocess

import pytest

from hetsim.analysis import load_run
from hetsim.cli import main
from hetsim.config import spec_to_dict, to_toml
from hetsim.errors import HetsimError, SpecError
from hetsim.rundir import claim_run_dir, default_run_dir, identity_key, normalized_config, spec_identity
from hetsim.sim import simulate


@pytest.fixture
def tiny_file(tiny_spec, tmp_path):
    def write(*overrides: str):
        p = tmp_path / "tiny.toml"
        p.write_text(to_toml(spec_to_dict(tiny_spec("stop.max_rounds=2", *overrides))))
        return p
    return write


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("hetsim: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- identity ---------------------------------------------------------------------------------


def test_identity_ignores_seed_name_run_and_trace_only(tiny_spec):
    def key(*overrides, engine="sim", fidelity="emulated"):
        return identity_key(normalized_config(tiny_spec(*overrides)), engine, fidelity)

    base = key()
    assert key("seed=7", "name='other'", "run.fault_timeout_s=5.0", "trace.max_rounds=1") == base
    assert key("optim.lr=0.05") != base
    assert key("cluster.devices.1.count=3") != base
    assert key(engine="torchmp", fidelity="real") != base    # a measured run is not a seed of a simulated one
    assert key(fidelity="time_only") != base


def test_a_run_read_back_has_its_specs_identity(tiny_spec, tmp_path):
    spec = tiny_spec("stop.max_rounds=2", "name='x'")
    simulate(spec, tmp_path / "r")
    assert load_run(tmp_path / "r").identity == spec_identity(spec, "sim")


# -- default folder ---------------------------------------------------------------------------


def test_default_folders_of_two_configs_sharing_a_name_differ(tiny_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", str(tiny_file("optim.lr=0.1")), "--quiet"]) == 0
    assert main(["simulate", str(tiny_file("optim.lr=0.05")), "--quiet"]) == 0
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2
    assert sorted(load_run(f).config["optim"]["lr"] for f in folders) == [0.05, 0.1]


def test_a_name_with_dotdot_stays_inside_runs(tiny_file, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["simulate", str(tiny_file("name='../../escaped/x'")), "--quiet"]) == 0
    (folder,) = (work / "runs").iterdir()
    assert (folder / "summary.json").is_file() and "/" not in folder.name and not folder.name.startswith(".")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml", "work"]


def test_a_200_character_name_gives_a_short_default_folder(tiny_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", str(tiny_file(f"name='{'n' * 300}'")), "--quiet"]) == 0
    (folder,) = (tmp_path / "runs").iterdir()
    assert len(folder.name) < 100 and (folder / "summary.json").is_file()


def test_names_changed_by_the_slug_do_not_share_a_folder(tiny_spec, tmp_path):
    a, b = tiny_spec("name='a/b'"), tiny_spec("name='a_b'")
    assert default_run_dir(a, "sim", tmp_path) != default_run_dir(b, "sim", tmp_path)
    assert default_run_dir(a, "sim", tmp_path).parent == tmp_path


# -- claiming a folder ------------------------------------------------------------------------


def test_out_refuses_a_users_folder_and_keeps_their_metrics(tiny_file, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.csv").write_text("my,own\n1,2\n")
    assert main(["simulate", str(tiny_file()), "--out", str(mine), "--quiet"]) == 2
    err = one_line_error(capsys)
    assert str(mine) in err and "not empty" in err and "--overwrite" in err
    assert (mine / "metrics.csv").read_text() == "my,own\n1,2\n"
    assert sorted(p.name for p in mine.iterdir()) == ["metrics.csv"]


def test_overwrite_replaces_only_hetsims_files(tiny_file, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.csv").write_text("my,own\n")
    (mine / "notes.txt").write_text("keep me")
    assert main(["simulate", str(tiny_file()), "--out", str(mine), "--quiet", "--overwrite"]) == 0
    assert (mine / "notes.txt").read_text() == "keep me"
    assert (mine / "metrics.csv").read_text().startswith("round,time_s")


def test_a_different_run_is_refused_the_same_config_reruns(tiny_file, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["simulate", str(tiny_file()), "--out", str(out), "--quiet"]) == 0
    assert main(["simulate", str(tiny_file()), "--out", str(out), "--quiet", "--set", "seed=1"]) == 2
    err = one_line_error(capsys)
    assert "holds a different run" in err and "seed: 0 there, 1 now" in err
    assert json.loads((out / "summary.json").read_text())["seed"] == 0
    assert main(["simulate", str(tiny_file()), "--out", str(out), "--quiet", "--set", "run.fault_timeout_s=9.0"]) == 0


def test_a_simulation_does_not_replace_a_real_run_of_the_config(tiny_spec, tmp_path):
    spec = tiny_spec("stop.max_rounds=2")
    simulate(spec, tmp_path / "r")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    (tmp_path / "r" / "summary.json").write_text(json.dumps({**summary, "engine": "torchmp"}))
    with pytest.raises(SpecError, match="engine: 'torchmp' there, 'sim' now"):
        simulate(spec, tmp_path / "r")


def test_resume_refuses_a_run_of_another_config(tiny_spec, tmp_path):
    simulate(tiny_spec("stop.max_rounds=4", "run.checkpoint_every=2"), tmp_path / "r")
    with pytest.raises(HetsimError, match="the config changed.*optim.lr"):
        simulate(tiny_spec("stop.max_rounds=4", "run.checkpoint_every=2", "optim.lr=0.5"), tmp_path / "r", resume=True)


def test_a_fresh_run_of_the_same_config_drops_the_earlier_checkpoint(tiny_spec, tmp_path):
    simulate(tiny_spec("stop.max_rounds=4", "run.checkpoint_every=2"), tmp_path / "r")
    assert (tmp_path / "r" / "checkpoint.pt").is_file()
    simulate(tiny_spec("stop.max_rounds=4"), tmp_path / "r")  # no checkpoints this time: none may be left
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_out_that_is_a_file_is_one_line(tiny_file, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["simulate", str(tiny_file()), "--out", str(tmp_path / "f"), "--quiet"]) == 2
    assert "exists and is not a folder" in one_line_error(capsys)
    assert (tmp_path / "f").read_text() == "x"


def test_out_with_a_too_long_name_is_one_line(tiny_file, tmp_path, capsys):
    assert main(["simulate", str(tiny_file()), "--out", str(tmp_path / ("x" * 300)), "--quiet"]) == 2
    assert "too long" in one_line_error(capsys)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot write into (chmod; chattr +i when running as root)."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    immutable = False
    if os.access(d, os.W_OK):
        immutable = shutil.which("chattr") and subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0
        if not immutable:
            d.chmod(0o755)
            pytest.skip("cannot make a read-only folder here")
    yield d
    if immutable:
        subprocess.run(["chattr", "-i", str(d)], check=True)
    d.chmod(0o755)


def test_a_read_only_folder_is_one_line(tiny_file, read_only_dir, capsys):
    assert main(["simulate", str(tiny_file()), "--out", str(read_only_dir / "r"), "--quiet"]) == 2
    assert "cannot write the run folder" in one_line_error(capsys)
    assert main(["simulate", str(tiny_file()), "--out", str(read_only_dir), "--quiet"]) == 2
    assert "cannot write the run folder" in one_line_error(capsys)


def test_the_backend_claims_its_folder_before_starting_processes(tiny_spec, tmp_path):
    from backends.torchmp import run

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.csv").write_text("mine\n")
    with pytest.raises(SpecError, match="not empty and holds no hetsim run"):
        run(tiny_spec("stop.max_rounds=2"), mine)
    assert sorted(p.name for p in mine.iterdir()) == ["metrics.csv"]


def test_claim_accepts_new_empty_and_same_config_folders(tiny_spec, tmp_path):
    spec = tiny_spec()
    assert claim_run_dir(tmp_path / "a" / "b", spec, "sim").is_dir()
    (tmp_path / "empty").mkdir()
    assert claim_run_dir(tmp_path / "empty", spec, "sim") == tmp_path / "empty"


def test_a_torchrun_rank_0_claims_the_folder_before_joining(tiny_file, tmp_path, capsys, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.csv").write_text("mine\n")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")  # the tiny cluster's 3 devices
    assert main(["run", str(tiny_file()), "--out", str(mine)]) == 2
    assert "not empty and holds no hetsim run" in one_line_error(capsys)
    assert sorted(p.name for p in mine.iterdir()) == ["metrics.csv"]


def test_default_folders_of_a_simulation_and_a_real_run_differ(tiny_spec, tmp_path):
    spec = tiny_spec("name='x'")
    sim, real = default_run_dir(spec, "sim", tmp_path), default_run_dir(spec, "torchmp", tmp_path)
    assert sim.name.startswith("x-s0-") and real.name.startswith("x-s0-") and real.name.endswith("-real")
    assert sim.name != real.name.removesuffix("-real")  # the identity differs too


def test_a_long_differing_value_is_shortened_in_the_error(tiny_spec, tmp_path):
    samples = ", ".join(["0.01"] * 500)
    simulate(tiny_spec("stop.max_rounds=2"), tmp_path / "r")
    with pytest.raises(SpecError) as e:
        claim_run_dir(tmp_path / "r", tiny_spec(f"cluster.devices.0.step_time={{dist='empirical', samples_s=[{samples}]}}"),
                      "sim")
    assert "cluster.devices.0.step_time.samples_s: [] there, [0.01, 0.01" in str(e.value) and len(str(e.value)) < 400


def test_a_config_written_before_a_key_existed_is_the_same_experiment(tiny_spec):
    # old config.toml files lack keys added since (stop.on_divergence, sim.threads, trace.max_devices);
    # their defaults are what those runs did
    new = normalized_config(tiny_spec())
    old = {k: dict(v) if isinstance(v, dict) else v for k, v in new.items()}
    del old["stop"]["on_divergence"], old["sim"]["threads"]
    assert identity_key(old, "sim", "emulated") == identity_key(new, "sim", "emulated")
    changed = {**old, "stop": {**old["stop"], "on_divergence": "continue"}}
    assert identity_key(changed, "sim", "emulated") != identity_key(new, "sim", "emulated")


def test_torch_threads_do_not_split_an_experiment(tiny_spec):
    assert spec_identity(tiny_spec("sim.threads=2"), "sim") == spec_identity(tiny_spec(), "sim")
    assert spec_identity(tiny_spec("optim.lr=0.2"), "sim") != spec_identity(tiny_spec(), "sim")
