"""Generate an OGBench manipulation "play" dataset locally, with OGBench's own scripted oracles.

OGBench downloads its published datasets from the internet; this script makes files of the same format
offline, following OGBench's generation script for manipspace "play" data
(data_gen_scripts/generate_manipspace.py --dataset_type=play):

- The environment (e.g. cube-triple-v0) runs in `mode="data_collection"` with `terminate_at_goal=False`, so every
  episode lasts exactly `max_episode_steps` (1001) steps and ends by truncation.
- A non-Markovian PlanOracle acts: for the current sub-task (move one cube; press a button; open the drawer ...)
  it interpolates keyframes (above the cube, grasp, lift, clearance, place, release, random final pose; keyframe
  heights and times are jittered) into a plan of absolute end-effector targets, one per control step, then adds
  temporally correlated noise to the plan:
      plan += gaussian_filter1d(N(0, 1) * [0.05, 0.05, 0.05, 0.3, 1.0] * noise, sigma=noise_smoothing, axis=time)
  with noise = 0.1 and noise_smoothing = 0.5. The action is the normalised difference between the plan's
  target and the current end effector (x, y, z, yaw, gripper), clipped to [-1, 1].
- When the oracle finishes its plan, the environment draws a new target (`set_new_target(p_stack)`: a top cube to
  a random place, or stacked on another top cube with probability p_stack, drawn per episode: U(0.05, 0.35) for
  triple, U(0, 0.25) double, U(0.1, 0.5) quadruple, 0 single) and the oracle plans again, until the episode ends.
- Scene episodes where the cube leaves the visible area (outside the drawer) are redrawn, as OGBench does.

Files: <dataset_dir>/<name>.npz (num_episodes episodes) and <dataset_dir>/<name>-val.npz (num_val_episodes,
by default num_episodes // 10, as OGBench). One row per step, episodes back to back:
    observations  float32 (N, ob_dim)   observation before the step
    actions       float32 (N, 5)        action taken, in [-1, 1]
    terminals     bool    (N,)          True on the last step of each episode
    qpos, qvel    float32 (N, nq/nv)    MuJoCo state before the step (singletask rewards are relabelled from qpos)
    button_states int64   (N, buttons)  scene and puzzle only
`ogbench.make_env_and_datasets(name, dataset_dir=...)` only checks that both files exist before loading them,
so with the files in place it never downloads.

Every episode has its own seed, derived from (--seed, split, episode index): the dataset does not depend on
--num-workers, and episode i of a small dataset is episode i of a large one with the same seed.

Ctrl-C or SIGTERM keeps the episodes generated so far in <dataset_dir>/<name>.partial.npz and exits (130 or 143);
the same command continues from them, and the files it writes are the ones an uninterrupted run writes.
The published datasets were generated with unseeded global RNGs, so the episodes here are different draws from
the same distribution, not copies of the published files.

Example (OGBench's default location, where ogbench.make_env_and_datasets looks):
    python offline_to_online/make_dataset.py --env-name cube-triple-play-v0 --num-workers 2
"""

import dataclasses
import multiprocessing
import os
import signal
import sys
import time
import zipfile
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import ogbench.manipspace  # noqa: F401  (registers the manipulation environments with gymnasium)
import tyro
from ogbench.manipspace.oracles.plan.button_plan import ButtonPlanOracle
from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle
from ogbench.manipspace.oracles.plan.drawer_plan import DrawerPlanOracle
from ogbench.manipspace.oracles.plan.window_plan import WindowPlanOracle

# dataset name -> (environment id, number of training episodes of OGBench's published dataset)
PLAY_DATASETS = {
    "cube-single-play-v0": ("cube-single-v0", 1000),
    "cube-double-play-v0": ("cube-double-v0", 1000),
    "cube-triple-play-v0": ("cube-triple-v0", 3000),
    "cube-quadruple-play-v0": ("cube-quadruple-v0", 5000),
    "scene-play-v0": ("scene-v0", 1000),
    "puzzle-3x3-play-v0": ("puzzle-3x3-v0", 1000),
    "puzzle-4x4-play-v0": ("puzzle-4x4-v0", 1000),
    "puzzle-4x5-play-v0": ("puzzle-4x5-v0", 3000),
    "puzzle-4x6-play-v0": ("puzzle-4x6-v0", 5000),
}
DEFAULT_DATASET_DIR = "~/.ogbench/data"  # = ogbench.utils.DEFAULT_DATASET_DIR
SPLITS = ("train", "val")


@dataclass
class Args:
    env_name: str = "cube-triple-play-v0"
    """dataset to generate, e.g. cube-triple-play-v0; a singletask name (cube-triple-play-singletask-task4-v0)
    selects its dataset"""
    num_episodes: int | None = None
    """training episodes; None = OGBench's published count (cube-triple: 3000, i.e. ~3M transitions)"""
    num_val_episodes: int | None = None
    """validation episodes (the -val.npz file); None = num_episodes // 10 (at least 1), as OGBench"""
    max_episode_steps: int = 1001
    """steps per episode (every episode has exactly this many rows)"""
    dataset_dir: str = DEFAULT_DATASET_DIR
    """directory of the .npz files (OGBench's default, where ogbench.make_env_and_datasets looks)"""
    seed: int = 0
    """base seed; each episode is seeded from (seed, split, episode index)"""
    num_workers: int = 1
    """episodes generated in parallel processes (the result does not depend on it)"""
    noise: float = 0.1
    """PlanOracle noise level (OGBench "play": 0.1)"""
    noise_smoothing: float = 0.5
    """std, in control steps, of the Gaussian filter that smooths the plan noise over time (OGBench "play": 0.5)"""
    overwrite: bool = False
    """replace existing dataset files (and ignore the episodes kept by an interrupted run)"""


def dataset_name_of(env_name: str) -> str:
    """cube-triple-play-singletask-task4-v0 -> cube-triple-play-v0 (the rule of ogbench.make_env_and_datasets)."""
    parts = env_name.split("-")
    if "singletask" in parts:
        parts = parts[: parts.index("singletask")] + parts[-1:]
    return "-".join(parts)


def dataset_paths(dataset_dir: str, dataset_name: str) -> dict:
    """The two file names ogbench.make_env_and_datasets loads (and downloads when either is missing)."""
    dataset_dir = os.path.expanduser(dataset_dir)
    return {
        "train": os.path.join(dataset_dir, f"{dataset_name}.npz"),
        "val": os.path.join(dataset_dir, f"{dataset_name}-val.npz"),
    }


def make_env_and_oracles(env_id: str, max_episode_steps: int, noise: float, noise_smoothing: float):
    """The data-collection environment and one PlanOracle per kind of sub-task it can set."""
    env = gym.make(
        env_id,
        terminate_at_goal=False,
        mode="data_collection",
        max_episode_steps=max_episode_steps,
        disable_env_checker=True,  # the checker builds the MuJoCo model an extra time, for nothing
    )
    plan_kwargs = dict(env=env, noise=noise, noise_smoothing=noise_smoothing)
    if env_id.startswith("cube"):
        oracles = {"cube": CubePlanOracle(**plan_kwargs)}
    elif env_id.startswith("scene"):
        oracles = {
            "cube": CubePlanOracle(**plan_kwargs),
            "button": ButtonPlanOracle(**plan_kwargs),
            "drawer": DrawerPlanOracle(**plan_kwargs),
            "window": WindowPlanOracle(**plan_kwargs),
        }
    else:  # puzzle: the arm presses buttons with the gripper closed
        oracles = {"button": ButtonPlanOracle(gripper_always_closed=True, **plan_kwargs)}
    return env, oracles


def draw_stack_probability(env_id: str) -> float:
    """Per-episode probability that a new cube target is on top of another cube (OGBench's values)."""
    if "single" in env_id:
        return 0.0
    if "double" in env_id:
        return np.random.uniform(0.0, 0.25)
    if "triple" in env_id:
        return np.random.uniform(0.05, 0.35)
    if "quadruple" in env_id:
        return np.random.uniform(0.1, 0.5)
    return 0.5  # scene (puzzle ignores it)


def scene_episode_is_healthy(qpos: np.ndarray) -> bool:
    """OGBench's check for scene: the cube never goes too far right, nor too far left unless it is in the drawer."""
    cube_xyz = qpos[:, 14:17]
    too_far_right = (cube_xyz[:, 1] >= 0.29).any()
    too_far_left = ((cube_xyz[:, 1] <= -0.3) & ((cube_xyz[:, 2] < 0.06) | (cube_xyz[:, 2] > 0.08))).any()
    return not (too_far_right or too_far_left)


def episode_seed(seed: int, split: str, index: int) -> int:
    """Independent seed of one episode, a function of (seed, split, index) only."""
    return int(np.random.SeedSequence([seed, SPLITS.index(split), index]).generate_state(1)[0])


def collect_episode(env, oracles: dict, env_id: str, seed: int) -> dict:
    """Run the noisy plan oracle for one full episode; returns its rows (see the header for keys and dtypes)."""
    # The oracles and p_stack draw from NumPy's global RNG, the environment from its own: seed both.
    np.random.seed(seed)
    env_seed = seed
    has_buttons = hasattr(env.unwrapped, "_cur_button_states")
    while True:  # only scene episodes can be redrawn
        ob, info = env.reset(seed=env_seed)
        env_seed = None  # a redrawn episode continues the RNG stream instead of repeating itself
        p_stack = draw_stack_probability(env_id)
        oracle = oracles[info["privileged/target_task"]]
        oracle.reset(ob, info)

        rows = {"observations": [], "actions": [], "terminals": [], "qpos": [], "qvel": []}
        if has_buttons:
            rows["button_states"] = []
        done = False
        while not done:
            action = np.clip(np.asarray(oracle.select_action(ob, info)), -1, 1)
            next_ob, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
            if oracle.done:
                target_ob, target_info = env.unwrapped.set_new_target(p_stack=p_stack)
                oracle = oracles[target_info["privileged/target_task"]]
                oracle.reset(target_ob, target_info)
            rows["observations"].append(ob)
            rows["actions"].append(action)
            rows["terminals"].append(done)
            rows["qpos"].append(info["prev_qpos"])  # state before the step, i.e. the state of `ob`
            rows["qvel"].append(info["prev_qvel"])
            if has_buttons:
                rows["button_states"].append(info["prev_button_states"])
            ob = next_ob

        episode = {key: np.asarray(value, dtype=np.float32) for key, value in rows.items()}
        episode["terminals"] = np.asarray(rows["terminals"], dtype=bool)
        if has_buttons:
            episode["button_states"] = np.asarray(rows["button_states"], dtype=np.int64)
        if not env_id.startswith("scene") or scene_episode_is_healthy(episode["qpos"]):
            return episode


# Worker processes build their environment once, then collect the episodes they are sent.
_worker = {}


def _init_worker(env_id: str, max_episode_steps: int, noise: float, noise_smoothing: float):
    _worker["env_id"] = env_id
    _worker["env"], _worker["oracles"] = make_env_and_oracles(env_id, max_episode_steps, noise, noise_smoothing)


def _init_pool_worker(*worker_args):
    # A terminal's Ctrl-C reaches every process of the group: the parent alone decides (it ends the workers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(*worker_args)


def _collect_job(job):
    split, index, seed = job
    return split, index, collect_episode(_worker["env"], _worker["oracles"], _worker["env_id"], seed)


class ProgressLine:
    """One line on stderr, rewritten in place: episodes done/total, rate, elapsed time and ETA."""

    def __init__(self, total: int, label: str):
        self.total, self.label = total, label
        self.start = time.time()
        self.last_print = 0.0
        self.update(0)

    def update(self, done: int):
        now = time.time()
        if done < self.total and now - self.last_print < 0.5:
            return
        self.last_print = now
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f"{format_duration((self.total - done) / rate)}" if rate > 0 else "?"
        sys.stderr.write(
            f"\r{self.label}: {done}/{self.total} episodes | {rate:.2f} ep/s | "
            f"elapsed {format_duration(elapsed)} | ETA {eta}   "
        )
        sys.stderr.flush()

    def close(self):
        sys.stderr.write("\n")
        sys.stderr.flush()


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


def save_npz(path: str, arrays: dict):
    """Write through a temporary file, so an interrupted run never leaves a file that ogbench would load."""
    tmp_path = f"{path}.tmp"
    with open(tmp_path, "wb") as file:
        np.savez_compressed(file, **arrays)  # compressed, like OGBench's published files
    os.replace(tmp_path, path)


def generate_dataset(
    env_name: str = "cube-triple-play-v0",
    num_episodes: int | None = None,
    num_val_episodes: int | None = None,
    max_episode_steps: int = 1001,
    dataset_dir: str = DEFAULT_DATASET_DIR,
    seed: int = 0,
    num_workers: int = 1,
    noise: float = 0.1,
    noise_smoothing: float = 0.5,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    """Write <dataset_dir>/<name>.npz and <name>-val.npz; returns {"train": path, "val": path}.

    Bad arguments raise SystemExit("error: ..."). num_workers > 1 starts processes with "spawn", which re-imports
    this file by its module name: from other code, call it with num_workers=1 (or run the script).
    """
    dataset_name, env_id, num_episodes, num_val_episodes = checked_recipe(
        env_name, num_episodes, num_val_episodes, max_episode_steps, num_workers
    )
    paths = dataset_paths(dataset_dir, dataset_name)
    existing = [path for path in paths.values() if os.path.exists(path)]
    if existing and not overwrite:
        raise SystemExit(f"error: {existing[0]} already exists (pass --overwrite to replace it)")
    os.makedirs(os.path.dirname(paths["train"]), exist_ok=True)

    counts = {"train": num_episodes, "val": num_val_episodes}
    recipe = np.array([num_episodes, num_val_episodes, max_episode_steps, seed, noise, noise_smoothing], np.float64)
    partial_path = os.path.join(os.path.dirname(paths["train"]), f"{dataset_name}.partial.npz")
    arrays = {"train": {}, "val": {}}  # filled in place: episode i of a split is rows [i*T, (i+1)*T)
    done = {split: np.zeros(counts[split], bool) for split in SPLITS}
    if os.path.exists(partial_path) and not overwrite:
        arrays, done = read_partial(partial_path, recipe)
        print(f"continuing from {partial_path}: {sum(map(np.sum, done.values()))} episodes already generated")
    jobs = [(split, i, episode_seed(seed, split, i)) for split in SPLITS for i in range(counts[split])]
    jobs = [(split, i, episode_seed_) for split, i, episode_seed_ in jobs if not done[split][i]]

    def store(split: str, index: int, episode: dict):
        rows = slice(index * max_episode_steps, (index + 1) * max_episode_steps)
        for key, value in episode.items():
            if key not in arrays[split]:
                shape = (counts[split] * max_episode_steps, *value.shape[1:])
                arrays[split][key] = np.zeros(shape, dtype=value.dtype)
            arrays[split][key][rows] = value
        done[split][index] = True

    progress = ProgressLine(len(jobs), dataset_name) if show_progress else None
    worker_args = (env_id, max_episode_steps, noise, noise_smoothing)
    signum = collect_episodes(jobs, worker_args, num_workers, store, progress)
    if signum is not None:
        generated = int(sum(map(np.sum, done.values())))
        if generated:
            save_npz(partial_path, {"recipe": recipe, **partial_arrays(arrays, done)})
            kept = f"kept {generated}/{sum(counts.values())} episodes in {partial_path}; the same command continues"
        else:
            kept = "no episode was finished, so nothing was kept"
        print(f"interrupted by {signal.Signals(signum).name}: {kept}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    for split in SPLITS:
        save_npz(paths[split], arrays[split])
    if os.path.exists(partial_path):
        os.remove(partial_path)
    return paths


def checked_recipe(env_name: str, num_episodes, num_val_episodes, max_episode_steps: int, num_workers: int):
    """The dataset's name, its environment and the two splits' episode counts (OGBench's where not given); a
    SystemExit("error: ...") for a bad argument."""
    dataset_name = dataset_name_of(env_name)
    if dataset_name not in PLAY_DATASETS:
        raise SystemExit(f"error: unknown dataset {env_name!r}; supported: {', '.join(PLAY_DATASETS)}")
    env_id, published_num_episodes = PLAY_DATASETS[dataset_name]
    if num_episodes is None:
        num_episodes = published_num_episodes
    if num_val_episodes is None:
        num_val_episodes = max(1, num_episodes // 10)
    if num_episodes < 1 or num_val_episodes < 1:
        raise SystemExit("error: --num-episodes and --num-val-episodes must be >= 1 (ogbench needs both files)")
    if max_episode_steps < 2:
        raise SystemExit("error: --max-episode-steps must be >= 2 (ogbench drops the last row of each episode)")
    if num_workers < 1:
        raise SystemExit("error: --num-workers must be >= 1")
    return dataset_name, env_id, num_episodes, num_val_episodes


def collect_episodes(jobs: list, worker_args: tuple, num_workers: int, store, progress) -> int | None:
    """Runs each job's episode, in this process or in num_workers spawned ones, and hands it to store(split, index,
    episode) as it comes. Returns the signal (SIGINT, SIGTERM) that stopped it early, or None."""
    stop = {"signal": None}

    def record_signal(signum, _frame):
        stop["signal"] = signum

    previous_handlers = {signum: signal.signal(signum, record_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    num_workers = max(1, min(num_workers, len(jobs)))
    pool = None
    try:
        if num_workers == 1:
            _init_worker(*worker_args)
            results = map(_collect_job, jobs)
        else:
            # spawn: fresh processes, safe whatever threads (MuJoCo, JAX ...) the parent runs
            pool = multiprocessing.get_context("spawn").Pool(num_workers, _init_pool_worker, worker_args)
            results = pool.imap_unordered(_collect_job, jobs)
        finished = 0
        while finished < len(jobs) and stop["signal"] is None:
            # In one process a signal stops the loop after the current episode; with workers it stops the wait at
            # once (a scheduler's SIGTERM may also have ended the workers, and their episodes with them).
            try:
                split, index, episode = next(results) if pool is None else results.next(timeout=0.5)
            except multiprocessing.TimeoutError:
                continue
            store(split, index, episode)
            finished += 1
            if progress:
                progress.update(finished)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if progress:
            progress.close()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    return stop["signal"]


def partial_arrays(arrays: dict, done: dict) -> dict:
    """The arrays of both splits and which episodes they hold, as flat npz keys (train/observations, ...)."""
    flat = {f"{split}/done": done[split] for split in SPLITS}
    flat.update({f"{split}/{key}": value for split in SPLITS for key, value in arrays[split].items()})
    return flat


def read_partial(path: str, recipe: np.ndarray) -> tuple[dict, dict]:
    """The episodes kept by an interrupted run, if it used the same settings (else a one-line error)."""
    try:
        with np.load(path) as data:
            if not np.array_equal(data["recipe"], recipe):
                raise SystemExit(
                    f"error: {path} holds episodes of other settings (episode counts, length, seed or noise): give "
                    "the same ones to continue, or --overwrite to start anew"
                )
            arrays, done = {split: {} for split in SPLITS}, {}
            for name in data.files:
                if name != "recipe":
                    split, key = name.split("/")
                    if key == "done":
                        done[split] = data[name]
                    else:
                        arrays[split][key] = data[name]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise SystemExit(f"error: cannot read {path} ({error}); delete it or pass --overwrite to start anew")
    return arrays, done


def main():
    args = tyro.cli(Args)
    start = time.time()
    paths = generate_dataset(**dataclasses.asdict(args))
    print(f"wrote {paths['train']} and {paths['val']} in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
