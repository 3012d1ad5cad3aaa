"""Tests of offline_to_online/qc_fql.py: the chunked TD target, chunk sampling, the flow-matching loss and the
Euler sampler against NumPy; end-to-end runs of QC-FQL (h=5) and FQL (h=1); the dataset error messages."""

import csv
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "offline_to_online", "qc_fql.py")
ENV_NAME = "cube-triple-play-singletask-task4-v0"
DATASET_NAME = "cube-triple-play-v0"


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


qc_fql = load_module("qc_fql", SCRIPT)


def run_script(cwd, *flags, log_compiles=False):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_LOG_COMPILES": "1" if log_compiles else "0"}
    return subprocess.run(
        [sys.executable, SCRIPT, *flags], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def read_metrics(cwd):
    (run_name,) = os.listdir(os.path.join(cwd, "runs"))
    run_dir = os.path.join(cwd, "runs", run_name)
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    return run_dir, rows


# ---------------------------------------------------------------------------------------------------- math


def test_chunked_td_target_matches_hand_computation():
    gamma, horizon = 0.9, 4
    rewards = np.array(
        [[-3, -2, -1, -1], [-1, -2, -3, -3], [-2, -2, -2, -2], [-1, 0, 0, -1], [-3, -3, -3, -3], [-1, -1, -1, 0]],
        np.float32,
    )
    masks = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]], np.float32)
    terminals = np.array(
        [
            [0, 0, 0, 0],  # inside an episode
            [0, 1, 0, 0],  # episode ends after step 1: steps 2, 3 belong to the next episode
            [0, 0, 0, 1],  # episode ends exactly at the chunk's last step: still valid
            [0, 0, 0, 0],  # task solved at step 1: no bootstrap
            [1, 0, 0, 0],  # ends at step 0: only step 0 is valid
            [0, 0, 0, 1],  # task solved (and episode ended) at the last step: no bootstrap, valid
        ],
        np.float32,
    )
    next_q = np.array([-50.0, -40.0, -30.0, -20.0, -10.0, -5.0], np.float32)

    expected_target, expected_valid = [], []
    for b in range(len(rewards)):
        total, discount, bootstrap, ended = 0.0, 1.0, 1.0, False
        row_valid = []
        for i in range(horizon):
            row_valid.append(0.0 if ended else 1.0)
            total += discount * rewards[b, i]
            discount *= gamma
            bootstrap = bootstrap * masks[b, i]
            ended = ended or terminals[b, i] == 1
        expected_target.append(total + discount * bootstrap * next_q[b])
        expected_valid.append(row_valid)

    target, valid = qc_fql.chunked_td_target(
        jnp.asarray(rewards), jnp.asarray(masks), jnp.asarray(terminals), jnp.asarray(next_q), gamma
    )
    np.testing.assert_allclose(np.asarray(target), expected_target, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(valid), expected_valid)
    # spot checks written out by hand
    assert np.asarray(target)[3] == pytest.approx(-1 + 0.9**3 * -1)  # no bootstrap after success
    assert np.asarray(target)[0] == pytest.approx(-3 - 0.9 * 2 - 0.81 - 0.729 + 0.9**4 * -50)
    np.testing.assert_array_equal(np.asarray(valid)[:, -1], [1, 0, 1, 1, 0, 1])


def test_sample_chunk_batch_takes_consecutive_rows_below_size():
    capacity, size, horizon, obs_dim, action_dim = 50, 30, 5, 3, 2
    rows = np.arange(capacity, dtype=np.float32)
    buffer = {
        "observations": jnp.asarray(np.repeat(rows[:, None], obs_dim, 1)),
        "actions": jnp.asarray(np.stack([rows, -rows], 1)),
        "rewards": jnp.asarray(rows * 10),
        "masks": jnp.asarray(rows * 100),
        "terminals": jnp.asarray(rows * 1000),
        "next_observations": jnp.asarray(np.repeat(rows[:, None] + 0.5, obs_dim, 1)),
    }
    batch = qc_fql.sample_chunk_batch(buffer, jnp.int32(size), jax.random.key(0), 64, horizon)
    start = np.asarray(batch["observations"])[:, 0].astype(int)
    assert start.min() >= 0 and start.max() <= size - horizon
    assert len(np.unique(start)) > 10
    steps = start[:, None] + np.arange(horizon)
    expected_chunks = np.stack([steps, -steps], -1).reshape(64, horizon * action_dim)
    np.testing.assert_array_equal(np.asarray(batch["action_chunks"]), expected_chunks)
    np.testing.assert_array_equal(np.asarray(batch["rewards"]), steps * 10)
    np.testing.assert_array_equal(np.asarray(batch["masks"]), steps * 100)
    np.testing.assert_array_equal(np.asarray(batch["terminals"]), steps * 1000)
    np.testing.assert_array_equal(np.asarray(batch["next_observations"])[:, 0], start + horizon - 1 + 0.5)


def test_flow_matching_loss_matches_numpy():
    rng = np.random.default_rng(0)
    batch, horizon, action_dim, obs_dim = 3, 2, 2, 4
    obs = rng.normal(size=(batch, obs_dim)).astype(np.float32)
    actions = rng.uniform(-1, 1, size=(batch, horizon * action_dim)).astype(np.float32)
    noise = rng.normal(size=(batch, horizon * action_dim)).astype(np.float32)
    times = np.array([[0.0], [0.3], [0.9]], np.float32)
    valid = np.array([[1, 1], [1, 0], [1, 1]], np.float32)
    w_x = rng.normal(size=(horizon * action_dim, horizon * action_dim)).astype(np.float32)
    w_s = rng.normal(size=(obs_dim, horizon * action_dim)).astype(np.float32)

    def velocity(s, x, t):  # a known velocity field: linear in (s, x) plus t
        return x @ w_x + s @ w_s + t

    loss = qc_fql.flow_matching_loss(
        velocity, jnp.asarray(obs), jnp.asarray(actions), jnp.asarray(valid), jnp.asarray(noise), jnp.asarray(times)
    )

    total = 0.0
    for b in range(batch):
        t = times[b, 0]
        x_t = (1 - t) * noise[b] + t * actions[b]
        predicted = x_t @ w_x + obs[b] @ w_s + t
        for j in range(horizon * action_dim):
            step = j // action_dim
            total += valid[b, step] * (predicted[j] - (actions[b, j] - noise[b, j])) ** 2
    assert float(loss) == pytest.approx(total / (batch * horizon * action_dim), rel=1e-5)


def test_flow_policy_actions_euler_and_clip():
    noise = jnp.array([[0.5, -2.0, 3.0]], jnp.float32)
    steps = 10
    times_seen = []

    def velocity(s, x, t):  # dx/dt = -x: Euler gives x0 (1 - 1/K)^K
        times_seen.append(float(t[0, 0]))
        return -x

    out = qc_fql.flow_policy_actions(velocity, jnp.zeros((1, 2)), noise, steps)
    expected = np.clip(np.array([0.5, -2.0, 3.0]) * (1 - 1 / steps) ** steps, -1, 1)
    np.testing.assert_allclose(np.asarray(out)[0], expected, rtol=1e-5)
    np.testing.assert_allclose(times_seen, np.arange(steps) / steps)


def test_sparse_reward_relabel():
    dataset = {
        "observations": np.zeros((3, 2), np.float32),
        "actions": np.array([[2.0], [-1.0], [0.5]], np.float32),
        "rewards": np.array([-3.0, -1.0, 0.0], np.float32),
        "masks": np.array([1.0, 1.0, 0.0], np.float32),
        "terminals": np.array([0.0, 0.0, 1.0], np.float32),
        "next_observations": np.zeros((3, 2), np.float32),
    }
    buffer = qc_fql.make_replay_buffer(dataset, 5, sparse=True)
    np.testing.assert_array_equal(np.asarray(buffer["rewards"]), [-1, -1, 0, 0, 0])
    assert float(buffer["actions"][0, 0]) < 1.0  # data actions clipped inside the bounds
    dense = qc_fql.make_replay_buffer(dataset, 5, sparse=False)
    np.testing.assert_array_equal(np.asarray(dense["rewards"]), [-3, -1, 0, 0, 0])


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("horizon", [5, pytest.param(1, marks=pytest.mark.long)])  # FQL: the same script
def test_end_to_end(tmp_path, dataset_dir, horizon):
    flags = [
        "--env-name", ENV_NAME, "--dataset-dir", dataset_dir, "--horizon-length", str(horizon),
        "--offline-steps", "30", "--online-steps", "30", "--eval-every", "30", "--eval-episodes", "1",
        "--batch-size", "16", "--log-every", "10", "--max-episode-steps", "20", "--online-learning-starts", "5",
        "--save-model",
    ]  # fmt: skip
    result = run_script(tmp_path, *flags, log_compiles=True)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir, rows = read_metrics(tmp_path)
    by_key = {}
    for row in rows:
        by_key.setdefault(row["key"], []).append((int(row["global_step"]), float(row["value"])))
    assert [step for step, _ in by_key["eval/success"]] == [30, 60]  # end of the offline and of the online phase
    assert all(0.0 <= value <= 1.0 for _, value in by_key["eval/success"])
    assert [step for step, _ in by_key["eval/episodic_return"]] == [30, 60]
    assert [step for step, _ in by_key["charts/updates_per_s"]] == [10, 20, 30]
    assert [step for step, _ in by_key["charts/SPS"]] == [40, 50, 60]
    assert [step for step, _ in by_key["charts/episodic_return"]] == [50]  # 20-step episodes: one ends online
    assert by_key["charts/episodic_return"][0][1] <= 0  # cube rewards are -#unsolved cubes
    for key in ("losses/qf_loss", "losses/actor_loss", "losses/bc_flow_loss", "losses/distill_loss", "losses/q_loss"):
        assert [step for step, _ in by_key[key]] == [10, 20, 30, 40, 50, 60], key
        assert all(np.isfinite(value) for _, value in by_key[key]), key
    assert os.path.isfile(os.path.join(run_dir, "args.json"))
    assert os.path.getsize(os.path.join(run_dir, "qc_fql.flax")) > 1000
    # every update function compiles once, however many blocks/steps ran
    # a set of messages: jax 0.6 (Python 3.10) prints each log line twice once a root logging handler exists
    compilations = {
        line.split("Finished XLA compilation of ", 1)[1]
        for line in result.stderr.splitlines()
        if "Finished XLA compilation of " in line
    }
    for name in ("offline_updates", "online_step", "online_collect", "sample_chunks"):
        assert sum(message.startswith(f"jit({name}) ") for message in compilations) == 1, name


# ---------------------------------------------------------------------------------------------------- errors


def write_bad_dataset(directory, kind):
    path = os.path.join(directory, f"{DATASET_NAME}.npz")
    if kind == "corrupt":
        with open(path, "wb") as f:
            f.write(b"this is not an npz file")
    elif kind == "wrong_shape":
        n = 20
        terminals = np.zeros(n, bool)
        terminals[-1] = True
        np.savez(
            path,
            observations=np.zeros((n, 7), np.float32),
            actions=np.zeros((n, 5), np.float32),
            terminals=terminals,
            qpos=np.zeros((n, 35), np.float32),
            qvel=np.zeros((n, 32), np.float32),
        )
    return path


@pytest.mark.parametrize("kind", ["missing", "corrupt", "wrong_shape"])
def test_bad_dataset_is_one_line_error(tmp_path, kind):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = write_bad_dataset(str(data_dir), kind) if kind != "missing" else str(data_dir / f"{DATASET_NAME}.npz")
    result = run_script(tmp_path, "--env-name", ENV_NAME, "--dataset-dir", str(data_dir), "--offline-steps", "1")
    assert result.returncode == 1
    error_lines = result.stderr.splitlines()
    assert len(error_lines) == 1 and error_lines[0].startswith("error: "), result.stderr
    assert path in error_lines[0]
    assert (
        f"python offline_to_online/make_dataset.py --env-name {DATASET_NAME} --dataset-dir {data_dir}" in error_lines[0]
    )
    assert not os.path.exists(tmp_path / "runs")
