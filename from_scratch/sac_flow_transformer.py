"""SAC Flow-T: Soft Actor-Critic with a flow-matching policy whose velocity is a transformer decoder.

The policy turns Gaussian noise into an action with K Euler-Maruyama steps of a learned velocity field
(the noise-augmented rollout of SAC Flow, arXiv 2509.25756). With Δt = 1/K and t_k = k·Δt:

    A_0 ~ N(0, I)
    v_k = v_θ(s, A_k, t_k)                                           velocity network (below)
    b_k = (1 + t_k σ² / (2(1 − t_k))) · v_k − σ² / (2(1 − t_k)) · A_k   drift that keeps the flow's marginals
    A_{k+1} = A_k + Δt · b_k + σ √Δt · ε_k,   ε_k ~ N(0, I)
    a = scale · tanh(A_K) + bias

Every step is Gaussian, so the log-density of the sampled path is exact:

    log π = log N(A_0; 0, I) + Σ_k log N(A_{k+1}; A_k + Δt b_k, σ² Δt I) − Σ_j log(scale_j (1 − tanh(A_K)_j²) + 1e-6)

σ is a state-dependent standard deviation (log σ squashed into [−5, log σ_max]) unless --noise-std fixes it. By
default σ_max = √(K/(2πe)): each noise step's std σ√Δt is then at most 1/√(2πe), the std of a Gaussian of zero
entropy, so the K noise steps cannot raise the path entropy above the N(0, I) start's.
Flow-T velocity (decoded): an action–time token and a state token, both of width d_model,

    Φ_A = E_A([A_k, φ(t_k)]),   Φ_S = E_S(s) = W_2 swish(W_1 s)     (W_1: d_model/2 wide, as the released code)
    L pre-norm decoder blocks:  Y = Φ_A + CrossAttn(query = LN(Φ_A), keys/values = LN(Φ_S))
                                Φ_A = Y + FFN(LN(Y))            FFN: d_model → 4·d_model → d_model, GELU
    v_k = W_o(LN(Φ_A))

Each step decodes v_k from a fresh token of (A_k, t_k) that attends to the state token only (the rollout stays
Markov); the LayerNorms keep v_k and ∂v_k/∂A_k bounded, so the gradient through the K steps does not compound.

SAC, CrossQ style (no target network; BatchRenorm in critic and actor input):

    y = r + γ (1 − terminated) (min_i Q_i(s', a') − α log π(a'|s')),   a' ~ π(·|s')
    L_Q = Σ_i mean (Q_i(s, a) − y)²     (s, a) and (s', a') pass the critic as ONE batch; y is stop-gradient
    L_π = mean(α log π(a_θ|s) − min_i Q_i(s, a_θ))      every `policy_delay` critic updates
    L_α = −log α · mean(log π(a_θ|s) + H_target)
    log α ← log α − (η/d) · ∂L_α/∂log α = log α − (η/d) · (H − H_target),   H = mean(−log π)   plain gradient descent
    α₀ = 0.2 / (K·d)    Gaussian SAC's initial 0.2, spread over the K·d Gaussian steps of the path's density

docs/design.md explains the choices (σ's bound, the target entropy, the replay buffer's layout, speed).
"""

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from sac_flow_utils import batching, cli, runs
from sac_flow_utils.gym_run import GymRun
from sac_flow_utils.replay_buffer import ReplayBuffer, buffer_add, buffer_sample, create_buffer


@dataclass
class Args(cli.RunArgs):  # the run options (--track, --checkpoint-every, --resume, ...) are in sac_flow_utils/cli.py
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (networks, noise, environment)"""
    capture_video: bool = False
    """record the first episode of each evaluation to runs/<run_name>/videos (needs a renderer: setup.md)"""

    env_id: str = "Humanoid-v4"
    """the gymnasium environment id (a continuous-action task, e.g. Hopper-v4 or Humanoid-v5)"""
    total_timesteps: int = 1_000_000
    """total environment steps"""
    buffer_size: int = 1_000_000
    """replay buffer slots (each episode end uses one extra slot for the final observation)"""
    gamma: float = 0.99
    """discount factor"""
    batch_size: int = 512
    """replay batch size of each update"""
    learning_starts: int = 50_000
    """environment steps with uniform random actions before the first update"""
    policy_lr: float = 3e-4
    """learning rate of the policy"""
    q_lr: float = 1e-3
    """learning rate of the critic (and of log α with --alpha-optimizer adam)"""
    adam_beta1: float = 0.5
    """Adam β1 of every optimiser (CrossQ uses 0.5)"""
    policy_delay: int = 3
    """update the actor and α once every this many critic updates"""
    alpha: float | None = None
    """initial entropy coefficient α; None: 0.2/(K·d) (d: action dimensions), where the entropy's bonus at σ's bound
    is about Gaussian SAC's (docs/entropy.md); the paper and the released code start at 0.2"""
    autotune: bool = True
    """learn α towards the target entropy"""
    alpha_optimizer: Literal["sgd", "adam"] = "sgd"
    """how log α follows L_α: "sgd", plain gradient descent, a step in proportion to the entropy gap; "adam", Adam at
    --q-lr as the released code and sac.py, a step of about q_lr whatever the gap (docs/entropy.md)"""
    alpha_lr: float = 1e-3
    """η of --alpha-optimizer sgd: log α moves by η/d per update and nat of entropy gap (d: action dimensions); slow
    enough that α does not pass its equilibrium while the actor brings σ back (docs/entropy.md)"""
    target_entropy: float = 0.0
    """H_target of the α loss, a path entropy −log π (0, as the paper and the released code); refused if unreachable"""
    critic_hidden: int = 1024
    """width of the critic's two hidden layers"""
    renorm_warmup_steps: int = 100_000
    """BatchRenorm uses plain batch statistics for this many training calls before its r/d corrections"""
    flow_steps: int = 4
    """K, the number of flow (Euler-Maruyama) steps of the policy"""
    noise_std: float = 0.0
    """σ of the rollout noise; 0 learns a state-dependent σ (the paper's fixed form uses 0.10)"""
    sigma_max: float | None = None
    """upper bound of the learned σ (log σ is squashed into [−5, log sigma_max]); None: √(K/(2πe)) (0.48 at K = 4),
    where no noise step adds entropy, so σ cannot buy path entropy on saturated action entries, where its noise does
    not move the action (docs/entropy.md); at most √2, above which a compensated step amplifies A_k (docs/design.md).
    1.4142 is this script's earlier default; the released code bounds log σ by 2, with uncompensated steps"""
    d_model: int = 64
    """width of the velocity decoder's tokens (its FFN is 4 times wider, its state MLP E_S half as wide)"""
    n_heads: int = 4
    """attention heads of each decoder block (must divide --d-model)"""
    n_layers: int = 2
    """decoder blocks of the velocity network"""
    eval_every: int = 50_000
    """environment steps between deterministic evaluations (ε = 0 at every flow step)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    eval_zero_initial_noise: bool = False
    """evaluate with A_0 = 0 too (fully deterministic); by default A_0 is still sampled"""
    log_every: int = 1_000
    """environment steps between logged losses"""
    log_grad_norms: bool = False
    """also log the actor loss's gradient norm w.r.t. each A_k and the velocity's parameters (a second backward pass)"""
    console_every: int = 5_000
    """environment steps between charts/SPS rows and console progress lines (a line also comes every 30 s)"""
    num_seeds: int = 1
    """train this many seeds (seed, seed+1, ...) in one process and train step, each in its own runs/<run_name>/"""


# ----------------------------------------------------------------------------------------------------
# Networks


class BatchRenorm(nn.Module):
    """Batch renormalisation (Ioffe, 2017), CrossQ's normaliser: in training, with the batch's μ_B, σ_B and the running
    μ, σ (updated), x̂ = (x − μ_B) / σ_B · r + d, r = clip(σ_B / σ, 1/r_max, r_max), d = clip((μ_B − μ) / σ, ±d_max),
    r = 1 and d = 0 for the first `warmup_steps` calls; in inference, x̂ = (x − μ) / σ. Output: γ · x̂ + β."""

    warmup_steps: int
    momentum: float = 0.99
    r_max: float = 3.0
    d_max: float = 5.0
    epsilon: float = 1e-3

    @nn.compact
    def __call__(self, x, train: bool):
        features = x.shape[-1]
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(features, jnp.float32))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones(features, jnp.float32))
        steps = self.variable("batch_stats", "steps", lambda: jnp.zeros((), jnp.int32))
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        running_std = jnp.sqrt(running_var.value + self.epsilon)
        if train:
            batch_mean = x.mean(axis=0)
            batch_var = x.var(axis=0)
            batch_std = jnp.sqrt(batch_var + self.epsilon)
            warmed_up = steps.value >= self.warmup_steps
            r = jnp.clip(batch_std / running_std, 1.0 / self.r_max, self.r_max)
            d = jnp.clip((batch_mean - running_mean.value) / running_std, -self.d_max, self.d_max)
            r = jax.lax.stop_gradient(jnp.where(warmed_up, r, 1.0))
            d = jax.lax.stop_gradient(jnp.where(warmed_up, d, 0.0))
            # γ x̂ + β is affine in x per feature: its multiplier and offset first, then one pass over the batch.
            multiplier = scale * r / batch_std
            offset = bias + scale * (d - batch_mean * r / batch_std)
            if not self.is_initializing():
                m = self.momentum
                running_mean.value = m * running_mean.value + (1 - m) * jax.lax.stop_gradient(batch_mean)
                running_var.value = m * running_var.value + (1 - m) * jax.lax.stop_gradient(batch_var)
                steps.value = steps.value + 1
        else:
            multiplier = scale / running_std
            offset = bias - running_mean.value * multiplier
        return x * multiplier + offset


class QNetwork(nn.Module):
    """One CrossQ critic: BatchRenorm → Dense → ReLU → BatchRenorm → Dense → ReLU → BatchRenorm → Dense 1."""

    hidden: int
    renorm_warmup_steps: int

    @nn.compact
    def __call__(self, obs, action, train: bool):
        x = jnp.concatenate([obs, action], axis=-1)
        x = BatchRenorm(self.renorm_warmup_steps)(x, train)
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = BatchRenorm(self.renorm_warmup_steps)(x, train)
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = BatchRenorm(self.renorm_warmup_steps)(x, train)
        return nn.Dense(1)(x).squeeze(-1)


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


LOG_SIGMA_MIN = -5.0


class FlowPolicy(nn.Module):
    """The noise-augmented flow rollout of the header, before the tanh squash: a deterministic function of its noise
    (A_0, ε_0..ε_{K−1}). Returns the path A_0..A_K (K+1, batch, d), σ (batch, d) and the Gaussian part of log π.
    `action_perturbations` (K, batch, d) are added to A_k before step k (--log-grad-norms differentiates at zero)."""

    velocity: nn.Module  # v(s, A_k, φ(t_k)): the variant's velocity network
    action_dim: int
    flow_steps: int
    noise_std: float
    sigma_max: float
    renorm_warmup_steps: int

    def setup(self):
        self.state_norm = BatchRenorm(self.renorm_warmup_steps)
        self.time_embedding = TimeEmbedding()
        if self.noise_std <= 0:
            self.log_sigma_hidden = nn.Dense(256)
            # Zero weights: σ starts at the middle of its log range (e^-2.86 ≈ 0.057 at the default bound, K = 4).
            self.log_sigma_out = nn.Dense(self.action_dim, kernel_init=nn.initializers.zeros)

    def __call__(self, obs, initial_noise, step_noise, train: bool, action_perturbations=None):
        state = self.state_norm(obs, train)
        if self.noise_std > 0:
            sigma = jnp.full_like(initial_noise, self.noise_std)
        else:
            raw = jnp.tanh(self.log_sigma_out(nn.relu(self.log_sigma_hidden(state))))
            sigma = jnp.exp(LOG_SIGMA_MIN + 0.5 * (math.log(self.sigma_max) - LOG_SIGMA_MIN) * (raw + 1))

        dt = 1.0 / self.flow_steps
        # φ(t_k) for every k at once: it does not depend on the state.
        time_features = self.time_embedding(jnp.array([[k * dt] for k in range(self.flow_steps)], jnp.float32))
        action = initial_noise
        log_prob = gaussian_log_density(initial_noise, 1.0)
        path = [action]
        for k in range(self.flow_steps):
            t = k * dt
            if action_perturbations is not None:
                action = action + action_perturbations[k]
            velocity = self.velocity(state, action, time_features[k : k + 1])
            compensation = sigma**2 / (2 * (1 - t))
            drift = (1 + t * compensation) * velocity - compensation * action
            step_std = sigma * math.sqrt(dt)
            action = action + dt * drift + step_std * step_noise[k]
            # A_{k+1} − (A_k + Δt b_k) = step_std · ε_k exactly, so log N(A_{k+1}; ·) needs only ε_k.
            log_prob = log_prob + gaussian_log_density(step_noise[k], step_std)
            path.append(action)
        return jnp.stack(path), sigma, log_prob


def gaussian_log_density(standard_noise, std):
    """Σ_j log N(x_j; μ_j, std_j²) for x = μ + std · standard_noise."""
    std = jnp.broadcast_to(std, standard_noise.shape)
    return jnp.sum(-0.5 * standard_noise**2 - jnp.log(std) - 0.5 * math.log(2 * math.pi), axis=-1)


SATURATED = math.tanh(2.0)  # an action entry whose pre-tanh value is beyond ±2 (|tanh| > 0.964) counts as saturated


def squash(pre_tanh_action, action_scale, action_bias):
    """a = scale · tanh(A_K) + bias, and the log-determinant term log|da/dA_K| (with CleanRL's 1e-6)."""
    y = jnp.tanh(pre_tanh_action)
    log_det = jnp.sum(jnp.log(action_scale * (1 - y**2) + 1e-6), axis=-1)
    return action_scale * y + action_bias, log_det


# ----------------------------------------------------------------------------------------------------
# Agent state, losses and the train step


class RenormTrainState(TrainState):
    batch_stats: dict


@flax.struct.dataclass
class AgentState:
    policy: RenormTrainState
    critic: RenormTrainState  # parameters stacked over the ensemble of 2 Q networks
    log_alpha: jax.Array
    alpha_opt_state: optax.OptState
    buffer: ReplayBuffer
    key: jax.Array
    critic_updates: jax.Array
    actor_metrics: dict  # the latest actor/α losses, reported between delayed actor updates


@dataclass(frozen=True)
class SACFlow:
    """What the train step closes over: the networks, α's optimizer, the action bounds and the settings."""

    policy: FlowPolicy
    q_network: QNetwork
    alpha_optimizer: optax.GradientTransformation
    action_scale: jax.Array
    action_bias: jax.Array
    args: Args


def make_agent(args: Args, action_dim: int, action_scale, action_bias) -> SACFlow:
    velocity = VelocityNet(action_dim, args.d_model, args.n_heads, args.n_layers)
    return SACFlow(
        policy=FlowPolicy(
            velocity, action_dim, args.flow_steps, args.noise_std, sigma_bound(args), args.renorm_warmup_steps
        ),
        q_network=QNetwork(args.critic_hidden, args.renorm_warmup_steps),
        alpha_optimizer=make_optimizers(args, action_dim)[2],
        action_scale=jnp.asarray(action_scale, jnp.float32),
        action_bias=jnp.asarray(action_bias, jnp.float32),
        args=args,
    )


def sigma_bound(args: Args) -> float:
    """σ's upper bound: --sigma-max, else √(K/(2πe)), where a noise step's Gaussian entropy ½ log(2πe σ²Δt) is 0
    (capped at √2, the largest σ whose compensated steps contract)."""
    if args.sigma_max is not None:
        return args.sigma_max
    return min(math.sqrt(args.flow_steps / (2 * math.pi * math.e)), math.sqrt(2.0))


def initial_alpha(args: Args, action_dim: int) -> float:
    """α₀: --alpha, or 0.2/(K·d). The entropy moves by K·d nats per unit of log σ (Gaussian SAC's by d), and α
    settles near 0.004-0.017 on MuJoCo: from 0.2 it would fall several e-folds while σ sits at its bound."""
    return 0.2 / (args.flow_steps * action_dim) if args.alpha is None else args.alpha


def make_optimizers(args: Args, action_dim: int):
    """Adam for the policy and the critic (CrossQ's β1); for log α plain gradient descent at η/d, or Adam."""
    if args.alpha_optimizer == "sgd":
        alpha_optimizer = optax.sgd(args.alpha_lr / action_dim)
    else:
        alpha_optimizer = optax.adam(args.q_lr, b1=args.adam_beta1)
    return optax.adam(args.policy_lr, b1=args.adam_beta1), optax.adam(args.q_lr, b1=args.adam_beta1), alpha_optimizer


def create_state(agent: SACFlow, key, obs_dim: int) -> AgentState:
    args, action_dim = agent.args, agent.action_scale.shape[0]
    key, policy_key, critic_key = jax.random.split(key, 3)
    obs = jnp.zeros((1, obs_dim), jnp.float32)
    action = jnp.zeros((1, action_dim), jnp.float32)
    step_noise = jnp.zeros((args.flow_steps, 1, action_dim), jnp.float32)
    policy_vars = agent.policy.init(policy_key, obs, action, step_noise, train=False)
    init_critic = jax.vmap(lambda k: agent.q_network.init(k, obs, action, train=False))
    critic_vars = init_critic(jax.random.split(critic_key, 2))
    log_alpha = jnp.asarray(math.log(initial_alpha(args, action_dim)), jnp.float32)
    policy_optimizer, critic_optimizer, _ = make_optimizers(args, action_dim)
    actor_metric_names = ["losses/actor_loss", "losses/alpha_loss", "losses/entropy"]
    actor_metric_names += ["policy/sigma", "policy/tanh_saturation"]
    if args.log_grad_norms:  # one per flow step k = 0..K−1, and the parameters'
        actor_metric_names += [f"grad/actor_wrt_A_k{k}" for k in range(args.flow_steps)] + ["grad/actor_params"]
    return AgentState(
        policy=renorm_train_state(agent.policy, policy_vars, policy_optimizer),
        critic=renorm_train_state(agent.q_network, critic_vars, critic_optimizer),
        log_alpha=log_alpha,
        alpha_opt_state=agent.alpha_optimizer.init(log_alpha),
        buffer=create_buffer(args.buffer_size, obs_dim, action_dim),
        key=key,
        critic_updates=jnp.zeros((), jnp.int32),
        actor_metrics={name: jnp.zeros((), jnp.float32) for name in actor_metric_names},  # separate: donated
    )


def renorm_train_state(network: nn.Module, variables: dict, optimizer) -> RenormTrainState:
    state = RenormTrainState.create(
        apply_fn=network.apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=optimizer
    )
    return state.replace(step=jnp.zeros((), jnp.int32))  # create() sets a Python int 0: a second compile otherwise


def td_target(rewards, terminations, next_q_min, next_log_prob, alpha, gamma: float):
    """y = r + γ (1 − terminated) (min_i Q_i(s', a') − α log π(a'|s'))."""
    return rewards + gamma * (1.0 - terminations) * (next_q_min - alpha * next_log_prob)


def max_path_entropy(action_scale, flow_steps: int, sigma: float) -> float:
    """Largest −log π with σ ≤ sigma (constant σ, no saturation): Σ_j [c + K (c + log σ − ½ log K) + log scale_j]."""
    c = 0.5 * math.log(2 * math.pi * math.e)
    per_dimension = c + flow_steps * (c + math.log(sigma) - 0.5 * math.log(flow_steps))
    return float(np.sum(per_dimension + np.log(action_scale)))


def alpha_loss(log_alpha, log_prob, target_entropy: float):
    """L_α = −log α · mean(log π + H_target): α grows while the entropy −log π is below H_target."""
    return -log_alpha * jnp.mean(jax.lax.stop_gradient(log_prob) + target_entropy)


def rollout(
    agent: SACFlow, params, batch_stats, obs, initial_noise, step_noise, train: bool, action_perturbations=None
):
    """The flow rollout and its squash: (action, log π(a|s), the policy's BatchRenorm statistics, σ)."""
    variables, mutable = {"params": params, "batch_stats": batch_stats}, ["batch_stats"] if train else []
    (path, sigma, log_prob), updates = agent.policy.apply(
        variables, obs, initial_noise, step_noise, train, action_perturbations, mutable=mutable
    )
    action, log_det = squash(path[-1], agent.action_scale, agent.action_bias)
    return action, log_prob - log_det, updates.get("batch_stats", batch_stats), sigma


def sample_actions(agent: SACFlow, params, batch_stats, obs, key, train: bool, action_perturbations=None):
    action_dim, flow_steps = agent.action_scale.shape[0], agent.args.flow_steps
    initial_key, step_key = jax.random.split(key)
    initial_noise = jax.random.normal(initial_key, (obs.shape[0], action_dim))
    step_noise = jax.random.normal(step_key, (flow_steps, obs.shape[0], action_dim))
    return rollout(agent, params, batch_stats, obs, initial_noise, step_noise, train, action_perturbations)


def critic_values(q_network: nn.Module, params, batch_stats, obs, action, train: bool):
    """Q_i(s, a) of both ensemble members, shape (2, batch), and their (updated) statistics."""

    def one_critic(p, s):
        mutable = ["batch_stats"] if train else []
        q, updates = q_network.apply({"params": p, "batch_stats": s}, obs, action, train, mutable=mutable)
        return q, updates.get("batch_stats", s)

    return jax.vmap(one_critic)(params, batch_stats)


def update_critic(agent: SACFlow, state: AgentState, batch, key):
    obs, actions, rewards, terminations, next_obs = batch
    alpha = jnp.exp(state.log_alpha)
    policy = state.policy
    next_actions, next_log_prob, _, _ = sample_actions(
        agent, policy.params, policy.batch_stats, next_obs, key, train=False
    )
    # CrossQ: current and next pairs share one training-mode batch, so both see the same statistics.
    both_obs, both_actions = jnp.concatenate([obs, next_obs]), jnp.concatenate([actions, next_actions])

    def critic_loss_fn(params):
        q, batch_stats = critic_values(
            agent.q_network, params, state.critic.batch_stats, both_obs, both_actions, train=True
        )
        q_current, q_next = jnp.split(q, 2, axis=1)
        next_q = jax.lax.stop_gradient(q_next.min(axis=0))
        target = td_target(rewards, terminations, next_q, next_log_prob, alpha, agent.args.gamma)
        loss = ((q_current - target) ** 2).mean(axis=1).sum()
        return loss, (batch_stats, q_current.mean())

    (qf_loss, (batch_stats, q_mean)), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(state.critic.params)
    critic = state.critic.apply_gradients(grads=grads).replace(batch_stats=batch_stats)
    return critic, {"losses/qf_loss": qf_loss, "losses/qf_values": q_mean}


def actor_gradient_norms(agent: SACFlow, params, batch_stats, critic, obs, key, alpha):
    """--log-grad-norms: grad/actor_wrt_A_k<k> = mean_i ‖∂ℓ_i/∂A_k‖₂ (ℓ_i: sample i's actor loss, later noises
    fixed), the gradient backpropagation carries back to flow step k, and grad/actor_params = ‖∂L_π/∂θ_v‖₂.
    A separate pass with the update's parameters, noise and batch (docs/design.md#gradient-norms)."""
    batch_size, action_dim, flow_steps = obs.shape[0], agent.action_scale.shape[0], agent.args.flow_steps

    def summed_actor_loss(params, action_perturbations):
        actions, log_prob, _, _ = sample_actions(
            agent, params, batch_stats, obs, key, train=True, action_perturbations=action_perturbations
        )
        q, _ = critic_values(agent.q_network, critic.params, critic.batch_stats, obs, actions, train=False)
        return jnp.sum(alpha * log_prob - q.min(axis=0))

    zero_perturbations = jnp.zeros((flow_steps, batch_size, action_dim), jnp.float32)
    param_grads, action_grads = jax.grad(summed_actor_loss, argnums=(0, 1))(params, zero_perturbations)
    per_step_norms = jnp.linalg.norm(action_grads, axis=-1).mean(axis=1)  # (K,)
    metrics = {f"grad/actor_wrt_A_k{k}": per_step_norms[k] for k in range(flow_steps)}
    metrics["grad/actor_params"] = optax.global_norm(param_grads["velocity"]) / batch_size
    return metrics


def update_actor_and_alpha(agent: SACFlow, policy_state, log_alpha, alpha_opt_state, critic, obs, key):
    alpha = jnp.exp(log_alpha)
    grad_metrics = {}
    if agent.args.log_grad_norms:  # a Python branch: without the flag nothing of the diagnostic is traced or compiled
        params, batch_stats = policy_state.params, policy_state.batch_stats
        grad_metrics = actor_gradient_norms(agent, params, batch_stats, critic, obs, key, alpha)

    def actor_loss_fn(params):
        actions, log_prob, batch_stats, sigma = sample_actions(agent, params, policy_state.batch_stats, obs, key, True)
        q, _ = critic_values(agent.q_network, critic.params, critic.batch_stats, obs, actions, train=False)
        return jnp.mean(alpha * log_prob - q.min(axis=0)), (batch_stats, log_prob, actions, sigma)

    actor_loss_and_grad = jax.value_and_grad(actor_loss_fn, has_aux=True)
    (actor_loss, (batch_stats, log_prob, actions, sigma)), grads = actor_loss_and_grad(policy_state.params)
    policy_state = policy_state.apply_gradients(grads=grads).replace(batch_stats=batch_stats)
    alpha_loss_value, alpha_grad = jax.value_and_grad(alpha_loss)(log_alpha, log_prob, agent.args.target_entropy)
    if agent.args.autotune:
        alpha_updates, alpha_opt_state = agent.alpha_optimizer.update(alpha_grad, alpha_opt_state)
        log_alpha = optax.apply_updates(log_alpha, alpha_updates)
    saturated = jnp.abs(actions - agent.action_bias) > SATURATED * agent.action_scale
    metrics = {
        "losses/actor_loss": actor_loss,
        "losses/alpha_loss": alpha_loss_value,
        "losses/entropy": -log_prob.mean(),
        # The path entropy is K Σ_j log σ_j plus constants and the tanh term: these two say which one moves it.
        "policy/sigma": jnp.exp(jnp.log(sigma).mean()),  # geometric mean over states and action dimensions
        "policy/tanh_saturation": jnp.mean(saturated),
    }
    return policy_state, log_alpha, alpha_opt_state, {**metrics, **grad_metrics}


def train_step(agent: SACFlow, state: AgentState, obs, action, reward, next_obs, terminated, episode_end, policy_obs):
    """Stores the transition, updates the critic (every `policy_delay` calls the actor and α too) and returns the
    action for the next observation, the losses and whether every loss and parameter is finite."""
    buffer = buffer_add(state.buffer, obs, action, reward, next_obs, terminated, episode_end)
    key, batch_key, target_key, actor_key, action_key = jax.random.split(state.key, 5)
    batch = buffer_sample(buffer, batch_key, agent.args.batch_size)
    critic, critic_metrics = update_critic(agent, state, batch, target_key)
    critic_updates = state.critic_updates + 1
    policy_state, log_alpha, alpha_opt_state, actor_metrics = jax.lax.cond(
        critic_updates % agent.args.policy_delay == 0,
        lambda: update_actor_and_alpha(
            agent, state.policy, state.log_alpha, state.alpha_opt_state, critic, batch[0], actor_key
        ),
        lambda: (state.policy, state.log_alpha, state.alpha_opt_state, state.actor_metrics),
    )
    next_action, _, _, _ = sample_actions(
        agent, policy_state.params, policy_state.batch_stats, policy_obs[None], action_key, False
    )
    state = AgentState(policy_state, critic, log_alpha, alpha_opt_state, buffer, key, critic_updates, actor_metrics)
    metrics = {**critic_metrics, **actor_metrics, "losses/alpha": jnp.exp(log_alpha)}
    finite = [jnp.isfinite(v) for v in metrics.values()]
    finite += [jnp.isfinite(x).all() for x in jax.tree.leaves((policy_state.params, critic.params))]
    return state, (next_action[0], metrics, jnp.all(jnp.stack(finite)))


def add_transition(state: AgentState, obs, action, reward, next_obs, terminated, episode_end):
    return state.replace(buffer=buffer_add(state.buffer, obs, action, reward, next_obs, terminated, episode_end)), None


def add_transitions(state: AgentState, *block):  # buffer_add over a block of transitions, in one lax.scan
    buffer, _ = jax.lax.scan(lambda b, transition: (buffer_add(b, *transition), None), state.buffer, block)
    return state.replace(buffer=buffer), None


def evaluation_action(agent: SACFlow, params, batch_stats, obs, key):
    """Deterministic action: ε = 0 at every flow step; A_0 sampled unless --eval-zero-initial-noise."""
    action_dim, flow_steps = agent.action_scale.shape[0], agent.args.flow_steps
    initial_noise = jax.random.normal(key, (1, action_dim))
    if agent.args.eval_zero_initial_noise:
        initial_noise = jnp.zeros_like(initial_noise)
    step_noise = jnp.zeros((flow_steps, 1, action_dim))
    action, _, _, _ = rollout(agent, params, batch_stats, obs[None], initial_noise, step_noise, train=False)
    return action[0]


class TrainFunctions(NamedTuple):
    train_step: Callable  # over seeds: the one call per environment step once learning has started
    add_transition: Callable  # over seeds: stores one transition, or a block of them (random actions)
    add_transitions: Callable
    evaluation_action: Callable  # one agent: the deterministic action (ε = 0)


def jit_train_functions(agent: SACFlow) -> TrainFunctions:
    """The functions the loop calls, jitted, over a list of --num-seeds states (inputs and outputs with a leading seed
    axis); the states are donated, so that the replay buffers change in place."""
    return TrainFunctions(
        train_step=jax.jit(batching.over_seeds(functools.partial(train_step, agent)), donate_argnums=0),
        add_transition=jax.jit(batching.over_seeds(add_transition), donate_argnums=0),
        add_transitions=jax.jit(batching.over_seeds(add_transitions), donate_argnums=0),
        evaluation_action=jax.jit(functools.partial(evaluation_action, agent)),
    )


# ----------------------------------------------------------------------------------------------------
# The training loop

SCRIPT = f"from_scratch/{os.path.basename(__file__)}"  # recorded in checkpoints: --resume refuses another script's


def check_args(args: Args):
    positive = ("total_timesteps", "buffer_size", "batch_size", "flow_steps", "policy_delay", "alpha_lr")
    positive += ("eval_every", "log_every", "console_every", "num_seeds", "d_model", "n_heads", "n_layers")
    non_negative = ("learning_starts", "eval_episodes", "noise_std", "checkpoint_every")
    cli.check_args(args, positive, non_negative, [
        (args.d_model % args.n_heads != 0, f"--n-heads {args.n_heads} does not divide --d-model {args.d_model}"),
        (args.alpha is not None and args.alpha <= 0, f"--alpha must be > 0, got {args.alpha}"),
        (args.sigma_max is not None and args.sigma_max <= math.exp(LOG_SIGMA_MIN),
         f"--sigma-max must be above e^-5, got {args.sigma_max}"),
        (args.batch_size > args.buffer_size, f"--batch-size {args.batch_size} is larger than --buffer-size"),
        (args.learning_starts < args.batch_size, f"--learning-starts {args.learning_starts} is below --batch-size"),
        (args.resume is not None and args.num_seeds != 1, "--resume continues one run: resume each of --num-seeds"),
    ])  # fmt: skip


def main():
    runs.reuse_freed_memory()
    args, checkpoint = cli.parse_args(Args, SCRIPT)
    check_args(args)
    run = GymRun(args, SCRIPT, checkpoint)
    largest = max_path_entropy(run.action_scale, args.flow_steps, args.noise_std or sigma_bound(args))
    if args.autotune and args.target_entropy >= largest:  # α would grow without bound
        raise SystemExit(
            f"error: --target-entropy {args.target_entropy} is not below the largest path entropy the policy can reach "
            f"on {args.env_id} with K = {args.flow_steps} and its σ bound, {largest:.1f}: lower it "
            f"(or raise {'--noise-std' if args.noise_std else '--sigma-max'})"
        )
    agent = make_agent(args, run.action_dim, run.action_scale, run.action_bias)
    states, actions = run.start(lambda key: create_state(agent, key, run.obs_dim))
    functions = jit_train_functions(agent)

    for step in range(run.start_step + 1, args.total_timesteps + 1):  # step: environment steps done after this one
        transition, policy_obs = run.step_environments(step, actions)
        if step < args.learning_starts:
            states = run.store(states, functions, transition)  # kept on the host, written in blocks
            actions = run.random_actions()
        else:
            states = run.store(states, functions)  # the random phase's last block, if still on the host
            states, (actions, metrics, all_finite) = functions.train_step(states, *transition, policy_obs)
            actions = np.asarray(actions)
            run.stop_if_diverged(step, all_finite, metrics, states)
            run.log_losses(step, metrics)
        run.report_progress(step)
        run.evaluate(step, functions.evaluation_action, states)
        states = run.checkpoint(step, states, actions, functions)  # also ends the run on SIGINT or SIGTERM
    run.finish(states)


if __name__ == "__main__":
    main()
