"""Run plumbing of the scripts in this folder; nothing here is part of an algorithm.

The same file sits in from_scratch/ and offline_to_online/ (tests/test_siblings.py keeps the two equal), so that
each folder stays self-contained while its scripts keep only what they compute. It holds: the run directory, its
lock and args.json; metrics.csv and wandb; the checks of the command line; checkpoints and --resume (with the
environment state that lets a resumed episode go on exactly); stop signals; the divergence stop; console progress.

Step convention, in both folders: a row of metrics.csv is labelled with the number of steps completed when it was
logged, and a checkpoint of step N holds the state after N steps, so a resume keeps the rows labelled <= N.
"""

import csv
import ctypes
import dataclasses
import fcntl
import functools
import io
import json
import netrc
import os
import pickle
import signal
import sys
import time
import urllib.parse
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Callable

import flax
import gymnasium as gym
import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import tyro
from gymnasium.envs.mujoco import MujocoEnv

# ----------------------------------------------------------------------------------------------------
# Command line


@dataclasses.dataclass
class RunArgs:
    """The run options every script's Args has (its own fields follow them in --help)."""

    track: bool = False
    """log to Weights & Biases (needs `wandb login`, WANDB_API_KEY, or WANDB_MODE=offline)"""
    wandb_project_name: str = "sac-flow"
    """the wandb project"""
    wandb_entity: str | None = None
    """the wandb entity (team); None uses your default"""
    save_model: bool = False
    """save the final parameters to runs/<run_name>/<exp_name>.flax"""
    checkpoint_every: int = 0
    """steps between checkpoints (runs/<run_name>/checkpoint.flax, the replay buffer included); 0: none"""
    resume: str | None = None
    """continue runs/<run_name> from its checkpoint with its saved args; flags given here win"""
    checkpoint_on_exit: bool = True
    """on Ctrl-C (SIGINT) or SIGTERM (cluster preemption): finish the step, write the checkpoint, exit 130 or 143"""


def parse_args(args_class: type, script: str):
    """The command line, and with --resume the run's checkpoint: its saved args, overridden by the flags given."""
    args = tyro.cli(args_class)
    if args.resume is None:
        return args, None
    saved_args, checkpoint = read_run(args.resume, script)
    try:
        saved = args_class(**{**saved_args, "resume": args.resume})
    except TypeError as error:
        raise SystemExit(f"error: {args.resume}/args.json does not match this script's Args: {error}")
    for field in dataclasses.fields(args_class):  # one line for a value of the wrong type (a hand edit, say)
        value, default = getattr(saved, field.name), field.default
        if value is None or default is None:
            continue
        expected = (int, float) if type(default) is float else type(default)
        if not isinstance(value, expected) or (isinstance(value, bool) and type(default) is not bool):
            name = type(default).__name__
            raise SystemExit(f"error: {args.resume}/args.json: {field.name} is {value!r}, not of type {name}")
    return tyro.cli(args_class, default=saved), checkpoint


def check_args(args, positive: tuple, non_negative: tuple, problems: list):
    """One line for the first field out of its range, the first of the script's `problems` (condition, message),
    --track without a wandb login, or --capture-video without moviepy or a renderer."""
    for name in positive:
        if getattr(args, name) <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in non_negative:
        if getattr(args, name) < 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for problem, message in problems:
        if problem:
            raise SystemExit(f"error: {message}")
    if getattr(args, "capture_video", False):
        try:
            import moviepy  # noqa: F401  (gymnasium's RecordVideo writes with it)
        except ImportError:
            raise SystemExit("error: --capture-video needs moviepy: pip install -r requirements.txt")
        check_renderer(args.env_id)
    if args.track and not wandb_login_available():
        raise SystemExit(
            "error: --track needs a wandb login: run `wandb login`, set WANDB_API_KEY, or set WANDB_MODE=offline"
        )


def wandb_login_available() -> bool:
    """True when wandb can log: offline/disabled mode, an API key in the environment, or a netrc entry."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


# ----------------------------------------------------------------------------------------------------
# Run directory, metrics.csv and wandb


def new_run_dir(env_name: str, exp_name: str, seed: int, timestamp: int) -> str:
    run_dir = os.path.join("runs", f"{env_name}__{exp_name}__{seed}__{timestamp}")
    if os.path.exists(run_dir):
        raise SystemExit(f"error: {run_dir} already exists; not overwriting it")
    return run_dir


def lock_run_dir(run_dir: str):
    """Holds runs/<run_name>/.lock while the process lives (the system releases it however the process ends), so
    that a second process started on the same run (a resume run twice at once) refuses instead of mixing the two."""
    os.makedirs(run_dir, exist_ok=True)
    lock = open(os.path.join(run_dir, ".lock"), "w")  # noqa: SIM115  (open for the life of the run)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise SystemExit(f"error: {run_dir} is in use by another process of this run; not starting a second one")
    return lock


class MetricsLog:
    """Appends every metric to runs/<run_name>/metrics.csv and, with a wandb run, sends it there too.

    On resume from a checkpoint of step N, the rows labelled after N (logged by the interrupted run after its
    checkpoint) are dropped, since the resumed run logs those steps again, and the file is appended to.
    """

    def __init__(self, run_dir: str, wandb_run=None, resume_step: int | None = None):
        self.wandb_run = wandb_run
        path = os.path.join(run_dir, "metrics.csv")
        if resume_step is not None:
            kept, dropped = rows_up_to(path, resume_step)
            with open(path + ".tmp", "w", newline="") as f:
                csv.writer(f).writerows([["global_step", "key", "value"], *kept])
            os.replace(path + ".tmp", path)
            print(f"resuming from step {resume_step}: dropped {dropped} later rows of metrics.csv", flush=True)
        self.file = open(path, "w" if resume_step is None else "a", newline="")  # noqa: SIM115
        self.writer = csv.writer(self.file)
        if resume_step is None:
            self.writer.writerow(["global_step", "key", "value"])

    def log(self, global_step: int, metrics: dict):
        try:
            for key, value in metrics.items():
                self.writer.writerow([global_step, key, float(value)])
            self.file.flush()
        except OSError as error:  # e.g. a full disk
            raise SystemExit(f"error: cannot write {self.file.name} at step {global_step} ({error.strerror or error})")
        if self.wandb_run is not None:
            self.wandb_run.log({key: float(value) for key, value in metrics.items()}, step=global_step)

    def close(self, exit_code: int = 0):
        self.file.close()
        if self.wandb_run is not None:
            if exit_code != 0:  # stopped by a signal: wandb shows the run as preempted, to be resumed
                self.wandb_run.mark_preempting()
            self.wandb_run.finish(exit_code=exit_code)


def rows_up_to(path: str, step: int) -> tuple[list, int]:
    """The rows of metrics.csv labelled <= `step`, and how many others there are. A last row cut short (the process
    died while writing it) counts as dropped; any other row that is not global_step,key,value stops the resume with
    one line, before anything is changed."""
    try:
        with open(path, newline="") as f:
            header, *rows = list(csv.reader(f))
    except (OSError, ValueError, csv.Error) as error:
        raise SystemExit(f"error: cannot read {path} ({error}); nothing was changed")
    if header != ["global_step", "key", "value"]:
        raise SystemExit(f"error: {path} does not start with global_step,key,value; nothing was changed")
    kept = []
    for line, row in enumerate(rows, start=2):
        try:
            row_step, _, _ = int(row[0]), row[1], float(row[2])
            well_formed = len(row) == 3
        except (IndexError, ValueError):
            well_formed = False
        if not well_formed:
            if line == len(rows) + 1:
                continue  # cut short by the interruption
            raise SystemExit(f"error: {path} line {line} is not global_step,key,value: {row}; nothing was changed")
        if row_step <= step:
            kept.append(row)
    return kept, len(rows) - len(kept)


def open_runs(args, env_name: str, seeds: list, checkpoint: dict | None):
    """The run directories of `seeds` (with --resume: the resumed one), locked, with their args.json, wandb runs (with
    --track; one group for several seeds) and MetricsLogs: (run_dirs, wandb_ids, metrics logs, locks)."""
    timestamp = int(time.time())
    if checkpoint is None:
        run_dirs = [new_run_dir(env_name, args.exp_name, seed, timestamp) for seed in seeds]
        wandb_ids = [uuid.uuid4().hex[:8] for _ in seeds]
    else:
        run_dirs, wandb_ids = [args.resume], [checkpoint["wandb_id"]]
    locks = [lock_run_dir(run_dir) for run_dir in run_dirs]
    group = f"{env_name}__{args.exp_name}__{timestamp}" if len(seeds) > 1 else None
    resume_step = None if checkpoint is None else int(checkpoint["step"])
    one_seed = {"num_seeds": 1} if hasattr(args, "num_seeds") else {}
    logs = [  # each seed's args.json describes a single-seed run of that seed, so it can be resumed on its own
        open_run(run_dir, dataclasses.replace(args, seed=seed, resume=None, **one_seed), wandb_id, resume_step, group)
        for seed, run_dir, wandb_id in zip(seeds, run_dirs, wandb_ids)
    ]
    return run_dirs, wandb_ids, logs, locks


def open_run(run_dir: str, args, wandb_id: str, resume_step: int | None, group: str | None):
    """Writes the run's args.json (what --resume reads back), starts its wandb run with --track (the same id on
    resume, so the curves continue) and returns its MetricsLog."""
    config = dataclasses.asdict(args)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(config, f, indent=2)
    wandb_run = None
    if args.track:
        import wandb  # only with --track: importing it takes seconds

        wandb_run = wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            name=os.path.basename(run_dir),
            group=group,
            id=wandb_id,
            resume="allow",
            config=config,
            dir=run_dir,
            reinit="create_new",
        )
    return MetricsLog(run_dir, wandb_run, resume_step)


# ----------------------------------------------------------------------------------------------------
# Evaluation (the deterministic policy the script gives)


def evaluate_gym(env: gym.Env, evaluation_action, policy, episodes: int, key) -> float:
    """Mean return of `episodes` episodes of evaluation_action(policy.params, policy.batch_stats, obs, key)."""
    returns = []
    for _ in range(episodes):
        obs, _ = env.reset()
        done = False
        while not done:
            key, action_key = jax.random.split(key)
            action = evaluation_action(policy.params, policy.batch_stats, jnp.asarray(obs, jnp.float32), action_key)
            obs, _, terminated, truncated, info = env.step(np.asarray(action))
            done = terminated or truncated
        returns.append(info["episode"]["r"])
    return float(np.mean(returns))


def evaluate_ogbench(env: gym.Env, act, params: dict, key, num_episodes: int, horizon_length: int, action_dim: int):
    """Mean success (OGBench's info['success'] at the episode's end) and mean return; chunks run open-loop.
    The key also seeds the environment, so the result depends only on the parameters and the key."""
    seed_key, key = jax.random.split(key)
    seed = int(jax.random.randint(seed_key, (), 0, 2**31 - 1))
    successes, returns = [], []
    for episode in range(num_episodes):
        observation, _ = env.reset(seed=seed if episode == 0 else None)
        episode_return, done, queue = 0.0, False, []
        while not done:
            if not queue:
                key, act_key = jax.random.split(key)
                chunk = np.asarray(act(params, np.asarray(observation, np.float32)[None], act_key)[0])
                queue = list(chunk.reshape(horizon_length, action_dim))
            observation, reward, terminated, truncated, info = env.step(queue.pop(0))
            episode_return += float(reward)
            done = terminated or truncated
        successes.append(float(info["success"]))
        returns.append(episode_return)
    return float(np.mean(successes)), float(np.mean(returns))


# ----------------------------------------------------------------------------------------------------
# OGBench tasks and datasets (offline_to_online/)


def make_ogbench_envs(env_name: str, dataset_dir: str | None, max_episode_steps: int | None):
    """The environment of an OGBench single-task name, a second one for evaluation, and the path of its dataset; one
    line for an unknown name, a missing dataset (naming the command that makes it) or action bounds other than
    [-1, 1]."""
    import ogbench  # noqa: F401  (registers the OGBench environments with gymnasium; only offline_to_online/ needs it)

    env_id, dataset_name = split_ogbench_name(env_name)
    if env_id not in gym.envs.registry:
        raise SystemExit(f"error: unknown OGBench environment {env_id} (from --env-name {env_name})")
    dataset_dir = os.path.expanduser(dataset_dir if dataset_dir is not None else "~/.ogbench/data")
    dataset_path = os.path.join(dataset_dir, f"{dataset_name}.npz")
    if not os.path.isfile(dataset_path):
        raise SystemExit(
            f"error: dataset file {dataset_path} not found; make it with: {make_dataset_command(dataset_path)}"
        )
    # The offline scripts never render: without a GL setting, MuJoCo (imported by gym.make) looks for an X display and
    # warns on headless machines. OGBench declares float64 observation bounds; gymnasium's cast warning is harmless.
    os.environ.setdefault("MUJOCO_GL", "disable")
    warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32")
    env_kwargs = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    # Without the environment checker, which only builds the MuJoCo model once more (about a second each).
    env = gym.make(env_id, disable_env_checker=True, **env_kwargs)
    eval_env = gym.make(env_id, disable_env_checker=True, **env_kwargs)
    if not (np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)):
        raise SystemExit(f"error: {env_id} has action bounds other than [-1, 1], which the tanh squash assumes")
    return env, eval_env, dataset_path


def make_dataset_command(dataset_path: str) -> str:
    dataset_name = os.path.basename(dataset_path)[: -len(".npz")]
    return f"python offline_to_online/make_dataset.py --env-name {dataset_name} --dataset-dir {os.path.dirname(dataset_path)}"


def offline_start(args, checkpoint: dict | None) -> tuple[int, int]:
    """The offline and online steps a run starts from: 0, 0, or its checkpoint's, when --offline-steps and
    --online-steps let it continue (once the online phase has begun, the offline step count is fixed)."""
    if checkpoint is None:
        return 0, 0
    offline, online = int(checkpoint["offline_step"]), int(checkpoint["online_step"])
    if offline > args.offline_steps or online > args.online_steps or (online > 0 and offline != args.offline_steps):
        raise SystemExit(
            f"error: the checkpoint of {args.resume} is at offline step {offline}, online step {online}: "
            f"it cannot continue with --offline-steps {args.offline_steps} --online-steps {args.online_steps}"
        )
    return offline, online


def restore_offline_agent(checkpoint: dict, state, buffer: dict, dataset_size: int, episode_continues: bool):
    """The agent state, RNG key and replay buffer of a checkpoint, restored into the freshly built `state` and `buffer`
    (whose first dataset_size rows hold the reloaded dataset; the saved online transitions go after them).
    `episode_continues`: the environment was restored, so the saved online episode goes on after the cut."""
    online_rows = int(checkpoint["online_step"])
    online_replay = {name: np.zeros((online_rows, *column.shape[1:]), column.dtype) for name, column in buffer.items()}
    target = {"state": state, "rng_key": jax.random.PRNGKey(0), "online_replay": online_replay}
    restored = restore_state(target, checkpoint["agent"], "the checkpoint")
    buffer = {
        name: column.at[dataset_size : dataset_size + online_rows].set(restored["online_replay"][name])
        for name, column in buffer.items()
    }
    if online_rows > 0 and not episode_continues:
        # The resumed run starts a new episode: the saved one ends here, so no chunk runs across the cut.
        buffer["terminals"] = buffer["terminals"].at[dataset_size + online_rows - 1].set(1.0)
    return restored["state"], restored["rng_key"], buffer


def split_ogbench_name(name: str) -> tuple[str, str]:
    """'cube-triple-play-singletask-task4-v0' -> env id 'cube-triple-singletask-task4-v0', dataset 'cube-triple-play-v0'
    (the same rule as ogbench.make_env_and_datasets)."""
    parts = name.split("-")
    if "singletask" not in parts:
        raise SystemExit(
            f"error: --env-name {name} is not an OGBench single-task name (<env>-<type>-singletask-...-v0)"
        )
    pos = parts.index("singletask")
    return "-".join(parts[: pos - 1] + parts[pos:]), "-".join(parts[:pos] + parts[-1:])


def load_ogbench_dataset(env: gym.Env, path: str, min_size: int) -> dict:
    """Loads <dataset>.npz as OGBench does (transitions with next_observations, rewards and masks relabelled from
    qpos for the env's task) and checks it fits the env and has min_size transitions or more; a bad file ends the
    run with one line naming the command that makes it."""
    env_id, make_it = env.spec.id, make_dataset_command(path)
    from ogbench.utils import load_dataset

    try:
        dataset = load_dataset(path, compact_dataset=False, add_info=True)
    except KeyError as e:
        raise SystemExit(f"error: dataset file {path} lacks a required array ({e.args[0]}); remake it with: {make_it}")
    except IndexError:  # the boolean terminal mask does not fit the other arrays
        raise SystemExit(f"error: dataset file {path} has arrays of different lengths; remake it with: {make_it}")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        raise SystemExit(f"error: dataset file {path} is not a readable .npz file; remake it with: {make_it}")
    expected = {
        "observations": env.observation_space.shape,
        "actions": env.action_space.shape,
        "qpos": env.unwrapped._data.qpos.shape,
    }
    for key, shape in expected.items():
        if key not in dataset or dataset[key].shape[1:] != shape or len(dataset[key]) != len(dataset["observations"]):
            got = dataset[key].shape if key in dataset else "nothing"
            needed = ", ".join(map(str, shape))
            raise SystemExit(
                f"error: dataset file {path} has {key} of shape {got}, but {env_id} needs (N, {needed}); "
                f"remake it with: {make_it}"
            )
    from ogbench.relabel_utils import relabel_dataset  # only offline_to_online/ needs OGBench

    if len(dataset["observations"]) < min_size:
        raise SystemExit(
            f"error: dataset {path} has {len(dataset['observations'])} transitions, fewer than the batch size or the "
            f"chunk length ({min_size})"
        )
    relabel_dataset(env_id, env, dataset)  # rewards = #solved - #subtasks, masks = 0 once all are solved
    return dataset


# ----------------------------------------------------------------------------------------------------
# Checkpoints and --resume


def save_checkpoint(run_dir: str, checkpoint: dict):
    """Writes runs/<run_name>/checkpoint.flax through a temporary file, so a crash while writing keeps the old one."""
    path = os.path.join(run_dir, "checkpoint.flax")
    data = flax.serialization.to_bytes(checkpoint)
    try:
        with open(path + ".tmp", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:  # e.g. a full disk: the previous checkpoint is untouched
        os.remove(path + ".tmp")
        raise SystemExit(
            f"error: cannot write {path} at step {checkpoint['step']} ({error.strerror or error}); the previous one is kept"
        )
    os.replace(path + ".tmp", path)


def read_run(run_dir: str, script: str) -> tuple[dict, dict]:
    """The saved args and the checkpoint (nested dicts of NumPy arrays) of a run of `script`, or a one-line error."""
    if not os.path.isfile(os.path.join(run_dir, "args.json")):
        raise SystemExit(f"error: {run_dir} is not a run directory (no args.json)")
    path = os.path.join(run_dir, "checkpoint.flax")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {run_dir} has no checkpoint.flax to resume from (run with --checkpoint-every N)")
    try:
        with open(os.path.join(run_dir, "args.json")) as f:
            saved_args = json.load(f)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot read {run_dir}/args.json: {type(error).__name__}: {error}")
    try:
        with open(path, "rb") as f:
            checkpoint = flax.serialization.msgpack_restore(f.read())
        saved_script = checkpoint["script"]
    except Exception as error:  # noqa: BLE001  (whatever the damage, one line)
        raise SystemExit(f"error: cannot read {path}: {type(error).__name__}: {error}")
    if saved_script != script:
        raise SystemExit(f"error: {run_dir} is a run of {saved_script}, not {script}")
    if not isinstance(saved_args, dict):
        raise SystemExit(f"error: {run_dir}/args.json does not hold a script's args")
    # JSON has no tuples: sizes of hidden layers come back as lists.
    return {name: tuple(value) if isinstance(value, list) else value for name, value in saved_args.items()}, checkpoint


def restore_state(target, saved, path: str):
    """`saved` (a checkpoint's nested dicts) in the structure of `target`, or one line when they do not fit."""
    try:
        restored = flax.serialization.from_state_dict(target, saved)
    except (KeyError, ValueError, TypeError) as error:
        raise SystemExit(f"error: {path} does not match these args: {error}")
    shapes = [(np.shape(x), np.result_type(x)) for x in jax.tree.leaves(restored)]
    if shapes != [(np.shape(x), np.result_type(x)) for x in jax.tree.leaves(target)]:
        raise SystemExit(f"error: {path} does not match these args (network or buffer sizes)")
    return jax.tree.map(jnp.asarray, restored)


def save_model(run_dir: str, exp_name: str, model: dict):
    """--save-model: the final parameters, runs/<run_name>/<exp_name>.flax."""
    path = os.path.join(run_dir, f"{exp_name}.flax")
    with open(path, "wb") as f:
        f.write(flax.serialization.to_bytes(model))
    print(f"model saved to {path}")


def check_renderer(env_id: str):
    """Renders one frame of env_id for --capture-video, before any run directory exists: one line now rather than a
    failure at the first evaluation after hours of training (an unknown id is make_gym_env's to report)."""
    try:
        env = gym.make(env_id, render_mode="rgb_array")
    except gym.error.Error:
        return
    try:
        env.reset(seed=0)
        env.render()
    except Exception as error:  # noqa: BLE001  (whatever the renderer's failure, one line)
        # Not closed: closing a renderer that failed can raise in turn, and the run stops here anyway.
        raise SystemExit(
            f"error: --capture-video cannot render ({str(error).splitlines()[0]}); "
            "set MUJOCO_GL=egl (GPU) or MUJOCO_GL=osmesa (CPU), see setup.md"
        )
    env.close()


def make_gym_env(env_id: str, seed: int, video_dir: str | None = None, video_every: int = 1) -> gym.Env:
    """A gymnasium environment with episode statistics (and video: check_renderer has rendered a frame); one line for
    an id it cannot make or a discrete or unbounded action space."""
    try:
        env = gym.make(env_id, render_mode="rgb_array" if video_dir else None)
    except gym.error.Error as error:
        raise SystemExit(f"error: cannot make environment '{env_id}': {str(error).splitlines()[0]}")
    if not isinstance(env.action_space, gym.spaces.Box):
        raise SystemExit(
            f"error: {env_id} has a {type(env.action_space).__name__} action space; SAC needs a continuous (Box) one"
        )
    if not (np.all(np.isfinite(env.action_space.low)) and np.all(np.isfinite(env.action_space.high))):
        raise SystemExit(f"error: {env_id} has an unbounded action space; SAC's tanh squash needs finite bounds")
    env.reset(seed=seed)  # seeds the environment; later resets continue its random stream
    env.action_space.seed(seed)
    if video_dir:
        env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda episode: episode % video_every == 0)
    return gym.wrappers.RecordEpisodeStatistics(env)


def find_wrapper(env: gym.Env, wrapper_type: type) -> gym.Wrapper:
    while not isinstance(env, wrapper_type):
        env = env.env
    return env


# Everything mj_step reads: a restored step is bitwise the same.
SIMULATOR_STATE = mujoco.mjtState.mjSTATE_INTEGRATION


def gym_mujoco_state(env: gym.Env, eval_env: gym.Env, obs, action) -> dict:
    """What continues a gymnasium MuJoCo task's training episode exactly after a resume: the simulator state, the
    random generators of both environments and of the action space, the time-limit and episode-return counters, and
    the loop's observation and next action. Empty for other simulators (their episode ends at a resume)."""
    if not isinstance(env.unwrapped, MujocoEnv):
        return {}
    generators = [env.unwrapped.np_random, eval_env.unwrapped.np_random, env.action_space.np_random]
    statistics = find_wrapper(env, gym.wrappers.RecordEpisodeStatistics)
    model, data = env.unwrapped.model, env.unwrapped.data
    simulator = np.empty(mujoco.mj_stateSize(model, SIMULATOR_STATE))
    mujoco.mj_getState(model, data, simulator, SIMULATOR_STATE)
    return {
        "generators": json.dumps([generator.bit_generator.state for generator in generators]),
        "counters": np.array(
            [find_wrapper(env, gym.wrappers.TimeLimit)._elapsed_steps, statistics.episode_lengths], np.int64
        ),
        "episode_return": np.float64(statistics.episode_returns),
        "obs": np.asarray(obs),
        "action": np.asarray(action),
        "simulator": simulator,
    }


def restore_gym_mujoco_state(env: gym.Env, eval_env: gym.Env, state: dict):
    """Puts gym_mujoco_state back after both environments were made and reset; returns the loop's (obs, action), or
    None (nothing changed, a new episode) when the checkpoint holds no such state."""
    if "simulator" not in state or not isinstance(env.unwrapped, MujocoEnv):
        return None
    generators = [env.unwrapped.np_random, eval_env.unwrapped.np_random, env.action_space.np_random]
    for generator, generator_state in zip(generators, json.loads(state["generators"])):
        generator.bit_generator.state = generator_state
    mujoco.mj_setState(env.unwrapped.model, env.unwrapped.data, np.asarray(state["simulator"]), SIMULATOR_STATE)
    statistics = find_wrapper(env, gym.wrappers.RecordEpisodeStatistics)
    find_wrapper(env, gym.wrappers.TimeLimit)._elapsed_steps, statistics.episode_lengths = map(int, state["counters"])
    statistics.episode_returns = float(state["episode_return"])
    return np.asarray(state["obs"]), np.asarray(state["action"])


def is_task_state(name: str, value) -> bool:
    """The attributes of an OGBench environment that hold its task's Python state (targets, success, generator, the IK
    target pose): plain values and OGBench's pose objects; not the MuJoCo model and data, nor the MJCF tree."""
    if name in ("spec", "_model", "_data"):
        return False
    if isinstance(value, (list, tuple)):
        return all(is_task_state(name, item) for item in value)
    if isinstance(value, dict):
        return all(is_task_state(name, item) for item in value.values())
    plain = (bool, int, float, str, type(None), np.ndarray, np.generic, np.random.Generator)
    return isinstance(value, plain) or type(value).__module__.startswith("ogbench.manipspace.lie")


class EnvironmentUnpickler(pickle.Unpickler):
    """Reads a saved OGBench state: NumPy arrays and generators, MuJoCo data and OGBench poses, nothing else (a
    checkpoint holds data, never code to run)."""

    def find_class(self, module, name):
        allowed = module.startswith(("numpy.random", "ogbench.manipspace.lie.")) or (module, name) in {
            ("numpy", "dtype"),
            ("numpy", "ndarray"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "scalar"),
            ("mujoco._structs", "MjData"),
            ("mujoco._structs", "MjModel"),
        }
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of an environment state")
        return super().find_class(module, name)


def ogbench_state(env: gym.Env, observation, queue: list, episode_return: float, episode_length: int) -> dict:
    """What continues an OGBench online episode exactly after a resume: OGBench's whole MuJoCo data (its controller
    reads positions that the last physics step left, so the integration state alone would not do), the task's Python
    state, the time limit's counter, and the loop's observation, rest of the current chunk, return and length.
    Empty for an environment whose simulator is not OGBench's: the resumed run then starts a new episode."""
    task = env.unwrapped
    if not isinstance(getattr(task, "_data", None), mujoco.MjData):
        return {}
    saved = {
        "data": task._data,
        "task": {name: value for name, value in vars(task).items() if is_task_state(name, value)},
        "elapsed_steps": find_wrapper(env, gym.wrappers.TimeLimit)._elapsed_steps,
    }
    return {
        "simulator": np.frombuffer(zlib.compress(pickle.dumps(saved), 1), np.uint8),
        "observation": np.asarray(observation),
        "queue": np.asarray(queue),
        "episode": np.array([episode_return, episode_length], np.float64),
    }


def restore_ogbench_state(env: gym.Env, state: dict):
    """Puts ogbench_state back into the freshly made and reset `env`; returns the loop's (observation, queue, episode
    return, episode length), or None (a new episode) when there is none to restore."""
    if "simulator" not in state:
        return None
    task = env.unwrapped
    try:
        saved = EnvironmentUnpickler(io.BytesIO(zlib.decompress(np.asarray(state["simulator"]).tobytes()))).load()
        if saved["data"].qpos.shape != task._data.qpos.shape or saved["data"].ctrl.shape != task._data.ctrl.shape:
            raise ValueError("it is the state of another environment")
        mujoco.mj_copyData(task._data, task._model, saved["data"])
    except Exception as error:  # noqa: BLE001  (another MuJoCo or NumPy version may fail in many ways)
        print(f"warning: cannot restore the environment ({error}); the resumed run starts a new episode", flush=True)
        return None
    for name, value in saved["task"].items():
        setattr(task, name, value)
    find_wrapper(env, gym.wrappers.TimeLimit)._elapsed_steps = saved["elapsed_steps"]
    episode_return, episode_length = state["episode"]
    return (
        np.asarray(state["observation"]),
        list(np.asarray(state["queue"])),
        float(episode_return),
        int(episode_length),
    )


# ----------------------------------------------------------------------------------------------------
# Stops: signals, divergence


def catch_stop_signals() -> dict:
    """SIGINT (Ctrl-C) and SIGTERM (what clusters send before they preempt a job) only record the signal: the loop
    ends after its current step (or block of updates), writes the checkpoint and exits. A second Ctrl-C exits at once
    (a checkpoint being written then stays a .tmp file and the previous one is kept); further SIGTERMs change nothing,
    since a scheduler may send one to every process of the job and to the batch script that passes it on."""
    stop = {"signal": None}

    def handle(signum, _frame):
        if stop["signal"] is None:
            stop["signal"] = signum
        elif signum == signal.SIGINT:
            print("stopped at once by a second Ctrl-C (SIGINT)", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handle)
    return stop


def exit_interrupted(signum: int, step: int, total_steps: int, checkpoint_step: int | None, run_dirs: list):
    """The last line of a run stopped by a signal, with the command that continues it; exits 128 + signum."""
    if checkpoint_step is None:
        continuation = "no checkpoint was written (--no-checkpoint-on-exit), so it cannot be continued"
    else:
        commands = " ; ".join(f"python {sys.argv[0]} --resume {run_dir}" for run_dir in run_dirs)
        continuation = f"checkpoint at step {checkpoint_step}; continue with: {commands}"
    name = signal.Signals(signum).name
    print(f"interrupted by {name} at step {step}/{total_steps}; {continuation}", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def nonfinite_names(groups: dict) -> list[str]:
    """The names of the groups (name -> scalar or pytree) that hold a non-finite number; a scalar shows its value."""
    names = []
    for name, tree in groups.items():
        if not all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)):
            names.append(f"{name}={float(tree)}" if np.ndim(tree) == 0 else name)
    return names


def stop_on_divergence(run_dir: str, step: int, metrics: dict, state: dict, checkpoint_step: int | None):
    """Saves `state` to runs/<run_name>/nonfinite_state.flax for inspection and ends the run with one line naming the
    non-finite losses (else the parameter groups of `state`), the step and the last checkpoint (only ever written
    from a finite state)."""
    path = os.path.join(run_dir, "nonfinite_state.flax")
    with open(path, "wb") as f:
        f.write(flax.serialization.to_bytes(state))
    if checkpoint_step is None:
        kept = "no checkpoint was written (use --checkpoint-every N)"
    else:
        kept = f"last finite checkpoint: {os.path.join(run_dir, 'checkpoint.flax')} (step {checkpoint_step})"
    bad = nonfinite_names(metrics) or nonfinite_names(state) or ["action proposed by the updated policy"]
    raise SystemExit(f"error: non-finite {', '.join(bad)} at step {step}; state saved to {path}; {kept}")


# ----------------------------------------------------------------------------------------------------
# Many seeds in one call, random-phase transitions in blocks


def over_seeds(function: Callable) -> Callable:
    """`function(agent, *inputs) -> (agent, outputs)` on each agent of a list, in one jitted call; inputs and outputs
    carry a leading seed axis. A list rather than one vmapped state: on a CPU vmap's batched matmuls are slower."""

    @functools.wraps(function)  # keeps its name in JAX's compile logs
    def each_seed(agents: list, *inputs):
        results = [function(agent, *(x[i] for x in inputs)) for i, agent in enumerate(agents)]
        stacked_outputs = jax.tree.map(lambda *per_seed: jnp.stack(per_seed), *[outputs for _, outputs in results])
        return [agent for agent, _ in results], stacked_outputs

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


# ----------------------------------------------------------------------------------------------------
# Console progress and speed


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(max(seconds, 0)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    """The console's progress lines: `step s/total | <phase>: <rate> <unit>, <ETA> left | <status>`, at least every
    30 s and at the end of each phase. Rate and ETA are those of the current phase, evaluations left out. The first
    step of a phase compiles its jitted call: its line says so, and the rate is measured from after it."""

    def __init__(self, total_steps: int, step: int, every_seconds: float = 30.0):
        self.total_steps, self.every_seconds = total_steps, every_seconds
        self.printed = self.window_time = time.time()
        self.window_step = step

    def phase(self, name: str, step: int, last_step: int, unit: str = "steps/s", compiles: bool = True):
        """Starts phase `name` after `step` steps; it ends at `last_step`."""
        self.name, self.start_step, self.last_step, self.unit = name, step, last_step, unit
        self.start_time, self.compiled = time.time(), not compiles

    def leave_out(self, seconds: float):
        """Time the rates leave out (an evaluation)."""
        self.start_time += seconds
        self.window_time += seconds

    def rate(self, step: int) -> float:
        """Steps per second since the previous call (or the start): the speed row of metrics.csv."""
        now = time.time()
        rate = (step - self.window_step) / max(now - self.window_time, 1e-9)
        self.window_step, self.window_time = step, now
        return rate

    def report(self, step: int, status: str = "", force: bool = False):
        now = time.time()
        if not self.compiled:
            seconds = now - self.printed  # since the previous line, or the start
            print(f"step {step}/{self.total_steps} | {self.name}: compiled and took the first step in {seconds:.0f}s")
            self.start_step, self.start_time, self.printed, self.compiled = step, now, now, True
        elif force or step == self.last_step or now - self.printed >= self.every_seconds:
            rate = (step - self.start_step) / max(now - self.start_time, 1e-9)
            eta = format_duration((self.last_step - step) / max(rate, 1e-9))
            line = f"step {step}/{self.total_steps} | {self.name}: {rate:.1f} {self.unit}, {eta} left"
            print(line + (f" | {status}" if status else ""), flush=True)
            self.printed = now


def reuse_freed_memory():
    """Linux (glibc): keep the memory that XLA frees for its next call instead of returning it to the system.

    Every call of a train step allocates its temporary arrays anew (~65 MB for the CrossQ critic at batch 512). By
    default glibc maps blocks that large freshly from the system and unmaps them when they are freed, so every call
    page-faults them in again; served from the heap, the train step ran 10-25 % faster on a 2-core CPU
    (bench/speed.py --default-malloc shows the difference). Elsewhere (macOS, musl) nothing changes.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters, from glibc's <malloc.h>
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**30)
