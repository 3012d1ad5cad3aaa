"""Tests of the offline-to-online SAC Flow scripts (offline_to_online/sac_flow_{naive,gru,transformer}.py): the chunk
log-probability against NumPy from the stored path, the action regularisation on a hand-set batch, the alpha update,
end-to-end runs (metrics, compile counts) and the one-line errors."""

import csv
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FLOW_SCRIPTS, OFFLINE_TO_ONLINE, load_script

SCRIPTS = FLOW_SCRIPTS
ENV_NAME = "cube-triple-play-singletask-task4-v0"
DATASET_NAME = "cube-triple-play-v0"
OBS_DIM, ACTION_DIM, HORIZON, BATCH, FLOW_STEPS = 5, 3, 2, 7, 4
CHUNK_DIM = HORIZON * ACTION_DIM


def load(script: str):
    return load_script(script, OFFLINE_TO_ONLINE)


def small_args(module, **overrides):
    """Args with small networks (the velocity flags differ between the scripts)."""
    if "d_model" in module.Args.__dataclass_fields__:
        velocity = {"d_model": 16, "n_heads": 2, "n_layers": 1}
    else:
        velocity = {"velocity_hidden": 32}
    return module.Args(horizon_length=HORIZON, batch_size=BATCH, critic_hidden_dims=(32, 32), **velocity, **overrides)


# ---------------------------------------------------------------------------------------------------- policy math


def layer_norm_np(x, scale, bias):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * scale + bias


def make_policy(module, noise_std: float):
    agent, state = module.make_agent(module.Args(horizon_length=HORIZON, noise_std=noise_std), OBS_DIM, ACTION_DIM)
    rng = np.random.default_rng(0)
    variables = state.params["policy"]
    # A non-trivial LayerNorm, so the state normalisation is part of what is checked, and a sigma head whose
    # (zero-initialised) last kernel makes sigma depend on the state.
    variables["params"]["state_norm"] = {
        "scale": jnp.asarray(rng.uniform(0.5, 2.0, OBS_DIM), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=OBS_DIM), jnp.float32),
    }
    if noise_std == 0:
        sigma_out = variables["params"]["log_sigma_out"]
        sigma_out["kernel"] = jnp.asarray(0.01 * rng.normal(size=sigma_out["kernel"].shape), jnp.float32)
    obs = (rng.normal(size=(BATCH, OBS_DIM)) * 3 + 1).astype(np.float32)
    initial_noise = rng.normal(size=(BATCH, CHUNK_DIM)).astype(np.float32)
    step_noise = rng.normal(size=(FLOW_STEPS, BATCH, CHUNK_DIM)).astype(np.float32)
    return agent, variables, obs, initial_noise, step_noise


def log_normal_np(x, mean, std):
    return np.sum(-((x - mean) ** 2) / (2 * std**2) - np.log(std) - 0.5 * np.log(2 * np.pi), axis=-1)


@pytest.mark.parametrize("script", SCRIPTS)
def test_chunk_log_probability_matches_numpy(script):
    """log pi(chunk) = log N(A_0) + sum_k log N(A_{k+1}; A_k + dt b_k, sigma^2 dt) - sum_j log(1 - tanh(A_K)_j^2 + eps),
    recomputed in NumPy from the stored path, with sigma and the velocity's state input from a NumPy LayerNorm."""
    module = load(script)
    agent, variables, obs, initial_noise, step_noise = make_policy(module, 0.0)
    path, sigma, _ = agent.policy.apply(variables, obs, initial_noise, step_noise)
    chunks, log_prob = module.rollout(agent, variables, obs, initial_noise, step_noise)
    path, sigma = np.asarray(path, np.float64), np.asarray(sigma, np.float64)
    p = variables["params"]

    state = layer_norm_np(obs, np.asarray(p["state_norm"]["scale"]), np.asarray(p["state_norm"]["bias"]))
    sigma_hidden = p["log_sigma_hidden"]
    hidden = np.maximum(state @ np.asarray(sigma_hidden["kernel"]) + np.asarray(sigma_hidden["bias"]), 0)
    raw = np.tanh(hidden @ np.asarray(p["log_sigma_out"]["kernel"]) + np.asarray(p["log_sigma_out"]["bias"]))
    expected_sigma = np.exp(module.LOG_SIGMA_MIN + (module.LOG_SIGMA_MAX - module.LOG_SIGMA_MIN) * (raw + 1) / 2)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-5)
    assert np.std(sigma[:, 0]) > 0  # a head on s, not a constant

    dt = 1.0 / FLOW_STEPS
    np.testing.assert_allclose(path[0], initial_noise, rtol=1e-6)
    expected = log_normal_np(path[0], 0.0, 1.0)
    for k in range(FLOW_STEPS):
        t = np.full((BATCH, 1), k * dt, np.float32)
        # The velocity network is a black box here, fed the NumPy-normalised state and the stored A_k.
        time_features = module.TimeEmbedding().apply({"params": p["time_embedding"]}, t)
        velocity = agent.policy.velocity_net.apply(
            {"params": p["velocity_net"]},
            state.astype(np.float32),
            path[k].astype(np.float32),
            time_features,
        )
        velocity = np.asarray(velocity, np.float64)
        from_policy = agent.policy.apply(variables, obs, path[k], t, method="velocity")
        np.testing.assert_allclose(velocity, np.asarray(from_policy), rtol=1e-4, atol=1e-4)
        coefficient = sigma**2 / (2 * (1 - k * dt))
        mean = path[k] + dt * ((1 + k * dt * coefficient) * velocity - coefficient * path[k])
        np.testing.assert_allclose(path[k + 1], mean + sigma * np.sqrt(dt) * step_noise[k], rtol=1e-4, atol=1e-4)
        expected = expected + log_normal_np(path[k + 1], mean, sigma * np.sqrt(dt))
    final = np.tanh(path[-1])
    expected = expected - np.sum(np.log(1 - final**2 + 1e-6), axis=-1)
    np.testing.assert_allclose(np.asarray(chunks), final, rtol=1e-5, atol=1e-6)
    assert np.abs(path[-1]).max() < 5  # away from tanh saturation, where float32 rounding of tanh^2 dominates
    np.testing.assert_allclose(np.asarray(log_prob), expected, rtol=1e-4, atol=5e-3)


@pytest.mark.parametrize("script", SCRIPTS)
def test_fixed_sigma_path_entropy(script):
    """With sigma fixed, each step adds -|eps_k|^2/2 - D log(sigma sqrt(dt)) - (D/2) log 2 pi (nothing dropped), and the
    mean of -(Gaussian part) over many paths is max_path_entropy, the bound the run checks --target-entropy against."""
    module = load(script)
    sigma = 0.3
    agent, variables, obs, initial_noise, step_noise = make_policy(module, sigma)
    _, _, gaussian_part = agent.policy.apply(variables, obs, initial_noise, step_noise)
    dt = 1.0 / FLOW_STEPS
    expected = -0.5 * np.sum(initial_noise.astype(np.float64) ** 2, -1) - CHUNK_DIM / 2 * math.log(2 * math.pi)
    for k in range(FLOW_STEPS):
        expected += (
            -0.5 * np.sum(step_noise[k].astype(np.float64) ** 2, -1)
            - CHUNK_DIM * math.log(sigma * math.sqrt(dt))
            - CHUNK_DIM / 2 * math.log(2 * math.pi)
        )
    np.testing.assert_allclose(np.asarray(gaussian_part), expected, rtol=1e-5)

    rng = np.random.default_rng(1)
    many = 4096
    _, _, gaussian_part = agent.policy.apply(
        variables,
        np.repeat(obs[:1], many, 0),
        rng.normal(size=(many, CHUNK_DIM)).astype(np.float32),
        rng.normal(size=(FLOW_STEPS, many, CHUNK_DIM)).astype(np.float32),
    )
    bound = module.max_path_entropy(CHUNK_DIM, FLOW_STEPS, sigma)
    assert -float(np.mean(gaussian_part)) == pytest.approx(bound, abs=0.3)


def test_action_regularisation_hand_set_batch():
    """beta's term: squared error averaged over (B, h, d), chunk steps after an episode end count as zero."""
    module = load("sac_flow_naive")
    chunks = jnp.array([[0.5, -0.5, 0.0, 1.0], [0.2, 0.2, -0.9, 0.9]], jnp.float32)  # B = 2, h = 2, d = 2
    data = jnp.array([[0.0, -0.5, 0.5, 0.0], [0.0, 0.0, 0.9, -0.9]], jnp.float32)
    valid = jnp.array([[1, 1], [1, 0]], jnp.float32)  # the second chunk's step 1 belongs to another episode
    # valid squared errors: 0.25, 0, 0.25, 1 (chunk 0); 0.04, 0.04 (chunk 0 of the second); divided by 2*2*2
    expected = (0.25 + 0.0 + 0.25 + 1.0 + 0.04 + 0.04) / 8
    assert float(module.action_regularisation(chunks, data, valid)) == pytest.approx(expected, rel=1e-6)
    for script in SCRIPTS:  # the same term in every script
        assert float(load(script).action_regularisation(chunks, data, valid)) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------------- updates


def hand_set_batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    return {
        "observations": jnp.asarray(rng.normal(size=(BATCH, OBS_DIM)), jnp.float32),
        "action_chunks": jnp.asarray(rng.uniform(-0.9, 0.9, size=(BATCH, CHUNK_DIM)), jnp.float32),
        "rewards": jnp.asarray(-rng.integers(0, 3, size=(BATCH, HORIZON)), jnp.float32),
        "masks": jnp.ones((BATCH, HORIZON), jnp.float32),
        "terminals": jnp.zeros((BATCH, HORIZON), jnp.float32),
        "next_observations": jnp.asarray(rng.normal(size=(BATCH, OBS_DIM)), jnp.float32),
    }


def test_alpha_loss_sign():
    """d L_alpha / d log alpha = -(mean log pi + H_target): negative (alpha rises) while the entropy is below target."""
    for script in SCRIPTS:
        module = load(script)
        log_prob = jnp.array([10.0, 14.0])  # entropy -12
        grad_below = jax.grad(module.alpha_loss)(jnp.float32(0.0), log_prob, 0.0)  # entropy below target 0
        grad_above = jax.grad(module.alpha_loss)(jnp.float32(0.0), log_prob, -20.0)  # entropy above target -20
        assert float(grad_below) == pytest.approx(-12.0) and float(grad_above) == pytest.approx(8.0)


ENTROPY_TARGET, BETA = 50.0, 1000.0


@pytest.fixture(scope="module", params=SCRIPTS)
def sac_setup(request):
    """A small agent of each script with H_target far above its entropy and a tiny alpha (so the entropy term does
    not fight the regularisation), one hand-set batch, and its SAC update jitted once with beta = 1000."""
    module = load(request.param)
    args = small_args(module, init_alpha=1e-3, target_entropy=ENTROPY_TARGET, learning_rate=3e-3)
    agent, state = module.make_agent(args, OBS_DIM, ACTION_DIM)
    batch = hand_set_batch()
    update = jax.jit(lambda state, key: module.sac_update(agent, state, batch, key, BETA))
    return module, agent, state, batch, update


def test_alpha_rises_when_entropy_is_below_target(sac_setup):
    """One SAC update with the entropy below H_target raises log alpha (float32 throughout)."""
    _, _, state, _, update = sac_setup
    assert state.log_alpha.dtype == jnp.float32
    new_state, metrics = update(state, jax.random.key(0))
    assert float(metrics["losses/entropy"]) < ENTROPY_TARGET
    assert float(new_state.log_alpha) > float(state.log_alpha) + 1e-5  # Adam's first step: about +learning rate
    assert float(metrics["losses/alpha"]) == pytest.approx(math.exp(float(new_state.log_alpha)))
    assert new_state.log_alpha.dtype == jnp.float32


def test_regularisation_pulls_chunks_towards_data(sac_setup):
    """With beta = 1000, 100 SAC updates on one batch bring the policy's chunks at least halfway to the data chunks
    (the squared error measured over the same 32 noise draws per observation before and after)."""
    module, agent, state, batch, update = sac_setup
    observations = jnp.repeat(batch["observations"], 32, axis=0)
    data_chunks = jnp.repeat(batch["action_chunks"], 32, axis=0)

    @jax.jit
    def squared_error(params):
        chunks, _ = module.sample_chunks(agent, params["policy"], observations, jax.random.key(123))
        return module.action_regularisation(chunks, data_chunks, jnp.ones((len(observations), HORIZON)))

    before = float(squared_error(state.params))
    for step in range(100):
        state, _ = update(state, jax.random.key(step))
    assert float(squared_error(state.params)) < 0.5 * before


# ---------------------------------------------------------------------------------------------------- end to end


def script_env(log_compiles: bool = False) -> dict:
    # LLVM's lowest optimisation level halves compilation, which is most of these short runs.
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_LOG_COMPILES": "1" if log_compiles else "0",
        "XLA_FLAGS": "--xla_backend_optimization_level=0",
    }


@pytest.fixture(scope="module")
def end_to_end_runs(dataset_dir, tmp_path_factory):
    """Starts the three scripts' runs at once (XLA compiles mostly on one thread) and yields {script: (cwd, process)};
    the naive script runs with --interleave-offline-updates, the others with the BC/SAC split. The README's flags
    (h = 5, alpha 100), with 20-step episodes, online learning from step 5 and a smaller critic, so that it is quick."""
    runs = {}
    for script in SCRIPTS:
        cwd = tmp_path_factory.mktemp(script)
        flags = [
            "--env-name", ENV_NAME, "--dataset-dir", dataset_dir, "--horizon-length", "5", "--alpha", "100",
            "--offline-steps", "30", "--online-steps", "30", "--eval-every", "30", "--eval-episodes", "1",
            "--batch-size", "16", "--log-every", "15", "--max-episode-steps", "20", "--online-learning-starts", "5",
            "--save-model", "--critic-hidden-dims", "64", "64",
        ]  # fmt: skip
        if script == "sac_flow_naive":
            flags.append("--interleave-offline-updates")
        if script == "sac_flow_transformer":
            flags += ["--n-layers", "1"]  # fewer operations to compile; the unit tests use the default 2 layers
        with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:
            process = subprocess.Popen(
                [sys.executable, str(OFFLINE_TO_ONLINE / f"{script}.py"), *flags],
                cwd=cwd,
                env=script_env(log_compiles=True),
                stdout=out,
                stderr=err,
            )
        runs[script] = (cwd, process)
    yield runs
    for _, process in runs.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("script", SCRIPTS)
def test_end_to_end(end_to_end_runs, script):
    cwd, process = end_to_end_runs[script]
    returncode = process.wait(timeout=900)
    stderr = (cwd / "stderr.txt").read_text()
    assert returncode == 0, stderr[-3000:]
    (run_name,) = os.listdir(cwd / "runs")
    run_dir = cwd / "runs" / run_name
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    by_key = {}
    for row in rows:
        by_key.setdefault(row["key"], []).append((int(row["global_step"]), float(row["value"])))
    assert [step for step, _ in by_key["eval/success"]] == [30, 60]  # end of the offline and of the online phase
    assert all(0.0 <= value <= 1.0 for _, value in by_key["eval/success"])
    assert [step for step, _ in by_key["eval/episodic_return"]] == [30, 60]
    assert [step for step, _ in by_key["charts/episodic_return"]] == [50]  # 20-step episodes: one ends online
    for key in ("losses/alpha", "losses/entropy", "losses/qf_loss"):
        assert [step for step, _ in by_key[key]] == [15, 30, 45, 60], key
        assert all(np.isfinite(value) for _, value in by_key[key]), key
    assert all(value > 0 for _, value in by_key["losses/alpha"])
    interleaved = script == "sac_flow_naive"
    # BC alone for the first half of the offline steps, then SAC (or both on every step when interleaved).
    assert [step for step, _ in by_key["losses/bc_loss"]] == ([15, 30] if interleaved else [15])
    assert [step for step, _ in by_key["losses/actor_reg_loss"]] == ([15, 30, 45, 60] if interleaved else [30, 45, 60])
    assert os.path.isfile(run_dir / "args.json")
    assert os.path.getsize(run_dir / f"{script}.flax") > 1000
    # Every jitted function compiles once per kind of block, however many blocks/steps ran.
    compiles = {
        "offline_updates": 1 if interleaved else 2,  # interleaved, or a BC and a SAC phase
        "online_step": 1,
        "online_collect": 1,
        "acting_chunks": 1,
        "evaluation_chunks": 1,
    }
    for name, count in compiles.items():
        assert stderr.count(f"Finished XLA compilation of jit({name})") == count, name


def run_script(script, cwd, *flags):
    return subprocess.run(
        [sys.executable, str(OFFLINE_TO_ONLINE / f"{script}.py"), *flags],
        cwd=cwd,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("kind", ["missing", "corrupt"])
def test_bad_dataset_is_one_line_error(tmp_path, kind):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = data_dir / f"{DATASET_NAME}.npz"
    if kind == "corrupt":
        path.write_bytes(b"this is not an npz file")
    result = run_script("sac_flow_transformer", tmp_path, "--env-name", ENV_NAME, "--dataset-dir", str(data_dir))
    make_it = f"python offline_to_online/make_dataset.py --env-name {DATASET_NAME} --dataset-dir {data_dir}"
    assert_one_line_error(result, str(path), make_it)
    assert not os.path.exists(tmp_path / "runs")


def test_unreachable_target_entropy_is_one_line_error(tmp_path, dataset_dir):
    """h*d = 25, K = 4, sigma <= e^2: -log pi <= 25 (c + 4 (c + 2 - log(2))) ~ 308, so 400 cannot be reached."""
    result = run_script("sac_flow_gru", tmp_path, "--dataset-dir", dataset_dir, "--target-entropy", "400")
    assert_one_line_error(result, "target entropy 400.0 (--target-entropy)", "alpha would grow without bound")
    assert not os.path.exists(tmp_path / "runs")
