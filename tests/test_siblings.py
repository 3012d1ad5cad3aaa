"""The scripts repeat each other by design (each one is self-contained, as cleanrl's): this keeps the repetition in
step. Every top-level definition (function, class, constant) that two scripts of a folder share by name must have the
same source text in both, and so must a flow variant's two scripts (from_scratch/ and offline_to_online/), except the
few that are declared here as meant to differ."""

import ast
import functools
import itertools

import pytest
from conftest import FLOW_SCRIPTS, REPO

# What the flow scripts of a folder may write differently: the velocity network and what sizes it.
FLOW_DIFFERENCES = {
    "from_scratch": {"Args", "VelocityNet", "make_agent", "check_args"},
    "offline_to_online": {"Args", "VelocityNet", "make_agent", "check_args"},
}
# The baseline of each folder (Gaussian SAC, QC-FQL) shares the plumbing, not the policy or its updates.
BASELINES = {
    "from_scratch": (
        "sac",
        {"Args", "check_args", "main", "make_agent", "create_state", "jit_train_functions", "evaluation_action"}
        | {"sample_actions", "update_critic", "update_actor_and_alpha", "train_step"}  # a Gaussian policy's
        | {"squash"}  # a Gaussian's squash also returns the pre-tanh mean
        | {"make_optimizers"},  # Gaussian SAC keeps Adam for log α (cleanrl's); the flows' default is docs/entropy.md
    ),
    "offline_to_online": (
        "qc_fql",
        {"Args", "AgentState", "main", "make_agent", "offline_updates", "online_collect", "online_step"}
        | {"sample_chunks", "is_finite", "parameter_groups"},  # QC-FQL has no α and two policies
    ),
}


# What a flow variant writes differently in its two folders: the run (a gymnasium task and its replay buffer, or
# OGBench chunks after an offline phase) and the policy's wrapping (BatchRenorm of the state and the task's action
# bounds from scratch, LayerNorm and [-1, 1] offline, with the flow-matching velocity for BC). The velocity networks,
# the time embedding and the maths of the density and of α are one text.
ACROSS_FOLDERS = {"Args", "check_args", "main", "SCRIPT", "make_agent", "SACFlow", "AgentState", "FlowPolicy"}
ACROSS_FOLDERS |= {"rollout", "squash", "max_path_entropy", "add_transition"}


@functools.cache
def top_level_definitions(path) -> dict[str, str]:
    """name -> source text (decorators included) of each top-level def, class and assignment of a script."""
    source = path.read_text()
    lines = source.splitlines()
    definitions = {}
    for node in ast.parse(source).body:
        first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        text = "\n".join(lines[first - 1 : node.end_lineno])
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            definitions[node.name] = text
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    definitions[target.id] = text
    return definitions


def sibling_pairs():
    for folder, differences in FLOW_DIFFERENCES.items():
        for a, b in itertools.combinations(FLOW_SCRIPTS, 2):
            yield folder, a, b, differences
        baseline, baseline_differences = BASELINES[folder]
        for flow in FLOW_SCRIPTS:
            yield folder, baseline, flow, differences | baseline_differences


def differing_definitions(folder: str, a: str, b: str, meant_to_differ: set) -> list[str]:
    defs_a = top_level_definitions(REPO / folder / f"{a}.py")
    defs_b = top_level_definitions(REPO / folder / f"{b}.py")
    shared = (defs_a.keys() & defs_b.keys()) - meant_to_differ
    return sorted(name for name in shared if defs_a[name] != defs_b[name])


@pytest.mark.parametrize(
    "folder, a, b, meant_to_differ", list(sibling_pairs()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_shared_definitions_are_the_same_text(folder, a, b, meant_to_differ):
    differing = differing_definitions(folder, a, b, meant_to_differ)
    assert not differing, (
        f"{folder}/{a}.py and {folder}/{b}.py define {', '.join(differing)} differently: make the same edit in "
        f"every script of {folder}/ that has it (or, if it is meant to differ, declare it in {__name__})"
    )


@pytest.mark.parametrize("folder", list(FLOW_DIFFERENCES))
def test_every_declared_difference_still_differs(folder):
    """A definition declared as meant to differ that no longer does should leave the list (so the list stays short)."""
    baseline, baseline_differences = BASELINES[folder]
    scripts = [baseline, *FLOW_SCRIPTS]
    definitions = {script: top_level_definitions(REPO / folder / f"{script}.py") for script in scripts}
    for name in FLOW_DIFFERENCES[folder] | baseline_differences:
        texts = {definitions[script][name] for script in scripts if name in definitions[script]}
        assert len(texts) > 1, f"{name} is the same in every script of {folder}/ that has it: remove it from the list"


@pytest.mark.parametrize("script", FLOW_SCRIPTS)
def test_a_flow_variant_is_the_same_text_in_both_folders(script):
    from_scratch = top_level_definitions(REPO / "from_scratch" / f"{script}.py")
    offline = top_level_definitions(REPO / "offline_to_online" / f"{script}.py")
    shared = (from_scratch.keys() & offline.keys()) - ACROSS_FOLDERS
    differing = sorted(name for name in shared if from_scratch[name] != offline[name])
    assert {"VelocityNet", "TimeEmbedding", "gaussian_log_density"} <= shared
    assert not differing, (
        f"from_scratch/{script}.py and offline_to_online/{script}.py define {', '.join(differing)} differently: make "
        f"the same edit in both (or, if it is meant to differ, declare it in {__name__}.ACROSS_FOLDERS)"
    )


def test_every_difference_declared_across_folders_still_differs():
    for name in ACROSS_FOLDERS:
        texts = set()
        for script in FLOW_SCRIPTS:
            for folder in ("from_scratch", "offline_to_online"):
                texts.add(top_level_definitions(REPO / folder / f"{script}.py").get(name))
        assert len(texts - {None}) > 1, f"{name} is the same in both folders: remove it from ACROSS_FOLDERS"
