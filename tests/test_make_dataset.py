"""Tests of offline_to_online/make_dataset.py: a tiny cube-triple "play" dataset, loaded through OGBench itself."""

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "offline_to_online", "make_dataset.py")
DATASET = "cube-triple-play-v0"
SINGLETASK_ENV = "cube-triple-play-singletask-task4-v0"
NUM_EPISODES, NUM_VAL_EPISODES, STEPS = 2, 1, 100
TINY_FLAGS = [
    "--env-name", DATASET,
    "--num-episodes", str(NUM_EPISODES),
    "--num-val-episodes", str(NUM_VAL_EPISODES),
    "--max-episode-steps", str(STEPS),
    "--seed", "0",
]  # fmt: skip


def load_script():
    spec = importlib.util.spec_from_file_location("make_dataset", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*flags, cwd):
    return subprocess.run(
        [sys.executable, SCRIPT, *flags], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


def raw_arrays(path):
    with np.load(path) as file:
        return {key: file[key] for key in file.files}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ogbench_data")
    result = run_script(*TINY_FLAGS, "--dataset-dir", str(directory), cwd=directory)
    assert result.returncode == 0, result.stderr
    assert "3/3 episodes" in result.stderr and "ETA" in result.stderr  # the progress line
    return directory


@pytest.fixture(scope="module")
def loaded(dataset_dir):
    """OGBench's own loader on the generated files; any download attempt fails the test."""
    import ogbench

    def no_download(*args, **kwargs):
        raise AssertionError("ogbench tried to download a dataset")

    original_urlopen = urllib.request.urlopen
    urllib.request.urlopen = no_download
    try:
        return ogbench.make_env_and_datasets(SINGLETASK_ENV, dataset_dir=str(dataset_dir), add_info=True)
    finally:
        urllib.request.urlopen = original_urlopen


def test_files_have_ogbench_keys_dtypes_and_shapes(dataset_dir, loaded):
    env = loaded[0]
    ob_dim = env.observation_space.shape[0]
    nq, nv = env.unwrapped._model.nq, env.unwrapped._model.nv
    for name, num_episodes in [(f"{DATASET}.npz", NUM_EPISODES), (f"{DATASET}-val.npz", NUM_VAL_EPISODES)]:
        data = raw_arrays(dataset_dir / name)
        n = num_episodes * STEPS
        assert set(data) == {"observations", "actions", "terminals", "qpos", "qvel"}
        assert data["observations"].dtype == np.float32 and data["observations"].shape == (n, ob_dim)
        assert data["actions"].dtype == np.float32 and data["actions"].shape == (n, 5)
        assert data["terminals"].dtype == bool and data["terminals"].shape == (n,)
        assert data["qpos"].dtype == np.float32 and data["qpos"].shape == (n, nq)
        assert data["qvel"].dtype == np.float32 and data["qvel"].shape == (n, nv)
        # terminals mark exactly the last step of every episode
        np.testing.assert_array_equal(np.flatnonzero(data["terminals"]), np.arange(1, num_episodes + 1) * STEPS - 1)
        assert np.all(np.abs(data["actions"]) <= 1.0)
        assert data["actions"].std(axis=0).min() > 0.01  # the oracle moves every action dimension
        # qpos is the state of the same row's observation: the first 6 observation entries are the arm joints
        np.testing.assert_array_equal(data["observations"][:, :6], data["qpos"][:, :6])


def test_ogbench_loader_builds_transitions(dataset_dir, loaded):
    _, train, val = loaded
    raw = raw_arrays(dataset_dir / f"{DATASET}.npz")
    keep = ~raw["terminals"]  # OGBench drops the last row of each episode: it has no next observation
    assert train["observations"].shape[0] == NUM_EPISODES * (STEPS - 1)
    assert val["observations"].shape[0] == NUM_VAL_EPISODES * (STEPS - 1)
    np.testing.assert_array_equal(train["observations"], raw["observations"][keep])
    np.testing.assert_array_equal(train["next_observations"], raw["observations"][np.roll(keep, 1)])
    np.testing.assert_array_equal(np.flatnonzero(train["terminals"]), np.arange(1, NUM_EPISODES + 1) * (STEPS - 1) - 1)


def test_singletask_rewards_match_the_environment(loaded):
    """OGBench relabels rewards from qpos; recompute them by putting the simulator in each row's state."""
    env, train, _ = loaded
    env.reset()  # task 4: the cube targets (mocap positions) stay fixed while we set states
    expected = []
    for qpos, qvel in zip(train["qpos"], train["qvel"]):
        env.unwrapped.set_state(qpos.astype(np.float64), qvel.astype(np.float64))
        expected.append(sum(env.unwrapped._compute_successes()) - env.unwrapped._num_cubes)
    expected = np.array(expected, dtype=np.float32)
    assert train["rewards"].shape == expected.shape
    assert len(np.unique(expected)) > 1, "test data without any cube on a target: the check would be vacuous"
    np.testing.assert_array_equal(train["rewards"], expected)
    np.testing.assert_array_equal(train["masks"], (expected < 0).astype(np.float32))


@pytest.mark.long
def test_refuses_to_overwrite_and_is_deterministic_across_worker_counts(dataset_dir, tmp_path):
    for name in [f"{DATASET}.npz", f"{DATASET}-val.npz"]:
        shutil.copy(dataset_dir / name, tmp_path / name)
    before = os.path.getmtime(tmp_path / f"{DATASET}.npz")

    result = run_script(*TINY_FLAGS, "--dataset-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "--overwrite" in result.stderr
    assert os.path.getmtime(tmp_path / f"{DATASET}.npz") == before

    # same seed, 2 worker processes instead of 1: identical arrays
    result = run_script(*TINY_FLAGS, "--dataset-dir", str(tmp_path), "--overwrite", "--num-workers", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in [f"{DATASET}.npz", f"{DATASET}-val.npz"]:
        original, regenerated = raw_arrays(dataset_dir / name), raw_arrays(tmp_path / name)
        for key in original:
            np.testing.assert_array_equal(original[key], regenerated[key], err_msg=f"{name}:{key}")


def test_unknown_env_name_is_a_one_line_error(tmp_path):
    result = run_script("--env-name", "cube-sextuple-play-v0", "--dataset-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: unknown dataset 'cube-sextuple-play-v0'")
    assert "cube-triple-play-v0" in last_line and "cube-quadruple-play-v0" in last_line
    assert os.listdir(tmp_path) == []


def test_in_process_generation_checks_and_seeds(tmp_path):
    make_dataset = load_script()
    assert make_dataset.dataset_name_of(SINGLETASK_ENV) == DATASET
    assert make_dataset.dataset_name_of("cube-double-play-singletask-v0") == "cube-double-play-v0"
    assert make_dataset.dataset_name_of(DATASET) == DATASET
    for bad in [{"num_episodes": 0}, {"num_episodes": 2, "num_val_episodes": 0}, {"max_episode_steps": 1}]:
        with pytest.raises(SystemExit, match="^error: "):
            make_dataset.generate_dataset(DATASET, dataset_dir=str(tmp_path), **bad)
    assert os.listdir(tmp_path) == []

    tiny = {"num_episodes": 1, "num_val_episodes": 1, "max_episode_steps": 20, "show_progress": False}
    paths = make_dataset.generate_dataset(SINGLETASK_ENV, dataset_dir=str(tmp_path / "a"), seed=1, **tiny)
    assert paths["train"] == str(tmp_path / "a" / f"{DATASET}.npz")
    other_seed = make_dataset.generate_dataset(DATASET, dataset_dir=str(tmp_path / "b"), seed=2, **tiny)
    a, b = raw_arrays(paths["train"]), raw_arrays(other_seed["train"])
    assert a["observations"].shape == (20, 46)
    assert not np.array_equal(a["qpos"], b["qpos"])  # different seed, different episode
    # the train and validation episodes of one seed are different draws too
    assert not np.array_equal(a["qpos"], raw_arrays(paths["val"])["qpos"])


@pytest.mark.long
@pytest.mark.parametrize("signum, workers", [(signal.SIGINT, "1"), (signal.SIGTERM, "2")])
def test_interrupted_generation_keeps_its_episodes_and_continues_to_the_same_files(tmp_path, signum, workers):
    """Ctrl-C (one process) or SIGTERM (workers): the finished episodes go to <name>.partial.npz and the run exits
    130 / 143 with one line; the same command continues from them and writes the files of an uninterrupted run."""
    flags = ["--env-name", "cube-single-play-v0", "--num-episodes", "30", "--num-val-episodes", "3"]
    flags += ["--max-episode-steps", "100", "--dataset-dir", str(tmp_path / "data"), "--num-workers", workers]
    process = subprocess.Popen(
        [sys.executable, SCRIPT, *flags], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    progress = ""
    # The progress line, rewritten in place with \r: signal once two episodes are done.
    while not any(int(done) >= 2 for done in re.findall(r"(\d+)/33 episodes", progress)):
        character = process.stderr.read(1)
        assert character, progress[-2000:]
        progress += character
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-2000:]
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"interrupted by {signal.Signals(signum).name}: kept ") and "Traceback" not in stderr
    assert os.listdir(tmp_path / "data") == ["cube-single-play-v0.partial.npz"]

    result = run_script(*flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "episodes already generated" in result.stdout
    assert sorted(os.listdir(tmp_path / "data")) == ["cube-single-play-v0-val.npz", "cube-single-play-v0.npz"]
    uninterrupted = load_script().generate_dataset(
        "cube-single-play-v0", 30, 3, 100, str(tmp_path / "fresh"), show_progress=False
    )
    for split, path in uninterrupted.items():
        fresh, continued = raw_arrays(path), raw_arrays(tmp_path / "data" / os.path.basename(path))
        assert fresh.keys() == continued.keys()
        for key in fresh:
            np.testing.assert_array_equal(continued[key], fresh[key], err_msg=f"{split}/{key}")
