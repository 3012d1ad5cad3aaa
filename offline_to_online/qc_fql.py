"""QC-FQL: flow Q-learning with action chunking, offline-to-online on OGBench and Robomimic (JAX, cleanrl style).

With --horizon-length 1 this is plain FQL (Park et al., 2025); with h > 1 it is QC-FQL (Li et al., 2025,
"Reinforcement Learning with Action Chunking"), the baseline that SAC Flow's offline-to-online experiments build on.
The policy acts in chunks: it outputs h actions a_{t:t+h} as one vector of D = h·d numbers, and the whole chunk runs
open-loop in the environment. Everything below works on chunks A = a_{t:t+h}.
Critic: 2 Q networks Q_i(s, A) (MLP 4×512, GELU, LayerNorm), a target network (Polyak rate τ):

    y = Σ_{i<h} γ^i r_{t+i} + γ^h m · mean_i Q_target,i(s_{t+h}, A'),   A' = μ(s_{t+h}, z)
    L_Q = mean over (i, batch) of valid · (Q_i(s_t, A_t) − y)²

m = 0 once the task is solved inside the chunk (no bootstrap after success); valid = 0 for chunks that run past the end
of an episode (their rewards would mix two episodes). Flow BC policy v(s, x, t) (MLP 4×512, GELU), trained by flow
matching on data chunks and sampled with K Euler steps x ← x + v(s, x, k/K) / K from x_0 = z, clipped to [−1, 1]:

    x_0 ~ N(0, I), x_1 = A_t, t ~ U[0, 1], x_t = (1 − t) x_0 + t x_1
    L_BC = mean ‖v(s, x_t, t) − (x_1 − x_0)‖²        (actions after an episode end masked out)

One-step policy μ(s, z) (MLP 4×512, GELU), the policy that acts:

    L_μ = α · mean ‖μ(s, z) − flow(s, z)‖² − mean_b mean_i Q_i(s, clip(μ(s, z), −1, 1))

The three losses are summed and minimised by one Adam step per update (each gradient reaches only its own network).
Offline: updates on the dataset. Online: the dataset is the initial replay buffer; each environment step appends one
transition and makes one update.

Example:
    python offline_to_online/make_dataset.py --env-name cube-triple-play-v0
    python offline_to_online/qc_fql.py --env-name cube-triple-play-singletask-task4-v0 --alpha 100 --horizon-length 5
    python offline_to_online/qc_fql.py --env-name square-mh-low_dim  # Robomimic (setup.md)
"""

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sac_flow_utils import cli
from sac_flow_utils.ogbench_run import OgbenchRun


@dataclass
class Args(cli.RunArgs):  # the run options (--track, --checkpoint-every, --resume, ...) are in sac_flow_utils/cli.py
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (networks, noise, environment)"""
    env_name: str = "cube-triple-play-singletask-task4-v0"
    """OGBench single-task dataset name (<env>-<dataset type>-singletask[-taskN]-v0), or Robomimic task as QC names it
    (<lift|can|square>-<mh|ph>-low_dim, e.g. square-mh-low_dim)"""
    dataset_dir: str | None = None
    """directory holding <dataset>.npz (None: ~/.ogbench/data; make it with offline_to_online/make_dataset.py);
    Robomimic: holding <task>/<type>/low_dim_v15.hdf5 (None: ~/.robomimic, robomimic's download layout) or the file"""
    sparse: bool = False
    """sparse reward as in QC: reward 0 when the whole task is solved, -1 otherwise (instead of -#unsolved subtasks)"""
    max_episode_steps: int | None = None
    """override the environment's time limit (None: the env's own, 1000 for cube tasks; QC's 300 for Robomimic lift
    and can, 400 for square); for quick tests"""

    offline_steps: int = 1_000_000
    """number of offline updates on the dataset"""
    online_steps: int = 1_000_000
    """number of online environment steps (one update each)"""
    online_learning_starts: int = 5000
    """online updates start at this online step; steps before it only collect data (QC's start_training)"""
    eval_every: int = 100_000
    """steps between evaluations, in each phase (and at the end of each phase)"""
    eval_episodes: int = 50
    """episodes per evaluation (0: no evaluation)"""
    log_every: int = 5000
    """steps between logged losses and speed (offline: the mean over the updates since the last log; online: the
    latest update's)"""
    offline_scan_length: int = 1000
    """offline updates per block, the steps at which a stop signal is answered (jitted calls of up to 100 updates,
    cut short at a log, eval, checkpoint or phase change; it does not change the run's results)"""

    horizon_length: int = 5
    """action chunk length h (1: plain FQL)"""
    batch_size: int = 256
    """batch size of each update"""
    learning_rate: float = 3e-4
    """Adam learning rate of all networks"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target critic Polyak rate"""
    alpha: float = 100.0
    """the distillation weight α of the one-step policy (100 in QC-FQL's published commands)"""
    flow_steps: int = 10
    """Euler steps of the flow BC policy"""
    critic_hidden_dims: tuple[int, ...] = (512, 512, 512, 512)
    """hidden layers of each Q network (with LayerNorm)"""
    actor_hidden_dims: tuple[int, ...] = (512, 512, 512, 512)
    """hidden layers of the flow BC policy and of the one-step policy"""
    num_qs: int = 2
    """number of Q networks in the critic ensemble"""


# ----------------------------------------------------------------------------------------------------
# Data: OGBench or Robomimic dataset → replay buffer on the device


def make_replay_buffer(dataset: dict, capacity: int, sparse: bool) -> dict:
    """Device arrays of `capacity` rows whose first len(dataset) rows hold the dataset. `terminals` marks the last
    transition of every episode (so chunks never mix episodes); `masks` is 0 where the task is solved (no bootstrap)."""
    size = len(dataset["observations"])
    rewards = dataset["rewards"]
    if sparse:
        rewards = (rewards != 0.0) * -1.0  # as QC: 0 when the task is solved, -1 otherwise
    columns = {
        "observations": dataset["observations"],
        # As QC, keep data actions strictly inside the bounds the policies can output.
        "actions": np.clip(dataset["actions"], -1 + 1e-5, 1 - 1e-5),
        "rewards": rewards,
        "masks": dataset["masks"],
        "terminals": dataset["terminals"],
        "next_observations": dataset["next_observations"],
    }
    buffer = {}
    for key, values in columns.items():
        column = np.zeros((capacity, *values.shape[1:]), dtype=np.float32)
        column[:size] = values
        buffer[key] = jnp.asarray(column)
    return buffer


def sample_chunk_batch(buffer: dict, buffer_size, key, batch_size: int, horizon_length: int) -> dict:
    """Uniformly samples `batch_size` windows of h consecutive transitions among the first `buffer_size` rows."""
    start = jax.random.randint(key, (batch_size,), 0, buffer_size - horizon_length + 1)
    steps = start[:, None] + jnp.arange(horizon_length)  # (B, h)
    return {
        "observations": buffer["observations"][start],
        "action_chunks": buffer["actions"][steps].reshape(batch_size, -1),  # (B, h*d), a_t first
        "rewards": buffer["rewards"][steps],
        "masks": buffer["masks"][steps],
        "terminals": buffer["terminals"][steps],
        "next_observations": buffer["next_observations"][start + horizon_length - 1],  # s_{t+h}
    }


def add_transition(buffer: dict, position, transition: dict) -> dict:
    """Writes one transition at row `position`."""
    return {key: column.at[position].set(transition[key]) for key, column in buffer.items()}


# ----------------------------------------------------------------------------------------------------
# Math: chunked TD target and flow matching


def chunked_td_target(rewards, masks, terminals, next_q, gamma):
    """y = Σ_{i<h} γ^i r_{t+i} + γ^h min_i(masks) next_q, and valid[:, i] = 0 when an episode ended at a step before i,
    from (B, h) rewards, masks, terminals and the (B,) value of s_{t+h}, as QC-FQL. The critic uses valid[:, -1]:
    chunks that cross an episode end are dropped (ending at the chunk's last step is fine)."""
    horizon = rewards.shape[-1]
    reward_sum = jnp.sum(rewards * gamma ** jnp.arange(horizon), axis=-1)
    bootstrap = jnp.min(masks, axis=-1)
    target = reward_sum + gamma**horizon * bootstrap * next_q
    ended_before = jnp.cumsum(terminals, axis=-1) - terminals  # number of episode ends at steps < i
    valid = (ended_before == 0).astype(rewards.dtype)
    return target, valid


def flow_matching_loss(velocity_fn, observations, action_chunks, valid, noise, times):
    """Masked flow-matching BC loss: mean || v(s, x_t, t) - (x_1 - x_0) ||^2 with x_t = (1-t) x_0 + t x_1,
    x_0 = noise (B, h*d), x_1 = action_chunks (B, h*d), t = times (B, 1); entries of actions whose chunk step is
    not valid count as zero (the mean still divides by B*h*d, as QC)."""
    x_t = (1.0 - times) * noise + times * action_chunks
    squared_error = (velocity_fn(observations, x_t, times) - (action_chunks - noise)) ** 2
    batch_size, horizon = valid.shape
    return jnp.mean(squared_error.reshape(batch_size, horizon, -1) * valid[:, :, None])


def flow_policy_actions(velocity_fn, observations, noise, flow_steps: int):
    """Integrates the flow from x_0 = noise with `flow_steps` Euler steps; returns chunks clipped to [-1, 1]."""
    x = noise
    for k in range(flow_steps):
        t = jnp.full((*x.shape[:-1], 1), k / flow_steps, dtype=x.dtype)
        x = x + velocity_fn(observations, x, t) / flow_steps
    return jnp.clip(x, -1.0, 1.0)


# ----------------------------------------------------------------------------------------------------
# Networks


class MLP(nn.Module):
    hidden_dims: Sequence[int]
    output_dim: int
    layer_norm: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.xavier_uniform()
        for width in self.hidden_dims:
            x = nn.gelu(nn.Dense(width, kernel_init=init)(x))
            if self.layer_norm:
                x = nn.LayerNorm()(x)
        return nn.Dense(self.output_dim, kernel_init=init)(x)


class Critic(nn.Module):
    """Ensemble of Q(s, A) networks; returns (num_qs, B)."""

    hidden_dims: Sequence[int]
    num_qs: int

    @nn.compact
    def __call__(self, observations, action_chunks):
        ensemble = nn.vmap(
            MLP,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=None,
            out_axes=0,
            axis_size=self.num_qs,
        )
        q = ensemble(self.hidden_dims, 1, layer_norm=True)(jnp.concatenate([observations, action_chunks], -1))
        return q.squeeze(-1)


class VelocityField(nn.Module):
    """Flow BC policy's velocity v(s, x, t) for a whole chunk."""

    hidden_dims: Sequence[int]
    chunk_dim: int

    @nn.compact
    def __call__(self, observations, x, t):
        return MLP(self.hidden_dims, self.chunk_dim)(jnp.concatenate([observations, x, t], -1))


class OneStepPolicy(nn.Module):
    """mu(s, z): maps a noise vector to a chunk in one network call."""

    hidden_dims: Sequence[int]
    chunk_dim: int

    @nn.compact
    def __call__(self, observations, noise):
        return MLP(self.hidden_dims, self.chunk_dim)(jnp.concatenate([observations, noise], -1))


@dataclass(frozen=True)
class QCFQL:
    """The networks, optimizer and hyperparameters the jitted functions below close over."""

    critic: Critic
    velocity_field: VelocityField
    onestep_policy: OneStepPolicy
    optimizer: optax.GradientTransformation
    chunk_dim: int
    horizon_length: int
    batch_size: int
    gamma: float
    tau: float
    alpha: float
    flow_steps: int


@flax.struct.dataclass
class AgentState:
    params: dict  # {"critic", "velocity_field", "onestep_policy"}
    target_critic_params: dict
    opt_state: optax.OptState


def make_agent(args: Args, obs_dim: int, action_dim: int) -> tuple[QCFQL, AgentState]:
    chunk_dim = args.horizon_length * action_dim
    agent = QCFQL(
        critic=Critic(args.critic_hidden_dims, args.num_qs),
        velocity_field=VelocityField(args.actor_hidden_dims, chunk_dim),
        onestep_policy=OneStepPolicy(args.actor_hidden_dims, chunk_dim),
        optimizer=optax.adam(args.learning_rate),
        chunk_dim=chunk_dim,
        horizon_length=args.horizon_length,
        batch_size=args.batch_size,
        gamma=args.gamma,
        tau=args.tau,
        alpha=args.alpha,
        flow_steps=args.flow_steps,
    )
    critic_key, velocity_key, onestep_key = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    obs = jnp.zeros((1, obs_dim), jnp.float32)
    chunk = jnp.zeros((1, chunk_dim), jnp.float32)
    # Jitted: one compiled call each, where eager initialisation compiles hundreds of small operations (seconds).
    params = {
        "critic": jax.jit(agent.critic.init)(critic_key, obs, chunk),
        "velocity_field": jax.jit(agent.velocity_field.init)(velocity_key, obs, chunk, jnp.zeros((1, 1), jnp.float32)),
        "onestep_policy": jax.jit(agent.onestep_policy.init)(onestep_key, obs, chunk),
    }
    # The target starts as a copy (not the same buffers: the jitted updates donate their inputs).
    state = AgentState(params, jax.tree.map(jnp.copy, params["critic"]), agent.optimizer.init(params))
    return agent, state


# ----------------------------------------------------------------------------------------------------
# Losses and updates


def qc_fql_loss(params, target_critic_params, agent: QCFQL, batch: dict, key):
    """Critic loss + flow BC loss + one-step policy loss; stop_gradient keeps each gradient in its own network."""
    next_key, bc_noise_key, time_key, distill_key = jax.random.split(key, 4)
    observations, action_chunks = batch["observations"], batch["action_chunks"]
    shape = action_chunks.shape

    # Critic. The target chunk A' comes from the one-step policy; QC-FQL's default (q_agg="mean") averages
    # the target Q ensemble (not the min) for the TD target.
    next_noise = jax.random.normal(next_key, shape)
    next_chunks = jnp.clip(
        agent.onestep_policy.apply(params["onestep_policy"], batch["next_observations"], next_noise), -1, 1
    )
    next_q = agent.critic.apply(target_critic_params, batch["next_observations"], next_chunks).mean(axis=0)
    target, valid = chunked_td_target(batch["rewards"], batch["masks"], batch["terminals"], next_q, agent.gamma)
    q = agent.critic.apply(params["critic"], observations, action_chunks)
    qf_loss = jnp.mean(valid[:, -1] * (q - jax.lax.stop_gradient(target)) ** 2)

    # Flow BC policy.
    def velocity(p):
        return lambda s, x, t: agent.velocity_field.apply(p, s, x, t)

    bc_flow_loss = flow_matching_loss(
        velocity(params["velocity_field"]),
        observations,
        action_chunks,
        valid,
        jax.random.normal(bc_noise_key, shape),
        jax.random.uniform(time_key, (shape[0], 1)),
    )

    # One-step policy: distil the flow policy's chunk for the same noise, and maximise the mean Q
    # (QC-FQL does not normalise this Q term: its normalize_q_loss is off).
    noise = jax.random.normal(distill_key, shape)
    flow_chunks = flow_policy_actions(
        velocity(jax.lax.stop_gradient(params["velocity_field"])), observations, noise, agent.flow_steps
    )
    onestep_chunks = agent.onestep_policy.apply(params["onestep_policy"], observations, noise)
    distill_loss = jnp.mean((onestep_chunks - flow_chunks) ** 2)
    q_policy = agent.critic.apply(
        jax.lax.stop_gradient(params["critic"]), observations, jnp.clip(onestep_chunks, -1, 1)
    )
    q_loss = -q_policy.mean()
    actor_loss = bc_flow_loss + agent.alpha * distill_loss + q_loss

    metrics = {
        "losses/qf_loss": qf_loss,
        "losses/qf_values": q.mean(),
        "losses/actor_loss": actor_loss,
        "losses/bc_flow_loss": bc_flow_loss,
        "losses/distill_loss": distill_loss,
        "losses/q_loss": q_loss,
        "losses/valid_chunk_fraction": valid[:, -1].mean(),
    }
    return qf_loss + actor_loss, metrics


def update_step(agent: QCFQL, state: AgentState, buffer: dict, buffer_size, key):
    """One Adam step on a batch of chunks from the buffer, then a Polyak update of the target critic."""
    batch_key, loss_key = jax.random.split(key)
    batch = sample_chunk_batch(buffer, buffer_size, batch_key, agent.batch_size, agent.horizon_length)
    grads, metrics = jax.grad(qc_fql_loss, has_aux=True)(
        state.params, state.target_critic_params, agent, batch, loss_key
    )
    updates, opt_state = agent.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    target_critic_params = optax.incremental_update(params["critic"], state.target_critic_params, agent.tau)
    return AgentState(params, target_critic_params, opt_state), metrics


def is_finite(metrics: dict, state: AgentState):
    """The divergence check, one boolean: every loss and every parameter (target critic included) is finite."""
    leaves = jax.tree.leaves((metrics, state.params, state.target_critic_params))
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def offline_updates(agent: QCFQL, state: AgentState, buffer: dict, buffer_size, keys):
    """One update per key, in one jax.lax.scan. Returns the new state, the metrics of every update and the number of
    updates before the first non-finite one (len(keys) if none); the state stays as that update left it."""

    def body(carry, step_key):
        state, finite_so_far = carry
        new_state, metrics = update_step(agent, state, buffer, buffer_size, step_key)
        state = jax.tree.map(lambda new, old: jnp.where(finite_so_far, new, old), new_state, state)
        finite = finite_so_far & is_finite(metrics, new_state)
        return (state, finite), (metrics, finite)

    (state, _), (metrics, finite) = jax.lax.scan(body, (state, jnp.bool_(True)), keys)
    return state, metrics, jnp.sum(finite)


def sample_chunks(agent: QCFQL, params: dict, observations, key):
    """The acting policy: one-step policy with fresh noise, clipped to the action bounds. (B, h*d)."""
    noise = jax.random.normal(key, (observations.shape[0], agent.chunk_dim))
    return jnp.clip(agent.onestep_policy.apply(params["onestep_policy"], observations, noise), -1, 1)


def online_collect(agent: QCFQL, state: AgentState, buffer: dict, position, transition: dict, observation, key):
    """Before online learning starts: store the transition and propose a chunk for `observation`."""
    buffer = add_transition(buffer, position, transition)
    return buffer, sample_chunks(agent, state.params, observation[None], key)[0]


def online_step(agent: QCFQL, state: AgentState, buffer: dict, position, transition: dict, observation, key):
    """Store the transition at row `position`, make one update on the buffer, propose a chunk for `observation`.
    Also returns the divergence check of the update."""
    update_key, act_key = jax.random.split(key)
    buffer = add_transition(buffer, position, transition)
    state, metrics = update_step(agent, state, buffer, position + 1, update_key)
    chunk = sample_chunks(agent, state.params, observation[None], act_key)[0]
    # A policy whose parameters are still finite can already propose a non-finite chunk: that counts as divergence
    # too, so that the chunk never reaches the environment.
    finite = is_finite(metrics, state) & jnp.all(jnp.isfinite(chunk))
    return state, buffer, metrics, finite, chunk


# ----------------------------------------------------------------------------------------------------
# The training loop

SCRIPT = f"offline_to_online/{os.path.basename(__file__)}"  # recorded in checkpoints: --resume refuses another's


def check_args(args: Args):
    positive = (
        "horizon_length",
        "batch_size",
        "flow_steps",
        "log_every",
        "eval_every",
        "offline_scan_length",
        "num_qs",
    )
    non_negative = ("offline_steps", "online_steps", "online_learning_starts", "eval_episodes", "checkpoint_every")
    cli.check_args(args, positive, non_negative, [
        (args.max_episode_steps is not None and args.max_episode_steps < 1, "--max-episode-steps must be >= 1"),
    ])  # fmt: skip


def parameter_groups(state: AgentState) -> dict:
    """What the divergence stop checks, by name."""
    return {
        "critic parameters": state.params["critic"],
        "flow policy parameters": state.params["velocity_field"],
        "one-step policy parameters": state.params["onestep_policy"],
        "target critic parameters": state.target_critic_params,
    }


def main():
    args, checkpoint = cli.parse_args(Args, SCRIPT)
    check_args(args)
    run = OgbenchRun(args, SCRIPT, checkpoint)
    del checkpoint  # the run drops it once it is restored: it can hold a large online replay
    dataset = run.load_dataset(min_size=max(args.batch_size, args.horizon_length))
    agent, state = make_agent(args, run.obs_dim, run.action_dim)
    buffer = make_replay_buffer(dataset, run.dataset_size + args.online_steps, args.sparse)
    del dataset
    state, buffer = run.start(state, buffer, parameter_groups)
    offline_block = jax.jit(functools.partial(offline_updates, agent), donate_argnums=0)
    act = jax.jit(functools.partial(sample_chunks, agent))
    collect = jax.jit(functools.partial(online_collect, agent), donate_argnums=1)
    learn = jax.jit(functools.partial(online_step, agent), donate_argnums=(0, 1))

    # Offline phase: blocks of updates, each run as jitted scans over batches sampled on the device.
    # The losses logged are the mean over every update since the previous log.
    step = run.start_offline
    while step < args.offline_steps:
        for keys in run.offline_update_keys(step, "offline", args.offline_steps):
            state, metrics, finite_updates = offline_block(state, buffer, np.int32(run.dataset_size), keys)
            step += len(keys)
            run.offline_updates_done(step, metrics, finite_updates, state)
        run.log_offline_losses(step, args.offline_steps)
        run.evaluate(step, act, state.params)
        run.checkpoint(step, state, buffer)  # also ends the run on SIGINT or SIGTERM

    # Online phase: the dataset is the start of the replay buffer; each env step appends one transition,
    # makes one update and proposes the chunk for the next observation (used when the previous one has run out).
    run.begin_online_phase(act, state.params)
    for online_step_index in range(run.start_online + 1, args.online_steps + 1):
        step = args.offline_steps + online_step_index
        transition, observation = run.step_environment(step)
        key = jax.random.fold_in(run.online_key, online_step_index)
        position = np.int32(run.dataset_size + online_step_index - 1)
        if online_step_index >= args.online_learning_starts:
            state, buffer, metrics, finite, chunk = learn(state, buffer, position, transition, observation, key)
            run.check_later(step, finite, metrics)
        else:
            buffer, chunk = collect(state, buffer, position, transition, observation, key)
        run.take_chunk(step, chunk, state)
        run.log_online_losses(step)
        run.evaluate(step, act, state.params)
        run.checkpoint(step, state, buffer)  # also ends the run on SIGINT or SIGTERM

    run.finish({"params": state.params, "target_critic_params": state.target_critic_params})


if __name__ == "__main__":
    main()
