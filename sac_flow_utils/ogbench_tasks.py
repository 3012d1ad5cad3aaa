"""OGBench tasks (offline_to_online/): the single-task names, the environments, the dataset with one-line errors for a
missing or damaged file, the evaluation of action chunks, and the environment state that lets a resumed online
episode go on exactly."""

import io
import os
import pickle
import warnings
import zipfile
import zlib

import gymnasium as gym
import jax
import mujoco
import numpy as np

from sac_flow_utils import gym_tasks


def split_ogbench_name(name: str) -> tuple[str, str]:
    """'cube-triple-play-singletask-task4-v0' -> env id 'cube-triple-singletask-task4-v0', dataset 'cube-triple-play-v0'
    (the same rule as ogbench.make_env_and_datasets)."""
    parts = name.split("-")
    if "singletask" not in parts:
        raise SystemExit(
            f"error: --env-name {name} is not an OGBench single-task name (<env>-<type>-singletask-...-v0) nor a "
            "Robomimic one (<task>-<mh|ph>-low_dim)"
        )
    pos = parts.index("singletask")
    return "-".join(parts[: pos - 1] + parts[pos:]), "-".join(parts[:pos] + parts[-1:])


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
        "elapsed_steps": gym_tasks.find_wrapper(env, gym.wrappers.TimeLimit)._elapsed_steps,
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
    gym_tasks.find_wrapper(env, gym.wrappers.TimeLimit)._elapsed_steps = saved["elapsed_steps"]
    episode_return, episode_length = state["episode"]
    return (
        np.asarray(state["observation"]),
        list(np.asarray(state["queue"])),
        float(episode_return),
        int(episode_length),
    )


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
