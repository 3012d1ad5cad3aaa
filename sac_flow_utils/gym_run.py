"""A from-scratch run's life around its training loop: the environments of --num-seeds seeds, their run directories
and logs, the random phase's transitions, evaluation, checkpoints, stop signals and the divergence stop. The
script's main keeps the loop itself: environment step, store, train step, log, evaluate, checkpoint."""

import os
import time
from collections.abc import Callable

import jax
import numpy as np

from sac_flow_utils import batching, checkpoints, gym_tasks, runs
from sac_flow_utils.replay_buffer import buffer_end_episode


class GymRun:
    """Everything but the agent: `states` (one agent state per seed, with .policy, .critic, .log_alpha and .buffer)
    and the script's jitted `functions` (train_step, add_transition(s), evaluation_action) are passed in."""

    def __init__(self, args, script: str, checkpoint: dict | None):
        """The training environments, before anything is written: the script can still refuse the task."""
        self.args, self.script, self.resume_checkpoint = args, script, checkpoint
        self.seeds = [args.seed + i for i in range(args.num_seeds)]
        self.start_step = 0 if checkpoint is None else int(checkpoint["step"])
        if self.start_step >= args.total_timesteps:
            raise SystemExit(
                f"error: {args.resume} is at step {self.start_step} already; give a larger --total-timesteps"
            )
        # A resumed run's environments are seeded anew; a MuJoCo task's checkpoint then puts its episode back exactly.
        self.envs = [gym_tasks.make_gym_env(args.env_id, seed + self.start_step) for seed in self.seeds]
        space = self.envs[0].action_space
        self.obs_dim, self.action_dim = self.envs[0].observation_space.shape[0], space.shape[0]
        self.action_scale, self.action_bias = (space.high - space.low) / 2, (space.high + space.low) / 2

    def start(self, create_state: Callable) -> tuple[list, np.ndarray]:
        """Opens the run directories and logs; returns the agent states and the first actions. New states are
        create_state(key); a checkpoint's state is restored before any file is opened, and its interrupted episode
        goes on exactly (MuJoCo) or ends in the replay buffer as a truncation."""
        args = self.args
        keys = [jax.random.split(jax.random.PRNGKey(seed)) for seed in self.seeds]
        self.eval_keys = [eval_key for _, eval_key in keys]
        if self.resume_checkpoint is None:
            states = [create_state(key) for key, _ in keys]
        else:
            target = create_state(keys[0][0])
            states = [
                checkpoints.restore_state(target, self.resume_checkpoint["agent"], f"{args.resume}/checkpoint.flax")
            ]
        self.run_dirs, self.wandb_ids, self.loggers, self.locks = runs.open_runs(
            args, args.env_id, self.seeds, self.resume_checkpoint
        )
        video_folder = "videos" if self.start_step == 0 else f"videos_from_step_{self.start_step}"
        self.eval_envs = [
            gym_tasks.make_gym_env(
                args.env_id,
                seed + 1 + self.start_step,
                os.path.join(run_dir, video_folder) if args.capture_video else None,
                max(args.eval_episodes, 1),
            )
            for seed, run_dir in zip(self.seeds, self.run_dirs)
        ]
        self.obs = np.stack([env.reset()[0] for env in self.envs])
        actions = self.random_actions()
        if self.resume_checkpoint is not None:
            environment = self.resume_checkpoint.get("environment", {})
            restored = gym_tasks.restore_gym_mujoco_state(self.envs[0], self.eval_envs[0], environment)
            if restored is not None:
                self.obs, actions = restored[0][None], restored[1][None]
            else:
                states = [states[0].replace(buffer=buffer_end_episode(states[0].buffer))]
        self.pending_transitions = []  # random-phase transitions, written to the device in blocks (docs/design.md)
        self.checkpoint_step = None if self.resume_checkpoint is None else self.start_step
        self.latest_returns = [float("nan")] * args.num_seeds
        self.stop = runs.catch_stop_signals()
        self.start_time = time.time()
        self.progress = runs.Progress(args.total_timesteps, self.start_step)
        self.progress.phase("random actions", self.start_step, args.learning_starts - 1, compiles=False)
        return states, actions

    def random_actions(self) -> np.ndarray:
        return np.stack([env.action_space.sample() for env in self.envs])

    def step_environments(self, step: int, actions) -> tuple[list, np.ndarray]:
        """One step of every seed's environment: the transition (obs, action, reward, next obs, terminated, episode
        end; a leading seed axis) and the observation to act on next, the first of a new episode where one ended."""
        next_obs, rewards, terminations, episode_ends, policy_obs = [], [], [], [], []
        for i, env in enumerate(self.envs):
            observation, reward, terminated, truncated, info = env.step(actions[i])
            next_obs.append(observation)  # the real final observation, also on truncation
            rewards.append(reward)
            terminations.append(terminated)
            episode_ends.append(terminated or truncated)
            if terminated or truncated:
                self.latest_returns[i] = float(info["episode"]["r"])
                episode = {
                    "charts/episodic_return": self.latest_returns[i],
                    "charts/episodic_length": info["episode"]["l"],
                }
                self.loggers[i].log(step, episode)
                observation, _ = env.reset()
            policy_obs.append(observation)
        transition = [np.asarray(x, np.float32) for x in (self.obs, actions, rewards, next_obs, terminations)]
        transition.append(np.asarray(episode_ends, np.bool_))
        self.obs = np.stack(policy_obs)
        return transition, np.asarray(policy_obs, np.float32)

    def store(self, states: list, functions, transition: list | None = None) -> list:
        """A random-phase transition is kept on the host and written with the others in blocks of
        batching.RANDOM_BLOCK; without one, what is still on the host goes to the device buffers now."""
        if transition is None:
            return batching.store_transitions(states, self.pending_transitions, functions)
        self.pending_transitions.append(transition)
        if len(self.pending_transitions) == batching.RANDOM_BLOCK:
            states = batching.store_transitions(states, self.pending_transitions, functions)
        return states

    def stop_if_diverged(self, step: int, all_finite, metrics: dict, states: list):
        """Ends the run with one line if a seed's losses or parameters are not finite (runs.stop_on_divergence)."""
        if not np.all(all_finite):
            i = int(np.argmin(all_finite))
            metrics_i = {key: value[i] for key, value in jax.device_get(metrics).items()}
            parameters = {"policy parameters": states[i].policy.params, "critic parameters": states[i].critic.params}
            runs.stop_on_divergence(self.run_dirs[i], step, metrics_i, parameters, self.checkpoint_step)

    def log_losses(self, step: int, metrics: dict):
        if step % self.args.log_every == 0:
            metrics = jax.device_get(metrics)
            for i, logger in enumerate(self.loggers):
                logger.log(step, {key: value[i] for key, value in metrics.items()})

    def report_progress(self, step: int):
        """charts/SPS every --console-every steps, and the console line (also every 30 s)."""
        args = self.args
        if step % args.console_every == 0 or step == args.total_timesteps:
            sps = self.progress.rate(step)
            for logger in self.loggers:
                logger.log(step, {"charts/SPS": sps})
        if step == max(args.learning_starts, self.start_step + 1):
            self.progress.phase("training", step - 1, args.total_timesteps)
        returns = ", ".join(f"{r:.1f}" for r in self.latest_returns)
        self.progress.report(step, f"latest return {returns}", force=step % args.console_every == 0)

    def evaluate(self, step: int, evaluation_action: Callable, states: list):
        """Every --eval-every steps and at the end: --eval-episodes deterministic episodes per seed."""
        args = self.args
        if args.eval_episodes == 0 or (step % args.eval_every != 0 and step != args.total_timesteps):
            return
        eval_start = time.time()
        eval_returns = []
        for eval_env, logger, state, eval_key in zip(self.eval_envs, self.loggers, states, self.eval_keys):
            key = jax.random.fold_in(eval_key, step)  # the same key at this step, resumed or not
            eval_returns.append(
                gym_tasks.evaluate_gym(eval_env, evaluation_action, state.policy, args.eval_episodes, key)
            )
            logger.log(step, {"eval/episodic_return": eval_returns[-1]})
        returns = ", ".join(f"{r:.1f}" for r in eval_returns)
        print(f"step {step}: eval return {returns} over {args.eval_episodes} episodes", flush=True)
        self.progress.leave_out(time.time() - eval_start)  # keep evaluation time out of the rates

    def checkpoint(self, step: int, states: list, actions, functions) -> list:
        """Every --checkpoint-every steps (after the step's evaluation, so that a resumed run has it); on SIGINT or
        SIGTERM, a last one unless --no-checkpoint-on-exit, then the run ends with the command that continues it."""
        args = self.args
        if args.checkpoint_every > 0 and step % args.checkpoint_every == 0:
            states = self.write_checkpoints(step, states, actions, functions)
        signum = self.stop["signal"]
        if signum is not None:
            if args.checkpoint_on_exit and self.checkpoint_step != step:
                states = self.write_checkpoints(step, states, actions, functions)
            self.close(exit_code=128 + signum)
            runs.exit_interrupted(signum, step, args.total_timesteps, self.checkpoint_step, self.run_dirs)
        return states

    def write_checkpoints(self, step: int, states: list, actions, functions) -> list:
        states = batching.store_transitions(states, self.pending_transitions, functions)
        for i, run_dir in enumerate(self.run_dirs):
            environment = gym_tasks.gym_mujoco_state(self.envs[i], self.eval_envs[i], self.obs[i], actions[i])
            checkpoint = {"script": self.script, "step": step, "wandb_id": self.wandb_ids[i], "agent": states[i]}
            checkpoints.save_checkpoint(run_dir, {**checkpoint, "environment": environment})
        self.checkpoint_step = step
        return states

    def close(self, exit_code: int = 0):
        for env, eval_env, logger in zip(self.envs, self.eval_envs, self.loggers):
            env.close()
            eval_env.close()
            logger.close(exit_code)

    def finish(self, states: list):
        """The final parameters (--save-model), then the logs are closed."""
        for state, run_dir in zip(states, self.run_dirs):
            if self.args.save_model:
                policy, critic = state.policy, state.critic
                checkpoints.save_model(run_dir, self.args.exp_name, {
                    "policy": {"params": policy.params, "batch_stats": policy.batch_stats},
                    "critic": {"params": critic.params, "batch_stats": critic.batch_stats},
                    "log_alpha": state.log_alpha,
                })  # fmt: skip
        self.close()
        print(f"done in {time.time() - self.start_time:.0f}s; logs in {', '.join(self.run_dirs)}")
