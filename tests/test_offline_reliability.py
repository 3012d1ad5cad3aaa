"""Reliability of the offline-to-online scripts: the same seed gives the same metrics.csv rows;
--checkpoint-every / --resume continue a completed run and a run killed with SIGKILL; a non-finite loss or parameter
stops the run with one line and keeps the last finite checkpoint; bad --resume inputs and other bad input end with a
one-line error.

The end-to-end runs are subprocesses with tiny sizes that share a persistent XLA compilation cache, so that the runs of
one script after its first compile little."""

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import flax
import pytest
from conftest import OFFLINE_SCRIPTS, OFFLINE_TO_ONLINE, load_script, run_and_signal, run_script, script_environment

pytestmark = pytest.mark.long  # subprocess runs that are signalled, killed and resumed: pytest -m long

SCRIPTS = OFFLINE_SCRIPTS
ENV_NAME = "cube-triple-play-singletask-task4-v0"
TIME_KEYS = {"charts/SPS", "charts/updates_per_s"}
# 20 offline updates then 20 online steps (global steps 21..40) in 7-step episodes (ends at 27 and 34) and chunks of 2; a
# checkpoint at step 30 only, inside an episode and inside a chunk.
# One flow step and small networks: compilation is most of these runs.
TINY = [
    "--env-name", ENV_NAME, "--horizon-length", "2", "--batch-size", "8", "--critic-hidden-dims", "32",
    "--offline-steps", "20", "--online-steps", "20", "--offline-scan-length", "10", "--log-every", "10",
    "--eval-every", "20", "--eval-episodes", "1", "--max-episode-steps", "7", "--online-learning-starts", "5",
    "--flow-steps", "1", "--checkpoint-every", "30",
]  # fmt: skip
NETWORKS = {  # small networks of each script; SAC offline updates only, or interleaved with BC ones (naive)
    "qc_fql": ["--actor-hidden-dims", "32", "32"],
    "sac_flow_naive": ["--velocity-hidden", "32", "--interleave-offline-updates"],
    "sac_flow_gru": ["--velocity-hidden", "32", "--bc-fraction", "0"],
    "sac_flow_transformer": ["--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--bc-fraction", "0"],
}
# Each script's divergence test: after resuming from the online checkpoint, or in the offline phase of a fresh run.
# (The online loops of the four scripts are the same text; the offline scans of qc_fql and the flow scripts differ.)
DIVERGES_AFTER_RESUME = ["sac_flow_naive", "sac_flow_transformer"]
DIVERGES_OFFLINE = ["qc_fql", "sac_flow_gru"]
TRACKED = "qc_fql"  # its first run and the resumed one log to wandb (offline)
OFFLINE = {"WANDB_MODE": "offline"}


def script_path(script: str) -> str:
    return str(OFFLINE_TO_ONLINE / f"{script}.py")


def run(script: str, cwd, *flags: str):
    """Runs a script with the tiny flags, wandb offline (for --track); flags given here win (a later flag wins)."""
    return run_script(script_path(script), *TINY, *NETWORKS[script], *flags, cwd=cwd, env={"WANDB_MODE": "offline"})


def only_run_dir(cwd):
    (run_name,) = os.listdir(os.path.join(cwd, "runs"))
    return os.path.join("runs", run_name)


def read_rows(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


def without_time_keys(rows):
    return [row for row in rows if row[1] not in TIME_KEYS]


def assert_one_line_error(result, *fragments):
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def runs(dataset_dir, tmp_path_factory):
    """For each script, in order: a run to the end (checkpoint at step 30), its twin with the same flags, the first one
    resumed from its checkpoint, and a run with --learning-rate 1e12: the twin resumed (DIVERGES_AFTER_RESUME) or a
    fresh one without checkpoints. Two scripts at a time."""

    def pipeline(script):
        first_cwd, twin_cwd = tmp_path_factory.mktemp(f"{script}_first"), tmp_path_factory.mktemp(f"{script}_twin")
        record = {"first_cwd": first_cwd, "twin_cwd": twin_cwd}
        track = ["--track"] if script == TRACKED else []
        record["first"] = run(script, first_cwd, "--dataset-dir", dataset_dir, *track)
        record["twin"] = run(script, twin_cwd, "--dataset-dir", dataset_dir)
        if record["first"].returncode != 0 or record["twin"].returncode != 0:
            return record
        first_dir, twin_dir = only_run_dir(first_cwd), only_run_dir(twin_cwd)
        record["first_dir"], record["twin_dir"] = first_dir, twin_dir
        record["first_rows"] = read_rows(first_cwd / first_dir / "metrics.csv")
        record["twin_rows"] = read_rows(twin_cwd / twin_dir / "metrics.csv")
        record["resumed"] = run(script, first_cwd, "--resume", first_dir, *track)
        record["resumed_rows"] = read_rows(first_cwd / first_dir / "metrics.csv")
        if script in DIVERGES_AFTER_RESUME:
            record["twin_checkpoint"] = (twin_cwd / twin_dir / "checkpoint.flax").read_bytes()
            flags = ["--resume", twin_dir, "--learning-rate", "1e12"]
            record["diverged"] = run(script, twin_cwd, *flags)
        else:
            record["diverged_cwd"] = tmp_path_factory.mktemp(f"{script}_diverged")
            flags = ["--dataset-dir", dataset_dir, "--learning-rate", "1e12", "--checkpoint-every", "0"]
            record["diverged"] = run(script, record["diverged_cwd"], *flags)
        return record

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(SCRIPTS, pool.map(pipeline, SCRIPTS)))


def finished_runs(runs, script):
    record = runs[script]
    for name in ("first", "twin"):
        assert record[name].returncode == 0, record[name].stderr[-3000:]
    return record


# ---------------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("script", SCRIPTS)
def test_same_seed_gives_same_rows(runs, script):
    record = finished_runs(runs, script)
    rows = without_time_keys(record["first_rows"])
    keys = {(int(step), key) for step, key, _ in rows}
    # Not vacuous: losses of both phases, the episode of the online phase and both evaluations are there.
    assert {
        (10, "losses/qf_loss"),
        (40, "losses/qf_loss"),
        (27, "charts/episodic_return"),
        (34, "charts/episodic_return"),
    } <= keys
    assert {(20, "eval/success"), (40, "eval/success"), (40, "eval/episodic_return")} <= keys
    assert rows == without_time_keys(record["twin_rows"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_training_does_not_depend_on_log_eval_or_checkpoint_cadence(dataset_dir, tmp_path, script):
    """12 offline updates, no online step: a run that logs, evaluates and checkpoints at none of them and a run that
    cuts its blocks everywhere (--log-every 3, --eval-every 5 with an episode, --checkpoint-every 4, blocks of 5)
    save the same parameters, bit for bit."""
    common = ["--dataset-dir", dataset_dir, "--offline-steps", "12", "--online-steps", "0", "--save-model"]
    plain = ["--log-every", "1000", "--eval-every", "1000", "--eval-episodes", "0", "--checkpoint-every", "0"]
    cut = ["--log-every", "3", "--eval-every", "5", "--eval-episodes", "1", "--checkpoint-every", "4"]
    models = []
    for name, flags in (("plain", plain), ("cut", [*cut, "--offline-scan-length", "5"])):
        cwd = tmp_path / name
        cwd.mkdir()
        result = run(script, cwd, *common, *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        models.append((cwd / only_run_dir(cwd) / f"{script}.flax").read_bytes())
    assert models[0] == models[1]


# ---------------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_completed_run(runs, script):
    """Resuming the completed run from its checkpoint at step 30 keeps the rows up to 30, drops the later ones and
    logs steps 31..40 again: the same rows as before (time rates aside), none twice. The checkpoint is inside an
    episode and a chunk: the restored environment and chunk continue them, so the episode ending at 34 is the same."""
    record = finished_runs(runs, script)
    resumed = record["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    first_rows, rows = record["first_rows"], record["resumed_rows"]
    kept = [row for row in first_rows if int(row[0]) <= 30]
    assert f"resuming from step 30: dropped {len(first_rows) - len(kept)} later rows" in resumed.stdout
    assert len(first_rows) > len(kept) > 0
    assert rows[: len(kept)] == kept
    assert min(int(row[0]) for row in rows[len(kept) :]) > 30
    step_keys = [(int(step), key) for step, key, _ in rows]
    assert len(step_keys) == len(set(step_keys))
    assert set(step_keys) == {(int(step), key) for step, key, _ in first_rows}
    assert without_time_keys(rows) == without_time_keys(first_rows)


def test_resume_continues_the_wandb_run(runs):
    """With --track, the resumed run logs to the wandb run of the first one (the id kept in the checkpoint)."""
    record = finished_runs(runs, TRACKED)
    assert record["resumed"].returncode == 0, record["resumed"].stderr[-3000:]
    wandb_dirs = sorted((record["first_cwd"] / record["first_dir"] / "wandb").glob("offline-run-*"))
    assert len(wandb_dirs) == 2  # one per process
    run_ids = {path.name.rsplit("-", 1)[1] for path in wandb_dirs}
    assert len(run_ids) == 1, wandb_dirs


def test_sigkill_then_resume_with_more_online_steps(dataset_dir, tmp_path):
    """A long run killed with SIGKILL after a checkpoint resumes to a new --online-steps: it finishes there, the rows up
    to the checkpoint are kept as they were and the later ones are logged once. A half-written checkpoint.flax.tmp
    (a crash while writing) does not matter."""
    flags = [*TINY, *NETWORKS["qc_fql"], "--dataset-dir", dataset_dir, "--online-steps", "100000"]
    flags += ["--checkpoint-every", "25"]  # not a multiple of the log interval: rows after it are dropped
    environment = script_environment({"WANDB_MODE": "offline"})
    with open(tmp_path / "stderr.txt", "w") as err:
        process = subprocess.Popen(
            [sys.executable, script_path("qc_fql"), *flags],
            cwd=tmp_path,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.time() + 300
        while not (tmp_path / "runs").is_dir() or not any((tmp_path / "runs").glob("*/checkpoint.flax")):
            assert process.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    run_dir = only_run_dir(tmp_path)
    checkpoint_path = tmp_path / run_dir / "checkpoint.flax"
    checkpoint = flax.serialization.msgpack_restore(checkpoint_path.read_bytes())
    step, online_step = checkpoint["step"], checkpoint["online_step"]
    assert step == 20 + online_step and step % 25 == 0 and online_step > 0  # checkpoints at 25, 50, ...
    (tmp_path / run_dir / "checkpoint.flax.tmp").write_bytes(checkpoint_path.read_bytes()[:100])
    rows_before = read_rows(tmp_path / run_dir / "metrics.csv")

    online_steps = online_step + 15
    result = run("qc_fql", tmp_path, "--resume", run_dir, "--online-steps", str(online_steps))
    assert result.returncode == 0, result.stderr[-3000:]
    kept = [row for row in rows_before if len(row) == 3 and int(row[0]) <= step]
    assert f"resuming from step {step}: dropped {len(rows_before) - len(kept)} later rows" in result.stdout
    rows = read_rows(tmp_path / run_dir / "metrics.csv")
    assert rows[: len(kept)] == kept
    later = [(int(row_step), key) for row_step, key, _ in rows[len(kept) :]]
    assert later and min(row_step for row_step, _ in later) > step
    assert len(later) == len(set(later))
    final_step = 20 + online_steps
    assert (final_step, "eval/success") in later and (final_step, "charts/SPS") in later
    assert max(row_step for row_step, _ in later) == final_step
    assert f'"online_steps": {online_steps}' in (tmp_path / run_dir / "args.json").read_text()


def test_ctrl_c_offline_and_sigterm_online_checkpoint_and_resume_as_printed(dataset_dir, tmp_path):
    """SIGINT in the offline phase and SIGTERM in the online phase, without --checkpoint-every: each run stops after
    its block or step with a checkpoint, one line with the --resume command and exit 130 / 143; resumed as printed,
    the run ends at its last step with every step logged once."""
    flags = [*TINY, *NETWORKS["qc_fql"], "--dataset-dir", dataset_dir, "--track"]
    flags += ["--offline-steps", "200", "--online-steps", "60", "--checkpoint-every", "0"]
    status, stderr = run_and_signal(
        script_path("qc_fql"), flags, tmp_path, "step 50/260 | offline", signal.SIGINT, OFFLINE
    )
    assert status == 130 and "Traceback" not in stderr, stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("interrupted by SIGINT at step "), last_line
    command = last_line.split("continue with: ")[1]
    assert command == f"python {script_path('qc_fql')} --resume {run_dir}"
    checkpoint = flax.serialization.msgpack_restore((tmp_path / run_dir / "checkpoint.flax").read_bytes())
    assert 50 <= checkpoint["offline_step"] < 200 and checkpoint["online_step"] == 0

    resume_flags = command.split()[2:]
    status, stderr = run_and_signal(
        script_path("qc_fql"), resume_flags, tmp_path, "step 220/260 | online", signal.SIGTERM, OFFLINE
    )
    assert status == 143 and "interrupted by SIGTERM" in stderr.strip().splitlines()[-1], stderr[-3000:]
    checkpoint = flax.serialization.msgpack_restore((tmp_path / run_dir / "checkpoint.flax").read_bytes())
    assert checkpoint["offline_step"] == 200 and 20 <= checkpoint["online_step"] < 60

    result = run_script(script_path("qc_fql"), *resume_flags, cwd=tmp_path, env=OFFLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [(int(step), key) for step, key, _ in read_rows(tmp_path / run_dir / "metrics.csv")]
    assert len(rows) == len(set(rows))  # no step logged twice
    assert (200, "eval/success") in rows and (260, "eval/success") in rows and max(step for step, _ in rows) == 260


# ---------------------------------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("script", DIVERGES_AFTER_RESUME)
def test_divergence_after_resume_keeps_the_checkpoint(runs, script):
    """--learning-rate 1e12 after resuming at step 30: the run stops at the first non-finite update of the online
    phase with one line, saves nonfinite_state.flax and leaves the checkpoint of step 30 as it was."""
    record = finished_runs(runs, script)
    twin_dir, twin_cwd = record["twin_dir"], record["twin_cwd"]
    checkpoint = os.path.join(twin_dir, "checkpoint.flax")
    line = assert_one_line_error(
        record["diverged"],
        "error: non-finite ",
        f"state saved to {os.path.join(twin_dir, 'nonfinite_state.flax')}",
        f"last finite checkpoint: {checkpoint} (step 30)",
    )
    step = int(re.search(r" at step (\d+);", line).group(1))
    assert 30 < step < 40
    assert (twin_cwd / checkpoint).read_bytes() == record["twin_checkpoint"]
    assert (twin_cwd / twin_dir / "nonfinite_state.flax").stat().st_size > 1000
    assert max(int(row[0]) for row in read_rows(twin_cwd / twin_dir / "metrics.csv")) <= 30  # nothing logged after


@pytest.mark.parametrize("script", DIVERGES_OFFLINE)
def test_divergence_inside_an_offline_block(runs, script):
    """A non-finite update inside a 10-update lax.scan block is named by its own step, not the block's end."""
    record = finished_runs(runs, script)
    line = assert_one_line_error(
        record["diverged"], "error: non-finite ", "no checkpoint was written (use --checkpoint-every N)"
    )
    assert 1 <= int(re.search(r" at step (\d+);", line).group(1)) < 10
    run_dir = record["diverged_cwd"] / only_run_dir(record["diverged_cwd"])
    assert (run_dir / "nonfinite_state.flax").is_file()
    assert not (run_dir / "checkpoint.flax").exists()


# ---------------------------------------------------------------------------------------------------- bad input


def main_error(script: str, monkeypatch, cwd, *flags: str) -> str:
    """Runs the script's main() in this process with these flags, in `cwd`; returns its error, checked to be the
    one-line SystemExit message (exit code 1, no traceback) that bad input must give."""
    module = load_script(script, OFFLINE_TO_ONLINE)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [script_path(script), *flags])
    monkeypatch.setenv("MUJOCO_GL", os.environ.get("MUJOCO_GL", "disable"))  # main() sets a default: undone after
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def test_resume_of_a_directory_that_is_not_a_run_is_one_line_error(tmp_path):
    """As a user sees it: one line on stderr, exit code 1."""
    (tmp_path / "somewhere").mkdir()
    result = run_script(script_path("sac_flow_gru"), "--resume", "somewhere", cwd=tmp_path)
    assert_one_line_error(result, "error: somewhere is not a run directory (no args.json)")


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_resume_is_one_line_error(runs, script, tmp_path, monkeypatch):
    record = finished_runs(runs, script)
    monkeypatch.setenv("WANDB_MODE", "offline")  # the saved args of the TRACKED run have --track
    run_dir = tmp_path / "run"
    shutil.copytree(record["first_cwd"] / record["first_dir"], run_dir)
    checkpoint = run_dir / "checkpoint.flax"
    message = main_error(script, monkeypatch, tmp_path, "--resume", "missing")
    assert message == "error: missing is not a run directory (no args.json)"

    other = SCRIPTS[(SCRIPTS.index(script) + 1) % len(SCRIPTS)]
    other_run = str(runs[other]["first_cwd"] / runs[other]["first_dir"])
    message = main_error(script, monkeypatch, tmp_path, "--resume", other_run)
    assert message == f"error: {other_run} is a run of offline_to_online/{other}.py, not offline_to_online/{script}.py"

    message = main_error(script, monkeypatch, tmp_path, "--resume", "run", "--online-steps", "5")
    assert message.startswith("error: the checkpoint of run is at offline step 20, online step 10: it cannot continue")

    valid = checkpoint.read_bytes()
    for damaged in (valid[: len(valid) // 2], b"this is not a checkpoint", flax.serialization.to_bytes({"a": 1})):
        checkpoint.write_bytes(damaged)
        message = main_error(script, monkeypatch, tmp_path, "--resume", "run")
        assert message.startswith(f"error: cannot read {os.path.join('run', 'checkpoint.flax')}: "), message

    checkpoint.unlink()
    message = main_error(script, monkeypatch, tmp_path, "--resume", "run")
    assert message == "error: run has no checkpoint.flax to resume from (run with --checkpoint-every N)"


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_counts_login_and_dataset_are_one_line_errors(script, tmp_path, monkeypatch):
    assert main_error(script, monkeypatch, tmp_path, "--batch-size", "0") == "error: --batch-size must be > 0, got 0"
    message = main_error(script, monkeypatch, tmp_path, "--checkpoint-every", "-1")
    assert message == "error: --checkpoint-every must be >= 0, got -1"
    message = main_error(script, monkeypatch, tmp_path, "--online-steps", "-5")
    assert message == "error: --online-steps must be >= 0, got -5"

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    message = main_error(script, monkeypatch, tmp_path, "--track")
    assert message.startswith("error: --track needs a wandb login")

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    dataset = data_dir / "cube-triple-play-v0.npz"
    for problem in ("missing", "corrupt"):
        if problem == "corrupt":
            dataset.write_bytes(b"this is not an npz file")
        message = main_error(script, monkeypatch, tmp_path, "--env-name", ENV_NAME, "--dataset-dir", str(data_dir))
        assert str(dataset) in message and "make_dataset.py" in message, message
    assert not (tmp_path / "runs").exists()
