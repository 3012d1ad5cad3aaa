"""What every from-scratch script shares: BatchRenorm, the TD target, the α update, and a train step that compiles
once and writes the replay buffer in place, against computations written out by hand."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ALL_SCRIPTS, load_script

from sac_flow_utils import batching

# BatchRenorm, the TD target and the α loss are the same text in every from-scratch script
# (tests/test_siblings.py), so sac.py's copy is tested for all; the train step is the same text in the three
# flow scripts, so Flow-G's stands for theirs; what compiles depends on each script's networks.
ONE_COPY = pytest.mark.parametrize("script", ["sac"])
EACH_TRAIN_STEP = pytest.mark.parametrize("script", ["sac", "sac_flow_gru"])
EVERY_SCRIPT = pytest.mark.parametrize("script", ALL_SCRIPTS)


def batch_renorm_np(x, running_mean, running_var, scale, bias, steps, warmup, eps, train):
    """BatchRenorm written out by hand (Ioffe 2017, eq. in the script's docstring)."""
    if not train:
        return (x - running_mean) / np.sqrt(running_var + eps) * scale + bias, running_mean, running_var
    mean, var = x.mean(0), x.var(0)
    std, running_std = np.sqrt(var + eps), np.sqrt(running_var + eps)
    r, d = np.ones_like(mean), np.zeros_like(mean)
    if steps >= warmup:
        r = np.clip(std / running_std, 1 / 3.0, 3.0)
        d = np.clip((mean - running_mean) / running_std, -5.0, 5.0)
    y = ((x - mean) / std * r + d) * scale + bias
    return y, 0.99 * running_mean + 0.01 * mean, 0.99 * running_var + 0.01 * var


@ONE_COPY
@pytest.mark.parametrize("steps", [0, 10])
def test_batch_renorm_matches_hand_computation(script, steps):
    module = load_script(script)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(64, 4)) * [1.0, 10.0, 0.1, 2.0] + [0.0, 30.0, -1.0, 0.5]).astype(np.float32)
    layer = module.BatchRenorm(warmup_steps=5)
    variables = layer.init(jax.random.PRNGKey(0), x, train=False)
    # Running statistics far from the batch's so that r and d hit their clipping bounds in some features.
    running_mean = np.array([0.1, 0.0, -1.0, 0.4], np.float32)
    running_var = np.array([1.0, 1.0, 1.0, 0.001], np.float32)
    scale, bias = np.array([1.0, 2.0, 0.5, 1.5], np.float32), np.array([0.0, -1.0, 0.2, 0.3], np.float32)
    variables = {
        "params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)},
        "batch_stats": {"mean": jnp.asarray(running_mean), "var": jnp.asarray(running_var), "steps": jnp.int32(steps)},
    }
    eps = module.BatchRenorm.epsilon
    for train in (True, False):
        expected, new_mean, new_var = batch_renorm_np(x, running_mean, running_var, scale, bias, steps, 5, eps, train)
        if train:
            y, updates = layer.apply(variables, x, train=True, mutable=["batch_stats"])
            stats = updates["batch_stats"]
            np.testing.assert_allclose(stats["mean"], new_mean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(stats["var"], new_var, rtol=1e-5, atol=1e-6)
            assert int(stats["steps"]) == steps + 1
        else:
            y = layer.apply(variables, x, train=False)
        np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-4)


@ONE_COPY
def test_td_target(script):
    module = load_script(script)
    rng = np.random.default_rng(3)
    r, term, q_next, logp = (
        rng.normal(size=6),
        np.array([0, 1, 0, 0, 1, 0.0]),
        rng.normal(size=(2, 6)),
        rng.normal(size=6),
    )
    alpha, gamma = 0.3, 0.97
    got = module.td_target(r, term, q_next.min(axis=0), logp, alpha, gamma)
    expected = [
        r[i] + (0 if term[i] else gamma * (min(q_next[0, i], q_next[1, i]) - alpha * logp[i])) for i in range(6)
    ]
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)


@ONE_COPY
@pytest.mark.parametrize("entropy_below_target", [True, False])
def test_alpha_update_direction(script, entropy_below_target):
    """α must rise when the entropy −log π is below H_target and fall when it is above."""
    module = load_script(script)
    target_entropy = 0.0
    log_prob = jnp.full((32,), 2.0 if entropy_below_target else -2.0)  # entropy −2 (below 0) or +2 (above)
    log_alpha = jnp.float32(np.log(0.2))
    optimizer = optax.adam(1e-2)
    grad = jax.grad(module.alpha_loss)(log_alpha, log_prob, target_entropy)
    updates, _ = optimizer.update(grad, optimizer.init(log_alpha))
    new_log_alpha = optax.apply_updates(log_alpha, updates)
    assert (new_log_alpha > log_alpha) == entropy_below_target


def small_args(module, **overrides):
    args = module.Args(**{"critic_hidden": 32, "batch_size": 8, "buffer_size": 64, "learning_starts": 8, **overrides})
    sizes = {"velocity_hidden": 16, "actor_hidden": 16, "d_model": 16}
    return dataclasses.replace(args, **{k: v for k, v in sizes.items() if hasattr(args, k)})


@EVERY_SCRIPT
def test_train_step_compiles_once_and_learns_something(script):
    """One compilation for the whole run (no weak types or int/float flips in the state), and parameters move."""
    module = load_script(script)
    args = small_args(module, policy_delay=2)
    obs_dim, action_dim = 3, 2
    agent = module.make_agent(args, action_dim, np.ones(2), np.zeros(2))
    functions = module.jit_train_functions(agent)
    train_step, add_transition, evaluation_action = (
        functions.train_step,
        functions.add_transition,
        functions.evaluation_action,
    )
    rng = np.random.default_rng(0)

    def transition(step):
        return (
            jnp.asarray(rng.normal(size=obs_dim), jnp.float32),
            jnp.asarray(rng.uniform(-1, 1, size=action_dim), jnp.float32),
            jnp.float32(rng.normal()),
            jnp.asarray(rng.normal(size=obs_dim), jnp.float32),
            jnp.float32(step % 7 == 0),
            jnp.bool_(step % 5 == 0),
        )

    def one_seed(tree):  # the per-step inputs carry a leading axis of seeds
        return jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], tree)

    states = [module.create_state(agent, jax.random.PRNGKey(0), obs_dim)]
    for step in range(10):
        states, _ = add_transition(states, *one_seed(transition(step)))
    first_policy = jax.tree_util.tree_map(np.asarray, states[0].policy.params)
    for step in range(7):
        states, (action, metrics, all_finite) = train_step(
            states, *one_seed(transition(step)), jnp.zeros((1, obs_dim), jnp.float32)
        )
        assert bool(all_finite[0]) and action.shape == (1, action_dim)
        policy = states[0].policy
        evaluation_action(policy.params, policy.batch_stats, jnp.zeros(obs_dim, jnp.float32), jax.random.PRNGKey(step))
    assert train_step._cache_size() == 1
    assert add_transition._cache_size() == 1
    assert evaluation_action._cache_size() == 1
    assert int(states[0].critic_updates) == 7
    moved = jax.tree_util.tree_map(
        lambda a, b: not np.allclose(a, b), first_policy, jax.tree_util.tree_map(np.asarray, states[0].policy.params)
    )
    assert any(jax.tree_util.tree_leaves(moved))
    assert float(metrics["losses/alpha"][0]) != 0.2  # autotune moved α


@EACH_TRAIN_STEP
def test_train_step_writes_the_replay_buffer_in_place(script):
    """The donated buffer is updated in place: the compiled step copies none of its float arrays. (With an array per
    field, XLA fused the transition's write into the batch gather and copied the action, reward and termination
    arrays twice per call; only the one-byte is_transition flags are still copied.)"""
    module = load_script(script)
    slots = 4096  # a size no other array of the step has
    args = small_args(module, buffer_size=slots)
    obs_dim, action_dim = 3, 2
    agent = module.make_agent(args, action_dim, np.ones(2), np.zeros(2))
    train_step = module.jit_train_functions(agent).train_step
    state = module.create_state(agent, jax.random.PRNGKey(0), obs_dim)
    inputs = [np.zeros(obs_dim), np.zeros(action_dim), 0.0, np.zeros(obs_dim), 0.0, False, np.zeros(obs_dim)]
    inputs = [jnp.asarray(x, jnp.bool_ if isinstance(x, bool) else jnp.float32)[None] for x in inputs]
    hlo = train_step.lower([state], *inputs).compile().as_text()
    copied = re.findall(r"= (\w+)\[(\d+)[,\]]\S* copy\(", hlo)
    assert [dtype for dtype, rows in copied if int(rows) == slots and dtype != "pred"] == []


@EACH_TRAIN_STEP
def test_random_phase_blocks_store_what_one_call_per_step_stores(script):
    """The random phase's transitions, written a block at a time and the rest one by one, leave every seed's buffer
    exactly as one add_transition per step does: rows, flags, slots and counters, with episode ends, terminations
    and the buffer wrapping around (150 transitions in 64 slots)."""
    module = load_script(script)
    args = small_args(module)
    obs_dim, action_dim, seeds, steps = 3, 2, 2, 150
    agent = module.make_agent(args, action_dim, np.ones(2), np.zeros(2))
    functions = module.jit_train_functions(agent)
    rng = np.random.default_rng(0)
    transitions = [
        (
            rng.normal(size=(seeds, obs_dim)).astype(np.float32),
            rng.uniform(-1, 1, size=(seeds, action_dim)).astype(np.float32),
            rng.normal(size=seeds).astype(np.float32),
            rng.normal(size=(seeds, obs_dim)).astype(np.float32),
            (rng.uniform(size=seeds) < 0.05).astype(np.float32),
            rng.uniform(size=seeds) < 0.1,
        )
        for _ in range(steps)
    ]

    def new_states():
        return [module.create_state(agent, jax.random.PRNGKey(seed), obs_dim) for seed in range(seeds)]

    one_by_one = new_states()
    for transition in transitions:
        one_by_one, _ = functions.add_transition(one_by_one, *transition)
    pending = list(transitions)
    in_blocks = batching.store_transitions(new_states(), pending, functions, block=40)  # 3 blocks, 30 single
    assert pending == []
    assert functions.add_transitions._cache_size() == 1
    for expected, state in zip(one_by_one, in_blocks):
        for field in ("rows", "is_transition", "transition_slots", "num_added", "num_valid", "position"):
            np.testing.assert_array_equal(getattr(state.buffer, field), getattr(expected.buffer, field), field)
    assert int(in_blocks[0].buffer.num_added) == steps and not np.array_equal(
        in_blocks[0].buffer.rows, in_blocks[1].buffer.rows
    )
