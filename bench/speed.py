"""Speed of every from-scratch script's train step, side by side, against the released code's structure.

For each script it imports the script itself (its networks, losses and train step; nothing is copied) and
measures on synthetic Hopper-v4-shaped data (obs 11, action 3) with the script's defaults (batch 512, K 4,
CrossQ critic, a 1M-slot buffer holding 100k transitions):

- updates_per_s: the script's own jitted call per environment step (store + critic + every `policy_delay`
  actor/α + next action), the action fetched to the host each time as the training loop does;
- reference_updates_per_s: the same networks and losses run in the released code's structure: a NumPy
  replay buffer on the host storing observations and next observations, a host-to-device copy of each batch,
  and separately jitted critic update, target-critic average, actor+α update and action selection;
- speedup: their ratio, measured in this one process in alternating rounds of whole actor cycles (policy_delay
  calls each, one with the actor update), after a warm-up that leaves both at the start of a cycle;
- flops_per_update: XLA's cost analysis of the compiled call, with the actor branch counted once every
  `policy_delay` calls (XLA counts both branches of the lax.cond);
- matmul_gflops: the machine's dense float32 matmul rate, measured here; roofline_fraction =
  flops_per_update × updates_per_s / matmul rate;
- compile_s: the first call (compilation included);
- outside --quick: sps_hopper, end-to-end environment steps per second on Hopper-v4 over 1000 steps after
  learning_starts (from the script's own console, the window with the compilation left out), and
  buffer_peak_rss_gib, the peak resident memory that a 1M-slot Humanoid-v4 buffer adds to a short run with a
  few updates, next to separate_storage_gib, what observations and next observations stored separately would
  take (buffer_memory_ratio = their ratio). Together about 5 minutes per script on 2 idle cores.

- num_seeds (outside --quick, or with --num-seeds 1 3 5): total updates/s (seeds × calls/s) of the train step
  of N seeds in one call (--num-seeds N of the scripts); vs_one_seed, its ratio to the single-seed rate (the
  throughput gained by packing N seeds into one process), and vs_n_single_seeds, its ratio to N × the
  single-seed rate (1.0: N seeds cost no more than one).

The process first calls the scripts' reuse_freed_memory(), as their main() does (glibc keeps the memory that XLA
frees for the next call instead of page-faulting it in again); --default-malloc leaves it out, to show its effect.

    python bench/speed.py --quick --json speed.json
    python bench/speed.py --quick --scripts sac_flow_gru --num-seeds 1 3 5
"""

import argparse
import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["sac", "sac_flow_naive", "sac_flow_gru", "sac_flow_transformer"]
OBS_DIM, ACTION_DIM = 11, 3  # Hopper-v4
FILLED = 100_000


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "from_scratch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def synthetic_agent(module, args, rng):
    """A fresh agent whose buffer already holds FILLED random transitions, stored with the script's buffer_add."""
    agent = module.create_agent(args, jax.random.PRNGKey(0), OBS_DIM, ACTION_DIM)
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
    return agent.replace(buffer=fill(agent.buffer, transitions))


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
        self.functions = module.make_train_functions(args, ACTION_DIM, np.ones(ACTION_DIM), np.zeros(ACTION_DIM))
        self.agents = [synthetic_agent(module, args, rng) for _ in range(args.num_seeds)]
        self.num_seeds, self.rng = args.num_seeds, rng

    def transition(self):
        """A random transition per seed, then the observation to act on."""
        seeds = [random_transition(self.rng) for _ in range(self.num_seeds)]
        stacked = tuple(np.stack(field) for field in zip(*seeds))
        return (*stacked, stacked[3])

    def step(self):
        self.agents, (action, _, _) = self.functions.train_step(self.agents, *self.transition())
        return np.asarray(action)


class ReferenceRunner:
    """The released code's structure around the same networks and losses: a host NumPy buffer with separate
    next observations, a host-to-device batch copy, and four separately jitted functions per step."""

    def __init__(self, module, args, rng):
        self.args = args
        functions = module.make_train_functions(args, ACTION_DIM, np.ones(ACTION_DIM), np.zeros(ACTION_DIM))
        self.agent = module.create_agent(args, jax.random.PRNGKey(0), OBS_DIM, ACTION_DIM)
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


def flops_per_update(module, args, fused: FusedRunner) -> float:
    def flops(compiled):
        analysis = compiled.cost_analysis()
        return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]

    whole = flops(fused.functions.train_step.lower(fused.agents, *fused.transition()).compile()) / len(fused.agents)
    agent = fused.agents[0]
    obs = jnp.zeros((args.batch_size, OBS_DIM), jnp.float32)
    actor = flops(
        jax.jit(fused.functions.update_actor_and_alpha)
        .lower(agent.policy, agent.log_alpha, agent.alpha_opt_state, agent.critic, obs, jax.random.PRNGKey(0))
        .compile()
    )
    return whole - actor * (1 - 1 / args.policy_delay)


def measure_script(name: str, rounds: int, cycles_per_round: int) -> dict:
    """The script's step against the reference, in alternating rounds of whole actor cycles (policy_delay calls,
    one of them with the actor update), both starting at the same point of the cycle after a warm-up."""
    module = load_script(name)
    args = module.Args()
    rng = np.random.default_rng(0)
    fused = FusedRunner(module, args, rng)
    start = time.perf_counter()
    fused.step()
    compile_s = time.perf_counter() - start
    reference = ReferenceRunner(module, args, rng)
    warmup = 2 * args.policy_delay  # compiles all the reference's functions; the first calls touch fresh memory
    for _ in range(warmup - 1):
        fused.step()
    for _ in range(warmup):
        reference.step()
    steps_per_round = cycles_per_round * args.policy_delay
    fused_time = reference_time = 0.0
    for _ in range(rounds):  # alternate, so both see the same machine load
        start = time.perf_counter()
        for _ in range(steps_per_round):
            fused.step()
        fused_time += time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps_per_round):
            reference.step()
        reference_time += time.perf_counter() - start
    steps = rounds * steps_per_round
    return {
        "updates_per_s": steps / fused_time,
        "reference_updates_per_s": steps / reference_time,
        "speedup": reference_time / fused_time,
        "flops_per_update": flops_per_update(module, args, fused),
        "compile_s": compile_s,
    }


def seeds_updates_per_s(name: str, num_seeds: list[int], rounds: int, cycles_per_round: int) -> dict:
    """Total updates/s (seeds × calls/s) of the script's train step over N seeds (--num-seeds N), and its ratios
    to the single-seed rate and to N × that rate; the N are measured in alternating rounds of whole actor cycles."""
    module = load_script(name)
    rng = np.random.default_rng(0)
    runners = {n: FusedRunner(module, dataclasses.replace(module.Args(), num_seeds=n), rng) for n in num_seeds}
    policy_delay = module.Args().policy_delay
    elapsed = dict.fromkeys(num_seeds, 0.0)
    for runner in runners.values():
        for _ in range(2 * policy_delay):  # compile, warm up, and end at the start of an actor cycle
            runner.step()
    steps_per_round = cycles_per_round * policy_delay
    for _ in range(rounds):
        for n, runner in runners.items():
            start = time.perf_counter()
            for _ in range(steps_per_round):
                runner.step()
            elapsed[n] += time.perf_counter() - start
    total = {n: n * rounds * steps_per_round / elapsed[n] for n in num_seeds}
    single = total[1] if 1 in total else float("nan")
    return {
        str(n): {
            "updates_per_s": total[n],
            "vs_one_seed": total[n] / single,
            "vs_n_single_seeds": total[n] / (n * single),
        }
        for n in num_seeds
    }


def run_script(name: str, flags: list, python_code: str | None = None) -> str:
    """Runs a from-scratch script in a scratch directory and returns its console; a one-line error if it fails."""
    command = [sys.executable] + (["-c", python_code] if python_code else [])
    with tempfile.TemporaryDirectory() as workdir:
        result = subprocess.run(
            command + [str(REPO / "from_scratch" / f"{name}.py")] + flags,
            cwd=workdir,
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"error: {name}.py {' '.join(flags)} failed: {last_line}")
    return result.stdout


def end_to_end_sps(name: str, learning_starts: int = 5_000, steps: int = 1_000, window: int = 250) -> float:
    """Environment steps per second on Hopper-v4 after learning_starts, from the script's console lines.

    The first window after learning_starts holds the compilation and is left out; the others are combined as
    total steps over total time."""
    console = run_script(
        name,
        ["--env-id", "Hopper-v4", "--learning-starts", str(learning_starts),
         "--total-timesteps", str(learning_starts + steps), "--console-every", str(window), "--eval-episodes", "0"],
    )  # fmt: skip
    rates = [
        float(sps)
        for step, sps in re.findall(r"step (\d+)/\d+ \| SPS ([\d.]+)", console)
        if int(step) > learning_starts + window
    ]
    return len(rates) / sum(1 / rate for rate in rates)


def buffer_peak_rss_gib(name: str) -> dict:
    """Peak resident memory a 1M-slot Humanoid-v4 buffer adds to a short run (vs. a 1k-slot one), a few
    updates included so that the train step's working memory counts."""

    def peak_rss(buffer_size: int) -> float:
        code = (
            "import resource, runpy, sys; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__'); "
            "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        )
        console = run_script(
            name,
            ["--env-id", "Humanoid-v4", "--buffer-size", str(buffer_size), "--total-timesteps", "520",
             "--learning-starts", "512", "--eval-episodes", "0"],
            python_code=code,
        )  # fmt: skip
        return int(re.search(r"PEAK_RSS_KIB (\d+)", console).group(1)) / 2**20

    obs_dim, action_dim, slots = 376, 17, 1_000_000
    separate = slots * (2 * obs_dim + action_dim + 2) * 4 / 2**30
    added = peak_rss(slots) - peak_rss(1_000)
    return {"buffer_peak_rss_gib": added, "separate_storage_gib": separate, "buffer_memory_ratio": added / separate}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="train-step figures only, under ~5 minutes on 2 cores")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--scripts", nargs="+", default=SCRIPTS, choices=SCRIPTS, help="which scripts to measure")
    parser.add_argument(
        "--num-seeds",
        type=int,
        nargs="*",
        help="also measure N seeds in one call (--num-seeds N) for these N (default: 1 3 5 outside --quick)",
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc as it is (the scripts call reuse_freed_memory() first; this shows what it gains)",
    )
    options = parser.parse_args()
    if options.json and options.json.exists():
        raise SystemExit(f"error: {options.json} exists; not overwriting it")

    if not options.default_malloc:
        load_script(options.scripts[0]).reuse_freed_memory()  # what each script's main() does first
    rounds, cycles_per_round = (6, 2) if options.quick else (10, 3)
    num_seeds = options.num_seeds if options.num_seeds is not None else ([] if options.quick else [1, 3, 5])
    results = {
        "device": str(jax.devices()[0]),
        "default_malloc": options.default_malloc,
        "matmul_gflops": matmul_gflops(),
        "scripts": {},
    }
    for name in options.scripts:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        figures = measure_script(name, rounds, cycles_per_round)
        if not options.quick:
            figures["sps_hopper"] = end_to_end_sps(name)
            figures.update(buffer_peak_rss_gib(name))
        if num_seeds:
            figures["num_seeds"] = seeds_updates_per_s(name, num_seeds, rounds, cycles_per_round)
        figures["roofline_fraction"] = (
            figures["flops_per_update"] * figures["updates_per_s"] / (results["matmul_gflops"] * 1e9)
        )
        results["scripts"][name] = figures

    columns = [
        "updates_per_s",
        "reference_updates_per_s",
        "speedup",
        "flops_per_update",
        "roofline_fraction",
        "compile_s",
    ]
    if not options.quick:
        columns += ["sps_hopper", "buffer_peak_rss_gib", "separate_storage_gib", "buffer_memory_ratio"]
    print(f"device {results['device']}, dense f32 matmul {results['matmul_gflops']:.1f} GFLOP/s")
    print(f"{'script':<22}" + "".join(f"{c:>24}" for c in columns))
    for name, figures in results["scripts"].items():
        cells = "".join(
            f"{figures[c]:>24.3g}" if c != "flops_per_update" else f"{figures[c] / 1e9:>20.2f} GF" for c in columns
        )
        print(f"{name:<22}{cells}")
    if num_seeds:
        print("\nN seeds in one call: total updates/s (ratio to one seed's rate; ratio to N × one seed's rate)")
        for name, figures in results["scripts"].items():
            cells = "".join(
                f"   N={n}: {f['updates_per_s']:.2f} ({f['vs_one_seed']:.2f}×; {f['vs_n_single_seeds']:.2f}×)"
                for n, f in figures["num_seeds"].items()
            )
            print(f"{name:<22}{cells}")
    if options.json:
        options.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
