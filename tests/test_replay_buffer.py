"""The from-scratch scripts' replay buffer (sac_flow_utils/replay_buffer.py): next observations paired with their
transitions, episode ends, wrapping around, and the episode a resumed run ends."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sac_flow_utils import replay_buffer


def test_replay_buffer_pairs_next_observations_and_keeps_final_ones():
    """Episode ends keep the real final observation; sampling covers exactly the stored transitions."""
    buffer = replay_buffer.create_buffer(12, 1, 1)
    add = jax.jit(replay_buffer.buffer_add)
    transitions = []  # (obs, next_obs, terminated) as added
    obs = 0.0
    for step in range(9):
        episode_end = step in (2, 5)  # two short episodes, then a third that runs on
        next_obs = obs + 1.0
        buffer = add(
            buffer,
            jnp.float32([obs]),
            jnp.float32([step]),
            jnp.float32(step),
            jnp.float32([next_obs]),
            jnp.float32(step == 2),
            jnp.bool_(episode_end),
        )
        transitions.append((obs, next_obs, float(step == 2)))
        obs = 100.0 * (step + 1) if episode_end else next_obs  # a reset observation differs from the final one
    obs_b, act_b, rew_b, term_b, next_b = jax.jit(replay_buffer.buffer_sample, static_argnums=2)(
        buffer, jax.random.PRNGKey(0), 4000
    )
    sampled_steps = np.asarray(act_b)[:, 0].astype(int)
    for i, step in enumerate(sampled_steps[:200]):
        o, n, term = transitions[step]
        assert (obs_b[i, 0], next_b[i, 0], term_b[i], rew_b[i]) == (o, n, term, step)
    counts = np.bincount(sampled_steps, minlength=9)
    assert counts.min() > 350, counts  # uniform over the 9 transitions (expected 444 each)


def test_replay_buffer_wraps_around():
    buffer = replay_buffer.create_buffer(5, 1, 1)
    for step in range(13):
        buffer = replay_buffer.buffer_add(
            buffer,
            jnp.float32([step]),
            jnp.float32([step]),
            jnp.float32(0),
            jnp.float32([step + 1]),
            jnp.float32(0),
            jnp.bool_(False),
        )
    obs_b, act_b, _, _, next_b = replay_buffer.buffer_sample(buffer, jax.random.PRNGKey(1), 500)
    # 5 slots: the newest slot holds only the last next observation, so the 4 newest transitions remain.
    assert set(np.asarray(act_b)[:, 0].astype(int)) == {9, 10, 11, 12}
    np.testing.assert_array_equal(np.asarray(next_b), np.asarray(obs_b) + 1)


@pytest.mark.parametrize("wraps", [False, True])
def test_replay_buffer_end_episode_on_resume_keeps_the_last_next_observation(wraps):
    """A resumed run ends the interrupted episode: the last transition keeps its next observation, the new episode
    does not overwrite it, and the pairing stays right (also when the buffer has wrapped around)."""
    buffer = replay_buffer.create_buffer(7, 1, 1)
    transitions = {}  # step -> (obs, next_obs) of the transitions still stored

    def add(buffer, step, obs):  # within an episode, obs is the previous next_obs
        transitions[step] = (obs, obs + 1.0)
        return replay_buffer.buffer_add(
            buffer,
            jnp.float32([obs]),
            jnp.float32([step]),
            jnp.float32(0),
            jnp.float32([obs + 1.0]),
            jnp.float32(0),
            jnp.bool_(False),
        )

    old_steps = 9 if wraps else 3
    for step in range(old_steps):
        buffer = add(buffer, step, float(step))
    buffer = replay_buffer.buffer_end_episode(buffer)
    assert replay_buffer.buffer_end_episode(buffer).position == buffer.position  # an ended episode is not ended twice
    for step in range(old_steps, old_steps + 2):  # the new episode, from a reset observation far from the old ones
        buffer = add(buffer, step, 100.0 + step - old_steps)
    obs_b, act_b, _, _, next_b = replay_buffer.buffer_sample(buffer, jax.random.PRNGKey(0), 2000)
    sampled = np.asarray(act_b)[:, 0].astype(int)
    for i, step in enumerate(sampled[:300]):
        assert (float(obs_b[i, 0]), float(next_b[i, 0])) == transitions[step]
    # 7 slots: the 2 new transitions take 3 slots (with the next observation), the skipped slot keeps the last
    # old next observation, so the old transitions left are the newest ones that fit in the 3 slots before it.
    expected_old = set(range(old_steps))
    if wraps:
        expected_old = {6, 7, 8}
    assert set(sampled) == expected_old | {old_steps, old_steps + 1}
