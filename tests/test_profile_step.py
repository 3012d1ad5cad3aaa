"""bench/profile_step.py: an operation's time leaves out the operations nested in it, a matmul's FLOPs and shapes
come from the compiled module, and the command profiles a script's train step from the shell."""

import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest
from conftest import REPO, load_script, script_environment


def load_profile_step(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")  # the module adds its flag to XLA_FLAGS: restored after the test
    return load_script("profile_step", REPO / "bench")


def test_self_time_leaves_out_the_operations_nested_in_a_loop(monkeypatch):
    profile_step = load_profile_step(monkeypatch)
    event = lambda name, start, duration: types.SimpleNamespace(name=name, start_ns=start, duration_ns=duration)
    events = [event("c", 120, 10), event("while.1", 0, 100), event("b", 40, 20), event("a", 10, 20)]
    assert profile_step.self_times(events) == {"while.1": 60, "a": 20, "b": 20, "c": 10}


def test_matmul_flops_and_shapes_are_read_from_the_compiled_module(monkeypatch):
    profile_step = load_profile_step(monkeypatch)
    ensemble, rows, inputs, hidden, outputs = 2, 32, 5, 16, 3
    x = jnp.ones((ensemble, rows, inputs))
    w1, w2 = jnp.ones((ensemble, inputs, hidden)), jnp.ones((ensemble, hidden, outputs))
    network = jax.vmap(lambda x, w1, w2: jax.nn.relu(x @ w1) @ w2)
    hlo = jax.jit(network).lower(x, w1, w2).compile().as_text()
    instructions, computations = profile_step.parse_hlo(hlo)
    entry = re.search(r"^ENTRY %([\w.\-]+)", hlo, re.MULTILINE).group(1)
    found = [profile_step.matmul_of(name, instructions, computations) for name in computations[entry]]
    found = [matmul for matmul in found if matmul is not None]
    assert sum(flops for _, flops in found) == 2 * ensemble * rows * hidden * (inputs + outputs)
    shapes = " ".join(description for description, _ in found)
    assert f"-> f32[{ensemble},{rows},{hidden}]" in shapes and f"-> f32[{ensemble},{rows},{outputs}]" in shapes


@pytest.mark.long
def test_profile_of_a_small_train_step_from_the_shell():
    flags = ["sac", "--critic-hidden", "16", "--batch-size", "16", "--cycles", "1", "--top", "2"]
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "profile_step.py"), *flags],
        env=script_environment(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "sac, critic 16, batch 16, 3 calls profiled"
    at_once = re.search(r"XLA operations ([\d.]+) ms/call .*: ([\d.]+) at once on average", lines[1])
    assert at_once and float(at_once.group(1)) > 0 and float(at_once.group(2)) > 0
    matmul_rows = lines[lines.index(" ms/call  per call  µs each  GFLOP/s  shapes") + 1 :]
    assert len(matmul_rows) == 2 and all(" x " in row and " -> " in row for row in matmul_rows)
