"""The flow policy's math (each flow script's header) against independent NumPy computations, for every flow script."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FLOW_SCRIPTS, load_script

pytestmark = pytest.mark.parametrize("script", FLOW_SCRIPTS)

OBS_DIM, ACTION_DIM, BATCH, FLOW_STEPS = 5, 3, 7, 4
SIGMA_MAX = math.sqrt(2)  # the math tests' bound: σ reaches up to the largest stable value


def make_policy(module, noise_std: float, sigma_max: float = SIGMA_MAX):
    args = module.Args(flow_steps=FLOW_STEPS, noise_std=noise_std, sigma_max=sigma_max)
    policy = module.make_agent(args, ACTION_DIM, np.ones(ACTION_DIM), np.zeros(ACTION_DIM)).policy
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(BATCH, OBS_DIM)).astype(np.float32) * 3
    initial_noise = rng.normal(size=(BATCH, ACTION_DIM)).astype(np.float32)
    step_noise = rng.normal(size=(FLOW_STEPS, BATCH, ACTION_DIM)).astype(np.float32)
    variables = policy.init(jax.random.PRNGKey(1), obs, initial_noise, step_noise, train=False)
    # Non-trivial running statistics, so the state normalisation is part of what is checked.
    stats = variables["batch_stats"]["state_norm"]
    stats["mean"] = jnp.asarray(rng.normal(size=OBS_DIM), jnp.float32)
    stats["var"] = jnp.asarray(rng.uniform(0.5, 2.0, size=OBS_DIM), jnp.float32)
    if noise_std == 0:  # a learned σ that differs between states and dimensions (it starts constant)
        head = variables["params"]["log_sigma_out"]
        head["kernel"] = jnp.asarray(rng.normal(size=head["kernel"].shape) * 0.3, jnp.float32)
    return module, policy, variables, obs, initial_noise, step_noise


def normalised_state_np(module, variables, obs):
    stats = variables["batch_stats"]["state_norm"]
    params = variables["params"]["state_norm"]
    std = np.sqrt(np.asarray(stats["var"]) + module.BatchRenorm.epsilon)
    return (obs - np.asarray(stats["mean"])) / std * np.asarray(params["scale"]) + np.asarray(params["bias"])


def sigma_np(module, variables, state, noise_std):
    if noise_std > 0:
        return np.full((BATCH, ACTION_DIM), noise_std)
    p = variables["params"]
    hidden = np.maximum(
        state @ np.asarray(p["log_sigma_hidden"]["kernel"]) + np.asarray(p["log_sigma_hidden"]["bias"]), 0
    )
    raw = np.tanh(hidden @ np.asarray(p["log_sigma_out"]["kernel"]) + np.asarray(p["log_sigma_out"]["bias"]))
    return np.exp(module.LOG_SIGMA_MIN + 0.5 * (math.log(SIGMA_MAX) - module.LOG_SIGMA_MIN) * (raw + 1))


def log_normal_np(x, mean, std):
    return np.sum(-((x - mean) ** 2) / (2 * std**2) - np.log(std) - 0.5 * np.log(2 * np.pi), axis=-1)


def velocity_at(policy, state, action, t):
    """One evaluation of v_θ(s, A, t) on normalised states, t shared by the batch: the state's context and φ(t)
    computed for this step alone (the rollout computes them once for all K steps)."""
    time_features = policy.time_embedding(jnp.full((action.shape[0], 1), t, jnp.float32))
    return policy.velocity(state, action, time_features)


@pytest.mark.parametrize("noise_std", [0.0, 0.1])
def test_path_log_probability_matches_numpy(script, noise_std):
    """log π of the stored path = log N(A_0) + Σ_k log N(A_{k+1}; A_k + Δt b_k, σ²Δt), with the header's b_k."""
    module, policy, variables, obs, initial_noise, step_noise = make_policy(load_script(script), noise_std)
    path, sigma, log_prob = policy.apply(variables, obs, initial_noise, step_noise, train=False)
    path, sigma, log_prob = np.asarray(path, np.float64), np.asarray(sigma, np.float64), np.asarray(log_prob)

    state = normalised_state_np(module, variables, obs)
    np.testing.assert_allclose(sigma, sigma_np(module, variables, state, noise_std), rtol=1e-5)
    dt = 1.0 / FLOW_STEPS
    expected = log_normal_np(path[0], 0.0, 1.0)
    np.testing.assert_allclose(path[0], initial_noise, rtol=1e-6)
    for k in range(FLOW_STEPS):
        t = k * dt
        velocity = np.asarray(
            policy.apply(
                variables, jnp.asarray(state, jnp.float32), jnp.asarray(path[k], jnp.float32), t, method=velocity_at
            )
        )
        drift = (1 + t * sigma**2 / (2 * (1 - t))) * velocity - sigma**2 / (2 * (1 - t)) * path[k]
        mean = path[k] + dt * drift
        # The stored path follows the Euler-Maruyama step of the compensated drift ...
        np.testing.assert_allclose(path[k + 1], mean + sigma * np.sqrt(dt) * step_noise[k], rtol=1e-4, atol=1e-5)
        # ... and its log-density is the Gaussian transition density evaluated at the stored A_{k+1}.
        expected = expected + log_normal_np(path[k + 1], mean, sigma * np.sqrt(dt))
    # Recomputing A_{k+1} − mean from float32 paths loses digits when σ√Δt is small; a dropped term costs units.
    np.testing.assert_allclose(log_prob, expected, rtol=1e-3, atol=1e-2)


def test_fixed_sigma_step_terms_include_log_sigma_and_dt(script):
    """With σ fixed, each step contributes −½‖ε_k‖² − d·log(σ√Δt) − (d/2)·log 2π: nothing dropped."""
    sigma = 0.1
    _, policy, variables, obs, initial_noise, step_noise = make_policy(load_script(script), sigma)
    _, _, log_prob = policy.apply(variables, obs, initial_noise, step_noise, train=False)
    d, dt = ACTION_DIM, 1.0 / FLOW_STEPS
    per_step = [
        -0.5 * np.sum(step_noise[k].astype(np.float64) ** 2, axis=-1)
        - d * math.log(sigma * math.sqrt(dt))
        - d / 2 * math.log(2 * math.pi)
        for k in range(FLOW_STEPS)
    ]
    initial = -0.5 * np.sum(initial_noise.astype(np.float64) ** 2, axis=-1) - d / 2 * math.log(2 * math.pi)
    np.testing.assert_allclose(np.asarray(log_prob), initial + np.sum(per_step, axis=0), rtol=1e-5)


def test_tanh_squash_and_correction(script):
    module = load_script(script)
    rng = np.random.default_rng(2)
    pre_tanh = rng.normal(size=(BATCH, ACTION_DIM)) * 2
    scale, bias = np.array([0.4, 1.0, 2.0]), np.array([0.0, 0.5, -1.0])
    action, log_det = module.squash(
        jnp.asarray(pre_tanh, jnp.float32), jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)
    )
    np.testing.assert_allclose(np.asarray(action), scale * np.tanh(pre_tanh) + bias, rtol=1e-5, atol=1e-6)
    expected = np.sum(np.log(scale * (1 - np.tanh(pre_tanh) ** 2) + 1e-6), axis=-1)
    np.testing.assert_allclose(np.asarray(log_det), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sigma_max", [SIGMA_MAX, 0.5])
def test_learned_sigma_starts_small_stays_in_bounds_and_depends_on_state(script, sigma_max):
    module, policy, variables, obs, initial_noise, step_noise = make_policy(load_script(script), 0.0, sigma_max)
    fresh = policy.init(jax.random.PRNGKey(5), obs, initial_noise, step_noise, train=False)
    _, sigma, _ = policy.apply(fresh, obs, initial_noise, step_noise, train=False)
    # The middle of [e^-5, sigma_max] in log space: e^-2.33 ≈ 0.098 for √2.
    np.testing.assert_allclose(np.asarray(sigma), math.exp((-5 + math.log(sigma_max)) / 2), rtol=1e-5)
    # Large output weights, as training may reach: σ varies with s and saturates at both bounds.
    head = variables["params"]["log_sigma_out"]
    head["kernel"] = jnp.asarray(np.random.default_rng(4).normal(size=head["kernel"].shape) * 50, jnp.float32)
    _, sigma, _ = policy.apply(variables, obs, initial_noise, step_noise, train=False)
    sigma = np.asarray(sigma)
    assert np.all(sigma >= math.exp(module.LOG_SIGMA_MIN) * (1 - 1e-5))
    assert np.all(sigma <= sigma_max * (1 + 1e-5))
    assert np.max(sigma) > sigma_max * 0.99  # the bound is reached, so it is the one given
    assert np.std(sigma[:, 0]) > 0  # a head on s, not a constant


@pytest.mark.parametrize("flow_steps", [1, 2, 4, 10, 50])
def test_default_sigma_bound_adds_no_entropy_per_step_and_keeps_steps_contracting(script, flow_steps):
    """At the default bound one noise step N(0, σ²Δt) has entropy 0 (numerical integration of −p log p), so the
    largest path entropy is the N(0, I) start's plus log scale, c + log scale_j per dimension, whatever K is; past
    K = 4πe ≈ 34 the bound is √2 instead, and a step's entropy is below 0. With v = 0 a compensated step is
    A_{k+1} = (1 − Δt σ²/(2(1 − t_k))) A_k (+ noise): at the bound the factor stays in [0, 1] at every step, so no
    step amplifies or flips A."""
    module = load_script(script)
    sigma = module.sigma_bound(module.Args(flow_steps=flow_steps))
    dt = 1.0 / flow_steps
    step_std = sigma * math.sqrt(dt)
    x = np.linspace(-12 * step_std, 12 * step_std, 200_001)
    density = np.exp(-0.5 * (x / step_std) ** 2) / (step_std * np.sqrt(2 * np.pi))
    step_entropy = -np.sum(density * np.log(density)) * (x[1] - x[0])
    if flow_steps <= 34:
        np.testing.assert_allclose(step_entropy, 0.0, atol=1e-6)
        scale = np.array([0.4, 1.0, 2.0])
        start_entropy = 0.5 * math.log(2 * math.pi) + 0.5  # E[−log N(x; 0, 1)] = ½ log 2π + ½ E[x²]
        np.testing.assert_allclose(
            module.max_path_entropy(scale, flow_steps, sigma), np.sum(start_entropy + np.log(scale)), atol=1e-9
        )
    else:
        assert sigma == pytest.approx(math.sqrt(2)) and step_entropy < 0  # the cap is the tighter bound
    factors = [1 - dt * sigma**2 / (2 * (1 - k * dt)) for k in range(flow_steps)]
    assert min(factors) >= -1e-6 and max(factors) <= 1.0


def test_largest_path_entropy_matches_monte_carlo(script):
    """max_path_entropy(scale, K, σ) = E[−log π] of a path with constant σ and A_K at 0 (no tanh saturation):
    the policy's own Gaussian log-density averaged over many sampled paths, plus Σ_j log scale_j."""
    module = load_script(script)
    sigma, scale = SIGMA_MAX, np.array([0.4, 1.0, 2.0])
    args = module.Args(flow_steps=FLOW_STEPS, noise_std=sigma)
    policy = module.make_agent(args, ACTION_DIM, np.ones(ACTION_DIM), np.zeros(ACTION_DIM)).policy
    rng = np.random.default_rng(3)
    batch = 20_000
    obs = rng.normal(size=(batch, OBS_DIM)).astype(np.float32)
    initial_noise = rng.normal(size=(batch, ACTION_DIM)).astype(np.float32)
    step_noise = rng.normal(size=(FLOW_STEPS, batch, ACTION_DIM)).astype(np.float32)
    variables = policy.init(jax.random.PRNGKey(0), obs[:1], initial_noise[:1], step_noise[:, :1], train=False)
    _, _, gaussian_log_prob = policy.apply(variables, obs, initial_noise, step_noise, train=False)
    monte_carlo = -float(np.mean(np.asarray(gaussian_log_prob, np.float64))) + float(np.sum(np.log(scale)))
    np.testing.assert_allclose(module.max_path_entropy(scale, FLOW_STEPS, sigma), monte_carlo, atol=0.05)
