"""sweeps/*.yaml: each parses, names an existing program, covers the paper's grid, and every command line the wandb
agent would run for it is accepted by that program's own Args (tyro)."""

import functools
import itertools
import sys
from pathlib import Path

import gymnasium as gym
import pytest
import tyro
import yaml
from conftest import REPO, load_script
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from sac_flow_utils import ogbench_tasks

SWEEPS = REPO / "sweeps"
MUJOCO_TASKS = ["Hopper-v4", "Walker2d-v4", "HalfCheetah-v4", "Ant-v4", "Humanoid-v4", "HumanoidStandup-v4"]
OGBENCH_TASK = "cube-triple-play-singletask-task4-v0"  # the README's offline-to-online task
SEEDS = [1, 2, 3, 4, 5]
# sweep file -> (program, exp_name of its runs, horizon_length or None)
EXPECTED = {
    "from_scratch_sac.yaml": ("from_scratch/sac.py", "sac", None),
    "from_scratch_sac_flow_naive.yaml": ("from_scratch/sac_flow_naive.py", "sac_flow_naive", None),
    "from_scratch_sac_flow_gru.yaml": ("from_scratch/sac_flow_gru.py", "sac_flow_gru", None),
    "from_scratch_sac_flow_transformer.yaml": ("from_scratch/sac_flow_transformer.py", "sac_flow_transformer", None),
    "offline_to_online_sac_flow_naive.yaml": ("offline_to_online/sac_flow_naive.py", "sac_flow_naive", 5),
    "offline_to_online_sac_flow_gru.yaml": ("offline_to_online/sac_flow_gru.py", "sac_flow_gru", 5),
    "offline_to_online_sac_flow_transformer.yaml": (
        "offline_to_online/sac_flow_transformer.py",
        "sac_flow_transformer",
        5,
    ),
    "offline_to_online_qc_fql.yaml": ("offline_to_online/qc_fql.py", "qc_fql", 5),
    "offline_to_online_fql.yaml": ("offline_to_online/qc_fql.py", "fql", 1),
}


@functools.cache
def script_module(program: str):
    path = REPO / program
    module = load_script(path.stem, path.parent)
    sys.modules[module.__name__] = module  # tyro's error message reads Args' docstrings through the module's source
    return module


def grid_points(parameters: dict) -> list[dict]:
    """The runs of a grid sweep: the cartesian product of every parameter's `values` (a `value` is one choice)."""
    names = list(parameters)
    choices = []
    for name in names:
        spec = parameters[name]
        assert set(spec) in ({"value"}, {"values"}), f"{name}: a grid parameter needs exactly value or values"
        choices.append([spec["value"]] if "value" in spec else spec["values"])
    return [dict(zip(names, point)) for point in itertools.product(*choices)]


def agent_command(sweep: dict, point: dict) -> list[str]:
    """The argv `wandb agent` runs for one grid point: wandb's own rendering of the argument macros, then the macro
    substitution of wandb_agent.Agent._command_run (env -> /usr/bin/env, interpreter -> python, program)."""
    sweep_vars = create_sweep_command_args({"args": {name: {"value": value} for name, value in point.items()}})
    sweep_vars.update(env=["/usr/bin/env"], interpreter=["python"], program=[sweep["program"]])
    argv = []
    for chunk in map(str, sweep["command"]):
        if chunk.startswith("${") and chunk.endswith("}"):
            argv += sweep_vars.get(chunk[2:-1]) or []
        else:
            argv.append(chunk)
    return argv


def parse_with_script(program: str, flags: list[str]):
    try:
        return tyro.cli(script_module(program).Args, args=flags)
    except SystemExit:
        pytest.fail(f"{program} rejects the sweep's command line: {' '.join(flags)}")


def load_sweep(name: str) -> dict:
    with open(SWEEPS / name) as f:
        return yaml.safe_load(f)


def test_one_sweep_per_algorithm():
    assert sorted(path.name for path in SWEEPS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sweep_commands_parse_with_the_scripts_args(name):
    program, exp_name, horizon_length = EXPECTED[name]
    sweep = load_sweep(name)
    assert sweep["program"] == program and (REPO / program).is_file()
    assert sweep["method"] == "grid"
    assert sweep["command"] == ["${env}", "${interpreter}", "${program}", "${args_no_boolean_flags}"]

    points = grid_points(sweep["parameters"])
    from_scratch = program.startswith("from_scratch/")
    envs = MUJOCO_TASKS if from_scratch else [OGBENCH_TASK]
    assert len(points) == len(envs) * len(SEEDS)
    env_field = "env_id" if from_scratch else "env_name"
    commands = set()
    for point in points:
        argv = agent_command(sweep, point)
        assert argv[:3] == ["/usr/bin/env", "python", program]
        assert "--track" in argv  # a bare flag: tyro booleans take no value
        commands.add(tuple(argv))
        args = parse_with_script(program, argv[3:])
        for field, value in point.items():
            assert getattr(args, field) == value, f"{name}: {field} parsed as {getattr(args, field)!r}, not {value!r}"
        assert args.track and args.exp_name == exp_name
        if horizon_length is not None:
            assert args.horizon_length == horizon_length and args.alpha == 100.0 and not args.sparse
    assert len(commands) == len(points)
    parsed = {(point[env_field], point["seed"]) for point in points}
    assert parsed == set(itertools.product(envs, SEEDS))


def test_sweep_environments_exist():
    for env_id in MUJOCO_TASKS:
        assert env_id in gym.envs.registry, env_id
    import ogbench  # noqa: F401  (registers the OGBench environments, as the offline scripts do when they run)

    assert ogbench_tasks.split_ogbench_name(OGBENCH_TASK)[0] in gym.envs.registry


def test_sweeps_set_no_device():
    """GPUs are chosen by the user (CUDA_VISIBLE_DEVICES in the agent's shell), never in the sweep files."""
    for path in SWEEPS.glob("*.yaml"):
        assert "CUDA_VISIBLE_DEVICES" not in Path(path).read_text(), path.name
