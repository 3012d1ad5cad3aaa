"""Shared helpers: the scripts are single files, not a package, so tests load them by path."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FROM_SCRATCH = REPO / "from_scratch"
OFFLINE_TO_ONLINE = REPO / "offline_to_online"
TINY_DATASET = "cube-triple-play-v0"
FLOW_SCRIPTS = ["sac_flow_naive", "sac_flow_gru", "sac_flow_transformer"]
ALL_SCRIPTS = ["sac", *FLOW_SCRIPTS]


def load_script(name: str, folder: Path = FROM_SCRATCH):
    """Import from_scratch/<name>.py as a module (its main() does not run)."""
    spec = importlib.util.spec_from_file_location(f"{folder.name}_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(script: Path, *flags: str, cwd: Path, env: dict | None = None, timeout: int = 600):
    """Run a script as a user would, in `cwd`; returns the CompletedProcess with text output."""
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run(
        [sys.executable, str(script), *flags],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory):
    """A tiny OGBench play dataset (2 episodes of 100 steps, 1 validation episode) made by the project's generator."""
    make_dataset = load_script("make_dataset", OFFLINE_TO_ONLINE)
    directory = str(tmp_path_factory.mktemp("ogbench_data"))
    make_dataset.generate_dataset(
        env_name=TINY_DATASET,
        num_episodes=2,
        num_val_episodes=1,
        max_episode_steps=100,
        dataset_dir=directory,
        show_progress=False,
    )
    return directory
