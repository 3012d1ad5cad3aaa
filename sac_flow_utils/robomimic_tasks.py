"""Robomimic tasks (offline_to_online/): QC's names (`square-mh-low_dim`), the official `low_dim_v15.hdf5` datasets
read with h5py, and the robosuite environment built from the dataset's own `env_args`, without robomimic or torch.

QC's conventions (github ColinQiyangLi/qc, envs/robomimic_utils.py and main.py), which this module follows:
- names `<task>-<mh|ph>-low_dim`; the file `~/.robomimic/<task>/<type>/low_dim_v15.hdf5`;
- observation: `robot0_eef_pos` (3), `robot0_eef_quat` (4), `robot0_gripper_qpos` (2), `object` (robosuite's
  `object-state`), concatenated in that order;
- the episode ends (terminated) on success, else it is truncated after 300 steps (lift, can) or 400 (square);
- reward: the sparse success reward (1 on success, 0 otherwise) shifted by -1 for training, offline and online
  (0 on success, -1 otherwise); `terminals` = the file's `dones`, `masks` = 1 - `dones`.
The environment: robosuite.make(env_args["env_name"], **env_args["env_kwargs"]) with the settings robomimic's
EnvRobosuite forces (no renderer, object observations, no cameras, ignore_done); success is the environment's own
`_check_success()`, as robomimic's is_success. docs/robomimic.md has the details."""

import json
import logging
import os

import gymnasium as gym
import numpy as np

# QC's episode lengths (envs/robomimic_utils.py, _get_max_episode_length) for the tasks this project runs.
EPISODE_STEPS = {"lift": 300, "can": 300, "square": 400}
# robosuite's environment of each task, as the datasets' env_args name it
ROBOSUITE_ENVS = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare"}
DATASET_TYPES = ("mh", "ph")
OBSERVATION_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")
FILE_NAME = "low_dim_v15.hdf5"
REWARD_OFFSET = -1.0  # QC: training rewards are success - 1, offline and online
INSTALL = "pip install -r requirements-robomimic.txt (setup.md, 'Robomimic')"


def is_robomimic_name(name: str) -> bool:
    """QC's test: a name with `low_dim` in it is a Robomimic one (`<task>-<type>-low_dim`)."""
    return "low_dim" in name


def split_robomimic_name(name: str) -> tuple[str, str]:
    """'square-mh-low_dim' -> ('square', 'mh'); one line for any other name."""
    parts = name.split("-")
    known = ", ".join(f"{task}-{kind}-low_dim" for task in EPISODE_STEPS for kind in DATASET_TYPES)
    if len(parts) != 3 or parts[0] not in EPISODE_STEPS or parts[1] not in DATASET_TYPES or parts[2] != "low_dim":
        raise SystemExit(f"error: unknown Robomimic task --env-name {name}; known: {known}")
    return parts[0], parts[1]


def dataset_path_of(name: str, dataset_dir: str | None) -> str:
    """The file QC reads, <dir>/<task>/<type>/low_dim_v15.hdf5 (dir: ~/.robomimic, as robomimic's download_dir), or
    <dir>/low_dim_v15.hdf5 when --dataset-dir names the folder that holds the file itself."""
    task, kind = split_robomimic_name(name)
    root = os.path.expanduser(dataset_dir if dataset_dir is not None else "~/.robomimic")
    direct = os.path.join(root, FILE_NAME)
    if dataset_dir is not None and os.path.isfile(direct):
        return direct
    return os.path.join(root, task, kind, FILE_NAME)


def download_command(path: str, name: str) -> str:
    """How to obtain the file at `path`: robomimic's download script (it writes <download_dir>/<task>/<type>/) or the
    file on Hugging Face."""
    task, kind = split_robomimic_name(name)
    layout = os.path.join(task, kind, FILE_NAME)
    if path.endswith(os.sep + layout):
        folder, move = path[: -len(layout) - 1], ""
    else:  # --dataset-dir named the file's own folder
        folder, move = os.path.dirname(path), f", then move its {layout} there"
    return (
        f"download it with robomimic's script (python robomimic/scripts/download_datasets.py --tasks {task} "
        f"--dataset_types {kind} --hdf5_types low_dim --download_dir {folder}{move}) or from the Hugging Face dataset "
        f"robomimic/robomimic_datasets, file v1.5/{layout}; setup.md, 'Robomimic'"
    )


def errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def import_optional():
    """h5py and robosuite, or one line saying how to install them. robosuite logs warnings at import and at every
    make about optional parts these tasks never use (a private macro file, more robot models, mink's whole-body IK,
    controller parts a one-arm robot lacks): only its errors reach the console."""
    logging.getLogger("robosuite_logs").addFilter(errors_only)
    try:
        import h5py
        import robosuite
    except ImportError as error:
        raise SystemExit(f"error: Robomimic tasks need {error.name}, not installed; {INSTALL}")
    return h5py, robosuite


def read_env_args(path: str, name: str) -> dict:
    """The dataset's `data.attrs["env_args"]` (JSON: env_name, type, env_kwargs); one line for a missing, unreadable
    or foreign file."""
    get_it = download_command(path, name)
    if not os.path.isfile(path):
        raise SystemExit(f"error: Robomimic dataset file {path} not found; {get_it}")
    h5py, _ = import_optional()
    try:
        with h5py.File(path, "r") as f:
            if "data" not in f or "env_args" not in f["data"].attrs:
                raise SystemExit(f"error: {path} is not a robomimic dataset (no data group with env_args); {get_it}")
            env_args = json.loads(f["data"].attrs["env_args"])
    except OSError as error:
        raise SystemExit(f"error: {path} is not a readable HDF5 file ({str(error).splitlines()[0]}); {get_it}")
    except (json.JSONDecodeError, TypeError):
        raise SystemExit(f"error: {path} has env_args that are not JSON; {get_it}")
    if env_args.get("type") != 1 or "env_name" not in env_args or not isinstance(env_args.get("env_kwargs"), dict):
        raise SystemExit(f"error: {path} is not a robosuite dataset (env_args type {env_args.get('type')}); {get_it}")
    task, _ = split_robomimic_name(name)
    if env_args["env_name"] != ROBOSUITE_ENVS[task]:
        raise SystemExit(
            f"error: {path} is a dataset of robosuite's {env_args['env_name']}, not of {task} "
            f"({ROBOSUITE_ENVS[task]}); {get_it}"
        )
    return env_args


class RobomimicEnv(gym.Env):
    """A robosuite environment as robomimic's EnvRobosuite builds it from a dataset's env_args, with QC's
    low-dimensional observation and success convention: terminated on success (info['success'] = the environment's own
    _check_success()), reward 1.0 on success and 0.0 otherwise. Truncation is the TimeLimit wrapper's.
    Its random object placements (robosuite draws them from NumPy's global generator) come from a generator of its own,
    seeded by reset(seed=...), so that the scripts' other NumPy draws and this environment do not disturb each other."""

    metadata = {"render_modes": []}

    def __init__(self, env_args: dict):
        _, robosuite = import_optional()
        kwargs = {key: value for key, value in env_args["env_kwargs"].items() if key != "env_lang"}
        # What robomimic's EnvRobosuite sets, whatever the file says: the scripts never render.
        kwargs.update(
            has_renderer=False,
            has_offscreen_renderer=False,
            ignore_done=True,
            use_object_obs=True,
            use_camera_obs=False,
            camera_depths=False,
        )
        self.env = robosuite.make(env_args["env_name"], **kwargs)
        low, high = self.env.action_spec
        if not (np.all(low == -1) and np.all(high == 1)):
            raise SystemExit(f"error: {env_args['env_name']} has action bounds other than [-1, 1] (its controller)")
        self.action_space = gym.spaces.Box(-1.0, 1.0, low.shape, np.float32)
        self._rng = np.random.RandomState()
        observation = self.observation(self._reset_robosuite())
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, observation.shape, np.float32)

    @staticmethod
    def observation(raw: dict) -> np.ndarray:
        """QC's low-dimensional keys in their order; robomimic calls robosuite's `object-state` `object`."""
        raw = {**raw, "object": raw["object-state"]}
        return np.concatenate([np.asarray(raw[key], np.float32) for key in OBSERVATION_KEYS])

    def _reset_robosuite(self) -> dict:
        outside = np.random.get_state()
        np.random.set_state(self._rng.get_state())
        try:
            raw = self.env.reset()
        finally:
            self._rng.set_state(np.random.get_state())
            np.random.set_state(outside)
        return raw

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.RandomState(seed)
        return self.observation(self._reset_robosuite()), {}

    def step(self, action):
        raw, _, _, info = self.env.step(np.asarray(action, np.float64))
        success = bool(self.env._check_success())
        return self.observation(raw), float(success), success, False, {**info, "success": success}

    def close(self):
        self.env.close()


def make_robomimic_envs(env_name: str, dataset_dir: str | None, max_episode_steps: int | None):
    """The environment of a Robomimic name built from its dataset's env_args, a second one for evaluation, and the
    dataset's path; one line for an unknown name, a missing or foreign file, or a missing install."""
    task, _ = split_robomimic_name(env_name)
    path = dataset_path_of(env_name, dataset_dir)
    env_args = read_env_args(path, env_name)
    os.environ.setdefault("MUJOCO_GL", "disable")  # the scripts never render (as ogbench_tasks)
    steps = max_episode_steps if max_episode_steps is not None else EPISODE_STEPS[task]
    try:
        env, eval_env = (gym.wrappers.TimeLimit(RobomimicEnv(env_args), steps) for _ in range(2))
    except SystemExit:
        raise
    except Exception as error:  # noqa: BLE001  (robosuite fails in many ways on kwargs it does not know)
        line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SystemExit(f"error: cannot build robosuite's {env_args['env_name']} from the env_args of {path}: {line}")
    return env, eval_env, path


def load_robomimic_dataset(env: gym.Env, path: str, env_name: str, min_size: int) -> dict:
    """The transitions of every demo in demo order (data/demo_<i>, sorted by i), as QC's get_dataset: observations and
    next_observations from obs/ and next_obs/ (QC's keys, in order), actions, rewards shifted by REWARD_OFFSET,
    terminals = dones, masks = 1 - dones; a demo's last transition is also terminal (so that chunks never join two
    demos, whatever its dones says). One line for a file of another layout or one that does not fit the env."""
    h5py, _ = import_optional()
    get_it = download_command(path, env_name)
    columns = {name: [] for name in ("observations", "next_observations", "actions", "rewards", "dones")}
    try:
        with h5py.File(path, "r") as f:
            demos = [name for name in f["data"].keys() if name.startswith("demo_")]
            if not demos:
                raise SystemExit(f"error: {path} has no data/demo_* groups, not a robomimic dataset; {get_it}")
            for demo in sorted(demos, key=lambda name: int(name[len("demo_") :])):
                group = f["data"][demo]
                needed = [f"{part}/{key}" for part in ("obs", "next_obs") for key in OBSERVATION_KEYS]
                needed += ["actions", "rewards", "dones"]
                missing = [item for item in needed if item not in group]
                if missing:
                    raise SystemExit(
                        f"error: {path} lacks data/{demo}/{missing[0]}, not a low-dimensional robomimic dataset "
                        f"(low_dim_v15.hdf5); {get_it}"
                    )
                for part, column in (("obs", "observations"), ("next_obs", "next_observations")):
                    parts = [np.asarray(group[part][key], np.float32) for key in OBSERVATION_KEYS]
                    if any(p.ndim != 2 or len(p) != len(parts[0]) for p in parts):
                        raise SystemExit(f"error: {path} has data/{demo}/{part} arrays of different lengths; {get_it}")
                    columns[column].append(np.concatenate(parts, axis=1))
                columns["actions"].append(np.asarray(group["actions"], np.float32))
                columns["rewards"].append(np.asarray(group["rewards"], np.float32).reshape(-1))
                dones = np.asarray(group["dones"], np.float32).reshape(-1)
                columns["dones"].append(dones)
                lengths = {len(values[-1]) for values in columns.values()}
                if len(lengths) != 1:
                    raise SystemExit(f"error: {path} has data/{demo} arrays of different lengths; {get_it}")
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(f"error: {path} cannot be read as a robomimic dataset ({error}); {get_it}")
    ends = np.concatenate([np.arange(len(d)) == len(d) - 1 for d in columns["dones"]])
    dataset = {name: np.concatenate(values) for name, values in columns.items()}
    dones = dataset.pop("dones")
    dataset["rewards"] = dataset["rewards"] + REWARD_OFFSET
    dataset["terminals"] = np.maximum(dones, ends).astype(np.float32)
    dataset["masks"] = 1.0 - dones
    expected = {"observations": env.observation_space.shape, "actions": env.action_space.shape}
    for key, shape in expected.items():
        if dataset[key].shape[1:] != shape:
            raise SystemExit(
                f"error: {path} has {key} of shape {dataset[key].shape}, but {env_name} needs (N, {shape[0]}); {get_it}"
            )
    if len(dataset["observations"]) < min_size:
        raise SystemExit(
            f"error: dataset {path} has {len(dataset['observations'])} transitions, fewer than the batch size or the "
            f"chunk length ({min_size})"
        )
    return dataset
