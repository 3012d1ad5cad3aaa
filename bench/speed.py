"""Speed of every from-scratch script's train step, side by side, against the released code's structure.

For each script it imports the script itself (its networks, losses and train step; nothing is copied) and
measures on synthetic Hopper-v4-shaped data (obs 11, action 3) with the script's defaults (K 4, CrossQ critic, a
1M-slot buffer holding 100k transitions) in two configurations, one table row each:

- the given sizes: --critic-hidden W and --batch-size B, the script's own (critic 1024, batch 512) where not given;
- the small one, critic 256 and batch 256, the sizes people use on a CPU; measured once if the given sizes are
  these, and left out with --no-small-config.

Every figure below belongs to one script and one configuration; the --json results hold them as
configs[label]["scripts"][script], label as critic1024_batch512 (configs[label] also holds the sizes).

- updates_per_s: the script's own jitted call per environment step (store + critic + every `policy_delay`
  actor/α + next action), the action fetched to the host each time as the training loop does;
- reference_updates_per_s: the same networks and losses run in the released code's structure: a NumPy
  replay buffer on the host storing observations and next observations, a host-to-device copy of each batch,
  and separately jitted critic update, target-critic average, actor+α update and action selection;
- speedup: their ratio, measured in this one process in alternating rounds of whole actor cycles (policy_delay
  calls each, one with the actor update), after a warm-up that leaves each at the start of a cycle (6 rounds
  with --quick, 10 otherwise, or --rounds N);
- with --baseline REF (a git revision: main, HEAD~3, a commit): baseline_updates_per_s, the train step of that
  revision's scripts (git show REF:from_scratch/<name>.py, imported as modules of their own) at the same sizes,
  measured in the same alternating rounds; vs_baseline = updates_per_s / baseline_updates_per_s;
- flops_per_update: XLA's cost analysis of the compiled call, with the actor branch counted once every
  `policy_delay` calls (XLA counts both branches of the lax.cond);
- matmul_gflops: the machine's dense float32 matmul rate, measured here (once, at 1024 × 1024 × 1024);
  roofline_fraction = flops_per_update × updates_per_s / matmul rate;
- compile_s: the first call (compilation included);
- outside --quick: sps_hopper, end-to-end environment steps per second on Hopper-v4 over 1000 steps after
  learning_starts (the training rate on the script's own console, measured from after its first train step), and
  buffer_peak_rss_gib, the peak resident memory that a 1M-slot Humanoid-v4 buffer adds to a short run with a
  few updates, next to separate_storage_gib, what observations and next observations stored separately would
  take (buffer_memory_ratio = their ratio). Together about 5 minutes per script on 2 idle cores at the default
  sizes, less in the small configuration. With --baseline, baseline_sps_hopper is the same run of that revision's
  script;
- outside --quick, or with --random-phase: each script's random-action phase on Humanoid-v4 (20k steps, learning
  never starts), random_phase_sps from its console, env_sps the environment's own rate with random actions
  measured in this process over as many steps, and random_phase_fraction = their ratio (results["random_phase"]).

- num_seeds (outside --quick, or with --num-seeds 1 3 5): total updates/s (seeds × calls/s) of the train step
  of N seeds in one call (--num-seeds N of the scripts); vs_one_seed, its ratio to the single-seed rate (the
  throughput gained by packing N seeds into one process), and vs_n_single_seeds, its ratio to N × the
  single-seed rate (1.0: N seeds cost no more than one).

The process first calls the scripts' reuse_freed_memory(), as their main() does (glibc keeps the memory that XLA
frees for the next call instead of page-faulting it in again); --default-malloc leaves it out, to show its effect.

    python bench/speed.py --quick --json speed.json
    python bench/speed.py --quick --baseline main --scripts sac_flow_gru --no-small-config
    python bench/speed.py --quick --scripts sac_flow_gru --num-seeds 1 3 5
"""

import argparse
import dataclasses
import functools
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

from sac_flow_utils import runs

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["sac", "sac_flow_naive", "sac_flow_gru", "sac_flow_transformer"]
OBS_DIM, ACTION_DIM = 11, 3  # Hopper-v4
FILLED = 100_000
RANDOM_PHASE_ENV = "Humanoid-v4"  # 376-number observations: where a per-step buffer write cost the most
SMALL_CONFIG = {"critic_hidden": 256, "batch_size": 256}  # the sizes people use on a CPU


def load_script(name: str, folder: Path = REPO / "from_scratch", module_name: str | None = None):
    """Imports <folder>/<name>.py as a module named `module_name` (default: `name`); its main() does not run."""
    spec = importlib.util.spec_from_file_location(module_name or name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def git(*command: str, failure: str) -> bytes:
    """The output of a git command in this repository; if it fails, `failure` with git's own message as the error."""
    result = subprocess.run(["git", "-C", str(REPO), *command], capture_output=True, check=False)
    if result.returncode != 0:
        reason = (result.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        raise SystemExit(f"error: {failure} ({reason})")
    return result.stdout


def load_baseline(ref: str, names: list[str], directory: Path) -> tuple[str, dict]:
    """The commit of git revision `ref` and its from-scratch scripts `names`, imported as modules of their own
    (baseline_<name>) next to the working tree's. Each file keeps its name in `directory`, as the scripts name
    their runs after their file."""
    revision = ("rev-parse", "--verify", "--end-of-options", f"{ref}^{{commit}}")
    commit = git(*revision, failure=f"--baseline {ref} is not a commit").decode().strip()
    listed = git("ls-tree", "--name-only", commit, "from_scratch/", failure=f"--baseline {ref} has no from_scratch/")
    if b"from_scratch/run_utils.py" in listed.split():
        # Revisions before sac_flow_utils/ kept the run plumbing next to the scripts, which import it from their folder.
        plumbing = git("show", f"{commit}:from_scratch/run_utils.py", failure=f"--baseline {ref}: run_utils.py")
        (directory / "run_utils.py").write_bytes(plumbing)
        sys.path.insert(0, str(directory))
        sys.modules.pop("run_utils", None)  # this revision's, not one imported before
    modules = {}
    for name in names:
        path = f"from_scratch/{name}.py"
        (directory / f"{name}.py").write_bytes(
            git("show", f"{commit}:{path}", failure=f"--baseline {ref} has no {path}")
        )
        modules[name] = load_script(name, directory, f"baseline_{name}")
    return commit, modules


def configurations(options: argparse.Namespace, defaults) -> dict[str, dict]:
    """label -> the Args sizes of each configuration to measure: the given ones (`defaults`, a script's Args, for
    those not given), then the small ones unless left out. Keyed by label, the same sizes twice are measured once."""
    given = {
        "critic_hidden": defaults.critic_hidden if options.critic_hidden is None else options.critic_hidden,
        "batch_size": defaults.batch_size if options.batch_size is None else options.batch_size,
    }
    chosen = [given] if options.no_small_config else [given, SMALL_CONFIG]
    return {f"critic{config['critic_hidden']}_batch{config['batch_size']}": config for config in chosen}


def configured_args(module, config: dict, **fields):
    """The script's Args with the configuration's sizes and `fields`."""
    try:
        return dataclasses.replace(module.Args(), **config, **fields)
    except TypeError as error:  # an Args without one of these fields (an older baseline)
        raise SystemExit(f"error: {module.__file__}: {error}") from None


def size_flags(config: dict) -> list[str]:
    """The configuration as the scripts' command-line flags."""
    return [text for field, value in config.items() for text in (f"--{field.replace('_', '-')}", str(value))]


def matmul_gflops(seconds: float = 3.0) -> float:
    """Dense float32 matmul rate at the critic's shapes (1024 rows × 1024 × 1024), best of several runs."""
    a = jax.random.normal(jax.random.PRNGKey(0), (1024, 1024), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (1024, 1024), jnp.float32)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(a, b).block_until_ready()
    best, deadline = 0.0, time.time() + seconds
    while time.time() < deadline:
        start = time.perf_counter()
        for _ in range(5):
            out = matmul(a, b)
        out.block_until_ready()
        best = max(best, 5 * 2 * 1024**3 / (time.perf_counter() - start) / 1e9)
    return best


class ScriptFunctions(NamedTuple):
    jitted: NamedTuple  # the script's TrainFunctions: train_step, add_transition(s), evaluation_action
    create_state: Callable  # key -> a fresh agent state
    update_critic: Callable  # the pieces of train_step, not jitted: (state, batch, key)
    update_actor_and_alpha: Callable  # (policy_state, log_alpha, alpha_opt_state, critic, obs, key)
    sample_actions: Callable  # (params, batch_stats, obs, key, train)


def script_functions(module, args) -> ScriptFunctions:
    """A script's train step and its pieces at ACTION_DIM: its module-level functions, or the closure factory of a
    revision from before them (a --baseline)."""
    scale, bias = np.ones(ACTION_DIM), np.zeros(ACTION_DIM)
    if not hasattr(module, "jit_train_functions"):
        functions = module.make_train_functions(args, ACTION_DIM, scale, bias)
        create = functools.partial(module.create_agent, args, obs_dim=OBS_DIM, action_dim=ACTION_DIM)
        pieces = (functions.update_critic, functions.update_actor_and_alpha, functions.sample_actions)
        return ScriptFunctions(functions, create, *pieces)
    agent = module.make_agent(args, ACTION_DIM, scale, bias)
    create = functools.partial(module.create_state, agent, obs_dim=OBS_DIM)
    pieces = [
        functools.partial(f, agent)
        for f in (module.update_critic, module.update_actor_and_alpha, module.sample_actions)
    ]
    return ScriptFunctions(module.jit_train_functions(agent), create, *pieces)


def synthetic_state(module, functions: ScriptFunctions, rng):
    """A fresh agent state whose buffer already holds FILLED random transitions, stored with the script's
    buffer_add."""
    state = functions.create_state(jax.random.PRNGKey(0))
    transitions = (
        rng.normal(size=(FILLED, OBS_DIM)).astype(np.float32),
        rng.uniform(-1, 1, size=(FILLED, ACTION_DIM)).astype(np.float32),
        rng.normal(size=FILLED).astype(np.float32),
        rng.normal(size=(FILLED, OBS_DIM)).astype(np.float32),
    )

    def add(buffer, transition):
        obs, action, reward, next_obs = transition
        return module.buffer_add(buffer, obs, action, reward, next_obs, jnp.float32(0), jnp.bool_(False)), None

    fill = jax.jit(lambda buffer, transitions: jax.lax.scan(add, buffer, transitions)[0], donate_argnums=0)
    return state.replace(buffer=fill(state.buffer, transitions))


def random_transition(rng):
    obs = rng.normal(size=OBS_DIM).astype(np.float32)
    return (
        obs,
        rng.uniform(-1, 1, size=ACTION_DIM).astype(np.float32),
        np.float32(rng.normal()),
        rng.normal(size=OBS_DIM).astype(np.float32),
        np.float32(0.0),
        np.bool_(False),
    )


class FusedRunner:
    """The script's own loop body: one jitted call per environment step, for args.num_seeds agents at once."""

    def __init__(self, module, args, rng):
        self.pieces = script_functions(module, args)
        self.functions = self.pieces.jitted
        self.states = [synthetic_state(module, self.pieces, rng) for _ in range(args.num_seeds)]
        self.args, self.num_seeds, self.rng = args, args.num_seeds, rng

    def transition(self):
        """A random transition per seed, then the observation to act on."""
        seeds = [random_transition(self.rng) for _ in range(self.num_seeds)]
        stacked = tuple(np.stack(field) for field in zip(*seeds))
        return (*stacked, stacked[3])

    def step(self):
        self.states, (action, _, _) = self.functions.train_step(self.states, *self.transition())
        return np.asarray(action)


class ReferenceRunner:
    """The released code's structure around the same networks and losses: a host NumPy buffer with separate
    next observations, a host-to-device batch copy, and four separately jitted functions per step."""

    def __init__(self, module, args, rng):
        self.args = args
        functions = script_functions(module, args)
        self.agent = functions.create_state(jax.random.PRNGKey(0))
        self.agent = self.agent.replace(buffer=module.create_buffer(1, OBS_DIM, ACTION_DIM))  # unused on device
        self.update_critic = jax.jit(functions.update_critic)
        self.update_actor = jax.jit(functions.update_actor_and_alpha)
        self.act = jax.jit(lambda params, stats, obs, key: functions.sample_actions(params, stats, obs, key, False)[0])
        # The released scripts also Polyak-average a target copy of the critic every step (unused by CrossQ).
        self.update_target = jax.jit(
            lambda target, online: jax.tree_util.tree_map(lambda t, o: 0.995 * t + 0.005 * o, target, online)
        )
        self.target = (self.agent.critic.params, self.agent.critic.batch_stats)
        size = args.buffer_size
        self.observations = np.zeros((size, OBS_DIM), np.float32)
        self.next_observations = np.zeros((size, OBS_DIM), np.float32)
        self.actions = np.zeros((size, ACTION_DIM), np.float32)
        self.rewards = np.zeros(size, np.float32)
        self.terminations = np.zeros(size, np.float32)
        self.observations[:FILLED] = rng.normal(size=(FILLED, OBS_DIM))
        self.next_observations[:FILLED] = rng.normal(size=(FILLED, OBS_DIM))
        self.actions[:FILLED] = rng.uniform(-1, 1, size=(FILLED, ACTION_DIM))
        self.rewards[:FILLED] = rng.normal(size=FILLED)
        self.size, self.updates, self.rng = FILLED, 0, rng
        self.key = jax.random.PRNGKey(1)

    def step(self):
        obs, action, reward, next_obs, terminated, _ = random_transition(self.rng)
        i = self.size % len(self.rewards)
        self.observations[i], self.next_observations[i], self.actions[i] = obs, next_obs, action
        self.rewards[i], self.terminations[i] = reward, terminated
        self.size += 1
        index = self.rng.integers(0, min(self.size, len(self.rewards)), self.args.batch_size)
        batch = tuple(
            jnp.asarray(array[index])
            for array in (self.observations, self.actions, self.rewards, self.terminations, self.next_observations)
        )
        self.key, critic_key, actor_key, action_key = jax.random.split(self.key, 4)
        critic, _ = self.update_critic(self.agent, batch, critic_key)
        self.agent = self.agent.replace(critic=critic)
        self.target = self.update_target(self.target, (critic.params, critic.batch_stats))
        self.updates += 1
        if self.updates % self.args.policy_delay == 0:
            policy, log_alpha, alpha_opt_state, _ = self.update_actor(
                self.agent.policy, self.agent.log_alpha, self.agent.alpha_opt_state, critic, batch[0], actor_key
            )
            self.agent = self.agent.replace(policy=policy, log_alpha=log_alpha, alpha_opt_state=alpha_opt_state)
        policy = self.agent.policy
        return np.asarray(self.act(policy.params, policy.batch_stats, jnp.asarray(next_obs)[None], action_key))


def flops_per_update(args, fused: FusedRunner) -> float:
    def flops(compiled):
        analysis = compiled.cost_analysis()
        return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]

    whole = flops(fused.functions.train_step.lower(fused.states, *fused.transition()).compile()) / len(fused.states)
    agent = fused.states[0]
    obs = jnp.zeros((args.batch_size, OBS_DIM), jnp.float32)
    actor = flops(
        jax.jit(fused.pieces.update_actor_and_alpha)
        .lower(agent.policy, agent.log_alpha, agent.alpha_opt_state, agent.critic, obs, jax.random.PRNGKey(0))
        .compile()
    )
    return whole - actor * (1 - 1 / args.policy_delay)


def alternating_rates(runners: dict, rounds: int, cycles_per_round: int) -> tuple[dict, dict]:
    """Each runner's first call in seconds (compilation included) and its calls/s over `rounds` alternating rounds
    of `cycles_per_round` whole actor cycles (its policy_delay calls, one of them with the actor update), after a
    warm-up that leaves each at the start of a cycle."""
    first_call_s, elapsed = {}, dict.fromkeys(runners, 0.0)
    for key, runner in runners.items():
        start = time.perf_counter()
        runner.step()
        first_call_s[key] = time.perf_counter() - start
        # The rest of the warm-up compiles what the first call did not, and touches fresh memory.
        for _ in range(2 * runner.args.policy_delay - 1):
            runner.step()
    for _ in range(rounds):  # alternate, so all see the same machine load
        for key, runner in runners.items():
            start = time.perf_counter()
            for _ in range(cycles_per_round * runner.args.policy_delay):
                runner.step()
            elapsed[key] += time.perf_counter() - start
    calls = {key: rounds * cycles_per_round * runner.args.policy_delay for key, runner in runners.items()}
    return first_call_s, {key: calls[key] / elapsed[key] for key in runners}


def measure_script(module, config: dict, rounds: int, cycles_per_round: int, baseline=None) -> dict:
    """The script's step against the reference, and against the step of `baseline` (the same script of another
    revision) at the same sizes if given, in alternating rounds."""
    args = configured_args(module, config)
    rng = np.random.default_rng(0)
    runners = {"fused": FusedRunner(module, args, rng), "reference": ReferenceRunner(module, args, rng)}
    if baseline is not None:
        runners["baseline"] = FusedRunner(baseline, configured_args(baseline, config), rng)
    first_call_s, calls_per_s = alternating_rates(runners, rounds, cycles_per_round)
    figures = {
        "updates_per_s": calls_per_s["fused"],
        "reference_updates_per_s": calls_per_s["reference"],
        "speedup": calls_per_s["fused"] / calls_per_s["reference"],
        "flops_per_update": flops_per_update(args, runners["fused"]),
        "compile_s": first_call_s["fused"],
    }
    if baseline is not None:
        figures["baseline_updates_per_s"] = calls_per_s["baseline"]
        figures["vs_baseline"] = calls_per_s["fused"] / calls_per_s["baseline"]
    return figures


def seeds_updates_per_s(module, config: dict, num_seeds: list[int], rounds: int, cycles_per_round: int) -> dict:
    """Total updates/s (seeds × calls/s) of the script's train step over N seeds (--num-seeds N), and its ratios
    to the single-seed rate and to N × that rate; the N are measured in alternating rounds of whole actor cycles."""
    rng = np.random.default_rng(0)
    runners = {n: FusedRunner(module, configured_args(module, config, num_seeds=n), rng) for n in num_seeds}
    _, calls_per_s = alternating_rates(runners, rounds, cycles_per_round)
    total = {n: n * calls_per_s[n] for n in num_seeds}
    single = total[1] if 1 in total else float("nan")
    return {
        str(n): {
            "updates_per_s": total[n],
            "vs_one_seed": total[n] / single,
            "vs_n_single_seeds": total[n] / (n * single),
        }
        for n in num_seeds
    }


def run_script(name: str, flags: list, python_code: str | None = None, folder: Path = REPO / "from_scratch") -> str:
    """Runs a from-scratch script (<folder>/<name>.py) in a scratch directory and returns its console; a one-line
    error if it fails."""
    command = [sys.executable] + (["-c", python_code] if python_code else [])
    with tempfile.TemporaryDirectory() as workdir:
        result = subprocess.run(
            command + [str(folder / f"{name}.py")] + flags,
            cwd=workdir,
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"error: {name}.py {' '.join(flags)} failed: {last_line}")
    return result.stdout


def end_to_end_sps(
    name: str, config: dict, learning_starts: int = 5_000, steps: int = 1_000, folder: Path = REPO / "from_scratch"
) -> float:
    """Environment steps per second on Hopper-v4 after learning_starts, at the configuration's sizes: the training
    rate of the last console line of <folder>/<name>.py (a baseline's copy, or the working tree's), which the
    scripts measure from after the first train step, so the compilation is left out."""
    console = run_script(
        name,
        ["--env-id", "Hopper-v4", "--learning-starts", str(learning_starts),
         "--total-timesteps", str(learning_starts + steps), "--console-every", str(steps), "--eval-episodes", "0",
         *size_flags(config)],
        folder=folder,
    )  # fmt: skip
    return float(re.findall(r"step \d+/\d+ \| training: ([\d.]+) steps/s", console)[-1])


def random_phase_rates(name: str, env_id: str = RANDOM_PHASE_ENV, steps: int = 20_000) -> dict:
    """The script's random-action phase on env_id, in environment steps per second (its console's rate over all
    `steps`, the buffer writes included), next to the environment's own rate with random actions, measured here
    over as many steps (resets included): random_phase_fraction is their ratio."""
    console = run_script(
        name,
        ["--env-id", env_id, "--total-timesteps", str(steps), "--learning-starts", str(steps + 1),
         "--console-every", str(steps), "--eval-episodes", "0", *size_flags(SMALL_CONFIG)],
    )  # fmt: skip
    script_rate = float(re.findall(r"random actions: ([\d.]+) steps/s", console)[-1])
    env = gym.make(env_id)
    env.action_space.seed(0)
    env.reset(seed=0)
    start = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    env_rate = steps / (time.perf_counter() - start)
    env.close()
    return {"random_phase_sps": script_rate, "env_sps": env_rate, "random_phase_fraction": script_rate / env_rate}


def buffer_peak_rss_gib(name: str, config: dict) -> dict:
    """Peak resident memory a 1M-slot Humanoid-v4 buffer adds to a short run (vs. a 1k-slot one), a few
    updates at the configuration's sizes included so that the train step's working memory counts."""
    batch_size = config["batch_size"]

    def peak_rss(buffer_size: int) -> float:
        code = (
            "import resource, runpy, sys; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__'); "
            "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        )
        console = run_script(
            name,
            ["--env-id", "Humanoid-v4", "--buffer-size", str(buffer_size), "--total-timesteps", str(batch_size + 8),
             "--learning-starts", str(batch_size), "--eval-episodes", "0", *size_flags(config)],
            python_code=code,
        )  # fmt: skip
        return int(re.search(r"PEAK_RSS_KIB (\d+)", console).group(1)) / 2**20

    obs_dim, action_dim, slots = 376, 17, 1_000_000
    separate = slots * (2 * obs_dim + action_dim + 2) * 4 / 2**30
    added = peak_rss(slots) - peak_rss(max(1_000, batch_size))  # the scripts refuse a batch larger than the buffer
    return {"buffer_peak_rss_gib": added, "separate_storage_gib": separate, "buffer_memory_ratio": added / separate}


def positive_int(text: str) -> int:
    """An argparse type: a positive integer."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="train-step figures only, under ~5 minutes on 2 cores")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--scripts", nargs="+", default=SCRIPTS, choices=SCRIPTS, help="which scripts to measure")
    parser.add_argument(
        "--critic-hidden", type=positive_int, metavar="W", help="critic width (default: the scripts' own)"
    )
    parser.add_argument("--batch-size", type=positive_int, metavar="B", help="batch size (default: the scripts' own)")
    parser.add_argument(
        "--no-small-config",
        action="store_true",
        help=f"leave out the second configuration, critic {SMALL_CONFIG['critic_hidden']}, batch "
        f"{SMALL_CONFIG['batch_size']}",
    )
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also measure the train step of this git revision's scripts (main, HEAD~3, a commit) against the "
        "working tree's, in the same alternating rounds",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        metavar="N",
        help="alternating rounds of the train-step figures (default: 6 with --quick, 10 otherwise)",
    )
    parser.add_argument(
        "--num-seeds",
        type=int,
        nargs="*",
        help="also measure N seeds in one call (--num-seeds N) for these N (default: 1 3 5 outside --quick)",
    )
    parser.add_argument(
        "--random-phase",
        action="store_true",
        help=f"also with --quick: each script's random-action phase on {RANDOM_PHASE_ENV} against the environment's "
        "own step rate",
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc as it is (the scripts call reuse_freed_memory() first; this shows what it gains)",
    )
    return parser.parse_args(argv)


# The table's columns in this order, those that the run measured.
COLUMNS = [
    "updates_per_s",
    "reference_updates_per_s",
    "speedup",
    "baseline_updates_per_s",
    "vs_baseline",
    "flops_per_update",
    "roofline_fraction",
    "compile_s",
    "sps_hopper",
    "baseline_sps_hopper",
    "buffer_peak_rss_gib",
    "separate_storage_gib",
    "buffer_memory_ratio",
]


def print_results(results: dict):
    """One row per script and configuration, the scripts in SCRIPTS' order."""
    rows = [
        (name, label, figures)
        for label, config in results["configs"].items()
        for name, figures in config["scripts"].items()
    ]
    rows.sort(key=lambda row: SCRIPTS.index(row[0]))  # stable: each script's configurations stay in order
    columns = [c for c in COLUMNS if c in rows[0][2]]
    print(f"device {results['device']}, dense f32 matmul {results['matmul_gflops']:.1f} GFLOP/s")
    if results["baseline"]:
        print(f"baseline {results['baseline']['ref']} ({results['baseline']['commit'][:12]})")
    print(f"{'script':<22}{'config':<22}" + "".join(f"{c:>24}" for c in columns))
    for name, label, figures in rows:
        cells = "".join(
            f"{figures[c]:>24.3g}" if c != "flops_per_update" else f"{figures[c] / 1e9:>20.2f} GF" for c in columns
        )
        print(f"{name:<22}{label:<22}{cells}")
    if results["random_phase"]:
        print(f"\nrandom-action phase on {RANDOM_PHASE_ENV}: the script's steps/s, the environment's own, their ratio")
        for name, figures in results["random_phase"].items():
            print(
                f"{name:<22}{figures['random_phase_sps']:>12.0f}{figures['env_sps']:>12.0f}"
                f"{figures['random_phase_fraction']:>12.2f}"
            )
    if "num_seeds" in rows[0][2]:
        print("\nN seeds in one call: total updates/s (ratio to one seed's rate; ratio to N × one seed's rate)")
        for name, label, figures in rows:
            cells = "".join(
                f"   N={n}: {f['updates_per_s']:.2f} ({f['vs_one_seed']:.2f}×; {f['vs_n_single_seeds']:.2f}×)"
                for n, f in figures["num_seeds"].items()
            )
            print(f"{name:<22}{label:<22}{cells}")


def main(argv: list[str] | None = None):
    options = parse_options(argv)
    if options.json and options.json.exists():
        raise SystemExit(f"error: {options.json} exists; not overwriting it")
    rounds = options.rounds or (6 if options.quick else 10)
    cycles_per_round = 2 if options.quick else 3
    num_seeds = options.num_seeds if options.num_seeds is not None else ([] if options.quick else [1, 3, 5])

    # The baseline's files stay until the end, for the source lines of a traceback from its code.
    with tempfile.TemporaryDirectory(prefix="speed-baseline-") as directory:
        commit, baselines = None, {}
        if options.baseline:  # before anything else, so that a wrong revision fails at once
            commit, baselines = load_baseline(options.baseline, options.scripts, Path(directory))
        modules = {name: load_script(name) for name in options.scripts}
        if not options.default_malloc:
            runs.reuse_freed_memory()  # what each script's main() does first
        results = {
            "device": str(jax.devices()[0]),
            "default_malloc": options.default_malloc,
            "matmul_gflops": matmul_gflops(),
            "baseline": {"ref": options.baseline, "commit": commit} if options.baseline else None,
            "configs": {},
            "random_phase": {},
        }
        for name, module in modules.items():
            for label, config in configurations(options, module.Args()).items():
                print(f"measuring {name} at {label} ...", file=sys.stderr, flush=True)
                figures = measure_script(module, config, rounds, cycles_per_round, baselines.get(name))
                if not options.quick:
                    figures["sps_hopper"] = end_to_end_sps(name, config)
                    if baselines:
                        figures["baseline_sps_hopper"] = end_to_end_sps(name, config, folder=Path(directory))
                    figures.update(buffer_peak_rss_gib(name, config))
                if num_seeds:
                    figures["num_seeds"] = seeds_updates_per_s(module, config, num_seeds, rounds, cycles_per_round)
                figures["roofline_fraction"] = (
                    figures["flops_per_update"] * figures["updates_per_s"] / (results["matmul_gflops"] * 1e9)
                )
                results["configs"].setdefault(label, {**config, "scripts": {}})["scripts"][name] = figures
            if options.random_phase or not options.quick:
                print(f"measuring {name}'s random-action phase on {RANDOM_PHASE_ENV} ...", file=sys.stderr, flush=True)
                results["random_phase"][name] = random_phase_rates(name)

    print_results(results)
    if options.json:
        options.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
