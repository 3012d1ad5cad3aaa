"""Gradient through the flow steps: does the actor's gradient grow as it flows back through the K-step rollout?

SAC Flow's argument (arXiv 2509.25756) is that the K-step flow rollout is a residual RNN: with the Naive (MLP)
velocity the actor loss's gradient can grow as it flows back from A_K to A_0, while the gated (Flow-G) and
decoded (Flow-T) velocities keep it flat. This bench measures that on your task with the project's own scripts.
It trains each flow variant (from_scratch/sac_flow_{naive,gru,transformer}.py) briefly, one after the other, as a
subprocess with --log-grad-norms, which logs at every --log-every step

    grad/actor_wrt_A_k<k> = mean_i ‖∂ℓ_i/∂A_k^(i)‖₂,  k = 0..K−1,  ℓ_i = α log π_i − min_j Q_j(s_i, a_i)

(sample i's actor loss, the later noises held fixed: the gradient backpropagation carries back to flow step k)
and grad/actor_params (the global L2 norm of the actor loss's gradient w.r.t. the velocity network's parameters).
It reads the runs' metrics.csv and writes

    <out>/grad_norms.json   {"naive": V, "gru": V, "transformer": V}, each V for the first --flow-steps value K:
        per_step_norm     [k = 0..K−1], the mean of the last --final-points logged values (the end of training)
        params_norm       the same for grad/actor_params
        over_training     {"steps": [...], "per_step_norm": [[k = 0..K−1] per logged step], "params_norm": [...]}
        flow_steps, env_id, steps, run_dir, exit_code (non-zero: the run stopped early, e.g. it diverged)
        by_flow_steps     {"<K>": the fields above for that K} for every --flow-steps value (the K sweep)
    <out>/grad_norms.png    top row: the end-of-training norm against the flow step k, the three variants in one
                            panel per K (log scale); bottom row: the norms at k = 0 and k = K−1 during training
and the runs (<out>/runs/<run_name>) with each run's console output (<out>/<variant>_K<K>.log).

Examples (2 shared CPU cores; the time is mostly the training):
    python bench/grad_norms.py --quick --out gn                        # Hopper-v4, 800 steps each, ~5 minutes
    python bench/grad_norms.py --quick --flow-steps 4 7 10 --out gn_k  # the K sweep, about three times as long
    # docs/gradients.md's figure: Hopper-v4, 2000 steps each, ~13 minutes
    python bench/grad_norms.py --steps 2000 --batch-size 64 --learning-starts 250 --log-every 25 --out gn_long
"""

import csv
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import tyro

FROM_SCRATCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "from_scratch")
VARIANTS = {"naive": "sac_flow_naive", "gru": "sac_flow_gru", "transformer": "sac_flow_transformer"}
QUICK = {"steps": 800, "learning_starts": 200, "batch_size": 32, "log_every": 20}


@dataclass
class Args:
    out: str = "runs/grad_norms"
    """folder for grad_norms.json, grad_norms.png, the runs (<out>/runs/...) and their console logs"""
    env_id: str = "Hopper-v4"
    """the gymnasium environment id every variant trains on"""
    steps: int = 3_000
    """environment steps of each run"""
    flow_steps: tuple[int, ...] = (4,)
    """K, the flow steps of the policy; several values make a K sweep (e.g. --flow-steps 4 7 10)"""
    quick: bool = False
    """a short check (under ~5 minutes for one K on 2 CPU cores): sets --steps 800 --learning-starts 200
    --batch-size 32 --log-every 20, whatever those flags say"""
    seed: int = 1
    """seed of every run"""
    batch_size: int = 64
    """replay batch size (smaller than the scripts' 512, for speed)"""
    learning_starts: int = 500
    """random-action steps before the first update"""
    log_every: int = 50
    """environment steps between logged gradient norms"""
    final_points: int = 5
    """the end-of-training norms are the mean of this many last logged values"""


def check_args(args: Args):
    for name in ("steps", "batch_size", "log_every", "final_points"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not args.flow_steps or min(args.flow_steps) <= 0:
        raise SystemExit(f"error: --flow-steps must be positive integers, got {' '.join(map(str, args.flow_steps))}")
    if len(set(args.flow_steps)) != len(args.flow_steps):
        raise SystemExit(f"error: --flow-steps has repeated values: {' '.join(map(str, args.flow_steps))}")
    if args.learning_starts < args.batch_size:
        raise SystemExit(
            f"error: --learning-starts {args.learning_starts} is smaller than --batch-size {args.batch_size}"
        )
    if args.learning_starts + args.log_every > args.steps:
        raise SystemExit(
            f"error: --steps {args.steps} logs nothing after --learning-starts {args.learning_starts} "
            f"with --log-every {args.log_every}"
        )


def script_command(variant: str, flow_steps: int, args: Args) -> list[str]:
    """The command line of one variant's training run (the tests rerun it without --log-grad-norms)."""
    return [
        sys.executable,
        os.path.join(FROM_SCRATCH, f"{VARIANTS[variant]}.py"),
        *("--env-id", args.env_id, "--seed", str(args.seed), "--flow-steps", str(flow_steps)),
        *("--total-timesteps", str(args.steps), "--learning-starts", str(args.learning_starts)),
        *("--batch-size", str(args.batch_size), "--log-every", str(args.log_every), "--log-grad-norms"),
        *("--eval-episodes", "0", "--console-every", str(max(args.steps // 5, 1))),
    ]


def train(variant: str, flow_steps: int, args: Args) -> tuple[int, str | None, str]:
    """Runs one script in <out>; returns its exit code, its new run folder (None if none) and its log file."""
    script = VARIANTS[variant]
    runs_dir = os.path.join(args.out, "runs")
    before = set(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else set()
    command = script_command(variant, flow_steps, args)
    log_path = os.path.join(args.out, f"{variant}_K{flow_steps}.log")
    with open(log_path, "w") as log:
        returncode = subprocess.run(command, cwd=args.out, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    prefix = f"{args.env_id}__{script}__{args.seed}__"
    new = sorted(d for d in (os.listdir(runs_dir) if os.path.isdir(runs_dir) else []) if d not in before)
    run_dirs = [os.path.join(runs_dir, d) for d in new if d.startswith(prefix)]
    return returncode, (run_dirs[-1] if run_dirs else None), log_path


def read_grad_norms(run_dir: str, flow_steps: int) -> dict:
    """A run's grad/ rows: {"steps": [...], "per_step_norm": [[K values], ...], "params_norm": [...]}."""
    by_step: dict[int, dict[str, float]] = {}
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        for row in csv.DictReader(f):
            if row["key"].startswith("grad/"):
                by_step.setdefault(int(row["global_step"]), {})[row["key"]] = float(row["value"])
    step_keys = [f"grad/actor_wrt_A_k{k}" for k in range(flow_steps)]
    # A log before the first actor update holds the initial zeros of the script's actor metrics: not a norm.
    steps = sorted(
        step
        for step, values in by_step.items()
        if all(key in values for key in step_keys) and values["grad/actor_params"] != 0.0
    )
    return {
        "steps": steps,
        "per_step_norm": [[by_step[step][key] for key in step_keys] for step in steps],
        "params_norm": [by_step[step]["grad/actor_params"] for step in steps],
    }


def summarise(over_training: dict, final_points: int) -> tuple[list[float], float]:
    """End-of-training values: the mean of the last `final_points` logged per-step norms and parameter norms."""
    last = over_training["per_step_norm"][-final_points:]
    per_step_norm = [sum(values[k] for values in last) / len(last) for k in range(len(last[0]))]
    params = over_training["params_norm"][-final_points:]
    return per_step_norm, sum(params) / len(params)


def plot(results: dict, args: Args, path: str):
    """Top row: end-of-training norm against k, one panel per K; bottom row: k = 0 and k = K−1 over training."""
    colors = {"naive": "tab:red", "gru": "tab:blue", "transformer": "tab:green"}
    figure, axes = plt.subplots(
        2, len(args.flow_steps), figsize=(6.5 * len(args.flow_steps), 9), squeeze=False, constrained_layout=True
    )
    for column, flow_steps in enumerate(args.flow_steps):
        top, bottom = axes[0, column], axes[1, column]
        for variant, by_k in results.items():
            result = by_k["by_flow_steps"][str(flow_steps)]
            top.plot(range(flow_steps), result["per_step_norm"], "o-", color=colors[variant], label=variant)
            history = result["over_training"]
            first = [values[0] for values in history["per_step_norm"]]
            last = [values[-1] for values in history["per_step_norm"]]
            bottom.plot(history["steps"], first, "-", color=colors[variant], label=f"{variant}, k = 0")
            bottom.plot(history["steps"], last, "--", color=colors[variant], label=f"{variant}, k = {flow_steps - 1}")
        top.set_yscale("log")
        top.set_xticks(range(flow_steps))
        top.set_xlabel("flow step k (backpropagation runs from k = K−1 to k = 0)")
        top.set_ylabel("mean ‖∂ℓ/∂A_k‖₂ at the end of training")
        top.set_title(f"K = {flow_steps}, end of training")
        top.grid(True, which="both", alpha=0.3)
        top.legend()
        bottom.set_yscale("log")
        bottom.set_xlabel("environment step")
        bottom.set_ylabel("mean ‖∂ℓ/∂A_k‖₂")
        bottom.set_title(f"K = {flow_steps}, during training: k = 0 (solid), k = {flow_steps - 1} (dashed)")
        bottom.grid(True, which="both", alpha=0.3)
        bottom.legend(fontsize="small")
    figure.suptitle(
        "Actor loss's gradient w.r.t. each flow step's A_k (batch mean of ‖∂ℓ_i/∂A_k‖₂)\n"
        f"{args.env_id}, {args.steps} steps per run, batch {args.batch_size}, seed {args.seed}"
    )
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main():
    args = tyro.cli(Args)
    if args.quick:
        args = dataclasses.replace(args, **QUICK)
    check_args(args)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    sweep = {variant: {} for variant in VARIANTS}  # variant -> str(K) -> that run's result
    for flow_steps in args.flow_steps:
        for variant in VARIANTS:
            print(f"training {variant} (K = {flow_steps}) on {args.env_id} for {args.steps} steps ...", flush=True)
            run_start = time.time()
            returncode, run_dir, log_path = train(variant, flow_steps, args)
            over_training = read_grad_norms(run_dir, flow_steps) if run_dir else {"steps": []}
            if not over_training["steps"]:
                raise SystemExit(f"error: {variant} (K = {flow_steps}) logged no gradient norms; see {log_path}")
            if returncode != 0:  # e.g. a diverged run: its norms up to the stop are still the result
                print(f"  {variant} stopped early (exit {returncode}); see {log_path}", flush=True)
            per_step_norm, params_norm = summarise(over_training, args.final_points)
            sweep[variant][str(flow_steps)] = {
                "flow_steps": flow_steps,
                "env_id": args.env_id,
                "steps": args.steps,
                "run_dir": run_dir,
                "exit_code": returncode,
                "per_step_norm": per_step_norm,
                "params_norm": params_norm,
                "over_training": over_training,
            }
            norms = ", ".join(f"{value:.3g}" for value in per_step_norm)
            print(
                f"  {(time.time() - run_start) / 60:.1f} min; ‖∂ℓ/∂A_k‖ for k = 0..{flow_steps - 1}: {norms}; "
                f"params {params_norm:.3g}",
                flush=True,
            )
    # The first K's result at the top level of each variant, every K's under "by_flow_steps".
    results = {variant: {**by_k[str(args.flow_steps[0])], "by_flow_steps": by_k} for variant, by_k in sweep.items()}
    json_path = os.path.join(args.out, "grad_norms.json")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2)
    png_path = os.path.join(args.out, "grad_norms.png")
    plot(results, args, png_path)

    print(
        f"\n{args.env_id}, {args.steps} steps, batch {args.batch_size}, seed {args.seed}: mean ‖∂ℓ/∂A_k‖₂ at the end "
        f"of training (mean of the last {args.final_points} logs), and its ratio k = 0 / k = K−1"
    )
    for flow_steps in args.flow_steps:
        for variant, by_k in results.items():
            result = by_k["by_flow_steps"][str(flow_steps)]
            norms = result["per_step_norm"]
            print(
                f"K = {flow_steps:<3} {variant:<12} {' '.join(f'{value:9.4g}' for value in norms)}   "
                f"ratio {norms[0] / norms[-1]:.3g}   params {result['params_norm']:.4g}"
            )
    print(f"wrote {json_path} and {png_path} in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
