"""Checkpoints: only tensors and plain data are loaded; a damaged, foreign or other-engine checkpoint is a
one-line error; a config edited since the checkpoint is refused unless --force, which the summary records."""

import hashlib
import json
import struct
import zipfile

import pytest
import torch

from hetsim.config import spec_to_dict, to_toml
from hetsim.errors import HetsimError
from hetsim.results import CHECKPOINT, save_checkpoint
from hetsim.sim import simulate

CHECKPOINTED = ("stop.max_rounds=6", "run.checkpoint_every=2")


class Interrupt(Exception):
    pass


def interrupted_run(tiny_spec, path, *args, at_round=3):
    """A run killed after round `at_round`: its last checkpoint is the one of round 2."""

    def crash(row):
        if row["round"] == at_round:
            raise Interrupt

    with pytest.raises(Interrupt):
        simulate(tiny_spec(*CHECKPOINTED, *args), path, progress=crash)
    return path


def sha256_of_config(spec):
    return hashlib.sha256(to_toml(spec_to_dict(spec)).encode()).hexdigest()


def one_line_error(excinfo, path):
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message
    return message


# -- a config edited since the checkpoint --------------------------------------------------------

def test_resume_refuses_a_config_edited_since_the_checkpoint_and_changes_nothing(tiny_spec, tmp_path):
    run = interrupted_run(tiny_spec, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(HetsimError) as e:
        simulate(tiny_spec(*CHECKPOINTED, "optim.lr=0.2"), run, resume=True)
    message = one_line_error(e, run / CHECKPOINT)
    assert "config changed since this checkpoint (optim.lr)" in message and "--force" in message
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_forced_resume_with_an_edited_config_is_recorded_in_the_summary(tiny_spec, tmp_path):
    old, new = tiny_spec(*CHECKPOINTED), tiny_spec(*CHECKPOINTED, "optim.lr=0.2", "stop.max_rounds=7")
    run = interrupted_run(tiny_spec, tmp_path / "run")
    result = simulate(new, run, resume=True, force=True)
    assert result.summary["rounds"] == 7
    assert result.summary["resumed_with_changed_config"] == [
        {"round": 2, "checkpoint_config_hash": sha256_of_config(old), "config_hash": sha256_of_config(new),
         "changed": ["optim.lr", "stop.max_rounds"]}]
    # the record stays with the run: a later plain resume of the edited config still reports it
    again = simulate(new, run, resume=True)
    assert again.summary["resumed_with_changed_config"] == result.summary["resumed_with_changed_config"]
    assert json.loads((run / "summary.json").read_text())["resumed_with_changed_config"][0]["round"] == 2


def test_a_plain_resume_records_no_config_change(tiny_spec, tmp_path):
    run = interrupted_run(tiny_spec, tmp_path / "run")
    assert simulate(tiny_spec(*CHECKPOINTED), run, resume=True).summary["resumed_with_changed_config"] is None


def test_forced_resume_of_a_state_that_cannot_fit_is_one_line(tiny_spec, tmp_path):
    run = interrupted_run(tiny_spec, tmp_path / "run")
    with pytest.raises(HetsimError) as e:
        simulate(tiny_spec(*CHECKPOINTED, "cluster.devices.1.count=3"), run, resume=True, force=True)
    assert "does not fit this run (it holds 3 workers, this config has 4)" in one_line_error(e, run / CHECKPOINT)


# -- unusable files ------------------------------------------------------------------------------

def flip_a_byte_of_tensor_data(path):
    """Flip one byte in the middle of the first tensor record of a torch zip archive (its CRC no longer matches)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 8)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, expected", [
    ("empty", "the checkpoint is empty"),
    ("truncated", "not a hetsim checkpoint (truncated, or not written by hetsim)"),
    ("bit flip", "the checkpoint is corrupt (checksum mismatch in"),
    ("text", "not a hetsim checkpoint (truncated, or not written by hetsim)"),
    ("plain weights", "not a hetsim checkpoint"),
    ("old format", "refused to load: the checkpoint holds objects other than tensors and plain data"),
])
def test_unusable_checkpoints_are_one_line_errors(tiny_spec, tmp_path, damage, expected):
    run = interrupted_run(tiny_spec, tmp_path / "run")
    path = run / CHECKPOINT
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "bit flip":
        flip_a_byte_of_tensor_data(path)
    elif damage == "text":
        path.write_text("round = 2\n")
    elif damage == "plain weights":
        torch.save({"weight": torch.zeros(3)}, path)
    elif damage == "old format":  # what hetsim wrote before: numpy arrays pickled as numpy objects
        import numpy as np

        torch.save({"round": 2, "busy_s": np.zeros(3)}, path)
    with pytest.raises(HetsimError) as e:
        simulate(tiny_spec(*CHECKPOINTED), run, resume=True)
    assert expected in one_line_error(e, path)


class WritesAFile:
    """A pickle payload that, when unpickled, creates a file: it runs code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tiny_spec, tmp_path):
    run = interrupted_run(tiny_spec, tmp_path / "run")
    marker = tmp_path / "code-ran"
    torch.save({"hetsim_checkpoint": 1, "engine": "sim", "state": {"round": WritesAFile(marker)}}, run / CHECKPOINT)
    with pytest.raises(HetsimError) as e:
        simulate(tiny_spec(*CHECKPOINTED), run, resume=True)
    assert "refused to load" in one_line_error(e, run / CHECKPOINT) and "(it refers to io.open)" in str(e.value)
    assert not marker.exists()
    torch.load(run / CHECKPOINT, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.exists()


# -- the other engine ----------------------------------------------------------------------------

def test_a_simulator_checkpoint_is_refused_by_the_real_backend(tiny_spec, tmp_path):
    from backends.torchmp.launcher import run as run_real

    run = interrupted_run(tiny_spec, tmp_path / "run")
    with pytest.raises(HetsimError) as e:
        run_real(tiny_spec(*CHECKPOINTED), run, resume=True)  # refused before any process starts
    assert "written by `hetsim simulate`, not `hetsim run`" in one_line_error(e, run / CHECKPOINT)


def test_a_backend_checkpoint_is_refused_by_the_simulator(tiny_spec, tmp_path):
    spec = tiny_spec(*CHECKPOINTED)
    save_checkpoint(tmp_path / CHECKPOINT, {"round": 2, "time_s": 0.1}, "torchmp", spec)
    with pytest.raises(HetsimError) as e:
        simulate(spec, tmp_path, resume=True)
    assert f"resume it with `hetsim run --resume {tmp_path}`" in one_line_error(e, tmp_path / CHECKPOINT)


def test_a_resumed_run_keeps_the_round_it_diverged_at(tiny_spec, tmp_path):
    # NaN model in round 3 (custom_policy), the run goes on; killed after round 5, resumed from round 4
    args = ("scheduler={name='custom_policy:StepsAtRound', params={steps=1, at=3, special=2}}",
            "aggregator={name='custom_policy:NanWhenSteps', params={steps=2}}", "stop.on_divergence='continue'")
    run = interrupted_run(tiny_spec, tmp_path / "run", *args, at_round=5)
    s = simulate(tiny_spec(*CHECKPOINTED, *args), run, resume=True).summary
    assert s["diverged_at_round"] == 3 and s["rounds"] == 6
