"""SAC Flow-T offline-to-online on OGBench and Robomimic: a flow policy with a transformer-decoder velocity, chunks.

The offline-to-online agent of SAC Flow (arXiv 2509.25756) on the QC-FQL setup (qc_fql.py): the policy outputs a
chunk of h actions as one vector of D = h·d numbers, and the whole chunk runs open-loop in the environment.
Policy: the noise-augmented flow rollout, K steps, Δt = 1/K, t_k = k·Δt, over a whole chunk:

    A_0 ~ N(0, I_D)
    v_k = v_θ(LN(s), A_k, φ(t_k))                                     velocity network (below), state LayerNorm-ed
    b_k = (1 + t_k σ² / (2(1 − t_k))) · v_k − σ² / (2(1 − t_k)) · A_k   drift that keeps the flow's marginals
    A_{k+1} = A_k + Δt · b_k + σ √Δt · ε_k,   ε_k ~ N(0, I_D)
    chunk = tanh(A_K)                                                 (OGBench's and Robomimic's actions: [−1, 1])
    log π = log N(A_0; 0, I) + Σ_k log N(A_{k+1}; A_k + Δt b_k, σ² Δt I) − Σ_j log(1 − tanh(A_K)_j² + 1e-6)

σ is a state-dependent standard deviation (log σ squashed into [−5, log √2]) unless --noise-std fixes it.
Flow-T velocity (decoded): an action–time token and a state token, both of width d_model,

    Φ_A = E_A([A_k, φ(t_k)]),   Φ_S = E_S(LN(s)) = W_2 swish(W_1 LN(s))     (W_1: d_model/2 wide, as the released code)
    L pre-norm decoder blocks:  Y = Φ_A + CrossAttn(query = LN(Φ_A), keys/values = LN(Φ_S))
                                Φ_A = Y + FFN(LN(Y))            FFN: d_model → 4·d_model → d_model, GELU
    v_k = W_o(LN(Φ_A))

Critic: 2 Q networks Q_i(s, chunk) (MLP 4×512, GELU, LayerNorm), a target network (Polyak rate τ), Q = mean_i Q_i:

    y = Σ_{i<h} γ^i r_{t+i} + γ^h m (Q_target(s_{t+h}, A') − α log π(A'|s_{t+h})),   A' ~ π(·|s_{t+h})
    L_Q = mean over (i, batch) of valid · (Q_i(s_t, A_t) − y)²

m = 0 once the task is solved inside the chunk; valid = 0 for chunks that cross an episode end (as QC-FQL).
Three phases; each update is one Adam step on the critic loss plus the actor loss (stop_gradient keeps each gradient
in its own network), then a Polyak step of the target critic:
  (a) offline BC, the first --bc-fraction of the offline steps: flow matching on data chunks, in pre-tanh space,
          x_0 ~ N(0, I), x_1 = atanh(clip(A_t, ±0.999)), t ~ U[0, 1), x_t = (1 − t) x_0 + t x_1
          L_BC = mean ‖v_θ(LN(s), x_t, φ(t)) − (x_1 − x_0)‖²     (chunk steps past an episode end masked)
  (b) offline action-regularised SAC, the rest of the offline steps (β = --alpha):
          L_π = β · mean_{b,i,j} valid (a_θ − a_data)² + mean_b (α log π(a_θ|s) − Q(s, a_θ))
          L_α = −log α · mean(log π(a_θ|s) + H_target)
      --interleave-offline-updates makes a BC update and then a SAC update on every offline step, as the released code.
  (c) online: the dataset is the initial replay buffer; each environment step appends one transition, makes one SAC
      update as in (b) with β = --online-alpha, and samples the next chunk (stochastic, as SAC explores).
Evaluation is deterministic: ε = 0 at every flow step, A_0 sampled (--eval-zero-initial-noise: A_0 = 0).
docs/design.md explains the choices (BC in pre-tanh space, entropy in the TD target, the target entropy, α).

Example:
    python offline_to_online/make_dataset.py --env-name cube-triple-play-v0
    python offline_to_online/sac_flow_transformer.py --env-name cube-triple-play-singletask-task4-v0 --alpha 100
    python offline_to_online/sac_flow_transformer.py --env-name square-mh-low_dim  # Robomimic (setup.md)
"""

import functools
import math
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
    bc_fraction: float = 0.5
    """share of the offline steps that are flow-matching BC (+ TD) only; the rest are action-regularised SAC"""
    interleave_offline_updates: bool = False
    """make a BC update and then a SAC update on every offline step, as the released code (--bc-fraction unused)"""

    horizon_length: int = 5
    """action chunk length h"""
    batch_size: int = 256
    """batch size of each update"""
    learning_rate: float = 3e-4
    """Adam learning rate of the critic, the policy and log alpha"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target critic Polyak rate"""
    alpha: float = 100.0
    """the behaviour-cloning weight β (named --alpha, as in QC-FQL's published commands): β · mean (a_θ − a_data)²"""
    online_alpha: float | None = None
    """β of the online phase (None: --alpha, so the actor's objective does not jump at the switch to online)"""
    init_alpha: float = 0.2
    """initial entropy coefficient alpha (learned from there)"""
    target_entropy: float | None = None
    """H_target of the alpha loss, a path entropy -log pi of a whole chunk (None: -h*d/2)"""
    backup_entropy: bool = True
    """subtract alpha log pi(A'|s') of the next chunk in the TD target (soft Q, as SAC)"""
    flow_steps: int = 4
    """K, the number of flow (Euler-Maruyama) steps of the policy"""
    noise_std: float = 0.0
    """sigma of the rollout noise; 0 learns a state-dependent sigma (a fixed one may need a lower --target-entropy)"""
    eval_zero_initial_noise: bool = False
    """evaluate with A_0 = 0 (fully deterministic); by default A_0 is sampled and eps = 0 at every flow step"""
    critic_hidden_dims: tuple[int, ...] = (512, 512, 512, 512)
    """hidden layers of each Q network (with LayerNorm)"""
    num_qs: int = 2
    """number of Q networks in the critic ensemble"""
    d_model: int = 128
    """width of the velocity decoder's tokens (its FFN is 4 times wider, its state MLP E_S half as wide)"""
    n_heads: int = 4
    """attention heads of each decoder block (must divide --d-model)"""
    n_layers: int = 2
    """decoder blocks of the velocity network"""


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
# Math: chunked TD target, flow matching, the policy's log-density and the α loss


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


BC_TARGET_BOUND = 0.999  # flow matching targets atanh(clip(a, +-0.999)), |.| <= 3.8 (header, phase (a))


def action_regularisation(chunks, data_chunks, valid):
    """mean_{b,i,j} valid[b, i] (chunk - data chunk)^2 over (B, h, d): entries of chunk steps past an episode end
    count as zero (their data actions belong to another episode), and the mean divides by B*h*d, as QC."""
    batch_size, horizon = valid.shape
    squared_error = ((chunks - data_chunks) ** 2).reshape(batch_size, horizon, -1)
    return jnp.mean(squared_error * valid[:, :, None])


def gaussian_log_density(standard_noise, std):
    """Σ_j log N(x_j; μ_j, std_j²) for x = μ + std · standard_noise."""
    std = jnp.broadcast_to(std, standard_noise.shape)
    return jnp.sum(-0.5 * standard_noise**2 - jnp.log(std) - 0.5 * math.log(2 * math.pi), axis=-1)


def squash(pre_tanh_chunks):
    """chunk = tanh(A_K) (action bounds [-1, 1]) and log|d chunk / d A_K| = sum_j log(1 - tanh^2 + 1e-6)."""
    y = jnp.tanh(pre_tanh_chunks)
    return y, jnp.sum(jnp.log(1 - y**2 + 1e-6), axis=-1)


def max_path_entropy(chunk_dim: int, flow_steps: int, sigma: float) -> float:
    """The largest -log pi with per-step std <= sigma: the path entropy of constant sigma, no tanh saturation."""
    c = 0.5 * math.log(2 * math.pi * math.e)
    return chunk_dim * (c + flow_steps * (c + math.log(sigma) - 0.5 * math.log(flow_steps)))


def alpha_loss(log_alpha, log_prob, target_entropy: float):
    """L_α = −log α · mean(log π + H_target): α grows while the entropy −log π is below H_target."""
    return -log_alpha * jnp.mean(jax.lax.stop_gradient(log_prob) + target_entropy)


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


class TimeEmbedding(nn.Module):
    """φ(t): sinusoidal features of t ∈ [0, 1) (angular frequencies 1 to 1000) followed by a small MLP."""

    dim: int = 32

    @nn.compact
    def __call__(self, t):
        frequencies = jnp.exp(jnp.linspace(0.0, math.log(1000.0), self.dim // 2, dtype=jnp.float32))
        features = jnp.concatenate([jnp.sin(t * frequencies), jnp.cos(t * frequencies)], axis=-1)
        return nn.Dense(self.dim)(nn.swish(nn.Dense(self.dim)(features)))


class DecoderBlock(nn.Module):
    """Pre-norm decoder block, no self-attention: Y = Φ_A + CrossAttn(LN(Φ_A), LN(Φ_S)); Φ_A' = Y + FFN(LN(Y)).
    Multi-head attention of each row's action token (batch, d_model) over its m context tokens (batch, m, d_model)."""

    d_model: int
    n_heads: int

    def setup(self):
        head_shape = (self.n_heads, self.d_model // self.n_heads)
        self.context_norm = nn.LayerNorm()
        self.key = nn.DenseGeneral(head_shape)
        self.value = nn.DenseGeneral(head_shape)
        self.query_norm = nn.LayerNorm()
        self.query = nn.DenseGeneral(head_shape)
        self.attention_out = nn.DenseGeneral(self.d_model, axis=(-2, -1))
        self.ffn_norm = nn.LayerNorm()
        self.ffn_hidden = nn.Dense(4 * self.d_model)
        self.ffn_out = nn.Dense(self.d_model)

    def __call__(self, action_token, context_tokens):
        context = self.context_norm(context_tokens)
        values = self.value(context)  # (batch, m, n_heads, head_dim)
        if context_tokens.shape[1] == 1:
            # One context token (the state): its attention weight is 1 whatever the query, so neither queries nor
            # keys are computed (they would get zero gradient).
            attended = values[:, 0]
        else:
            queries = self.query(self.query_norm(action_token))  # (batch, n_heads, head_dim)
            scores = jnp.einsum("bhd,bmhd->bhm", queries, self.key(context)) / math.sqrt(queries.shape[-1])
            attended = jnp.einsum("bhm,bmhd->bhd", nn.softmax(scores, axis=-1), values)
        y = action_token + self.attention_out(attended)
        return y + self.ffn_out(nn.gelu(self.ffn_hidden(self.ffn_norm(y))))


class VelocityNet(nn.Module):
    """Flow-T velocity: Φ_A = E_A([A_k, φ(t_k)]), Φ_S = E_S(s), n_layers decoder blocks, v = W_o(LN(Φ_A)).
    E_S is an MLP, as in the released code: with one context token the attention passes on a linear map of LN(Φ_S),
    so a linear E_S would leave the velocity only a linear view of the state."""

    action_dim: int
    d_model: int
    n_heads: int
    n_layers: int

    def setup(self):
        self.state_hidden = nn.Dense(self.d_model // 2)
        self.state_embedding = nn.Dense(self.d_model)
        self.action_time_embedding = nn.Dense(self.d_model)
        self.blocks = [DecoderBlock(self.d_model, self.n_heads) for _ in range(self.n_layers)]
        self.output_norm = nn.LayerNorm()
        self.output = nn.Dense(self.action_dim)

    def __call__(self, state, action, time_features):
        state_token = self.state_embedding(nn.swish(self.state_hidden(state)))[:, None]  # one context token per row
        time_features = jnp.broadcast_to(time_features, (*action.shape[:-1], time_features.shape[-1]))  # may be one row
        action_token = self.action_time_embedding(jnp.concatenate([action, time_features], axis=-1))
        for block in self.blocks:
            action_token = block(action_token, state_token)
        return self.output(self.output_norm(action_token))


# σ ≤ √2 keeps every compensated step from amplifying A_k (the last one multiplies it by 1 − σ²/2): docs/design.md.
LOG_SIGMA_MIN, LOG_SIGMA_MAX = -5.0, 0.5 * math.log(2.0)


class FlowPolicy(nn.Module):
    """The noise-augmented flow rollout of the header over a chunk, before the tanh squash: a deterministic function
    of its noise (A_0, ε_0..ε_{K−1}). Returns the path A_0..A_K (K+1, B, D), σ (B, D) and the Gaussian part of log π."""

    velocity_net: nn.Module  # v(s, x, φ(t)) -> (B, D): the variant's velocity network
    chunk_dim: int
    flow_steps: int
    noise_std: float

    def setup(self):
        self.state_norm = nn.LayerNorm()
        self.time_embedding = TimeEmbedding()
        if self.noise_std <= 0:
            self.log_sigma_hidden = nn.Dense(256)
            # Zero weights: sigma starts at the middle of its log range, e^-2.33 = 0.10, in every entry and state.
            self.log_sigma_out = nn.Dense(self.chunk_dim, kernel_init=nn.initializers.zeros)

    def velocity(self, observations, x, t):
        """v(LN(s), x, phi(t)) for times t of shape (B, 1): flow-matching BC."""
        return self.velocity_net(self.state_norm(observations), x, self.time_embedding(t))

    def __call__(self, observations, initial_noise, step_noise):
        state = self.state_norm(observations)
        if self.noise_std > 0:
            sigma = jnp.full_like(initial_noise, self.noise_std)
        else:
            raw = jnp.tanh(self.log_sigma_out(nn.relu(self.log_sigma_hidden(state))))
            sigma = jnp.exp(LOG_SIGMA_MIN + 0.5 * (LOG_SIGMA_MAX - LOG_SIGMA_MIN) * (raw + 1))

        dt = 1.0 / self.flow_steps
        # phi(t_k) for every k at once: it does not depend on the state.
        time_features = self.time_embedding(jnp.array([[k * dt] for k in range(self.flow_steps)], jnp.float32))
        x = initial_noise
        log_prob = gaussian_log_density(initial_noise, 1.0)
        path = [x]
        for k in range(self.flow_steps):
            t = k * dt
            velocity = self.velocity_net(state, x, time_features[k : k + 1])
            compensation = sigma**2 / (2 * (1 - t))
            drift = (1 + t * compensation) * velocity - compensation * x
            step_std = sigma * math.sqrt(dt)
            x = x + dt * drift + step_std * step_noise[k]
            # A_{k+1} - (A_k + dt b_k) = step_std * eps_k exactly, so log N(A_{k+1}; .) needs only eps_k.
            log_prob = log_prob + gaussian_log_density(step_noise[k], step_std)
            path.append(x)
        return jnp.stack(path), sigma, log_prob


# ----------------------------------------------------------------------------------------------------
# Agent


@dataclass(frozen=True)
class SACFlow:
    """The networks, optimizers and hyperparameters the jitted functions below close over."""

    critic: Critic
    policy: FlowPolicy
    optimizer: optax.GradientTransformation
    alpha_optimizer: optax.GradientTransformation
    chunk_dim: int  # D = h·d
    online_beta: float  # --online-alpha, or --alpha
    target_entropy: float
    args: Args


@flax.struct.dataclass
class AgentState:
    params: dict  # {"critic", "policy"}
    target_critic_params: dict
    opt_state: optax.OptState
    log_alpha: jax.Array  # float32 scalar
    alpha_opt_state: optax.OptState


def target_entropy_of(args: Args, chunk_dim: int) -> float:
    """H_target: --target-entropy, or -h*d/2 when it is None."""
    return -chunk_dim / 2 if args.target_entropy is None else args.target_entropy


def make_agent(args: Args, obs_dim: int, action_dim: int) -> tuple[SACFlow, AgentState]:
    chunk_dim = args.horizon_length * action_dim
    velocity_net = VelocityNet(chunk_dim, args.d_model, args.n_heads, args.n_layers)
    agent = SACFlow(
        critic=Critic(args.critic_hidden_dims, args.num_qs),
        policy=FlowPolicy(velocity_net, chunk_dim, args.flow_steps, args.noise_std),
        optimizer=optax.adam(args.learning_rate),
        alpha_optimizer=optax.adam(args.learning_rate),
        chunk_dim=chunk_dim,
        online_beta=args.alpha if args.online_alpha is None else args.online_alpha,
        target_entropy=target_entropy_of(args, chunk_dim),
        args=args,
    )
    critic_key, policy_key = jax.random.split(jax.random.PRNGKey(args.seed))
    obs = jnp.zeros((1, obs_dim), jnp.float32)
    chunk = jnp.zeros((1, chunk_dim), jnp.float32)
    # Jitted: one compiled call each, where eager initialisation compiles hundreds of small operations (seconds).
    params = {
        "critic": jax.jit(agent.critic.init)(critic_key, obs, chunk),
        "policy": jax.jit(agent.policy.init)(
            policy_key, obs, chunk, jnp.zeros((args.flow_steps, 1, chunk_dim), jnp.float32)
        ),
    }
    log_alpha = jnp.asarray(math.log(args.init_alpha), jnp.float32)
    # The target starts as a copy (not the same buffers: the jitted updates donate their inputs).
    target_critic_params = jax.tree.map(jnp.copy, params["critic"])
    optimizer_state, alpha_optimizer_state = agent.optimizer.init(params), agent.alpha_optimizer.init(log_alpha)
    state = AgentState(params, target_critic_params, optimizer_state, log_alpha, alpha_optimizer_state)
    return agent, state


def rollout(agent: SACFlow, policy_params, observations, initial_noise, step_noise):
    """The flow rollout and its squash: (chunks (B, h*d) in [-1, 1], log pi(chunk|s) (B,))."""
    path, _, log_prob = agent.policy.apply(policy_params, observations, initial_noise, step_noise)
    chunks, log_det = squash(path[-1])
    return chunks, log_prob - log_det


def sample_chunks(agent: SACFlow, policy_params, observations, key):
    """A stochastic chunk and its log-probability for each observation."""
    initial_key, step_key = jax.random.split(key)
    initial_noise = jax.random.normal(initial_key, (observations.shape[0], agent.chunk_dim))
    step_noise = jax.random.normal(step_key, (agent.args.flow_steps, observations.shape[0], agent.chunk_dim))
    return rollout(agent, policy_params, observations, initial_noise, step_noise)


def acting_chunks(agent: SACFlow, params: dict, observations, key):
    """The exploring policy of the online phase: stochastic chunks (B, h*d)."""
    return sample_chunks(agent, params["policy"], observations, key)[0]


def evaluation_chunks(agent: SACFlow, params: dict, observations, key):
    """Deterministic chunks: eps = 0 at every flow step; A_0 sampled unless --eval-zero-initial-noise."""
    initial_noise = jax.random.normal(key, (observations.shape[0], agent.chunk_dim))
    if agent.args.eval_zero_initial_noise:
        initial_noise = jnp.zeros_like(initial_noise)
    step_noise = jnp.zeros((agent.args.flow_steps, observations.shape[0], agent.chunk_dim))
    return rollout(agent, params["policy"], observations, initial_noise, step_noise)[0]


# ----------------------------------------------------------------------------------------------------
# Losses and updates


def critic_loss(critic_params, target_critic_params, policy_params, agent: SACFlow, batch: dict, alpha, key):
    """TD loss of the critic with the soft chunked target of the header; also returns the chunk steps' validity."""
    next_chunks, next_log_prob = sample_chunks(agent, policy_params, batch["next_observations"], key)
    # Q = mean of the target ensemble (QC-FQL's q_agg="mean").
    next_q = agent.critic.apply(target_critic_params, batch["next_observations"], next_chunks).mean(axis=0)
    if agent.args.backup_entropy:
        next_q = next_q - alpha * next_log_prob
    target, valid = chunked_td_target(batch["rewards"], batch["masks"], batch["terminals"], next_q, agent.args.gamma)
    q = agent.critic.apply(critic_params, batch["observations"], batch["action_chunks"])
    qf_loss = jnp.mean(valid[:, -1] * (q - jax.lax.stop_gradient(target)) ** 2)
    metrics = {
        "losses/qf_loss": qf_loss,
        "losses/qf_values": q.mean(),
        "losses/valid_chunk_fraction": valid[:, -1].mean(),
        # -log pi of the next chunks; in the SAC phases replaced by that of the actor's chunks at s_t
        "losses/entropy": -next_log_prob.mean(),
    }
    return qf_loss, valid, metrics


def bc_loss(params, target_critic_params, agent: SACFlow, batch: dict, alpha, key):
    """Phase (a): critic TD loss + flow-matching BC of the velocity towards the pre-tanh data chunks."""
    critic_key, noise_key, time_key = jax.random.split(key, 3)
    qf_loss, valid, metrics = critic_loss(
        params["critic"], target_critic_params, jax.lax.stop_gradient(params["policy"]), agent, batch, alpha, critic_key
    )
    pre_tanh_chunks = jnp.arctanh(jnp.clip(batch["action_chunks"], -BC_TARGET_BOUND, BC_TARGET_BOUND))
    noise = jax.random.normal(noise_key, pre_tanh_chunks.shape)
    times = jax.random.uniform(time_key, (len(pre_tanh_chunks), 1))
    velocity = lambda s, x, t: agent.policy.apply(params["policy"], s, x, t, method="velocity")  # noqa: E731
    loss = flow_matching_loss(velocity, batch["observations"], pre_tanh_chunks, valid, noise, times)
    return qf_loss + loss, {**metrics, "losses/bc_loss": loss}


def sac_loss(params, target_critic_params, agent: SACFlow, batch: dict, alpha, beta: float, key):
    """Phases (b), (c): critic TD loss + the action-regularised SAC actor loss; returns log pi for the alpha loss."""
    critic_key, actor_key = jax.random.split(key)
    qf_loss, valid, metrics = critic_loss(
        params["critic"], target_critic_params, jax.lax.stop_gradient(params["policy"]), agent, batch, alpha, critic_key
    )
    chunks, log_prob = sample_chunks(agent, params["policy"], batch["observations"], actor_key)
    q = agent.critic.apply(jax.lax.stop_gradient(params["critic"]), batch["observations"], chunks).mean(axis=0)
    regularisation = action_regularisation(chunks, batch["action_chunks"], valid)
    actor_loss = beta * regularisation + jnp.mean(alpha * log_prob - q)
    metrics = {**metrics, "losses/actor_loss": actor_loss, "losses/actor_reg_loss": regularisation}
    metrics.update(
        {"losses/q_loss": -q.mean(), "losses/entropy": -log_prob.mean()}
    )  # the entropy of the actor's chunks
    return qf_loss + actor_loss, (metrics, log_prob)


def apply_gradients(agent: SACFlow, state: AgentState, grads) -> AgentState:
    """One Adam step of the critic and the policy, then a Polyak step of the target critic."""
    updates, opt_state = agent.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    target_critic_params = optax.incremental_update(params["critic"], state.target_critic_params, agent.args.tau)
    return state.replace(params=params, target_critic_params=target_critic_params, opt_state=opt_state)


def bc_update(agent: SACFlow, state: AgentState, batch: dict, key):
    """Phase (a) update. alpha stays as it is: no actor term here reacts to it, so its loss would run away."""
    alpha = jnp.exp(state.log_alpha)
    grads, metrics = jax.grad(bc_loss, has_aux=True)(state.params, state.target_critic_params, agent, batch, alpha, key)
    return apply_gradients(agent, state, grads), {**metrics, "losses/alpha": alpha}


def sac_update(agent: SACFlow, state: AgentState, batch: dict, key, beta: float):
    """Phases (b), (c) update: critic, policy, then log alpha."""
    alpha = jnp.exp(state.log_alpha)
    grads, (metrics, log_prob) = jax.grad(sac_loss, has_aux=True)(
        state.params, state.target_critic_params, agent, batch, alpha, beta, key
    )
    state = apply_gradients(agent, state, grads)
    alpha_loss_value, alpha_grad = jax.value_and_grad(alpha_loss)(state.log_alpha, log_prob, agent.target_entropy)
    alpha_updates, alpha_opt_state = agent.alpha_optimizer.update(alpha_grad, state.alpha_opt_state)
    log_alpha = optax.apply_updates(state.log_alpha, alpha_updates)
    metrics = {**metrics, "losses/alpha_loss": alpha_loss_value, "losses/alpha": jnp.exp(log_alpha)}
    return state.replace(log_alpha=log_alpha, alpha_opt_state=alpha_opt_state), metrics


def is_finite(metrics: dict, state: AgentState):
    """The divergence check, one boolean: every loss and every parameter (target critic and log alpha included) is
    finite."""
    leaves = jax.tree.leaves((metrics, state.params, state.target_critic_params, state.log_alpha))
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def offline_updates(agent: SACFlow, state: AgentState, buffer: dict, buffer_size, keys, phase: str):
    """One offline update per key, in one jax.lax.scan; phase "bc", "sac" or "interleaved" (a BC then a SAC update
    on each batch). Returns the new state, the metrics of every update and the number of updates before the first
    non-finite one (len(keys) if none); the state stays as that update left it, for inspection."""

    def body(carry, step_key):
        state, finite_so_far = carry
        batch_key, bc_key, sac_key = jax.random.split(step_key, 3)
        batch = sample_chunk_batch(buffer, buffer_size, batch_key, agent.args.batch_size, agent.args.horizon_length)
        metrics = {}
        new_state = state
        if phase in ("bc", "interleaved"):
            new_state, metrics = bc_update(agent, new_state, batch, bc_key)
        if phase in ("sac", "interleaved"):
            new_state, sac_metrics = sac_update(agent, new_state, batch, sac_key, agent.args.alpha)
            metrics = {**metrics, **sac_metrics}
        state = jax.tree.map(lambda new, old: jnp.where(finite_so_far, new, old), new_state, state)
        finite = finite_so_far & is_finite(metrics, new_state)
        return (state, finite), (metrics, finite)

    (state, _), (metrics, finite) = jax.lax.scan(body, (state, jnp.bool_(True)), keys)
    return state, metrics, jnp.sum(finite)


def online_collect(agent: SACFlow, state: AgentState, buffer: dict, position, transition: dict, observation, key):
    """Before online learning starts: store the transition and propose a chunk for `observation`."""
    buffer = add_transition(buffer, position, transition)
    return buffer, acting_chunks(agent, state.params, observation[None], key)[0]


def online_step(agent: SACFlow, state: AgentState, buffer: dict, position, transition: dict, observation, key):
    """Store the transition at row `position`, make one SAC update on the buffer, propose a chunk for `observation`.
    Also returns the divergence check of the update."""
    batch_key, update_key, act_key = jax.random.split(key, 3)
    buffer = add_transition(buffer, position, transition)
    batch = sample_chunk_batch(buffer, position + 1, batch_key, agent.args.batch_size, agent.args.horizon_length)
    state, metrics = sac_update(agent, state, batch, update_key, agent.online_beta)
    chunk = acting_chunks(agent, state.params, observation[None], act_key)[0]
    # A policy whose parameters are still finite can already propose a non-finite chunk: that counts as divergence
    # too, so that the chunk never reaches the environment.
    finite = is_finite(metrics, state) & jnp.all(jnp.isfinite(chunk))
    return state, buffer, metrics, finite, chunk


# ----------------------------------------------------------------------------------------------------
# The training loop

SCRIPT = f"offline_to_online/{os.path.basename(__file__)}"  # recorded in checkpoints: --resume refuses another's


def check_args(args: Args):
    positive = ("horizon_length", "batch_size", "flow_steps", "log_every", "eval_every", "offline_scan_length")
    positive += ("num_qs", "init_alpha", "d_model", "n_heads", "n_layers")
    non_negative = ("offline_steps", "online_steps", "online_learning_starts", "eval_episodes", "checkpoint_every")
    cli.check_args(args, positive, non_negative + ("alpha", "noise_std"), [
        (args.d_model % args.n_heads != 0, f"--n-heads {args.n_heads} does not divide --d-model {args.d_model}"),
        (args.online_alpha is not None and args.online_alpha < 0, f"--online-alpha must be >= 0, got {args.online_alpha}"),
        (not 0 <= args.bc_fraction <= 1, f"--bc-fraction must be in [0, 1], got {args.bc_fraction}"),
        (args.max_episode_steps is not None and args.max_episode_steps < 1, "--max-episode-steps must be >= 1"),
    ])  # fmt: skip


def parameter_groups(state: AgentState) -> dict:
    """What the divergence stop checks, by name."""
    return {
        "critic parameters": state.params["critic"],
        "policy parameters": state.params["policy"],
        "target critic parameters": state.target_critic_params,
        "log alpha": state.log_alpha,
    }


def main():
    args, checkpoint = cli.parse_args(Args, SCRIPT)
    check_args(args)
    run = OgbenchRun(args, SCRIPT, checkpoint)
    del checkpoint  # the run drops it once it is restored: it can hold a large online replay
    chunk_dim = args.horizon_length * run.action_dim
    sigma_bound = args.noise_std if args.noise_std > 0 else math.exp(LOG_SIGMA_MAX)
    largest_entropy = max_path_entropy(chunk_dim, args.flow_steps, sigma_bound)
    if target_entropy_of(args, chunk_dim) >= largest_entropy:
        raise SystemExit(
            f"error: the target entropy {target_entropy_of(args, chunk_dim)} (--target-entropy) is not below the "
            f"largest entropy the policy can reach, {largest_entropy:.1f} for h*d = {chunk_dim}, K = {args.flow_steps} "
            "and its sigma bound: alpha would grow without bound"
        )
    dataset = run.load_dataset(min_size=max(args.batch_size, args.horizon_length))
    agent, state = make_agent(args, run.obs_dim, run.action_dim)
    buffer = make_replay_buffer(dataset, run.dataset_size + args.online_steps, args.sparse)
    del dataset
    state, buffer = run.start(state, buffer, parameter_groups)
    offline_block = jax.jit(functools.partial(offline_updates, agent), static_argnames="phase", donate_argnums=0)
    act = jax.jit(functools.partial(acting_chunks, agent))
    eval_act = jax.jit(functools.partial(evaluation_chunks, agent))
    collect = jax.jit(functools.partial(online_collect, agent), donate_argnums=1)
    learn = jax.jit(functools.partial(online_step, agent), donate_argnums=(0, 1))

    # Offline phase: blocks of updates, each run as jitted scans over batches sampled on the device; the first
    # bc_steps are BC, the rest action-regularised SAC (or both on every step with --interleave-offline-updates).
    # The losses logged are the mean over every update since the previous log (or phase change).
    bc_steps = 0 if args.interleave_offline_updates else round(args.bc_fraction * args.offline_steps)
    step = run.start_offline
    while step < args.offline_steps:
        phase = "interleaved" if args.interleave_offline_updates else "bc" if step < bc_steps else "sac"
        phase_end = bc_steps if phase == "bc" else args.offline_steps
        for keys in run.offline_update_keys(step, f"offline {phase}", phase_end):
            state, metrics, finite_updates = offline_block(state, buffer, np.int32(run.dataset_size), keys, phase=phase)
            step += len(keys)
            run.offline_updates_done(step, metrics, finite_updates, state)
        run.log_offline_losses(step, phase_end)
        run.evaluate(step, eval_act, state.params)
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
        run.evaluate(step, eval_act, state.params)
        run.checkpoint(step, state, buffer)  # also ends the run on SIGINT or SIGTERM

    run.finish(
        {"params": state.params, "target_critic_params": state.target_critic_params, "log_alpha": state.log_alpha}
    )


if __name__ == "__main__":
    main()
