"""Learning check: does each from-scratch script learn a quick task?

Trains every script of from_scratch/ (Gaussian SAC, Naive SAC Flow, SAC Flow-G, SAC Flow-T) one after the
other as a subprocess, as a user would run it, on a task that SAC solves in a few thousand steps
(InvertedPendulum-v4: the return is the number of steps balanced, at most 1000). Each run's metrics.csv
gives the final deterministic evaluation return; a script passes when it reaches --threshold.

Runs go to <out>/runs/<run_name>, each script's console output to <out>/<script>.log. The exit code is 0
only when every script passes.

Example (about 5-10 minutes per flow script on 2 shared CPU cores; the flow scripts reach 1000 by step 2000):
    python bench/learning_check.py --scripts sac_flow_gru sac_flow_transformer
"""

import csv
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import tyro

FROM_SCRATCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "from_scratch")
SCRIPTS = ("sac", "sac_flow_naive", "sac_flow_gru", "sac_flow_transformer")


@dataclass
class Args:
    env_id: str = "InvertedPendulum-v4"
    """the gymnasium environment id every script trains on"""
    total_timesteps: int = 5_000
    """environment steps of each run"""
    scripts: tuple[str, ...] = SCRIPTS
    """the from_scratch/ scripts to check (file stems)"""
    out: str = "runs/learning_check"
    """folder for the runs (<out>/runs/...) and the console logs (<out>/<script>.log)"""
    threshold: float = 700.0
    """final evaluation return that counts as learned (InvertedPendulum-v4's maximum is 1000)"""
    seed: int = 1
    """seed of every run"""
    batch_size: int = 128
    """replay batch size (smaller than the scripts' 512, for speed)"""
    learning_starts: int = 1_000
    """random-action steps before the first update"""
    eval_every: int = 1_000
    """environment steps between evaluations"""
    eval_episodes: int = 5
    """episodes per evaluation"""


def check_args(args: Args):
    unknown = [name for name in args.scripts if name not in SCRIPTS]
    if unknown or not args.scripts:
        raise SystemExit(f"error: --scripts must name some of {', '.join(SCRIPTS)}; got {' '.join(args.scripts)}")
    for name in ("total_timesteps", "batch_size", "eval_every", "eval_episodes"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.learning_starts >= args.total_timesteps:
        raise SystemExit(
            f"error: --learning-starts {args.learning_starts} leaves no training in --total-timesteps {args.total_timesteps}"
        )


def eval_returns(run_dir: str) -> list[float]:
    """The eval/episodic_return values of a run's metrics.csv, in order."""
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return [float(row["value"]) for row in csv.DictReader(f) if row["key"] == "eval/episodic_return"]


def train(script: str, args: Args) -> tuple[int, str | None, float]:
    """Runs one script in <out>; returns its exit code, its new run folder (None if none) and the seconds it took."""
    runs_dir = os.path.join(args.out, "runs")
    before = set(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else set()
    command = [
        sys.executable,
        os.path.join(FROM_SCRATCH, f"{script}.py"),
        *("--env-id", args.env_id, "--seed", str(args.seed)),
        *("--total-timesteps", str(args.total_timesteps), "--learning-starts", str(args.learning_starts)),
        *("--batch-size", str(args.batch_size), "--eval-every", str(args.eval_every)),
        *("--eval-episodes", str(args.eval_episodes), "--console-every", str(args.eval_every)),
    ]
    start = time.time()
    with open(os.path.join(args.out, f"{script}.log"), "w") as log:
        returncode = subprocess.run(command, cwd=args.out, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.time() - start
    prefix = f"{args.env_id}__{script}__{args.seed}__"
    new = sorted(d for d in (os.listdir(runs_dir) if os.path.isdir(runs_dir) else []) if d not in before)
    run_dirs = [os.path.join(runs_dir, d) for d in new if d.startswith(prefix)]
    return returncode, (run_dirs[-1] if run_dirs else None), seconds


def main():
    args = tyro.cli(Args)
    check_args(args)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for script in args.scripts:
        print(f"training {script} on {args.env_id} for {args.total_timesteps} steps ...", flush=True)
        returncode, run_dir, seconds = train(script, args)
        returns = eval_returns(run_dir) if run_dir and returncode == 0 else []
        if not returns:
            result = f"ERROR (exit {returncode}, see {os.path.join(args.out, script + '.log')})"
            rows.append((script, float("nan"), float("nan"), seconds, result))
        else:
            result = "PASS" if returns[-1] >= args.threshold else "FAIL"
            rows.append((script, returns[-1], max(returns), seconds, result))
        print(
            f"  {result} in {seconds / 60:.1f} min; evaluations: {', '.join(f'{r:.0f}' for r in returns)}", flush=True
        )

    print(
        f"\n{args.env_id}, {args.total_timesteps} steps, seed {args.seed}, learned = final eval ≥ {args.threshold:.0f}"
    )
    print(f"{'script':<22} {'final eval':>10} {'best eval':>10} {'minutes':>8}  result")
    for script, final, best, seconds, result in rows:
        print(f"{script:<22} {final:>10.1f} {best:>10.1f} {seconds / 60:>8.1f}  {result}")
    if any(row[-1] != "PASS" for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
