"""An offline-to-online run's life around its two training loops: the OGBench or Robomimic task and its dataset, the run
directory and log, the keys and logs of the offline updates, the online phase's action chunks and episodes, evaluation,
checkpoints, stop signals and the divergence stop. The script's main keeps the loops themselves: blocks of offline
updates; then environment step, store and update, next chunk, log, evaluate, checkpoint."""

import os
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from sac_flow_utils import checkpoints, ogbench_tasks, robomimic_tasks, runs

PROGRESS_UPDATES = 100  # offline updates per jitted call, so that the console hears from the run every few seconds


class OgbenchRun:
    """Everything but the agent: its state, replay buffer and jitted functions are passed in. The offline phase runs
    steps 1 to --offline-steps, the online phase the --online-steps after them; `step` is always the global step."""

    def __init__(self, args, script: str, checkpoint: dict | None):
        """The environments and the dataset's path, before anything is written: the script can still refuse them."""
        self.args, self.script, self.resume_checkpoint = args, script, checkpoint
        self.start_offline, self.start_online = checkpoints.offline_start(args, checkpoint)
        # A Robomimic name (`square-mh-low_dim`) selects robomimic_tasks; every other name is an OGBench one.
        self.robomimic = robomimic_tasks.is_robomimic_name(args.env_name)
        make_envs = robomimic_tasks.make_robomimic_envs if self.robomimic else ogbench_tasks.make_ogbench_envs
        self.env, self.eval_env, self.dataset_path = make_envs(args.env_name, args.dataset_dir, args.max_episode_steps)
        # Added to every online reward before it is stored (Robomimic: QC's success - 1; the dataset's already is).
        self.reward_offset = robomimic_tasks.REWARD_OFFSET if self.robomimic else 0.0
        self.obs_dim, self.action_dim = self.env.observation_space.shape[0], self.env.action_space.shape[0]
        self.total_steps = args.offline_steps + args.online_steps

    def load_dataset(self, min_size: int) -> dict:
        """The dataset's transitions (a one-line error if it is missing, damaged or smaller than min_size)."""
        if self.robomimic:
            dataset = robomimic_tasks.load_robomimic_dataset(self.env, self.dataset_path, self.args.env_name, min_size)
        else:
            dataset = ogbench_tasks.load_ogbench_dataset(self.env, self.dataset_path, min_size)
        self.dataset_size = len(dataset["observations"])
        return dataset

    def start(self, state, buffer: dict, parameter_groups: Callable) -> tuple:
        """Opens the run directory and log; returns the agent state and replay buffer, a checkpoint's where the run
        resumes (with its online transitions after the dataset, and its interrupted episode where OGBench's state
        lets it go on). parameter_groups(state): the named parameters the divergence stop checks."""
        args, checkpoint = self.args, self.resume_checkpoint
        key = jax.random.PRNGKey(args.seed)
        (self.run_dir,), (self.wandb_id,), (self.logger,), self.locks = runs.open_runs(
            args, args.env_name, [args.seed], checkpoint
        )
        self.online_loop, self.checkpoint_step = None, None
        if checkpoint is not None:
            self.env.reset(seed=args.seed + self.start_online)
            self.online_loop = ogbench_tasks.restore_ogbench_state(self.env, checkpoint.get("environment", {}))
            episode_continues = self.online_loop is not None
            state, key, buffer = checkpoints.restore_offline_agent(
                checkpoint, state, buffer, self.dataset_size, episode_continues
            )
            self.checkpoint_step = int(checkpoint["step"])
            self.resume_checkpoint = None  # its online replay is in the buffer now
        run_name = os.path.basename(self.run_dir)
        print(f"run {run_name}: {self.dataset_size} transitions from {self.dataset_path}, device {jax.devices()[0]}")
        # Every random draw comes from these keys folded with a step number, so a run can restart at any step.
        self.key = key
        self.offline_key, self.online_key, self.first_chunk_key, self.eval_key = jax.random.split(key, 4)
        self.parameter_groups = parameter_groups
        self.progress = runs.Progress(self.total_steps, self.start_offline + self.start_online)
        self.stop = runs.catch_stop_signals()
        self.phase_name, self.metrics_since_log, self.environment = None, [], {}
        return state, buffer

    # ------------------------------------------------------------------------------------------------
    # The offline phase

    def offline_update_keys(self, step: int, phase_name: str, phase_end: int) -> Iterator:
        """The keys of the updates after `step` up to the next log, evaluation, checkpoint or phase_end (at most
        --offline-scan-length), in pieces of PROGRESS_UPDATES, one jitted call each. Update n's key is
        fold_in(offline_key, n): where logs, evaluations and checkpoints cut the blocks does not change the run."""
        args = self.args
        if phase_name != self.phase_name:
            self.progress.phase(phase_name, step, phase_end, unit="updates/s")
            self.phase_name = phase_name
        next_stop = min(
            phase_end,
            (step // args.log_every + 1) * args.log_every,
            (step // args.eval_every + 1) * args.eval_every,
            (step // args.checkpoint_every + 1) * args.checkpoint_every if args.checkpoint_every > 0 else phase_end,
        )
        block_length = min(args.offline_scan_length, next_stop - step)
        block_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
            self.offline_key, jnp.arange(step, step + block_length)
        )
        for start in range(0, block_length, PROGRESS_UPDATES):
            yield block_keys[start : start + PROGRESS_UPDATES]

    def offline_updates_done(self, step: int, metrics: dict, finite_updates, state):
        """After the updates up to `step`: the divergence stop if one was not finite, and the console line."""
        self.metrics_since_log.append(metrics)
        updates = len(metrics["losses/qf_loss"])
        if int(finite_updates) < updates:
            failed = {name: values[int(finite_updates)] for name, values in metrics.items()}
            self.stop_on_divergence(step - updates + int(finite_updates) + 1, failed, state)
        status = f"qf_loss {float(metrics['losses/qf_loss'][-1]):.4f}"
        if "losses/alpha" in metrics:
            status += f", alpha {float(metrics['losses/alpha'][-1]):.4g}"
        self.progress.report(step, status, force=step % self.args.log_every == 0)

    def log_offline_losses(self, step: int, phase_end: int):
        """Every --log-every updates and at a phase's end (so that its losses stay apart): the mean of each loss over
        every update since the previous log."""
        if step % self.args.log_every == 0 or step == phase_end:
            since_log = self.metrics_since_log
            metrics = {name: jnp.mean(jnp.concatenate([m[name] for m in since_log])) for name in since_log[0]}
            self.metrics_since_log = []
            self.logger.log(step, {**metrics, "charts/updates_per_s": self.progress.rate(step)})

    # ------------------------------------------------------------------------------------------------
    # The online phase

    def begin_online_phase(self, act: Callable, params: dict):
        """The online phase's first observation and chunk, or a checkpoint's interrupted episode."""
        args = self.args
        if self.online_loop is None:
            observation, _ = self.env.reset(seed=args.seed + self.start_online)
            key = jax.random.fold_in(self.first_chunk_key, self.start_online)
            first_chunk = act(params, np.asarray(observation, np.float32)[None], key)
            queue = list(np.asarray(first_chunk[0]).reshape(args.horizon_length, self.action_dim))
            self.online_loop = observation, queue, 0.0, 0
        self.observation, self.queue, self.episode_return, self.episode_length = self.online_loop
        self.metrics, self.latest_success, self.unchecked = {}, float("nan"), []
        self.progress.phase("online", args.offline_steps + self.start_online, self.total_steps)

    def step_environment(self, step: int) -> tuple[dict, np.ndarray]:
        """Runs the next action of the current chunk. Returns the transition and the observation to propose the next
        chunk for (a new episode's first where one ended; the chunk is used when the current one has run out)."""
        args = self.args
        online_step = step - args.offline_steps
        if online_step == args.online_learning_starts and online_step > self.start_online + 1:
            self.progress.phase("online", step - 1, self.total_steps)  # the first update compiles
        action = self.queue.pop(0)
        next_observation, reward, terminated, truncated, info = self.env.step(action)
        self.episode_return += float(reward)
        self.episode_length += 1
        reward = float(reward) + self.reward_offset
        if args.sparse:
            reward = -1.0 if reward != 0.0 else 0.0
        transition = {
            "observations": np.asarray(self.observation, np.float32),
            "actions": action,
            "rewards": np.float32(reward),
            "masks": np.float32(1.0 - terminated),
            "terminals": np.float32(terminated or truncated),
            "next_observations": np.asarray(next_observation, np.float32),
        }
        if terminated or truncated:
            self.latest_success = float(info["success"])
            self.logger.log(step, {
                "charts/episodic_return": self.episode_return, "charts/episodic_length": self.episode_length,
                "charts/success": self.latest_success,
            })  # fmt: skip
            self.observation, _ = self.env.reset()
            self.episode_return, self.episode_length, self.queue = 0.0, 0, []
        else:
            self.observation = next_observation
        return transition, np.asarray(self.observation, np.float32)

    def check_later(self, step: int, finite, metrics: dict):
        """Keeps an update's divergence check (a device value) and metrics until the host waits for the device."""
        self.unchecked.append((step, finite, metrics))
        self.metrics = metrics

    def take_chunk(self, step: int, chunk, state):
        """The proposed chunk becomes the next one if the current one has run out. The divergence checks are read when
        the host waits for the device anyway (a new chunk, a log, an evaluation, a checkpoint): reading each one at
        once would keep the environment steps from overlapping the updates."""
        args = self.args
        waits = not self.queue or self.stop["signal"] is not None or self.checkpoint_due(step)
        if waits or self.online_due(step, args.log_every) or self.online_due(step, args.eval_every):
            for step_of_update, finite, metrics in self.unchecked:
                if not finite:
                    self.stop_on_divergence(step_of_update, metrics, state)
            self.unchecked = []
        if not self.queue:
            self.queue = list(np.asarray(chunk).reshape(args.horizon_length, self.action_dim))

    def log_online_losses(self, step: int):
        """The latest update's losses every --log-every online steps; the console line."""
        log_now = self.online_due(step, self.args.log_every)
        if log_now:
            self.logger.log(step, {**self.metrics, "charts/SPS": self.progress.rate(step)})
        alpha = (
            f", alpha {float(self.metrics['losses/alpha']):.4g}" if "losses/alpha" in self.metrics and log_now else ""
        )
        self.progress.report(step, f"latest success {self.latest_success}{alpha}", force=log_now)

    def online_due(self, step: int, every: int) -> bool:
        online_step = step - self.args.offline_steps
        return online_step % every == 0 or online_step == self.args.online_steps

    # ------------------------------------------------------------------------------------------------
    # Both phases

    def evaluate(self, step: int, act: Callable, params: dict):
        """At every --eval-every steps of a phase and at its end: --eval-episodes episodes, chunks run open-loop."""
        args = self.args
        if step <= args.offline_steps:
            due = step % args.eval_every == 0 or step == args.offline_steps
        else:
            due = self.online_due(step, args.eval_every)
        if not due or args.eval_episodes == 0:
            return
        eval_start = time.time()
        success, episodic_return = ogbench_tasks.evaluate_ogbench(
            self.eval_env, act, params, jax.random.fold_in(self.eval_key, step), args.eval_episodes,
            args.horizon_length, self.action_dim,
        )  # fmt: skip
        self.logger.log(step, {"eval/success": success, "eval/episodic_return": episodic_return})
        print(f"step {step}: eval success {success:.3f}, return {episodic_return:.1f}", flush=True)
        self.progress.leave_out(time.time() - eval_start)  # keep evaluation time out of the rates

    def checkpoint_due(self, step: int) -> bool:
        return self.args.checkpoint_every > 0 and step % self.args.checkpoint_every == 0

    def checkpoint(self, step: int, state, buffer: dict):
        """Every --checkpoint-every steps (after the step's evaluation, so that a resumed run has it); on SIGINT or
        SIGTERM, a last one unless --no-checkpoint-on-exit, then the run ends with the command that continues it."""
        signum = self.stop["signal"]
        if not self.checkpoint_due(step) and signum is None:
            return
        if step > self.args.offline_steps:  # an online episode goes on exactly after a resume (OGBench's tasks)
            episode = self.observation, self.queue, self.episode_return, self.episode_length
            self.environment = ogbench_tasks.ogbench_state(self.env, *episode)
        if self.checkpoint_due(step):
            self.write_checkpoint(step, state, buffer)
        if signum is not None:
            if self.args.checkpoint_on_exit and self.checkpoint_step != step:
                self.write_checkpoint(step, state, buffer)
            self.close(exit_code=128 + signum)
            runs.exit_interrupted(signum, step, self.total_steps, self.checkpoint_step, [self.run_dir])

    def write_checkpoint(self, step: int, state, buffer: dict):
        offline_done = min(step, self.args.offline_steps)
        online_done = step - offline_done
        rows = slice(self.dataset_size, self.dataset_size + online_done)
        online_replay = {name: column[rows] for name, column in buffer.items()}
        checkpoints.save_checkpoint(self.run_dir, {
            "script": self.script, "step": step, "offline_step": offline_done, "online_step": online_done,
            "wandb_id": self.wandb_id, "environment": self.environment,
            "agent": {"state": state, "rng_key": self.key, "online_replay": online_replay},
        })  # fmt: skip
        self.checkpoint_step = step

    def stop_on_divergence(self, step: int, metrics: dict, state):
        """Ends the run with one line if a loss or parameter is not finite (runs.stop_on_divergence)."""
        runs.stop_on_divergence(self.run_dir, step, metrics, self.parameter_groups(state), self.checkpoint_step)

    def close(self, exit_code: int = 0):
        self.env.close()
        self.eval_env.close()
        self.logger.close(exit_code)

    def finish(self, model: dict):
        """The final parameters (--save-model), then the log is closed."""
        if self.args.save_model:
            checkpoints.save_model(self.run_dir, self.args.exp_name, model)
        self.close()
