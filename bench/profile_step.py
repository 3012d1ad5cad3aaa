"""Where a from-scratch script's train step spends its time: a jax.profiler trace of the jitted call, per XLA operation.

    python bench/profile_step.py sac_flow_transformer --critic-hidden 256 --batch-size 256

It runs the script's own per-step call (bench/speed.py's FusedRunner: synthetic Hopper-v4-shaped data, the script's
defaults but for the sizes given) under the profiler for --cycles whole actor cycles (policy_delay calls each, one of
them with the actor update), after a warm-up, and prints:

- wall ms/call, the summed (self) time of the XLA operations XLA's CPU runtime executed per call, and their ratio:
  how many operations ran at once on average (those of one call run on a pool of threads, concurrently only where
  they do not depend on each other). It is not the cores busy: an operation that splits its own work across
  threads (a large matmul) is one event, timed once. What a second core gives shows in the wall time of a run
  pinned to one core (`taskset -c 0 python bench/profile_step.py ...`) against an unpinned one;
- that time per kind of operation (the operation's name without its number: fusions, dots, copies, loops);
- the --top matmuls (a dot, alone or fused with elementwise work) by time, grouped by their shapes, each with its
  rate in GFLOP/s, next to the dense matmul rate of bench/speed.py (1024 × 1024 × 1024, on the cores it may use).

Tracing adds its own cost to every operation: for updates/s, use bench/speed.py.
XLA's CPU backend only reports its operations with --xla_cpu_enable_xprof_traceme, which this script adds to
XLA_FLAGS before jax starts.
"""

import argparse
import collections
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_enable_xprof_traceme=true".strip()
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import numpy as np
import speed

from sac_flow_utils import runs

# One HLO instruction: `%name = f32[2,512,256]{2,1,0} dot(%a, %b), lhs_contracting_dims={2}, ...`
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+\[[\d,]*\])\S* (\w[\w\-]*)\(([^)]*)\)(.*)$")
COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")


def parse_hlo(text: str) -> tuple[dict, dict]:
    """The compiled module's instructions, name -> (shape, opcode, operands, attributes), and each computation's."""
    instructions, computations, current = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        if match := COMPUTATION.match(line):
            current = match.group(1)
        elif match := INSTRUCTION.match(line):
            name, shape, opcode, operands, attributes = match.groups()
            instructions[name] = (shape, opcode, re.findall(r"%([\w.\-]+)", operands), attributes)
            computations[current].append(name)
    return instructions, computations


def dims(shape: str) -> list[int]:
    return [int(d) for d in re.findall(r"\d+", shape.split("[", 1)[1])]


def matmul_of(name: str, instructions: dict, computations: dict) -> tuple[str, float] | None:
    """(shapes, FLOPs) of the dots that operation `name` computes (a dot, or a fusion calling dots); None if none."""
    attributes = instructions[name][3]
    called = re.search(r"calls=%([\w.\-]+)", attributes)
    names = computations[called.group(1)] if called else [name]
    descriptions, flops = [], 0.0
    for dot in (n for n in names if instructions[n][1] == "dot"):
        out_shape, _, (lhs, rhs), dot_attributes = instructions[dot]
        lhs_shape, rhs_shape = instructions[lhs][0], instructions[rhs][0]
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", dot_attributes).group(1)
        contracted = np.prod([dims(lhs_shape)[int(d)] for d in contracting.split(",") if d])
        flops += 2.0 * np.prod(dims(out_shape)) * contracted
        descriptions.append(f"{lhs_shape} x {rhs_shape} -> {out_shape} (lhs contracting {{{contracting}}})")
    return ("; ".join(descriptions), flops) if descriptions else None


def self_times(events: list) -> dict:
    """Operation name -> its summed time without the operations nested in it (a loop's body), one thread's events."""
    totals, stack = collections.Counter(), []  # stack: [name, end_ns] of the enclosing operations
    for event in sorted(events, key=lambda e: (e.start_ns, -e.duration_ns)):
        while stack and stack[-1][1] <= event.start_ns:
            stack.pop()
        if stack:
            totals[stack[-1][0]] -= event.duration_ns
        totals[event.name] += event.duration_ns
        stack.append([event.name, event.start_ns + event.duration_ns])
    return totals


def profile(module, args, calls: int, trace_dir: str) -> tuple[float, dict, dict, str]:
    """Wall seconds per call, operation -> summed self ns, operation -> count, and the compiled module's text."""
    runner = speed.FusedRunner(module, args, np.random.default_rng(0))
    for _ in range(2 * args.policy_delay):  # compiles, and leaves the runner at the start of an actor cycle
        runner.step()
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    for _ in range(calls):
        runner.step()
    wall = (time.perf_counter() - start) / calls
    jax.profiler.stop_trace()
    hlo = runner.functions.train_step.lower(runner.states, *runner.transition()).compile().as_text()
    module_name = re.match(r"HloModule (\S+),", hlo).group(1)
    space = jax.profiler.ProfileData.from_file(str(next(Path(trace_dir).rglob("*.xplane.pb"))))
    times, counts = collections.Counter(), collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            events = [e for e in line.events if dict(e.stats).get("hlo_module") == module_name]
            times.update(self_times(events))
            counts.update(e.name for e in events)
    return wall, times, counts, hlo


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("script", choices=speed.SCRIPTS, help="the from-scratch script whose train step to profile")
    parser.add_argument("--critic-hidden", type=speed.positive_int, default=256, help="critic width (256)")
    parser.add_argument("--batch-size", type=speed.positive_int, default=256, help="batch size (256)")
    parser.add_argument("--cycles", type=speed.positive_int, default=10, help="profiled actor cycles (10)")
    parser.add_argument("--top", type=speed.positive_int, default=12, help="matmul shapes listed (12)")
    options = parser.parse_args(argv)
    if jax.default_backend() != "cpu":  # a GPU's trace has kernels on a device plane, not these operations
        raise SystemExit(f"error: this profiles XLA's CPU runtime, and jax runs on {jax.default_backend()}: "
                         "run it with JAX_PLATFORMS=cpu")  # fmt: skip
    runs.reuse_freed_memory()  # as the scripts' main() and bench/speed.py do
    module = speed.load_script(options.script)
    config = {"critic_hidden": options.critic_hidden, "batch_size": options.batch_size}
    args = speed.configured_args(module, config)
    with tempfile.TemporaryDirectory() as trace_dir:
        calls = options.cycles * args.policy_delay
        wall, times, counts, hlo = profile(module, args, calls, trace_dir)
    instructions, computations = parse_hlo(hlo)
    operations_s = sum(times.values()) / 1e9 / calls  # per call, summed over the threads that ran them
    print(f"{options.script}, critic {options.critic_hidden}, batch {options.batch_size}, {calls} calls profiled")
    print(f"wall {wall * 1e3:.2f} ms/call; XLA operations {operations_s * 1e3:.2f} ms/call summed over threads "
          f"({sum(counts.values()) / calls:.0f} per call): {operations_s / wall:.2f} at once on average")  # fmt: skip
    rate = speed.matmul_gflops(seconds=1.0)
    print(f"dense matmul rate, 1024 x 1024 x 1024 on the cores this process may use: {rate:.1f} GFLOP/s\n")

    kinds, kind_counts = collections.Counter(), collections.Counter()
    for name, ns in times.items():
        kind = re.sub(r"\.\d+$", "", name)
        kinds[kind] += ns
        kind_counts[kind] += counts[name]
    print("kind of operation         ms/call  per call  µs each")
    for kind, ns in kinds.most_common(12):
        number = kind_counts[kind] / calls
        print(f"{kind:<25} {ns / 1e6 / calls:7.3f}  {number:8.1f}  {ns / 1e3 / kind_counts[kind]:7.1f}")

    matmuls = collections.defaultdict(lambda: [0.0, 0, 0.0])  # shapes -> [ns, calls, FLOPs]
    for name, ns in times.items():
        found = matmul_of(name, instructions, computations) if name in instructions else None
        if found:
            shapes, flops = found
            matmuls[shapes][0] += ns
            matmuls[shapes][1] += counts[name]
            matmuls[shapes][2] += flops * counts[name]
    matmul_ns = sum(ns for ns, _, _ in matmuls.values())
    print(f"\nmatmuls: {matmul_ns / 1e6 / calls:.3f} ms/call; the {options.top} shapes that take longest:")
    print(" ms/call  per call  µs each  GFLOP/s  shapes")
    for shapes, (ns, number, flops) in sorted(matmuls.items(), key=lambda item: -item[1][0])[: options.top]:
        print(f"{ns / 1e6 / calls:8.3f}  {number / calls:8.1f}  {ns / 1e3 / number:7.1f}  {flops / ns:7.1f}  {shapes}")


if __name__ == "__main__":
    main()
