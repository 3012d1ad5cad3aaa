"""Gaussian SAC: Soft Actor-Critic with a tanh-squashed Gaussian policy, the baseline of SAC Flow.

Everything but the policy (CrossQ critic, replay buffer, train step, logging, evaluation, defaults) is the same
as in sac_flow_naive.py, so that comparing the two runs isolates the policy class. The policy (CleanRL's):

    h = MLP(BatchRenorm(s))                                   two hidden layers of 256 (--actor-hidden), ReLU
    μ = W_μ h + b_μ,   log σ = −5 + ½ (2 − (−5)) (tanh(W_σ h + b_σ) + 1)      log σ squashed into [−5, 2]
    u = μ + σ ε,   ε ~ N(0, I)                                reparameterised
    a = scale · tanh(u) + bias

    log π = Σ_j log N(u_j; μ_j, σ_j²) − Σ_j log(scale_j (1 − tanh(u_j)²) + 1e-6)

Deterministic evaluation: ε = 0, so a = scale · tanh(μ) + bias.

SAC, CrossQ style (no target network; BatchRenorm in critic and actor input):

    y = r + γ (1 − terminated) (min_i Q_i(s', a') − α log π(a'|s')),   a' ~ π(·|s')
    L_Q = Σ_i mean (Q_i(s, a) − y)²     (s, a) and (s', a') pass the critic as ONE batch; y is stop-gradient
    L_π = mean(α log π(a_θ|s) − min_i Q_i(s, a_θ))      every `policy_delay` critic updates
    L_α = −log α · mean(log π(a_θ|s) + H_target)      H_target = −dim(A) by default (the flow scripts use 0)

docs/design.md explains the choices (the replay buffer's layout, speed).
"""

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

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

    env_id: str = "Hopper-v4"
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
    """learning rate of the critic and of log α"""
    adam_beta1: float = 0.5
    """Adam β1 of every optimiser (CrossQ uses 0.5)"""
    policy_delay: int = 3
    """update the actor and α once every this many critic updates"""
    alpha: float = 0.2
    """initial entropy coefficient α"""
    autotune: bool = True
    """learn α towards the target entropy"""
    target_entropy: float | None = None
    """H_target of the α loss; None uses −action_dim, the usual choice for Gaussian SAC (the flow scripts use 0)"""
    critic_hidden: int = 1024
    """width of the critic's two hidden layers"""
    renorm_warmup_steps: int = 100_000
    """BatchRenorm uses plain batch statistics for this many training calls before its r/d corrections"""
    actor_hidden: int = 256
    """width of the policy MLP's two hidden layers"""
    eval_every: int = 50_000
    """environment steps between deterministic evaluations (a = scale · tanh(μ) + bias)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    log_every: int = 1_000
    """environment steps between logged losses"""
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


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class GaussianPolicy(nn.Module):
    """The Gaussian policy of the header, before the tanh squash.

    Takes the standard normal noise ε as input, so u = μ(s) + σ(s) ε is a deterministic function of it.
    Returns u (batch, d) and the Gaussian part of log π, Σ_j log N(u_j; μ_j, σ_j²) (batch,).
    """

    action_dim: int
    hidden: int
    renorm_warmup_steps: int

    @nn.compact
    def __call__(self, obs, noise, train: bool):
        state = BatchRenorm(self.renorm_warmup_steps, name="state_norm")(obs, train)
        x = nn.relu(nn.Dense(self.hidden, name="hidden_0")(state))
        x = nn.relu(nn.Dense(self.hidden, name="hidden_1")(x))
        mean = nn.Dense(self.action_dim, name="mean")(x)
        raw = jnp.tanh(nn.Dense(self.action_dim, name="log_std")(x))
        std = jnp.exp(LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (raw + 1))
        return mean + std * noise, gaussian_log_density(noise, std)


def gaussian_log_density(standard_noise, std):
    """Σ_j log N(x_j; μ_j, std_j²) for x = μ + std · standard_noise."""
    std = jnp.broadcast_to(std, standard_noise.shape)
    return jnp.sum(-0.5 * standard_noise**2 - jnp.log(std) - 0.5 * math.log(2 * math.pi), axis=-1)


SATURATED = math.tanh(2.0)  # an action entry whose pre-tanh value is beyond ±2 (|tanh| > 0.964) counts as saturated


def squash(pre_tanh_action, action_scale, action_bias):
    """a = scale · tanh(u) + bias, and the log-determinant term log|da/du| (with CleanRL's 1e-6)."""
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
class SAC:
    """What the train step closes over: the networks, α's optimizer, the action bounds and the settings."""

    policy: GaussianPolicy
    q_network: QNetwork
    alpha_optimizer: optax.GradientTransformation
    action_scale: jax.Array
    action_bias: jax.Array
    target_entropy: float  # --target-entropy, or −d
    args: Args


def make_agent(args: Args, action_dim: int, action_scale, action_bias) -> SAC:
    return SAC(
        policy=GaussianPolicy(action_dim, args.actor_hidden, args.renorm_warmup_steps),
        q_network=QNetwork(args.critic_hidden, args.renorm_warmup_steps),
        alpha_optimizer=make_optimizers(args)[2],
        action_scale=jnp.asarray(action_scale, jnp.float32),
        action_bias=jnp.asarray(action_bias, jnp.float32),
        target_entropy=-float(action_dim) if args.target_entropy is None else args.target_entropy,
        args=args,
    )


def make_optimizers(args: Args):
    """Adam for the policy, the critic and log α (CrossQ's β1)."""
    return [optax.adam(lr, b1=args.adam_beta1) for lr in (args.policy_lr, args.q_lr, args.q_lr)]


def create_state(agent: SAC, key, obs_dim: int) -> AgentState:
    args, action_dim = agent.args, agent.action_scale.shape[0]
    key, policy_key, critic_key = jax.random.split(key, 3)
    obs = jnp.zeros((1, obs_dim), jnp.float32)
    action = jnp.zeros((1, action_dim), jnp.float32)
    policy_vars = agent.policy.init(policy_key, obs, action, train=False)
    init_critic = jax.vmap(lambda k: agent.q_network.init(k, obs, action, train=False))
    critic_vars = init_critic(jax.random.split(critic_key, 2))
    log_alpha = jnp.asarray(math.log(args.alpha), jnp.float32)
    policy_optimizer, critic_optimizer, _ = make_optimizers(args)
    actor_metric_names = ["losses/actor_loss", "losses/alpha_loss", "losses/entropy", "policy/tanh_saturation"]
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


def alpha_loss(log_alpha, log_prob, target_entropy: float):
    """L_α = −log α · mean(log π + H_target): α grows while the entropy −log π is below H_target."""
    return -log_alpha * jnp.mean(jax.lax.stop_gradient(log_prob) + target_entropy)


def policy_action(agent: SAC, params, batch_stats, obs, noise, train: bool):
    """u = μ + σ ε and its squash: (action, log π(a|s), the policy's BatchRenorm statistics)."""
    variables, mutable = {"params": params, "batch_stats": batch_stats}, ["batch_stats"] if train else []
    (pre_tanh_action, log_prob), updates = agent.policy.apply(variables, obs, noise, train, mutable=mutable)
    action, log_det = squash(pre_tanh_action, agent.action_scale, agent.action_bias)
    return action, log_prob - log_det, updates.get("batch_stats", batch_stats)


def sample_actions(agent: SAC, params, batch_stats, obs, key, train: bool):
    noise = jax.random.normal(key, (obs.shape[0], agent.action_scale.shape[0]))
    return policy_action(agent, params, batch_stats, obs, noise, train)


def critic_values(q_network: nn.Module, params, batch_stats, obs, action, train: bool):
    """Q_i(s, a) of both ensemble members, shape (2, batch), and their (updated) statistics."""

    def one_critic(p, s):
        mutable = ["batch_stats"] if train else []
        q, updates = q_network.apply({"params": p, "batch_stats": s}, obs, action, train, mutable=mutable)
        return q, updates.get("batch_stats", s)

    return jax.vmap(one_critic)(params, batch_stats)


def update_critic(agent: SAC, state: AgentState, batch, key):
    obs, actions, rewards, terminations, next_obs = batch
    alpha = jnp.exp(state.log_alpha)
    policy = state.policy
    next_actions, next_log_prob, _ = sample_actions(agent, policy.params, policy.batch_stats, next_obs, key, False)
    # CrossQ: current and next pairs share one training-mode batch, so both see the same statistics.
    both_obs, both_actions = jnp.concatenate([obs, next_obs]), jnp.concatenate([actions, next_actions])

    def critic_loss_fn(params):
        q, batch_stats = critic_values(agent.q_network, params, state.critic.batch_stats, both_obs, both_actions, True)
        q_current, q_next = jnp.split(q, 2, axis=1)
        next_q = jax.lax.stop_gradient(q_next.min(axis=0))
        target = td_target(rewards, terminations, next_q, next_log_prob, alpha, agent.args.gamma)
        loss = ((q_current - target) ** 2).mean(axis=1).sum()
        return loss, (batch_stats, q_current.mean())

    (qf_loss, (batch_stats, q_mean)), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(state.critic.params)
    critic = state.critic.apply_gradients(grads=grads).replace(batch_stats=batch_stats)
    return critic, {"losses/qf_loss": qf_loss, "losses/qf_values": q_mean}


def update_actor_and_alpha(agent: SAC, policy_state, log_alpha, alpha_opt_state, critic, obs, key):
    alpha = jnp.exp(log_alpha)

    def actor_loss_fn(params):
        actions, log_prob, batch_stats = sample_actions(agent, params, policy_state.batch_stats, obs, key, True)
        q, _ = critic_values(agent.q_network, critic.params, critic.batch_stats, obs, actions, train=False)
        return jnp.mean(alpha * log_prob - q.min(axis=0)), (batch_stats, log_prob, actions)

    actor_loss_and_grad = jax.value_and_grad(actor_loss_fn, has_aux=True)
    (actor_loss, (batch_stats, log_prob, actions)), grads = actor_loss_and_grad(policy_state.params)
    policy_state = policy_state.apply_gradients(grads=grads).replace(batch_stats=batch_stats)
    alpha_loss_value, alpha_grad = jax.value_and_grad(alpha_loss)(log_alpha, log_prob, agent.target_entropy)
    if agent.args.autotune:
        alpha_updates, alpha_opt_state = agent.alpha_optimizer.update(alpha_grad, alpha_opt_state)
        log_alpha = optax.apply_updates(log_alpha, alpha_updates)
    metrics = {
        "losses/actor_loss": actor_loss,
        "losses/alpha_loss": alpha_loss_value,
        "losses/entropy": -log_prob.mean(),
        # the share of action entries on the tanh's flat ends, as the flows log it (docs/entropy.md compares them)
        "policy/tanh_saturation": jnp.mean(jnp.abs(actions - agent.action_bias) > SATURATED * agent.action_scale),
    }
    return policy_state, log_alpha, alpha_opt_state, metrics


def train_step(agent: SAC, state: AgentState, obs, action, reward, next_obs, terminated, episode_end, policy_obs):
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
    next_action, _, _ = sample_actions(
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


def evaluation_action(agent: SAC, params, batch_stats, obs, key):
    """Deterministic action: ε = 0, so a = scale · tanh(μ) + bias. `key` is unused: every script's
    evaluation_action has the flow scripts' signature, so the evaluation loop is the same everywhere."""
    noise = jnp.zeros((1, agent.action_scale.shape[0]), jnp.float32)
    action, _, _ = policy_action(agent, params, batch_stats, obs[None], noise, train=False)
    return action[0]


class TrainFunctions(NamedTuple):
    train_step: Callable  # over seeds: the one call per environment step once learning has started
    add_transition: Callable  # over seeds: stores one transition, or a block of them (random actions)
    add_transitions: Callable
    evaluation_action: Callable  # one agent: the deterministic action (ε = 0)


def jit_train_functions(agent: SAC) -> TrainFunctions:
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
    positive = ("total_timesteps", "buffer_size", "batch_size", "policy_delay", "alpha", "eval_every")
    positive += ("log_every", "console_every", "num_seeds", "actor_hidden")
    non_negative = ("learning_starts", "eval_episodes", "checkpoint_every")
    cli.check_args(args, positive, non_negative, [
        (args.batch_size > args.buffer_size, f"--batch-size {args.batch_size} is larger than --buffer-size"),
        (args.learning_starts < args.batch_size, f"--learning-starts {args.learning_starts} is below --batch-size"),
        (args.resume is not None and args.num_seeds != 1, "--resume continues one run: resume each of --num-seeds"),
    ])  # fmt: skip


def main():
    runs.reuse_freed_memory()
    args, checkpoint = cli.parse_args(Args, SCRIPT)
    check_args(args)
    run = GymRun(args, SCRIPT, checkpoint)
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
