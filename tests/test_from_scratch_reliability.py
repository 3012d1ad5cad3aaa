"""The from-scratch scripts over a run's life: the same seed gives the same run, checkpoints resume (also after
SIGKILL), Ctrl-C and SIGTERM checkpoint and say how to resume, --num-seeds trains independent seeds, a diverging run
stops at once, and a bad --resume is one line."""

import csv
import json
import signal
import subprocess
import sys
import time

import flax
import numpy as np
import pytest
from conftest import FROM_SCRATCH, run_and_signal, run_script, script_environment

pytestmark = pytest.mark.long  # subprocess runs that are signalled, killed and resumed: pytest -m long

SMALL_NETWORKS = {
    "sac": ["--actor-hidden", "32"],
    "sac_flow_naive": ["--velocity-hidden", "32"],
    "sac_flow_gru": ["--velocity-hidden", "32"],
    "sac_flow_transformer": ["--d-model", "16", "--n-heads", "2"],
}


def tiny_flags(script: str, total_timesteps: int, *extra: str) -> list[str]:
    return [
        *("--env-id", "Hopper-v4", "--total-timesteps", str(total_timesteps), "--learning-starts", "100"),
        *("--batch-size", "16", "--buffer-size", "1000", "--critic-hidden", "64", *SMALL_NETWORKS[script]),
        *("--eval-every", "200", "--eval-episodes", "1", "--log-every", "20", "--console-every", "100", *extra),
    ]


def run_dirs(cwd) -> list:
    return sorted((cwd / "runs").iterdir())


def metric_rows(run_dir) -> list[tuple[int, str, float]]:
    """(global_step, key, value) of metrics.csv, without the time-based charts/SPS."""
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return [(int(r["global_step"]), r["key"], float(r["value"])) for r in rows if r["key"] != "charts/SPS"]


def checkpoint_step(run_dir) -> int:
    with open(run_dir / "checkpoint.flax", "rb") as f:
        return int(flax.serialization.msgpack_restore(f.read())["step"])


def assert_one_line_error(result, *mentioned: str):
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error:") and all(m in last_line for m in mentioned), last_line


def test_same_seed_same_metrics_and_resume_to_a_new_total(tmp_path):
    """Two runs of one seed write the same rows (checkpointing changes nothing); the finished run then continues
    from its checkpoint to a larger --total-timesteps in the same directory."""
    script = FROM_SCRATCH / "sac_flow_transformer.py"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    flags = tiny_flags("sac_flow_transformer", 200)
    first = run_script(script, *flags, "--checkpoint-every", "100", cwd=tmp_path / "a")
    second = run_script(script, *flags, cwd=tmp_path / "b")
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-3000:] + second.stderr[-3000:]
    (run_a,) = run_dirs(tmp_path / "a")
    (run_b,) = run_dirs(tmp_path / "b")
    rows = metric_rows(run_a)
    assert {key for _, key, _ in rows} >= {"losses/qf_loss", "losses/actor_loss", "eval/episodic_return"}
    assert rows == metric_rows(run_b)
    assert checkpoint_step(run_a) == 200

    resumed = run_script(script, "--resume", f"runs/{run_a.name}", "--total-timesteps", "300", cwd=tmp_path / "a")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "step 300/300" in resumed.stdout
    assert run_dirs(tmp_path / "a") == [run_a]  # the same directory, continued
    assert json.loads((run_a / "args.json").read_text())["total_timesteps"] == 300
    continued = metric_rows(run_a)
    assert continued[: len(rows)] == rows
    steps = [step for step, _, _ in continued]
    assert steps == sorted(steps) and steps[-1] == 300 and steps[len(rows)] > 200
    assert checkpoint_step(run_a) == 300


def test_resume_after_sigkill_continues_without_duplicate_rows(tmp_path):
    script = FROM_SCRATCH / "sac_flow_naive.py"
    flags = tiny_flags("sac_flow_naive", 100_000, "--checkpoint-every", "100")
    process = subprocess.Popen(
        [sys.executable, str(script), *flags],
        cwd=tmp_path,
        env=script_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            runs = list((tmp_path / "runs").glob("*/checkpoint.flax"))
            if runs and checkpoint_step(runs[0].parent) >= 200:
                time.sleep(1.0)  # let it log past the checkpoint: those rows must be dropped on resume
                break
            time.sleep(0.5)
        else:
            pytest.fail("no checkpoint at step 200 within 5 minutes")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    (run_dir,) = run_dirs(tmp_path)
    step = checkpoint_step(run_dir)
    resumed = run_script(script, "--resume", f"runs/{run_dir.name}", "--total-timesteps", str(step + 100), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = metric_rows(run_dir)
    assert len({(s, key) for s, key, _ in rows}) == len(rows)  # nothing logged twice for one step
    steps = [s for s, _, _ in rows]
    assert steps == sorted(steps) and steps[-1] == step + 100
    assert all(np.isfinite(value) for _, _, value in rows)


@pytest.mark.parametrize("script", ["sac_flow_gru"])  # the loop is the same text in every script (test_siblings.py)
def test_ctrl_c_and_sigterm_checkpoint_and_resume_as_printed(script, tmp_path):
    """SIGINT in the random phase (no --checkpoint-every), then SIGTERM while training: each finishes its step,
    writes the checkpoint, prints the exact --resume command in one line and exits 130 / 143; the run resumed as
    printed writes the rows of an uninterrupted run of the same seed, each step once."""
    path = FROM_SCRATCH / f"{script}.py"
    flags = tiny_flags(script, 600, "--learning-starts", "300")
    status, stderr = run_and_signal(path, flags, tmp_path, "step 200/600", signal.SIGINT)
    assert status == 130, stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("interrupted by SIGINT at step ") and "Traceback" not in stderr, stderr[-3000:]
    command = last_line.split("continue with: ")[1]
    assert command == f"python {path} --resume runs/{run_dir.name}"
    first_stop = checkpoint_step(run_dir)
    assert 200 <= first_stop < 300  # in the random phase, where no checkpoint was asked for

    resume_flags = command.split()[2:]
    status, stderr = run_and_signal(path, resume_flags, tmp_path, "step 400/600", signal.SIGTERM)
    assert status == 143 and "interrupted by SIGTERM" in stderr.strip().splitlines()[-1], stderr[-3000:]
    assert 400 <= checkpoint_step(run_dir) < 600

    resumed = run_script(path, *resume_flags, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = metric_rows(run_dir)
    assert len({(s, key) for s, key, _ in rows}) == len(rows)  # nothing logged twice for one step
    steps = [s for s, _, _ in rows]
    assert steps == sorted(steps) and steps[-1] == 600
    assert {key for _, key, _ in rows} >= {"losses/qf_loss", "eval/episodic_return", "charts/episodic_return"}
    # The checkpoints hold the simulator's state: interrupted twice, the run is the uninterrupted one, row for row.
    (tmp_path / "uninterrupted").mkdir()
    uninterrupted = run_script(path, *flags, cwd=tmp_path / "uninterrupted")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert rows == metric_rows(run_dirs(tmp_path / "uninterrupted")[0])


def test_no_checkpoint_on_exit_writes_none(tmp_path):
    """--no-checkpoint-on-exit: the run ends at the signal without a checkpoint and says it cannot be continued."""
    path = FROM_SCRATCH / "sac.py"
    flags = tiny_flags("sac", 600, "--no-checkpoint-on-exit")
    status, stderr = run_and_signal(path, flags, tmp_path, "step 200/600", signal.SIGTERM)
    assert status == 143, stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    assert not (run_dir / "checkpoint.flax").exists()
    assert "cannot be continued" in stderr.strip().splitlines()[-1]


def test_num_seeds_trains_each_seed_as_if_alone(tmp_path):
    """--num-seeds 3 from seed 1 writes three runs; the seed-2 one matches a single-seed run of seed 2 (to float
    rounding: XLA compiles the three-seed program on its own and may round differently, and training amplifies
    that, so only the first updates)."""
    script = FROM_SCRATCH / "sac_flow_gru.py"
    (tmp_path / "group").mkdir()
    (tmp_path / "alone").mkdir()
    flags = tiny_flags("sac_flow_gru", 200)
    group = run_script(script, *flags, "--num-seeds", "3", cwd=tmp_path / "group")
    alone = run_script(script, *flags, "--seed", "2", cwd=tmp_path / "alone")
    assert group.returncode == 0 and alone.returncode == 0, group.stderr[-3000:] + alone.stderr[-3000:]
    seeds = run_dirs(tmp_path / "group")
    assert [run.name.split("__")[2] for run in seeds] == ["1", "2", "3"]
    assert [json.loads((run / "args.json").read_text())["seed"] for run in seeds] == [1, 2, 3]
    rows = [metric_rows(run) for run in seeds]
    assert rows[0] != rows[1] != rows[2]  # independent environments and agents
    (alone_dir,) = run_dirs(tmp_path / "alone")
    first_updates = [row for row in rows[1] if row[0] < 150]
    expected = [row for row in metric_rows(alone_dir) if row[0] < 150]
    assert {"losses/qf_loss", "losses/actor_loss"} <= {key for _, key, _ in expected}
    assert [(s, key) for s, key, _ in first_updates] == [(s, key) for s, key, _ in expected]
    np.testing.assert_allclose([v for _, _, v in first_updates], [v for _, _, v in expected], rtol=1e-5)


# Gaussian SAC and one flow script: the finiteness check is the same text in the three flow scripts.
@pytest.mark.parametrize("script", ["sac", "sac_flow_transformer"])
def test_divergence_stops_at_once_and_keeps_the_last_checkpoint(script, tmp_path):
    flags = tiny_flags(script, 300, "--q-lr", "1e12", "--policy-lr", "1e12", "--checkpoint-every", "50")
    result = run_script(FROM_SCRATCH / f"{script}.py", *flags, cwd=tmp_path)
    assert_one_line_error(result, "non-finite", "at step", "last finite checkpoint")
    (run_dir,) = run_dirs(tmp_path)
    assert checkpoint_step(run_dir) in (50, 100)  # learning starts at step 100; it diverges within a few updates
    assert (run_dir / "nonfinite_state.flax").stat().st_size > 0


def write_fake_run(run_dir, script_name: str | None, checkpoint: bytes | None = None, args_json: str = "{}"):
    run_dir.mkdir(parents=True)
    (run_dir / "args.json").write_text(args_json)
    if checkpoint is None and script_name is not None:
        checkpoint = flax.serialization.to_bytes({"script": script_name, "step": 10, "wandb_id": "", "agent": {}})
    if checkpoint is not None:
        (run_dir / "checkpoint.flax").write_bytes(checkpoint)


BAD_RESUMES = {
    "not a run": (lambda d: d.mkdir(), [], "is not a run directory"),
    "no checkpoint": (lambda d: write_fake_run(d, None), [], "has no checkpoint.flax"),
    "another script's run": (
        lambda d: write_fake_run(d, "from_scratch/sac_flow_gru.py"),
        [],
        "is a run of from_scratch/sac_flow_gru.py",
    ),
    "corrupt checkpoint": (lambda d: write_fake_run(d, None, b"\x00garbage"), [], "cannot read"),
    "truncated args.json": (
        lambda d: write_fake_run(d, "from_scratch/sac_flow_naive.py", args_json='{"seed": 1, "env_id": "Hop'),
        [],
        "cannot read run/args.json",
    ),
    "hand-edited args.json": (
        lambda d: write_fake_run(d, "from_scratch/sac_flow_naive.py", args_json='{"batch_size": "256"}'),
        [],
        "batch_size is '256', not of type int",
    ),
    "several seeds": (
        lambda d: write_fake_run(d, "from_scratch/sac_flow_naive.py"),
        ["--num-seeds", "2"],
        "--num-seeds",
    ),
    "already finished": (
        lambda d: write_fake_run(d, "from_scratch/sac_flow_naive.py"),
        ["--total-timesteps", "10"],
        "--total-timesteps",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RESUMES))
def test_bad_resume_is_one_line_and_nonzero_exit(case, tmp_path):
    make_run, flags, mentioned = BAD_RESUMES[case]
    make_run(tmp_path / "run")
    result = run_script(FROM_SCRATCH / "sac_flow_naive.py", "--resume", "run", *flags, cwd=tmp_path, timeout=120)
    assert_one_line_error(result, mentioned)


def test_resume_from_a_checkpoint_that_does_not_fit_leaves_the_run_as_it_was(tmp_path):
    """The checkpoint's agent state is restored before the run's files are opened: a resume that fails there (here an
    empty agent) does not cut metrics.csv back to the checkpoint's step."""
    write_fake_run(tmp_path / "run", "from_scratch/sac_flow_naive.py")  # a checkpoint of step 10
    metrics = "global_step,key,value\n5,losses/qf_loss,1.5\n20,losses/qf_loss,1.0\n"
    (tmp_path / "run" / "metrics.csv").write_text(metrics)
    result = run_script(FROM_SCRATCH / "sac_flow_naive.py", "--resume", "run", cwd=tmp_path, timeout=120)
    assert_one_line_error(result, "does not match these args")
    assert (tmp_path / "run" / "metrics.csv").read_text() == metrics
