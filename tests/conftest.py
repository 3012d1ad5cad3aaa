"""Shared helpers: the scripts are single files, not a package, so tests load them by path."""

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FROM_SCRATCH = REPO / "from_scratch"
OFFLINE_TO_ONLINE = REPO / "offline_to_online"
TINY_DATASET = "cube-triple-play-v0"
# The scripts, declared once: the flow variants (both folders), and each folder's scripts with its baseline first.
FLOW_SCRIPTS = ["sac_flow_naive", "sac_flow_gru", "sac_flow_transformer"]
ALL_SCRIPTS = ["sac", *FLOW_SCRIPTS]
OFFLINE_SCRIPTS = ["qc_fql", *FLOW_SCRIPTS]


def load_script(name: str, folder: Path = FROM_SCRATCH):
    """Import from_scratch/<name>.py as a module (its main() does not run)."""
    spec = importlib.util.spec_from_file_location(f"{folder.name}_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The scripts the tests run compile at LLVM's lowest optimisation level (it halves compilation, most of a short run)
# into one persistent compilation cache for the session, so a program that an earlier run compiled loads at once.
COMPILATION_CACHE = tempfile.mkdtemp(prefix="sac-flow-tests-xla-cache-")


@pytest.fixture(scope="session", autouse=True)
def remove_compilation_cache():
    yield
    shutil.rmtree(COMPILATION_CACHE, ignore_errors=True)


def script_environment(env: dict | None = None) -> dict:
    """The environment of a script run by a test: CPU, the shared compilation cache, then `env`."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_backend_optimization_level=0",
        "JAX_COMPILATION_CACHE_DIR": COMPILATION_CACHE,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        **(env or {}),
    }


def run_script(script: Path, *flags: str, cwd: Path, env: dict | None = None, timeout: int = 600):
    """Run a script as a user would, in `cwd`; returns the CompletedProcess with text output."""
    return subprocess.run(
        [sys.executable, str(script), *flags],
        cwd=cwd,
        env=script_environment(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_and_signal(script: Path, flags: list[str], cwd, console_line: str, signum: int, env: dict | None = None):
    """Runs a script as run_script does and sends it `signum` once it has printed `console_line`; returns its exit
    status and stderr."""
    process = subprocess.Popen(
        [sys.executable, str(script), *flags],
        cwd=cwd,
        env=script_environment(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in process.stdout:
            if console_line in line:
                process.send_signal(signum)
                break
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    return process.returncode, stderr


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
