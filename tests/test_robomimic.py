"""Robomimic offline-to-online (sac_flow_utils/robomimic_tasks.py) without a download: a small dataset in the official
low_dim_v15.hdf5 layout recorded in the real robosuite Lift (tests/robomimic_data.py) is read by the loader and checked
against what was recorded; the environment built from its env_args; success through the environment's own
_check_success() (the cube placed above the table); the one-line errors; and (pytest -m long) a short run of each of
the five agents on it. The tests that need robosuite and h5py (requirements-robomimic.txt) skip without them."""

import csv
import importlib.util
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import robomimic_data  # the test helper beside this file
from conftest import OFFLINE_TO_ONLINE, script_environment

OPTIONAL = [name for name in ("robosuite", "h5py") if importlib.util.find_spec(name) is None]
needs_robomimic = pytest.mark.skipif(
    bool(OPTIONAL),
    reason=f"{' and '.join(OPTIONAL)} not installed: pip install -r requirements-robomimic.txt (setup.md, 'Robomimic')",
)
ENV_NAME = "lift-mh-low_dim"
DEMO_NAMES = ["demo_1", "demo_2", "demo_10"]  # sorted as numbers, not as text (demo_10 comes last)
KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")  # QC's order


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The recorded episodes and the directory holding lift/mh/low_dim_v15.hdf5 written from them."""
    directory = tmp_path_factory.mktemp("robomimic")
    env_args, episodes = robomimic_data.record_demos(episode_lengths=(12, 9, 8), succeed_in_last_at=4)
    path = directory / "lift" / "mh" / "low_dim_v15.hdf5"
    robomimic_data.write_dataset(str(path), env_args, episodes, DEMO_NAMES)
    return directory, path, episodes


@pytest.fixture(scope="module")
def task(recorded):
    from sac_flow_utils import robomimic_tasks

    directory, _, _ = recorded
    env, eval_env, path = robomimic_tasks.make_robomimic_envs(ENV_NAME, str(directory), None)
    yield robomimic_tasks, env, eval_env, path
    env.close()
    eval_env.close()


@needs_robomimic
def test_loader_gives_the_recorded_transitions(recorded, task):
    """Observations in QC's key order, demos in numeric order, rewards success - 1, terminals = dones (and each demo's
    end), masks = 1 - dones."""
    robomimic_tasks, env, _, path = task
    _, _, episodes = recorded
    dataset = robomimic_tasks.load_robomimic_dataset(env, str(path), ENV_NAME, min_size=4)
    assert env.observation_space.shape == (3 + 4 + 2 + 10,) and env.action_space.shape == (7,)
    for column, part in (("observations", "obs"), ("next_observations", "next_obs")):
        expected = np.concatenate([np.concatenate([e[part][key] for key in KEYS], 1) for e in episodes])
        np.testing.assert_array_equal(dataset[column], expected.astype(np.float32))
    np.testing.assert_array_equal(
        dataset["actions"], np.concatenate([e["actions"] for e in episodes]).astype(np.float32)
    )
    rewards = np.concatenate([e["rewards"] for e in episodes])
    dones = np.concatenate([e["dones"] for e in episodes])
    assert rewards.sum() >= 1 and dones.sum() > len(episodes)  # the recording holds successes (not only demo ends)
    np.testing.assert_array_equal(dataset["rewards"], rewards - 1.0)
    np.testing.assert_array_equal(dataset["masks"], 1.0 - dones)
    ends = np.cumsum([len(e["actions"]) for e in episodes]) - 1
    assert set(np.flatnonzero(dataset["terminals"])) == set(np.flatnonzero(dones)) | set(ends)


@needs_robomimic
def test_environment_is_the_dataset_s(recorded, task):
    """The env built from env_args gives the recorded observation for a recorded simulator state, QC's time limits,
    and seeded resets that neither depend on nor move NumPy's global generator."""
    robomimic_tasks, env, _, _ = task
    _, _, episodes = recorded
    suite = env.unwrapped.env
    env.reset(seed=0)
    suite.sim.set_state_from_flattened(episodes[1]["states"][3])
    suite.sim.forward()
    observation = env.unwrapped.observation(suite._get_observations(force_update=True))
    expected = np.concatenate([episodes[1]["obs"][key][3] for key in KEYS]).astype(np.float32)
    np.testing.assert_allclose(observation, expected, atol=1e-6)
    assert robomimic_tasks.EPISODE_STEPS == {"lift": 300, "can": 300, "square": 400}
    assert env._max_episode_steps == 300
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first, _ = env.reset(seed=5)
    again, _ = env.reset(seed=5)
    other, _ = env.reset(seed=6)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    np.testing.assert_array_equal(np.random.get_state()[1], before)


class PlaceCubeOnReset(gym.Wrapper):
    """Lift with its cube above the table from the start: the next step succeeds."""

    def reset(self, **kwargs):
        observation, info = self.env.reset(**kwargs)
        robomimic_data.place_cube_above_table(self.env.unwrapped.env)
        return observation, info


@needs_robomimic
def test_success_is_the_environment_s_own_check(task):
    """A step ends the episode (terminated, reward 1, info success) exactly when robosuite's _check_success() holds;
    evaluation counts it; without success the time limit truncates."""
    robomimic_tasks, env, eval_env, _ = task
    from sac_flow_utils import ogbench_tasks

    env.reset(seed=1)
    _, reward, terminated, truncated, info = env.step(np.zeros(7))
    assert (reward, terminated, truncated, info["success"]) == (0.0, False, False, False)
    robomimic_data.place_cube_above_table(env.unwrapped.env)
    _, reward, terminated, truncated, info = env.step(np.zeros(7))
    assert env.unwrapped.env._check_success()
    assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True)

    def zeros(params, observation, key):
        return np.zeros((1, 2 * 7), np.float32)

    import jax

    short = gym.wrappers.TimeLimit(eval_env.unwrapped, 4)
    assert ogbench_tasks.evaluate_ogbench(short, zeros, {}, jax.random.PRNGKey(0), 2, 2, 7) == (0.0, 0.0)
    placed = PlaceCubeOnReset(short)
    assert ogbench_tasks.evaluate_ogbench(placed, zeros, {}, jax.random.PRNGKey(0), 2, 2, 7) == (1.0, 1.0)


@needs_robomimic
@pytest.mark.parametrize("task_name", ["can", "square"])
def test_can_and_square_build_with_qc_s_observation(task_name):
    """robosuite's PickPlaceCan and NutAssemblySquare from Lift's env_args with their env_name: 23 numbers (the object
    state has 14), 7 actions in [-1, 1]."""
    from sac_flow_utils import robomimic_tasks

    env_args = {**robomimic_data.lift_env_args(), "env_name": robomimic_tasks.ROBOSUITE_ENVS[task_name]}
    env = robomimic_tasks.RobomimicEnv(env_args)
    observation, _ = env.reset(seed=0)
    assert observation.shape == env.observation_space.shape == (23,) and env.action_space.shape == (7,)
    observation, reward, terminated, _, info = env.step(np.zeros(7))
    assert observation.shape == (23,) and (reward, terminated, info["success"]) == (0.0, False, False)
    env.close()


@needs_robomimic
@pytest.mark.parametrize("layout", ["npz", "no_data", "image_only", "other_env"])
def test_file_of_another_layout_is_one_line(tmp_path, layout, recorded):
    """An OGBench .npz under the robomimic name, an HDF5 file without data/env_args, one without the low-dimensional
    observations (an image dataset), one of another task: one line naming the file and how to get the right one."""
    import h5py

    from sac_flow_utils import robomimic_tasks

    path = tmp_path / "lift" / "mh" / "low_dim_v15.hdf5"
    path.parent.mkdir(parents=True)
    _, _, episodes = recorded
    env_args = robomimic_data.lift_env_args()
    if layout == "npz":
        np.savez(path.open("wb"), observations=np.zeros((3, 19)))
    elif layout == "no_data":
        with h5py.File(path, "w") as f:
            f.create_dataset("observations", data=np.zeros((3, 19)))
    elif layout == "image_only":
        with h5py.File(path, "w") as f:
            f.create_dataset("data/demo_0/obs/agentview_image", data=np.zeros((3, 8, 8, 3), np.uint8))
            f["data"].attrs["env_args"] = robomimic_data.json.dumps(env_args)
    else:  # Lift's file read for the 23-dimensional square task
        robomimic_data.write_dataset(str(path), env_args, episodes)
        path = path.parent.parent.parent / "square" / "mh" / "low_dim_v15.hdf5"
        path.parent.mkdir(parents=True)
        path.write_bytes((tmp_path / "lift" / "mh" / "low_dim_v15.hdf5").read_bytes())
    name = "square-mh-low_dim" if layout == "other_env" else ENV_NAME
    expected = {
        "npz": "is not a readable HDF5 file",
        "no_data": "is not a robomimic dataset (no data group with env_args)",
        "image_only": "lacks data/demo_0/obs/robot0_eef_pos",
        "other_env": "is a dataset of robosuite's Lift, not of square (NutAssemblySquare)",
    }[layout]
    with pytest.raises(SystemExit) as error:
        env, eval_env, found = robomimic_tasks.make_robomimic_envs(name, str(tmp_path), None)
        try:
            robomimic_tasks.load_robomimic_dataset(env, found, name, min_size=4)
        finally:
            env.close()
            eval_env.close()
    message = str(error.value)
    assert message.startswith("error: ") and "\n" not in message and str(path) in message, message
    assert expected in message and "download_datasets.py" in message, message


@pytest.mark.parametrize("case", ["unknown_task", "unknown_type", "missing_file"])
def test_unknown_name_and_missing_file_are_one_line(tmp_path, case):
    """Through the script, before anything is written; needs neither robosuite nor h5py."""
    name = {"unknown_task": "squar-mh-low_dim", "unknown_type": "square-mg-low_dim", "missing_file": "can-ph-low_dim"}
    command = [sys.executable, str(OFFLINE_TO_ONLINE / "qc_fql.py"), "--env-name", name[case]]
    result = subprocess.run(
        [*command, "--dataset-dir", str(tmp_path)],
        cwd=tmp_path, env=script_environment(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    if case == "missing_file":
        expected = f"Robomimic dataset file {tmp_path}/can/ph/low_dim_v15.hdf5 not found"
        download = f"--tasks can --dataset_types ph --hdf5_types low_dim --download_dir {tmp_path})"
        assert expected in lines[0] and download in lines[0]
    else:
        assert f"unknown Robomimic task --env-name {name[case]}; known: lift-mh-low_dim" in lines[0]
    assert not os.path.exists(tmp_path / "runs")


# ---------------------------------------------------------------------------------------------------- end to end

AGENTS = {  # name: (script, flags)
    "qc_fql": ("qc_fql", ["--horizon-length", "5", "--actor-hidden-dims", "32", "32"]),
    "fql": ("qc_fql", ["--horizon-length", "1", "--actor-hidden-dims", "32", "32"]),
    "sac_flow_transformer": (
        "sac_flow_transformer",
        ["--horizon-length", "5", "--d-model", "16", "--n-heads", "2", "--n-layers", "1"],
    ),  # fmt: skip
    "sac_flow_gru": ("sac_flow_gru", ["--horizon-length", "5", "--velocity-hidden", "32"]),
    "sac_flow_naive": ("sac_flow_naive", ["--horizon-length", "5", "--velocity-hidden", "32"]),
}


@pytest.fixture(scope="module")
def agent_runs(recorded, tmp_path_factory):
    """The five agents at once on the recorded file: 20 offline updates, 30 online steps (12-step episodes), an
    evaluation at the end of each phase, a checkpoint at the end (its online replay holds the stored rewards)."""
    directory, _, _ = recorded
    runs = {}
    for name, (script, flags) in AGENTS.items():
        cwd = tmp_path_factory.mktemp(name)
        flags = [
            "--env-name", ENV_NAME, "--dataset-dir", str(directory), "--exp-name", name, *flags,
            "--offline-steps", "20", "--online-steps", "30", "--eval-every", "20", "--eval-episodes", "1",
            "--batch-size", "8", "--log-every", "10", "--max-episode-steps", "12", "--online-learning-starts", "5",
            "--critic-hidden-dims", "32", "32", "--checkpoint-every", "50",
        ]  # fmt: skip
        with open(cwd / "stderr.txt", "w") as err:
            process = subprocess.Popen(
                [sys.executable, str(OFFLINE_TO_ONLINE / f"{script}.py"), *flags],
                cwd=cwd, env=script_environment(), stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        runs[name] = (cwd, script, process)
    yield runs
    for _, _, process in runs.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@needs_robomimic
@pytest.mark.long
@pytest.mark.parametrize("name", list(AGENTS))
def test_each_agent_runs_offline_to_online(agent_runs, name):
    from sac_flow_utils import checkpoints

    cwd, script, process = agent_runs[name]
    assert process.wait(timeout=900) == 0, (cwd / "stderr.txt").read_text()[-3000:]
    (run_name,) = os.listdir(cwd / "runs")
    assert run_name.startswith(f"{ENV_NAME}__{name}__1__")
    with open(cwd / "runs" / run_name / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    by_key = {}
    for row in rows:
        by_key.setdefault(row["key"], []).append((int(row["global_step"]), float(row["value"])))
    assert [step for step, _ in by_key["eval/success"]] == [20, 40, 50]
    assert all(value in (0.0, 1.0) for _, value in by_key["eval/success"])
    assert [step for step, _ in by_key["charts/episodic_length"]] == [32, 44]  # 12-step episodes, unless one succeeds
    assert all(np.isfinite(value) for _, value in by_key["losses/qf_loss"])
    _, checkpoint = checkpoints.read_run(str(cwd / "runs" / run_name), f"offline_to_online/{script}.py")
    rewards = np.asarray(checkpoint["agent"]["online_replay"]["rewards"])
    assert len(rewards) == 30 and set(np.unique(rewards)) <= {-1.0, 0.0}  # success - 1, as the dataset's
