"""Writes a small Robomimic dataset in the official `low_dim_v15.hdf5` layout by recording episodes in the real
robosuite environment with robosuite alone (not with sac_flow_utils, whose loader the tests check against it):

    data.attrs["env_args"]  JSON {"env_name", "env_version", "type": 1, "env_kwargs"}, data.attrs["total"]
    data/demo_<i>/obs/<key>, next_obs/<key>   every robot0_* observation of robosuite and "object" (its object-state)
    data/demo_<i>/actions, rewards, dones, states; .attrs["num_samples"]

rewards are robosuite's sparse reward (1.0 where its _check_success() holds), dones are 1 at those steps and at each
demo's last step (robomimic's done_mode 2). Also runnable: python tests/robomimic_data.py DIR writes
DIR/lift/mh/low_dim_v15.hdf5."""

import json
import os
import sys

import numpy as np

LIFT_SUCCESS_HEIGHT = 0.10  # the cube is placed this far above the table top: Lift's success needs more than 0.04


def lift_env_args() -> dict:
    """env_args as a robosuite-1.5 robomimic dataset of Lift stores them (Panda, the BASIC composite OSC_POSE
    controller, 20 Hz, sparse reward)."""
    from robosuite.controllers import load_composite_controller_config

    controller = load_composite_controller_config(controller="BASIC", robot="Panda")
    env_kwargs = {
        "has_renderer": False,
        "has_offscreen_renderer": False,
        "ignore_done": True,
        "use_object_obs": True,
        "use_camera_obs": False,
        "camera_depths": False,
        "control_freq": 20,
        "controller_configs": controller,
        "robots": ["Panda"],
        "reward_shaping": False,
        "camera_names": ["agentview", "robot0_eye_in_hand"],
        "camera_heights": 84,
        "camera_widths": 84,
    }
    import robosuite

    return {"env_name": "Lift", "env_version": robosuite.__version__, "type": 1, "env_kwargs": env_kwargs}


def place_cube_above_table(env, height: float = LIFT_SUCCESS_HEIGHT):
    """Moves Lift's cube (its free joint) `height` above the table top, at rest."""
    joint = env.cube.joints[0]
    qpos = np.array(env.sim.data.get_joint_qpos(joint))
    qpos[2] = env.model.mujoco_arena.table_offset[2] + height
    env.sim.data.set_joint_qpos(joint, qpos)
    env.sim.data.set_joint_qvel(joint, np.zeros(6))
    env.sim.forward()


def observation_dict(raw: dict) -> dict:
    """robomimic's low-dimensional observation keys: each robot0_* one but proprio-state, and object-state as object."""
    keys = [key for key in raw if key.startswith("robot0_") and not key.endswith("proprio-state")]
    return {"object": np.array(raw["object-state"]), **{key: np.array(raw[key]) for key in keys}}


def record_demos(episode_lengths=(12, 9, 8), succeed_in_last_at: int | None = 4, seed: int = 0) -> tuple[dict, list]:
    """Runs episodes of smooth random actions in robosuite's Lift; in the last one the cube is placed above the table
    before step `succeed_in_last_at`, so that its rewards and dones hold successes. Returns env_args and, per
    episode, a dict of obs/next_obs (dicts of arrays), actions, rewards, dones and states."""
    import robosuite

    env_args = lift_env_args()
    env = robosuite.make(env_args["env_name"], **env_args["env_kwargs"])
    rng = np.random.default_rng(seed)
    np.random.seed(seed)  # robosuite's placement sampler draws from NumPy's global generator
    episodes = []
    for index, length in enumerate(episode_lengths):
        env.reset()
        env.sim.forward()
        raw = env._get_observations(force_update=True)
        obs, next_obs, actions, rewards, dones, states = [], [], [], [], [], []
        action = np.zeros(7)
        for step in range(length):
            if index == len(episode_lengths) - 1 and step == succeed_in_last_at:
                place_cube_above_table(env)
                raw = env._get_observations(force_update=True)
                next_obs[-1] = observation_dict(raw)  # the teleport happens between two recorded steps
            action = np.clip(0.7 * action + 0.3 * rng.uniform(-1, 1, 7), -1, 1)
            states.append(np.array(env.sim.get_state().flatten()))
            obs.append(observation_dict(raw))
            _, reward, _, _ = env.step(action)
            success = bool(env._check_success())
            # As robomimic's extraction (dataset_states_to_obs.py) makes the official files' observations: from the
            # simulator state after a forward pass (the ones step returns lag one physics substep behind it).
            env.sim.forward()
            raw = env._get_observations(force_update=True)
            next_obs.append(observation_dict(raw))
            actions.append(action)
            rewards.append(float(reward))
            dones.append(float(success or step == length - 1))
            assert reward == float(success)
        episodes.append({
            "obs": {key: np.stack([o[key] for o in obs]) for key in obs[0]},
            "next_obs": {key: np.stack([o[key] for o in next_obs]) for key in next_obs[0]},
            "actions": np.stack(actions), "rewards": np.array(rewards), "dones": np.array(dones),
            "states": np.stack(states),
        })  # fmt: skip
    env.close()
    return env_args, episodes


def write_dataset(path: str, env_args: dict, episodes: list, demo_names: list[str] | None = None):
    """The official layout; demo_names (default demo_0, demo_1, ...) name the episodes in order."""
    import h5py

    demo_names = demo_names or [f"demo_{i}" for i in range(len(episodes))]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for name, episode in zip(demo_names, episodes):
            group = data.create_group(name)
            for part in ("obs", "next_obs"):
                # Written in reverse alphabetical order: the loader must not rely on the file's key order.
                for key in sorted(episode[part], reverse=True):
                    group.create_dataset(f"{part}/{key}", data=episode[part][key])
            for key in ("actions", "rewards", "dones", "states"):
                group.create_dataset(key, data=episode[key])
            group.attrs["num_samples"] = len(episode["actions"])
        data.attrs["total"] = sum(len(episode["actions"]) for episode in episodes)
        data.attrs["env_args"] = json.dumps(env_args)


if __name__ == "__main__":
    directory = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.robomimic")
    env_args, episodes = record_demos(episode_lengths=(60, 60, 60, 60), succeed_in_last_at=30)
    target = os.path.join(directory, "lift", "mh", "low_dim_v15.hdf5")
    write_dataset(target, env_args, episodes)
    print(f"wrote {target}: {sum(len(e['actions']) for e in episodes)} transitions in {len(episodes)} demos")
