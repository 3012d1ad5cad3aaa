"""sac_flow_utils, in-process: the helpers that guard a run's files and its stops, tested without training."""

import csv
import dataclasses
import json
import os
import signal
import sys

import flax
import numpy as np
import pytest

from sac_flow_utils import checkpoints, cli, runs


def keep_metrics_before(run_dir, step: int):
    """Cuts metrics.csv at a checkpoint of `step` - 1, as a resumed run does (rows labelled after it are dropped)."""
    runs.MetricsLog(str(run_dir), None, resume_step=step - 1).close()


def test_resume_drops_a_row_cut_short_and_refuses_a_hand_edited_one(tmp_path):
    metrics = tmp_path / "metrics.csv"
    good = "global_step,key,value\n9,losses/qf_loss,1.5\n19,losses/qf_loss,1.25\n29,losses/qf_loss,1.0\n"
    metrics.write_text(good + "39,losses/qf")  # the process died while writing this row
    keep_metrics_before(tmp_path, 20)
    assert metrics.read_text() == "global_step,key,value\n9,losses/qf_loss,1.5\n19,losses/qf_loss,1.25\n"

    edited = good.replace("19,losses/qf_loss,1.25", "19;losses/qf_loss;1.25")
    metrics.write_text(edited)
    with pytest.raises(SystemExit) as stopped:
        keep_metrics_before(tmp_path, 20)
    assert str(stopped.value.code).startswith("error: ") and "line 3" in str(stopped.value.code)
    assert metrics.read_text() == edited  # nothing was changed


def test_full_disk_while_checkpointing_or_logging_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint = tmp_path / "checkpoint.flax"

    def save(step):
        checkpoints.save_checkpoint(str(tmp_path), {"step": step, "x": np.arange(3.0)})

    save(100)
    previous = checkpoint.read_bytes()
    assert flax.serialization.msgpack_restore(previous)["step"] == 100

    def no_space(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.os, "fsync", no_space)
    with pytest.raises(SystemExit) as stopped:
        save(200)
    message = str(stopped.value.code)
    assert message.startswith("error: cannot write") and "No space left on device" in message and "\n" not in message
    assert checkpoint.read_bytes() == previous and not (tmp_path / "checkpoint.flax.tmp").exists()

    logger = runs.MetricsLog(str(tmp_path))
    monkeypatch.setattr(logger, "file", type("FullDisk", (), {"write": no_space, "flush": no_space, "name": "m"})())
    logger.writer = csv.writer(logger.file)
    with pytest.raises(SystemExit) as stopped:
        logger.log(300, {"losses/qf_loss": 1.0})
    assert str(stopped.value.code) == "error: cannot write m at step 300 (No space left on device)"


def test_a_second_process_on_the_same_run_refuses(tmp_path):
    first = runs.lock_run_dir(str(tmp_path))
    with pytest.raises(SystemExit) as stopped:
        runs.lock_run_dir(str(tmp_path))
    assert "in use by another process" in str(stopped.value.code)
    first.close()  # the first process ends
    runs.lock_run_dir(str(tmp_path)).close()


def test_first_signal_is_recorded_and_a_second_ctrl_c_exits_at_once():
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = runs.catch_stop_signals()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop["signal"] == signal.SIGTERM  # recorded; the loop ends after its step
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's second SIGTERM changes nothing
        assert stop["signal"] == signal.SIGTERM
        with pytest.raises(SystemExit) as stopped:  # a second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
        assert stopped.value.code == 128 + signal.SIGINT
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@dataclasses.dataclass
class SettingArgs(cli.RunArgs):
    exp_name: str = "test"
    seed: int = 1
    alpha_optimizer: str = "sgd"
    """a setting that a run made by an older version did not record"""


def test_resume_of_a_run_that_did_not_record_a_setting_names_it_and_its_default(tmp_path, monkeypatch, capsys):
    (tmp_path / "args.json").write_text(json.dumps({"exp_name": "old", "seed": 3}))
    (tmp_path / "checkpoint.flax").write_bytes(flax.serialization.msgpack_serialize({"script": "x.py", "step": 5}))
    monkeypatch.setattr(sys, "argv", ["x.py", "--resume", str(tmp_path)])
    args, checkpoint = cli.parse_args(SettingArgs, "x.py")
    assert (args.exp_name, args.seed, args.alpha_optimizer, int(checkpoint["step"])) == ("old", 3, "sgd", 5)
    note = capsys.readouterr().out
    assert "has no" in note and "alpha_optimizer" in note and "--alpha-optimizer sgd" in note
    assert "seed" not in note.split("defaults apply")[0].split("has no")[1]  # recorded settings are not named

    monkeypatch.setattr(sys, "argv", ["x.py", "--resume", str(tmp_path), "--alpha-optimizer", "adam"])
    assert cli.parse_args(SettingArgs, "x.py")[0].alpha_optimizer == "adam"
