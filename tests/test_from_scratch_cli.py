"""Each from-scratch script as a user runs it: a short end-to-end run, and every bad input answered in one line."""

import csv
import json
import math
import sys

import flax
import jax
import pytest
from conftest import ALL_SCRIPTS, FROM_SCRATCH, load_script, run_script

from sac_flow_utils import gym_tasks

SCRIPTS = ALL_SCRIPTS
SMOKE_FLAGS = [
    *("--env-id", "Hopper-v4", "--total-timesteps", "400", "--learning-starts", "200", "--batch-size", "32"),
    *("--eval-every", "400", "--eval-episodes", "1", "--log-every", "50", "--save-model"),
    *("--critic-hidden", "64", "--buffer-size", "1000"),  # a quicker compile
]
# Small non-default policy sizes: a quicker compile, and the saved parameters show that the flags reached the networks.
POLICY_FLAGS = {
    "sac": ["--actor-hidden", "32"],
    "sac_flow_naive": ["--velocity-hidden", "32", "--flow-steps", "2"],
    "sac_flow_gru": ["--velocity-hidden", "64", "--flow-steps", "2"],
    "sac_flow_transformer": ["--d-model", "32", "--n-heads", "2", "--n-layers", "1", "--flow-steps", "2"],
}


def assert_policy_sizes(script: str, policy_params: dict):
    if script == "sac_flow_gru":
        velocity = policy_params["velocity"]
        for net in ("gate_net", "candidate_net"):  # one hidden layer of 64, then the output layer
            assert [velocity[net][layer]["kernel"].shape[1] for layer in sorted(velocity[net])] == [64, 3]
    elif script == "sac_flow_transformer":
        velocity = policy_params["velocity"]
        assert {k for k in velocity if k.startswith("blocks")} == {"blocks_0"}
        assert velocity["blocks_0"]["value"]["kernel"].shape == (32, 2, 16)
    else:
        kernels = [leaf.shape for leaf in jax.tree_util.tree_leaves(policy_params) if leaf.ndim == 2]
        assert (32, 32) in kernels, kernels


@pytest.mark.parametrize("script", SCRIPTS)
def test_end_to_end_run_writes_the_local_log(script, tmp_path):
    result = run_script(FROM_SCRATCH / f"{script}.py", *SMOKE_FLAGS, *POLICY_FLAGS[script], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith(f"Hopper-v4__{script}__1__")
    assert json.loads((run_dir / "args.json").read_text())["total_timesteps"] == 400
    saved = flax.serialization.msgpack_restore((run_dir / f"{script}.flax").read_bytes())
    assert_policy_sizes(script, saved["policy"]["params"])
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = {row["key"] for row in rows}
    expected = {
        "charts/episodic_return",
        "charts/episodic_length",
        "charts/SPS",
        "losses/qf_loss",
        "losses/actor_loss",
        "losses/alpha",
        "losses/entropy",
        "eval/episodic_return",
    }
    assert expected <= keys, expected - keys
    returns = [float(row["value"]) for row in rows if row["key"] == "charts/episodic_return"]
    assert len(returns) >= 3 and all(
        math.isfinite(r) for r in returns
    )  # Hopper episodes under random actions are short
    steps = [int(row["global_step"]) for row in rows]
    assert steps == sorted(steps) and steps[-1] == 400
    assert "step 400/400" in result.stdout
    # Progress names its phase, and the first train step's line says that it compiled (its rate is not the phase's).
    assert "step 199/400 | random actions: " in result.stdout
    assert "step 200/400 | training: compiled and took the first step in " in result.stdout


BAD_INPUTS = {
    "unknown env id": (["--env-id", "NoSuchEnv-v9"], "NoSuchEnv-v9"),
    "discrete actions": (["--env-id", "CartPole-v1"], "Discrete"),
    "batch larger than buffer": (
        ["--batch-size", "64", "--buffer-size", "32", "--learning-starts", "64"],
        "--buffer-size",
    ),
    "non-positive steps": (["--total-timesteps", "0"], "--total-timesteps"),
    "non-positive seeds": (["--num-seeds", "0"], "--num-seeds"),
    "negative checkpoint interval": (["--checkpoint-every", "-1"], "--checkpoint-every"),
    "learning starts before a batch": (["--learning-starts", "10", "--batch-size", "32"], "--learning-starts"),
    "track without login": (["--track"], "wandb login"),
}


# Flow scripts only: a target entropy above the largest path entropy that σ ≤ 0.1 allows (−4.2 on Pendulum-v1).
FLOW_BAD_INPUTS = {
    "unreachable target entropy": (["--env-id", "Pendulum-v1", "--noise-std", "0.1"], "--target-entropy"),
    "σ bound at or below σ's lower bound": (["--sigma-max", "0.001"], "--sigma-max"),
}


@pytest.mark.parametrize(
    "script, case",
    [(script, case) for script in SCRIPTS for case in BAD_INPUTS]
    + [(script, case) for script in SCRIPTS if script != "sac" for case in FLOW_BAD_INPUTS],
)
def test_bad_input_is_one_line_error_before_anything_is_written(script, case, tmp_path, monkeypatch):
    """main() stops with one `error:` line (the SystemExit message Python prints, exit status 1); in-process to
    keep the suite fast, the shell's view is checked below."""
    flags, mentioned = {**BAD_INPUTS, **FLOW_BAD_INPUTS}[case]
    monkeypatch.chdir(tmp_path)
    # A home with no netrc and no key: the `--track` case must not find a login.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *flags])
    with pytest.raises(SystemExit) as stopped:
        load_script(script).main()
    message = stopped.value.code
    assert isinstance(message, str) and message.startswith("error:") and "\n" not in message
    assert mentioned in message, message
    assert not (tmp_path / "runs").exists()  # nothing written for a run that never started


@pytest.mark.long
@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_input_from_the_shell_is_one_line_and_exit_status_1(script, tmp_path):
    result = run_script(FROM_SCRATCH / f"{script}.py", "--env-id", "NoSuchEnv-v9", cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error:") and "NoSuchEnv-v9" in last_line, result.stderr[-2000:]


@pytest.mark.long
def test_video_without_a_renderer_is_one_line_before_anything_is_written(tmp_path):
    """GLFW with no display cannot render: --capture-video stops before a run directory is made, not at the first
    evaluation (nor after leaving an empty run behind)."""
    no_display = {"MUJOCO_GL": "glfw", "DISPLAY": "", "WAYLAND_DISPLAY": ""}
    result = run_script(
        FROM_SCRATCH / "sac.py", "--env-id", "Hopper-v4", "--capture-video", cwd=tmp_path, env=no_display
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --capture-video cannot render"), result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("env_id", ["Hopper-v4", "Hopper-v5", "Humanoid-v4", "Humanoid-v5"])
def test_gymnasium_v4_and_v5_mujoco_ids_work(env_id):
    """The paper's -v4 tasks and the current -v5 ones both build and step with the pinned mujoco."""
    env = gym_tasks.make_gym_env(env_id, seed=0)
    _, _, _, _, info = env.step(env.action_space.sample())
    assert env.observation_space.shape[0] > 0 and isinstance(info, dict)
    env.close()
