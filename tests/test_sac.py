"""Tests of from_scratch/sac.py (Gaussian SAC, the baseline): the policy's log-probability with its tanh
correction and its deterministic action against a NumPy forward pass written by hand; an end-to-end run.
(BatchRenorm, the replay buffer, the TD target, α and the compile count are in test_sac_core.py.)"""

import csv
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FROM_SCRATCH, load_script, run_script

SCRIPT = FROM_SCRATCH / "sac.py"
OBS_DIM, ACTION_DIM, BATCH = 5, 3, 16
ACTION_SCALE = np.array([0.4, 1.0, 2.0], np.float32)
ACTION_BIAS = np.array([0.0, 0.5, -1.0], np.float32)

sac = load_script("sac")


def make_policy(log_std_gain: float):
    """A small policy with non-trivial running statistics; `log_std_gain` scales the log σ head's weights."""
    args = sac.Args(actor_hidden=32)
    policy = sac.make_agent(args, ACTION_DIM, ACTION_SCALE, ACTION_BIAS).policy
    rng = np.random.default_rng(0)
    obs = (rng.normal(size=(BATCH, OBS_DIM)) * 3).astype(np.float32)
    noise = rng.normal(size=(BATCH, ACTION_DIM)).astype(np.float32)
    variables = policy.init(jax.random.PRNGKey(1), obs, noise, train=False)
    stats = variables["batch_stats"]["state_norm"]
    stats["mean"] = jnp.asarray(rng.normal(size=OBS_DIM), jnp.float32)
    stats["var"] = jnp.asarray(rng.uniform(0.5, 2.0, size=OBS_DIM), jnp.float32)
    variables["params"]["log_std"]["kernel"] = variables["params"]["log_std"]["kernel"] * log_std_gain
    return args, policy, variables, obs, noise


def mean_and_std_np(variables, obs):
    """μ(s), σ(s) by hand: BatchRenorm (inference) → 2 × (Dense, ReLU) → mean / squashed log σ heads."""
    p = {name: {k: np.asarray(v, np.float64) for k, v in layer.items()} for name, layer in variables["params"].items()}
    stats = {k: np.asarray(v, np.float64) for k, v in variables["batch_stats"]["state_norm"].items() if k != "steps"}
    x = (obs - stats["mean"]) / np.sqrt(stats["var"] + 1e-3) * p["state_norm"]["scale"] + p["state_norm"]["bias"]
    for layer in ("hidden_0", "hidden_1"):
        x = np.maximum(x @ p[layer]["kernel"] + p[layer]["bias"], 0.0)
    mean = x @ p["mean"]["kernel"] + p["mean"]["bias"]
    log_std = -5.0 + 3.5 * (np.tanh(x @ p["log_std"]["kernel"] + p["log_std"]["bias"]) + 1.0)
    return mean, np.exp(log_std)


def test_log_probability_with_tanh_correction_matches_numpy():
    """log π(a|s) = Σ log N(u; μ, σ²) − Σ log(scale(1 − tanh(u)²) + 1e-6), u = μ + σ ε, a = scale tanh(u) + bias."""
    _, policy, variables, obs, noise = make_policy(log_std_gain=0.3)
    pre_tanh, gaussian_log_prob = policy.apply(variables, obs, noise, train=False)
    action, log_det = sac.squash(pre_tanh, jnp.asarray(ACTION_SCALE), jnp.asarray(ACTION_BIAS))
    log_prob = np.asarray(gaussian_log_prob - log_det)

    mean, std = mean_and_std_np(variables, obs.astype(np.float64))
    u = mean + std * noise
    # Away from tanh saturation, where float32 cannot resolve 1 − tanh(u)², yet with a varied σ and curvature.
    assert np.abs(u).max() < 4 and np.abs(u).max() > 1 and std.max() / std.min() > 3
    np.testing.assert_allclose(np.asarray(pre_tanh), u, rtol=1e-4, atol=1e-4)
    density = np.exp(-((u - mean) ** 2) / (2 * std**2)) / (std * np.sqrt(2 * np.pi))
    jacobian = ACTION_SCALE * (1 - np.tanh(u) ** 2) + 1e-6
    expected = np.sum(np.log(density), axis=-1) - np.sum(np.log(jacobian), axis=-1)
    np.testing.assert_allclose(log_prob, expected, rtol=1e-4, atol=2e-3)
    np.testing.assert_allclose(np.asarray(action), ACTION_SCALE * np.tanh(u) + ACTION_BIAS, rtol=1e-5, atol=1e-5)


def test_std_stays_in_bounds():
    """log σ is squashed into [−5, 2] even for large pre-activations, and σ depends on the state."""
    _, policy, variables, obs, noise = make_policy(log_std_gain=30.0)
    pre_tanh, _ = policy.apply(variables, obs, np.zeros_like(noise), train=False)
    pre_tanh_one, _ = policy.apply(variables, obs, np.ones_like(noise), train=False)
    std = np.asarray(pre_tanh_one - pre_tanh, np.float64)  # u(ε = 1) − u(ε = 0) = σ
    np.testing.assert_allclose(std, mean_and_std_np(variables, obs.astype(np.float64))[1], rtol=1e-4, atol=1e-6)
    assert std.min() < math.exp(-4.5) and std.max() > math.exp(1.5)  # both ends of the range are reached ...
    assert std.min() >= math.exp(-5.0) * (1 - 1e-4) and std.max() <= math.exp(2.0) * (1 + 1e-4)  # ... not passed


def test_deterministic_action_is_squashed_mean():
    """Evaluation acts with a = scale · tanh(μ(s)) + bias, whatever key it is given."""
    args, _, variables, obs, _ = make_policy(log_std_gain=1.0)
    evaluation_action = sac.jit_train_functions(
        sac.make_agent(args, ACTION_DIM, ACTION_SCALE, ACTION_BIAS)
    ).evaluation_action
    mean, _ = mean_and_std_np(variables, obs.astype(np.float64))
    for i in range(4):
        got = evaluation_action(
            variables["params"], variables["batch_stats"], jnp.asarray(obs[i]), jax.random.PRNGKey(i)
        )
        np.testing.assert_allclose(np.asarray(got), ACTION_SCALE * np.tanh(mean[i]) + ACTION_BIAS, rtol=1e-5, atol=1e-5)


def metrics_of_one_actor_update(args, mean_bias: np.ndarray) -> dict:
    """The metrics of the jitted train step (one actor update) for a policy with μ = mean_bias, σ = e⁻⁵ (log σ's
    bias at −10 saturates its squash) and action scale 100, whatever the state."""
    rng = np.random.default_rng(0)
    obs, next_obs = jnp.asarray(rng.normal(size=(2, OBS_DIM)), jnp.float32)
    action = jnp.asarray(rng.uniform(-1, 1, size=ACTION_DIM), jnp.float32)
    action_scale = np.full(ACTION_DIM, 100.0, np.float32)
    agent = sac.make_agent(args, ACTION_DIM, action_scale, np.zeros(ACTION_DIM, np.float32))
    state = sac.create_state(agent, jax.random.PRNGKey(0), OBS_DIM)
    params = dict(state.policy.params)
    params["mean"] = {"kernel": jnp.zeros_like(params["mean"]["kernel"]), "bias": jnp.asarray(mean_bias, jnp.float32)}
    params["log_std"] = {"kernel": jnp.zeros_like(params["log_std"]["kernel"]), "bias": jnp.full(ACTION_DIM, -10.0)}
    state = state.replace(policy=state.policy.replace(params=params))
    train_step = sac.jit_train_functions(agent).train_step
    transition = (obs, action, jnp.float32(1), next_obs, jnp.float32(0), jnp.bool_(False), next_obs)
    one_seed = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], transition)  # a seed axis of 1
    _, (_, metrics, _) = train_step([state], *one_seed)
    return {key: float(value[0]) for key, value in metrics.items()}


def test_train_step_entropy_and_default_target_entropy():
    """Through the jitted train step (one actor update): with μ = 0, σ = e⁻⁵ and scale 100, u ≈ 0 and
    log π ≈ Σ_j (−ε_j²/2 + 5 − ½ log 2π) − d log 100, so the reported entropy −mean log π ≈ d (log 100 − 5 + ½ log 2π
    + ½): the tanh correction is in the loss the actor sees. L_α = −log α · (mean log π + H_target) then gives back
    H_target, which must be −action_dim by default (the flow scripts use 0)."""
    args = sac.Args(critic_hidden=16, actor_hidden=16, batch_size=64, buffer_size=64, learning_starts=4, policy_delay=1)
    assert args.target_entropy is None
    metrics = metrics_of_one_actor_update(args, np.zeros(ACTION_DIM))
    entropy = metrics["losses/entropy"]
    expected_entropy = ACTION_DIM * (math.log(100.0) - 5.0 + 0.5 * math.log(2 * math.pi) + 0.5)
    assert abs(entropy - expected_entropy) < 1.0, (entropy, expected_entropy)  # sampling spread of ε²: ~0.15
    target_entropy = -metrics["losses/alpha_loss"] / math.log(args.alpha) + entropy
    assert math.isclose(target_entropy, -ACTION_DIM, abs_tol=1e-3), target_entropy
    assert metrics["policy/tanh_saturation"] == 0.0


def test_tanh_saturation_is_the_share_of_action_entries_beyond_tanh_2():
    """With σ = e⁻⁵, u = μ: entries with |μ| = 2.05 count as saturated (|tanh u| > tanh 2), those with 1.95 do not."""
    args = sac.Args(critic_hidden=16, actor_hidden=16, batch_size=64, buffer_size=64, learning_starts=4, policy_delay=1)
    metrics = metrics_of_one_actor_update(args, np.array([2.05, -1.95, -2.05]))
    assert math.isclose(metrics["policy/tanh_saturation"], 2 / 3, rel_tol=1e-6)


@pytest.mark.long  # tests/test_from_scratch_cli.py runs sac.py end to end in the quick suite
def test_end_to_end_run_logs_losses_returns_and_evaluation(tmp_path):
    flags = [
        "--env-id", "Hopper-v4", "--total-timesteps", "400", "--learning-starts", "200", "--batch-size", "32",
        "--eval-every", "400", "--eval-episodes", "1", "--log-every", "100",
    ]  # fmt: skip
    result = run_script(SCRIPT, *flags, cwd=tmp_path, env={"JAX_LOG_COMPILES": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("train_step", "add_transition", "evaluation_action"):  # no retracing after the first call
        assert result.stderr.count(f"Finished XLA compilation of jit({name})") == 1, name
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("Hopper-v4__sac__1__")
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    by_key = {}
    for row in rows:
        by_key.setdefault(row["key"], []).append((int(row["global_step"]), float(row["value"])))
    for key in ("losses/qf_loss", "losses/actor_loss", "losses/alpha", "losses/entropy"):
        assert [step for step, _ in by_key[key]] == [200, 300, 400], key  # logged once learning has started
        assert all(np.isfinite(value) for _, value in by_key[key]), key
    assert len(by_key["charts/episodic_return"]) >= 1  # random Hopper episodes last ~20-60 steps
    assert all(np.isfinite(value) and value != 0 for _, value in by_key["charts/episodic_return"])
    assert [step for step, _ in by_key["eval/episodic_return"]] == [400]
    assert (run_dir / "args.json").is_file()
