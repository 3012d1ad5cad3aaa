"""The from-scratch scripts' replay buffer, on the device. Slot i holds an observation and the action, reward and
termination of the transition from it; its next observation is slot i + 1's (an episode's final observation gets a
slot of its own). Slots are written in order, so the intact transitions are the newest `num_valid`. docs/design.md
explains the layout."""

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class ReplayBuffer:
    rows: jax.Array  # (slots, obs_dim + action_dim + 2): observation | action | reward | terminated (1.0 or 0.0)
    is_transition: jax.Array  # (slots,) slot i holds a complete transition (its next obs is at i + 1)
    transition_slots: jax.Array  # (slots,) the slot of the n-th transition added, at n mod slots
    num_added: jax.Array  # () transitions added so far
    num_valid: jax.Array  # () the newest transitions still intact
    position: jax.Array  # () the slot of the next transition
    obs_dim: int = flax.struct.field(pytree_node=False)


def create_buffer(slots: int, obs_dim: int, action_dim: int) -> ReplayBuffer:
    return ReplayBuffer(
        rows=jnp.zeros((slots, obs_dim + action_dim + 2), jnp.float32),
        is_transition=jnp.zeros((slots,), bool),
        transition_slots=jnp.zeros((slots,), jnp.int32),
        num_added=jnp.zeros((), jnp.int32),
        num_valid=jnp.zeros((), jnp.int32),
        position=jnp.zeros((), jnp.int32),
        obs_dim=obs_dim,
    )


def buffer_add(buffer: ReplayBuffer, obs, action, reward, next_obs, terminated, episode_end) -> ReplayBuffer:
    slots = buffer.rows.shape[0]
    i = buffer.position
    next_i = (i + 1) % slots
    # Overwriting slots i and i + 1 destroys the (oldest) transitions stored there, if any.
    destroyed = buffer.is_transition[i].astype(jnp.int32) + buffer.is_transition[next_i].astype(jnp.int32)
    row = jnp.concatenate([obs, action, jnp.stack([reward, terminated])])
    return buffer.replace(
        rows=buffer.rows.at[i].set(row).at[next_i, : buffer.obs_dim].set(next_obs),
        is_transition=buffer.is_transition.at[i].set(True).at[next_i].set(False),
        transition_slots=buffer.transition_slots.at[buffer.num_added % slots].set(i),
        num_added=buffer.num_added + 1,
        num_valid=buffer.num_valid + 1 - destroyed,
        position=(i + 1 + episode_end.astype(jnp.int32)) % slots,
    )


def buffer_end_episode(buffer: ReplayBuffer) -> ReplayBuffer:
    """Ends the latest transition's episode as a truncation (a resumed run starts a new one): its next observation
    at slot `position` is kept, and the next episode starts one slot further."""
    slots = buffer.rows.shape[0]
    episode_open = buffer.is_transition[(buffer.position - 1) % slots]
    return buffer.replace(position=(buffer.position + episode_open.astype(jnp.int32)) % slots)


def buffer_sample(buffer: ReplayBuffer, key, batch_size: int):
    """Uniform over the intact transitions: (obs, actions, rewards, terminations, next_obs)."""
    slots = buffer.rows.shape[0]
    age = jax.random.randint(key, (batch_size,), 0, buffer.num_valid)
    i = buffer.transition_slots[(buffer.num_added - 1 - age) % slots]
    rows, next_rows = buffer.rows[i], buffer.rows[(i + 1) % slots]
    obs_dim = buffer.obs_dim
    return rows[:, :obs_dim], rows[:, obs_dim:-2], rows[:, -2], rows[:, -1], next_rows[:, :obs_dim]
