"""Several seeds in one jitted call, and the random phase's transitions written to the device in blocks."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def over_seeds(function: Callable) -> Callable:
    """`function(agent, *inputs) -> (agent, outputs)` on each agent of a list, in one jitted call; inputs and outputs
    carry a leading seed axis. A list rather than one vmapped state: on a CPU vmap's batched matmuls are slower."""

    def each_seed(agents: list, *inputs):
        results = [function(agent, *(x[i] for x in inputs)) for i, agent in enumerate(agents)]
        stacked_outputs = jax.tree.map(lambda *per_seed: jnp.stack(per_seed), *[outputs for _, outputs in results])
        return [agent for agent, _ in results], stacked_outputs

    # The function's name in JAX's compile logs (that of a functools.partial's function).
    each_seed.__name__ = each_seed.__qualname__ = getattr(function, "func", function).__name__
    return each_seed


RANDOM_BLOCK = 1000  # random-phase transitions per write to the device buffer


def store_transitions(agents: list, pending: list, functions, block: int = RANDOM_BLOCK) -> list:
    """Writes the host's `pending` transitions to the agents' buffers, in order, and empties the list: `block` at a
    time, the rest one by one, so that neither function compiles more than once."""
    while len(pending) >= block:
        block_fields = [np.stack(field, axis=1) for field in zip(*pending[:block])]  # (seeds, block, ...)
        agents, _ = functions.add_transitions(agents, *block_fields)
        del pending[:block]
    for transition in pending:
        agents, _ = functions.add_transition(agents, *transition)
    pending.clear()
    return agents
