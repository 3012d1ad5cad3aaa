"""Checkpoints and --resume: writing runs/<run_name>/checkpoint.flax safely, reading a run back with one-line errors,
restoring a saved state into the structure a script builds, the offline-to-online scripts' phases, --save-model."""

import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np


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
