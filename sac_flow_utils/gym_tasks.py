"""Gymnasium tasks (from_scratch/): making the environment with one-line errors, its deterministic evaluation, and the
MuJoCo state that lets a resumed training episode go on exactly."""

import json

import gymnasium as gym
import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from gymnasium.envs.mujoco import MujocoEnv


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
