"""--log-grad-norms of the flow scripts and bench/grad_norms.py: the per-step norms against a NumPy product of
Jacobians on a linear velocity field, the flag leaving training unchanged, and the bench end to end."""

import csv
import json
import math
import os
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro
from conftest import FLOW_SCRIPTS, REPO, load_script, run_script, script_environment

BENCH = REPO / "bench" / "grad_norms.py"


class LinearVelocity(nn.Module):
    """v(s, A, t) = A Wᵀ + c, whatever the state and time: each flow step is then affine in A_k."""

    action_dim: int

    @nn.compact
    def __call__(self, state, action, time_features):
        weight = self.param("weight", nn.initializers.zeros, (self.action_dim, self.action_dim))
        bias = self.param("bias", nn.initializers.zeros, (self.action_dim,))
        return action @ weight.T + bias


class LinearCritic(nn.Module):
    """Q(s, a) = a·w + s·u. The unused statistic gives it the params + batch_stats the scripts' critic code expects."""

    @nn.compact
    def __call__(self, obs, action, train: bool):
        self.variable("batch_stats", "unused", lambda: jnp.zeros((), jnp.float32))
        action_weight = self.param("action_weight", nn.initializers.normal(1.0), (action.shape[-1],))
        obs_weight = self.param("obs_weight", nn.initializers.normal(1.0), (obs.shape[-1],))
        return action @ action_weight + obs @ obs_weight


def numpy_gradient_norms(obs, initial_noise, step_noise, weight, bias, sigma, critic_weights, alpha, scale, shift):
    """Mean over the batch of ‖J_kᵀ J_{k+1}ᵀ … J_{K−1}ᵀ g‖ for every k, g = ∂ℓ/∂A_K, by explicit Jacobian products;
    and the norm of the mean gradient w.r.t. (W, c). Float64, written from the equations, not from the scripts."""
    flow_steps, batch, dim = step_noise.shape
    dt = 1.0 / flow_steps
    path = [initial_noise]
    jacobians, velocity_factors = [], []
    for k in range(flow_steps):
        t = k * dt
        compensation = sigma**2 / (2 * (1 - t))
        a = path[-1]
        drift = (1 + t * compensation) * (a @ weight.T + bias) - compensation * a
        path.append(a + dt * drift + sigma * math.sqrt(dt) * step_noise[k])
        jacobians.append(np.eye(dim) + dt * ((1 + t * compensation) * weight - compensation * np.eye(dim)))
        velocity_factors.append(dt * (1 + t * compensation))  # ∂A_{k+1}/∂v_k

    # ℓ_i = α (Gaussian terms − Σ_j log(scale_j (1 − tanh²) + 1e-6)) − min_m Q_m(s_i, scale tanh(A_K) + shift)
    y = np.tanh(path[-1])
    actions = scale * y + shift
    q = np.stack([actions @ w + obs @ u for w, u in critic_weights])  # (2, batch)
    chosen_action_weight = np.stack([critic_weights[m][0] for m in q.argmin(axis=0)])  # (batch, dim)
    dlogdet = scale * (-2 * y * (1 - y**2)) / (scale * (1 - y**2) + 1e-6)
    g = -alpha * dlogdet - chosen_action_weight * scale * (1 - y**2)  # (batch, dim) = ∂ℓ_i/∂A_K

    per_step_norms, adjoints = [], {flow_steps: g}
    for k in range(flow_steps):
        product = np.eye(dim)
        for j in range(k, flow_steps):
            product = product @ jacobians[j].T  # J_kᵀ J_{k+1}ᵀ … J_{K−1}ᵀ
        adjoints[k] = g @ product.T  # row i: product @ g_i
        per_step_norms.append(np.linalg.norm(adjoints[k], axis=1).mean())
    weight_grad = sum(velocity_factors[k] * adjoints[k + 1].T @ path[k] for k in range(flow_steps)) / batch
    bias_grad = sum(velocity_factors[k] * adjoints[k + 1].sum(axis=0) for k in range(flow_steps)) / batch
    params_norm = math.sqrt(np.sum(weight_grad**2) + np.sum(bias_grad**2))
    return np.array(per_step_norms), params_norm


@pytest.mark.parametrize("script", FLOW_SCRIPTS)
def test_per_step_norms_match_the_jacobian_product_of_a_linear_flow(script):
    module = load_script(script)  # a fresh module: the patches below stay in this test
    module.VelocityNet = lambda action_dim, *sizes: LinearVelocity(action_dim)
    module.QNetwork = lambda *sizes: LinearCritic()
    flow_steps, batch, obs_dim, action_dim, sigma = 5, 16, 4, 3, 0.3
    args = module.Args(flow_steps=flow_steps, noise_std=sigma, batch_size=batch, buffer_size=64, log_grad_norms=True)
    scale, shift = np.array([1.0, 2.0, 0.5]), np.array([0.0, 0.5, -0.2])
    agent = module.make_agent(args, action_dim, scale, shift)
    state = module.create_state(agent, jax.random.PRNGKey(0), obs_dim)
    rng = np.random.default_rng(0)
    # A contracting field keeps A_K where tanh is not saturated (float32 loses 1 − tanh² there); the adjoint
    # then shrinks about 0.7 times per step backwards, so the K norms differ.
    weight = -1.5 * np.eye(action_dim) + 0.5 * rng.normal(size=(action_dim, action_dim))
    bias = 0.3 * rng.normal(size=action_dim)
    params = {
        **state.policy.params,
        "velocity": {"weight": jnp.asarray(weight, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)},
    }
    policy_state = state.policy.replace(params=params)
    obs = rng.normal(size=(batch, obs_dim)).astype(np.float32)
    key = jax.random.PRNGKey(3)

    *_, metrics = module.update_actor_and_alpha(
        agent, policy_state, state.log_alpha, state.alpha_opt_state, state.critic, jnp.asarray(obs), key
    )

    initial_key, step_key = jax.random.split(key)  # the rollout noise of sample_actions
    initial_noise = np.asarray(jax.random.normal(initial_key, (batch, action_dim)), np.float64)
    step_noise = np.asarray(jax.random.normal(step_key, (flow_steps, batch, action_dim)), np.float64)
    critic_params = state.critic.params
    critic_weights = [
        (
            np.asarray(critic_params["action_weight"][m], np.float64),
            np.asarray(critic_params["obs_weight"][m], np.float64),
        )
        for m in range(2)
    ]
    expected, expected_params_norm = numpy_gradient_norms(
        obs.astype(np.float64),
        initial_noise,
        step_noise,
        weight,
        bias,
        sigma,
        critic_weights,
        float(np.exp(np.float64(state.log_alpha))),
        scale,
        shift,
    )
    assert expected.max() / expected.min() > 3  # the field is far from the identity: the k's differ
    measured = np.array([float(metrics[f"grad/actor_wrt_A_k{k}"]) for k in range(flow_steps)])
    np.testing.assert_allclose(measured, expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad/actor_params"]), expected_params_norm, rtol=1e-5)


FLOW_STEPS = 2  # K of the tiny runs: small graphs compile fastest
TINY_BENCH = f"--steps 240 --learning-starts 200 --batch-size 16 --log-every 10 --flow-steps {FLOW_STEPS}".split()


def read_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return [(int(row["global_step"]), row["key"], row["value"]) for row in csv.DictReader(f)]


REFERENCE_VARIANT = "naive"  # the flag's code is the same text in the three flow scripts


@pytest.fixture(scope="module")
def bench_and_reference_run(tmp_path_factory):
    """bench/grad_norms.py at a tiny size (each script run with --log-grad-norms) and, alongside it, the naive run
    without the flag (the bench's own command line minus the flag)."""
    grad_norms = load_script("grad_norms", REPO / "bench")
    out = tmp_path_factory.mktemp("grad_norms")
    reference_dir = out / "reference"
    reference_dir.mkdir()
    bench_args = tyro.cli(grad_norms.Args, args=[*TINY_BENCH, "--out", str(out / "bench")])
    command = grad_norms.script_command(REFERENCE_VARIANT, FLOW_STEPS, bench_args)
    reference = subprocess.Popen(
        [flag for flag in command if flag != "--log-grad-norms"],
        cwd=reference_dir,
        env=script_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    bench = run_script(BENCH, *TINY_BENCH, "--out", str(out / "bench"), cwd=out)
    reference_output = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, reference_output[-3000:]
    (reference_run,) = (reference_dir / "runs").iterdir()
    return bench, out / "bench", reference_run


@pytest.mark.long
def test_the_flag_changes_no_training_result(bench_and_reference_run):
    bench, bench_dir, reference_run = bench_and_reference_run
    assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-3000:]
    results = json.loads((bench_dir / "grad_norms.json").read_text())
    for variant in results:
        grad_keys = {key for _, key, _ in read_rows(results[variant]["run_dir"]) if key.startswith("grad/")}
        assert grad_keys == {"grad/actor_wrt_A_k0", "grad/actor_wrt_A_k1", "grad/actor_params"}, variant
    with_flag = read_rows(results[REFERENCE_VARIANT]["run_dir"])  # absolute: --out was
    without_flag = read_rows(reference_run)
    assert not any(key.startswith("grad/") for _, key, _ in without_flag)
    assert any(key == "grad/actor_params" and float(value) > 0 for _, key, value in with_flag)

    def training_rows(rows):  # everything but the diagnostics and the time-based speed
        return [row for row in rows if not row[1].startswith("grad/") and row[1] != "charts/SPS"]

    losses = [row for row in training_rows(with_flag) if row[1].startswith("losses/")]
    assert len({key for _, key, _ in losses}) >= 5 and len(losses) >= 20
    assert training_rows(with_flag) == training_rows(without_flag)


@pytest.mark.long
def test_bench_writes_the_json_and_the_figure(bench_and_reference_run):
    bench, bench_dir, _ = bench_and_reference_run
    assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-3000:]
    results = json.loads((bench_dir / "grad_norms.json").read_text())
    assert list(results) == ["naive", "gru", "transformer"]
    for variant, result in results.items():
        assert len(result["per_step_norm"]) == FLOW_STEPS, variant
        assert all(math.isfinite(v) and v > 0 for v in result["per_step_norm"]), variant
        history = result["over_training"]
        assert len(history["steps"]) == len(history["per_step_norm"]) == len(history["params_norm"]) >= 3
        assert all(len(values) == FLOW_STEPS for values in history["per_step_norm"])
        assert history["steps"] == sorted(history["steps"]) and history["steps"][-1] == 240
        # the end-of-training value is the mean of the last --final-points (5) logs
        np.testing.assert_allclose(result["per_step_norm"], np.mean(history["per_step_norm"][-5:], axis=0))
        assert result["by_flow_steps"][str(FLOW_STEPS)]["per_step_norm"] == result["per_step_norm"]
    png = (bench_dir / "grad_norms.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    assert "ratio" in bench.stdout and "wrote" in bench.stdout
