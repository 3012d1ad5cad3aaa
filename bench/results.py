"""Results protocols: run a grid of (script, environment, seed) to the end, resumably, and summarise it.

A protocol is a YAML file in bench/protocols/ (data, not code): the runs' scripts, environments, seeds and flags,
optional commands that prepare data, and the metric to report. This tool runs the protocol's runs one at a time,
each as a subprocess of the script exactly as a user would run it, with --checkpoint-every, in <out>/runs/.
Running the same command again skips the finished runs and resumes the interrupted one from its checkpoint
(<out>/state.json records each run's directory and whether it finished).

After every run, and at the end, it writes <summary-dir>/summary.csv (script, env, seed, step, key, value: every
evaluation row of the protocol's metrics, plus a uniformly random policy's return when the protocol asks for it)
and draws <summary-dir>/<key>.png with tools/plot_runs.py (mean and, as the protocol's `band` says, the 95 %
interval over seeds or the lowest to highest seed).

Ctrl-C or SIGTERM is passed on to the running script; the tool then exits (130 or 143) and the next start resumes.
A sitting killed outright (SIGKILL) records nothing; the next start takes up the newest run directory it left behind.

Examples:
    python bench/results.py --protocol cpu-from-scratch           # about 2 hours on 2 CPU cores
    python bench/results.py --protocol cpu-from-scratch --dry-run # list the runs and their commands
    python bench/results.py --protocol paper --only sac_flow_gru  # on a GPU machine or a cluster node

Sittings with disjoint --only lists may run at once on the same --out (one per core, or per node): each records
its runs in state.json without undoing the others', and the summary covers every run finished so far.
"""

import csv
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import tyro
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOLS = os.path.join(REPO, "bench", "protocols")


@dataclass
class Args:
    protocol: str = "cpu-from-scratch"
    """the protocol: a name from bench/protocols/ (without .yaml) or the path of a YAML file"""
    out: str | None = None
    """folder for the runs, their console logs and state.json (None: runs/results/<protocol>)"""
    summary_dir: str | None = None
    """folder for summary.csv and the figures (None: docs/results/<protocol>)"""
    only: tuple[str, ...] = ()
    """run only the runs whose script name (e.g. sac_flow_gru, fql) is listed; the summary still covers all"""
    dry_run: bool = False
    """print the runs and their commands, run nothing"""
    summary_only: bool = False
    """write the summary and figures from the runs done so far, run nothing"""


@dataclass
class Run:
    name: str  # the script's exp_name in this protocol (e.g. fql for qc_fql.py --horizon-length 1)
    script: str  # path relative to the repository
    env: str
    seed: int
    flags: list[str]  # every flag but --resume

    @property
    def key(self) -> str:
        return f"{self.name}/{self.env}/{self.seed}"


def fail(message: str):
    raise SystemExit(f"error: {message}")


def load_protocol(name: str) -> tuple[str, dict]:
    path = name if name.endswith((".yaml", ".yml")) else os.path.join(PROTOCOLS, f"{name}.yaml")
    if not os.path.isfile(path):
        known = sorted(f[: -len(".yaml")] for f in os.listdir(PROTOCOLS) if f.endswith(".yaml"))
        fail(f"no protocol {name}; known: {', '.join(known)}")
    try:
        with open(path) as f:
            protocol = yaml.safe_load(f)
    except yaml.YAMLError as error:
        fail(f"cannot read protocol {path}: {error}")
    missing = {"groups", "metrics", "checkpoint_every"} - set(protocol if isinstance(protocol, dict) else {})
    if missing:
        fail(f"protocol {path} lacks {', '.join(sorted(missing))}")
    return os.path.splitext(os.path.basename(path))[0], protocol


def expand(value, out: str):
    return str(value).replace("{out}", out)


def as_flags(flags: dict, out: str) -> list[str]:
    result = []
    for flag, value in (flags or {}).items():
        if isinstance(value, bool):
            result.append(f"--{flag}" if value else f"--no-{flag}")
        elif isinstance(value, list):  # a tuple-valued flag: --critic-hidden-dims 256 256
            result += [f"--{flag}", *(expand(item, out) for item in value)]
        else:
            result += [f"--{flag}", expand(value, out)]
    return result


def protocol_runs(protocol: dict, out: str) -> list[Run]:
    """The grid in protocol order: for each group, env, seed, script."""
    runs = []
    for group in protocol["groups"]:
        for env in group["envs"]:
            for seed in group["seeds"]:
                for entry in group["scripts"]:
                    entry = {"script": entry} if isinstance(entry, str) else entry
                    name = entry.get("name", os.path.splitext(os.path.basename(entry["script"]))[0])
                    flags = [f"--{group['env_flag']}", env, "--seed", str(seed), "--exp-name", name]
                    flags += ["--checkpoint-every", str(protocol["checkpoint_every"])]
                    flags += as_flags(group.get("flags"), out) + as_flags(entry.get("flags"), out)
                    runs.append(Run(name, entry["script"], env, seed, flags))
    return runs


def read_state(out: str) -> dict:
    path = os.path.join(out, "state.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        fail(f"cannot read {path} ({error}); move it away to start the protocol anew")


def record_run(out: str, key: str, entry: dict) -> dict:
    """Writes one run's entry into <out>/state.json, merged with what is there now, and returns the merged state:
    sittings that run disjoint --only subsets of a protocol at once keep each other's entries."""
    state = read_state(out)
    state[key] = entry
    path = os.path.join(out, "state.json")
    with open(f"{path}.{os.getpid()}.tmp", "w") as f:
        json.dump(state, f, indent=1)
    os.replace(f"{path}.{os.getpid()}.tmp", path)
    return state


def prepare(protocol: dict, out: str):
    """The protocol's preparation commands (e.g. generating a dataset), each skipped when what it creates exists."""
    for step in protocol.get("prepare", []):
        creates = expand(step["creates"], out)
        if os.path.exists(creates):
            continue
        command = [sys.executable, os.path.join(REPO, step["script"]), *as_flags(step.get("flags"), out)]
        print(f"preparing {creates}: {' '.join(command[1:])}", flush=True)
        returncode = run_child(command, os.path.join(out, "prepare.log"))
        if returncode != 0:
            fail(f"preparation failed (exit {returncode}); see {out}/prepare.log")


class Interruption:
    """SIGINT/SIGTERM: passed on once to the running script (which ends cleanly), then this tool stops."""

    signal: int | None = None
    child: subprocess.Popen | None = None

    @classmethod
    def handle(cls, signum, _frame):
        if cls.signal is None and cls.child is not None and cls.child.poll() is None:
            cls.child.send_signal(signum)
        cls.signal = signum

    @classmethod
    def stop_if_interrupted(cls):
        if cls.signal is not None:
            print(f"interrupted ({signal.Signals(cls.signal).name}); run the same command again to resume", flush=True)
            raise SystemExit(128 + cls.signal)


def run_child(command: list[str], log_path: str, cwd: str | None = None) -> int:
    """Runs command, its output shown and appended to log_path. Its own session: a Ctrl-C in the terminal reaches it
    once, through Interruption, not twice."""
    with open(log_path, "a") as log:
        child = subprocess.Popen(
            command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        Interruption.child = child
        for line in child.stdout:
            sys.stdout.write("    " + line)
            sys.stdout.flush()
            log.write(line)
            log.flush()
        returncode = child.wait()
        Interruption.child = None
    Interruption.stop_if_interrupted()
    return returncode


def new_run_dir(out: str, run: Run, known: set[str]) -> str | None:
    """The newest directory of this run not in `known` (None if there is none)."""
    pattern = os.path.join(out, "runs", f"{run.env}__{run.name}__{run.seed}__*")
    candidates = [d for d in glob.glob(pattern) if d not in known and os.path.isdir(d)]
    return max(candidates, key=os.path.getmtime) if candidates else None


def execute(run: Run, out: str, state: dict) -> float:
    """Runs (or resumes) one run to its end; returns the wall time it took in this sitting."""
    entry = state.get(run.key, {})
    # A sitting killed outright (SIGKILL, the end of a batch job) records nothing: take up the run it left behind.
    run_dir = entry.get("run_dir") or new_run_dir(out, run, known=set())
    command = [sys.executable, os.path.join(REPO, run.script)]
    if run_dir and os.path.exists(os.path.join(run_dir, "checkpoint.flax")):
        command += ["--resume", os.path.relpath(run_dir, out)]
    else:
        if run_dir and os.path.exists(run_dir):  # interrupted before its first checkpoint: keep it out of the plots
            abandoned = os.path.join(out, "abandoned", os.path.basename(run_dir))
            os.makedirs(os.path.dirname(abandoned), exist_ok=True)
            shutil.move(run_dir, abandoned)
            print(f"{run_dir} had no checkpoint; moved to {abandoned}, starting the run anew")
        command += run.flags
    known = set(glob.glob(os.path.join(out, "runs", "*")))
    log_path = os.path.join(out, "logs", run.key.replace("/", "__") + ".log")
    start = time.time()
    returncode = None
    try:
        log_size = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        returncode = run_child(command, log_path, cwd=out)
        with open(log_path) as f:
            f.seek(log_size)
            # Stopped after its last checkpoint, which the scripts write after the final evaluation: complete.
            if returncode != 0 and "already; give a larger" in f.read():
                returncode = 0
    finally:
        if not run_dir or not os.path.exists(run_dir):
            run_dir = new_run_dir(out, run, known)
        seconds = entry.get("seconds", 0.0) + time.time() - start
        state.update(record_run(out, run.key, {"run_dir": run_dir, "done": returncode == 0, "seconds": seconds}))
    if returncode != 0:
        fail(f"{run.key} failed (exit {returncode}); its log: {log_path}")
    return time.time() - start


def random_policy_return(env_id: str, episodes: int = 10, seed: int = 0) -> float:
    """The mean return of uniformly random actions, the floor every method must clear."""
    env = gym.wrappers.RecordEpisodeStatistics(gym.make(env_id))
    env.action_space.seed(seed)
    returns = []
    for episode in range(episodes):
        env.reset(seed=seed + episode)
        done = False
        while not done:
            _, _, terminated, truncated, info = env.step(env.action_space.sample())
            done = terminated or truncated
        returns.append(float(info["episode"]["r"]))
    env.close()
    return float(np.mean(returns))


def write_summary(protocol_name: str, protocol: dict, runs: list[Run], out: str, state: dict, summary_dir: str):
    rows = []
    for run in runs:
        run_dir = state.get(run.key, {}).get("run_dir")
        path = os.path.join(run_dir, "metrics.csv") if run_dir else None
        if not path or not os.path.exists(path):
            continue
        with open(path, newline="") as f:  # both folders label a row with the steps done (docs/design.md)
            for step, key, value in list(csv.reader(f))[1:]:
                if key in protocol["metrics"]:
                    rows.append([run.name, run.env, run.seed, int(step), key, float(value)])
    if protocol.get("random_policy_episodes"):
        cache = os.path.join(out, "random_policy.json")
        returns = {}
        if os.path.exists(cache):
            with open(cache) as f:
                returns = json.load(f)
        for env in sorted({run.env for run in runs}):
            if env not in returns:
                returns[env] = random_policy_return(env, protocol["random_policy_episodes"])
            rows.append(["random", env, 0, 0, "eval/episodic_return", returns[env]])
        with open(cache, "w") as f:
            json.dump(returns, f)
    os.makedirs(summary_dir, exist_ok=True)
    with open(os.path.join(summary_dir, "summary.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["script", "env", "seed", "step", "key", "value"])
        writer.writerows(rows)
    for key in protocol["metrics"]:
        if any(row[4] == key for row in rows if row[0] != "random"):
            figure = os.path.join(summary_dir, key.replace("/", "_") + ".png")
            command = [sys.executable, os.path.join(REPO, "tools", "plot_runs.py"), "--runs-dir"]
            command += [os.path.join(out, "runs"), "--key", key, "--out", figure, "--overwrite"]
            command += ["--band", protocol.get("band", "ci")]
            subprocess.run(command, check=False, stdout=subprocess.DEVNULL, start_new_session=True)
    print(f"{protocol_name}: {len(rows)} rows in {summary_dir}/summary.csv", flush=True)


def eta_text(runs: list[Run], todo: list[Run], state: dict) -> str:
    """Time left: each remaining run takes the mean time of the finished runs of its script (else of all runs)."""
    finished = {r.key: state[r.key]["seconds"] for r in runs if state.get(r.key, {}).get("done")}
    if not finished:
        return "unknown until a run finishes"
    overall = np.mean(list(finished.values()))
    by_script = {r.name: [t for key, t in finished.items() if key.startswith(r.name + "/")] for r in todo}
    seconds = sum(np.mean(by_script[r.name]) if by_script[r.name] else overall for r in todo)
    return f"{seconds / 3600:.1f} h"


def main():
    args = tyro.cli(Args)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, Interruption.handle)
    name, protocol = load_protocol(args.protocol)
    out = os.path.abspath(args.out or os.path.join("runs", "results", name))
    summary_dir = args.summary_dir or os.path.join(REPO, "docs", "results", name)
    runs = protocol_runs(protocol, out)
    if args.only and not {run.name for run in runs} & set(args.only):
        fail(f"--only {' '.join(args.only)} names none of {', '.join(sorted({run.name for run in runs}))}")
    if args.dry_run:
        for run in runs:
            print(f"{run.key}: python {run.script} {' '.join(run.flags)}")
        return
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    state = read_state(out)
    if args.summary_only:
        write_summary(name, protocol, runs, out, state, summary_dir)
        return
    prepare(protocol, out)
    todo = [run for run in runs if not state.get(run.key, {}).get("done") and (not args.only or run.name in args.only)]
    start = time.time()
    for i, run in enumerate(todo):
        done = sum(1 for r in runs if state.get(r.key, {}).get("done"))
        print(
            f"[{name}] run {done + 1}/{len(runs)}: {run.key} | {len(todo) - i} left this sitting, "
            f"ETA {eta_text(runs, todo[i:], state)} | this sitting {(time.time() - start) / 3600:.2f} h",
            flush=True,
        )
        execute(run, out, state)
        write_summary(name, protocol, runs, out, state, summary_dir)
        Interruption.stop_if_interrupted()
    if not todo:
        write_summary(name, protocol, runs, out, state, summary_dir)
    print(f"[{name}] {sum(1 for r in runs if state.get(r.key, {}).get('done'))}/{len(runs)} runs done", flush=True)


if __name__ == "__main__":
    main()
