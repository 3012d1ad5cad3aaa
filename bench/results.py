"""Results protocols: run a grid of (script, environment, seed) to the end, resumably, and summarise it.

A protocol is a YAML file in bench/protocols/ (data, not code): the runs' scripts, environments, seeds and flags,
optional commands that prepare data, and the metric to report. This tool runs the protocol's runs one at a time,
each as a subprocess of the script exactly as a user would run it, with --checkpoint-every, in <out>/runs/.
Running the same command again skips the finished runs and resumes the interrupted one from its checkpoint
(<out>/state.json records each run's directory and whether it finished).

After every run, and at the end, it writes <summary-dir>/summary.csv (script, env, seed, step, key, value: every
evaluation row of the protocol's metrics, plus a uniformly random policy's return when the protocol asks for it)
and draws <summary-dir>/<key>.png with tools/plot_runs.py (mean and, as the protocol's `band` says, the 95 %
interval over seeds or the lowest to highest seed), and <summary-dir>/runs.json (the finished runs and their wall
time): committed with the summary, it lets a sitting on a fresh clone skip the runs finished elsewhere.

Ctrl-C or SIGTERM is passed on to the running script; the tool then exits (130 or 143) and the next start resumes.
A sitting killed outright (SIGKILL) records nothing; the next start takes up the newest run directory it left behind.

Examples:
    python bench/results.py --protocol cpu-from-scratch           # about 2 hours on 2 CPU cores
    python bench/results.py --protocol cpu-from-scratch --dry-run # list the runs and their commands
    python bench/results.py --protocol paper --only sac_flow_gru  # on a GPU machine or a cluster node

Sittings with disjoint --only lists may run at once on the same --out (one per core, or per node): each records
its runs in state.json without undoing the others' (under a lock on <out>/state.lock), and the summary covers every
run finished so far. --run-index i runs run i of the list alone (the numbering of --dry-run).

On a SLURM cluster, --slurm submits the runs not finished as one job array, one task per run, each task running
--run-index; --slurm-status shows each run's state and writes the summary (bench/slurm.py, docs/long_runs.md):
    python bench/results.py --protocol paper --out /shared/paper --slurm --slurm-gpus 1 --slurm-time 24:00:00
    python bench/results.py --protocol paper --out /shared/paper --slurm-status
"""

import csv
import fcntl
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Annotated

import gymnasium as gym
import numpy as np
import tyro
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/slurm.py, when loaded by path (the tests)
import slurm  # noqa: E402

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
    run_index: int | None = None
    """run only run i of the list --dry-run prints (resumed if it has a checkpoint); with --slurm, submit it alone"""
    prepare_only: bool = False
    """run the protocol's preparation commands only (what the SLURM prepare job runs)"""
    slurm: bool = False
    """submit the runs neither finished nor queued to SLURM as a job array, one task per run (bench/slurm.py)"""
    slurm_status: bool = False
    """print each run's state (finished, running, pending, failed) from SLURM and state.json, write the summary"""
    slurm_partition: str | None = None
    """sbatch --partition (None: the protocol's slurm: partition, else the cluster's default)"""
    slurm_time: str | None = None
    """sbatch --time, e.g. 24:00:00; a run stopped by the limit requeues itself and resumes"""
    slurm_cpus: int | None = None
    """sbatch --cpus-per-task"""
    slurm_gpus: str | None = None
    """GPUs per task, as sbatch --gres=gpu:<this>, e.g. 1 or a100:1"""
    slurm_mem: str | None = None
    """sbatch --mem, e.g. 32G"""
    slurm_option: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """another sbatch option, e.g. qos=high or account=rl (after the protocol's slurm: options)"""
    slurm_max_restarts: int | None = None
    """how often a task requeues itself at its time limit (None: the protocol's, else 10)"""
    slurm_signal_seconds: int | None = None
    """SIGTERM to a task this many seconds before its time limit (None: the protocol's, else 300)"""
    slurm_parallel: int | None = None
    """at most this many array tasks at once (the array's %N; None: as many as the cluster allows)"""


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


def protocol_path(name: str) -> str:
    return name if name.endswith((".yaml", ".yml")) else os.path.join(PROTOCOLS, f"{name}.yaml")


def load_protocol(name: str) -> tuple[str, dict]:
    path = protocol_path(name)
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
    sittings that run disjoint --only subsets of a protocol at once, or SLURM array tasks, keep each other's entries.
    The read-merge-replace holds a lock on <out>/state.lock: without it, two processes that read the same state
    would each replace the file with their own entry added, and the first one's entry would be lost."""
    path = os.path.join(out, "state.json")
    with open(os.path.join(out, "state.lock"), "a") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)  # POSIX record locks work on NFS too (flock may not); released on close
        state = read_state(out)
        state[key] = entry
        with open(f"{path}.{os.getpid()}.tmp", "w") as f:
            json.dump(state, f, indent=1)
        os.replace(f"{path}.{os.getpid()}.tmp", path)
    return state


def unprepared(protocol: dict, out: str) -> list[dict]:
    """The protocol's preparation steps whose product does not exist yet."""
    return [step for step in protocol.get("prepare", []) if not os.path.exists(expand(step["creates"], out))]


def prepare(protocol: dict, out: str):
    """The protocol's preparation commands (e.g. generating a dataset), each skipped when what it creates exists."""
    for step in unprepared(protocol, out):
        creates = expand(step["creates"], out)
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
    Interruption.stop_if_interrupted()  # a signal that came before this child: do not start it
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


def restore_finished_runs(runs: list[Run], out: str, state: dict, summary_dir: str) -> dict:
    """Runs that <summary_dir>/runs.json (committed with the summary) records as finished but this <out> does not
    hold (a fresh clone, or a machine that lost its work tree between sittings) are not run again: each gets a run
    directory rebuilt from its summary.csv rows (args.json and metrics.csv, the protocol's metrics only) and is
    recorded as done in state.json. Returns the updated state."""
    finished_path, summary_path = os.path.join(summary_dir, "runs.json"), os.path.join(summary_dir, "summary.csv")
    if not os.path.exists(finished_path) or not os.path.exists(summary_path):
        return state
    try:
        with open(finished_path) as f:
            finished = {key: entry["seconds"] for key, entry in json.load(f).items() if entry["done"]}
        with open(summary_path, newline="") as f:
            summary_rows = list(csv.DictReader(f))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        fail(f"cannot read {finished_path} or {summary_path} ({error}); restore them with git")
    restored = 0
    for run in runs:
        if run.key not in finished or state.get(run.key, {}).get("done"):
            continue
        run_dir = os.path.join(out, "runs", f"{run.env}__{run.name}__{run.seed}__restored")
        os.makedirs(run_dir, exist_ok=True)
        env_key = run.flags[0].removeprefix("--").replace("-", "_")  # env_id or env_name: the script's own field
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump({"exp_name": run.name, env_key: run.env, "seed": run.seed, "restored_from": summary_path}, f)
        with open(os.path.join(run_dir, "metrics.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["global_step", "key", "value"])
            for row in summary_rows:
                if (row["script"], row["env"], row["seed"]) == (run.name, run.env, str(run.seed)):
                    writer.writerow([row["step"], row["key"], row["value"]])
        state = record_run(out, run.key, {"run_dir": run_dir, "done": True, "seconds": finished[run.key]})
        restored += 1
    if restored:
        print(f"{restored} finished runs restored from {summary_dir} (their run directories were not in {out})")
    return state


def write_summary(protocol_name: str, protocol: dict, runs: list[Run], out: str, state: dict, summary_dir: str):
    """<summary_dir>/summary.csv (the metrics' rows of every run so far), runs.json (which runs finished and their
    wall time, so that a fresh clone skips them: restore_finished_runs) and one figure per metric."""
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
        # The from-scratch tasks (gymnasium ids); offline-to-online names (OGBench, Robomimic) report success instead.
        for env in sorted({run.env for run in runs if run.env in gym.envs.registry}):
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
    with open(os.path.join(summary_dir, "runs.json"), "w") as f:
        finished = {
            r.key: {"done": state[r.key]["done"], "seconds": round(state[r.key]["seconds"])}
            for r in runs
            if r.key in state
        }
        json.dump(finished, f, indent=1)
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


def run_one(name: str, protocol: dict, runs: list[Run], index: int, out: str, state: dict):
    """--run-index: runs (or resumes) run `index` alone; a SLURM array task. The summary is left to
    --summary-only or --slurm-status: tasks that end at once would otherwise write it at once."""
    run = runs[index]
    job_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    expected = slurm.submitted_key(out, job_id, index) if job_id else None
    if expected is not None and expected != run.key:
        fail(f"{name} has changed since job {job_id} was submitted: run {index} is {run.key}, was {expected}")
    if state.get(run.key, {}).get("done"):
        print(f"[{name}] run {index}: {run.key} is done already", flush=True)
        return
    prepare(protocol, out)
    print(f"[{name}] run {index}: {run.key}", flush=True)
    execute(run, out, state)
    print(f"[{name}] run {index}: {run.key} done", flush=True)


def slurm_settings(args: Args, protocol: dict) -> dict:
    flags = {"partition": args.slurm_partition, "time": args.slurm_time, "cpus": args.slurm_cpus}
    flags |= {"gpus": args.slurm_gpus, "mem": args.slurm_mem, "options": args.slurm_option}
    flags |= {"max_restarts": args.slurm_max_restarts, "signal_seconds": args.slurm_signal_seconds}
    return slurm.settings(protocol, flags | {"parallel": args.slurm_parallel})


def slurm_runs(runs: list[Run], out: str, state: dict, dry_run: bool) -> tuple[list[slurm.RunStatus], dict]:
    """Each run's status from its submissions (none yet: every run is finished or not submitted), and the jobs'
    tasks as SLURM shows them."""
    submissions = slurm.read_submissions(out)
    try:
        jobs = slurm.jobs_of(submissions)
    except slurm.SlurmError as error:
        if not dry_run:
            raise
        print(f"note: {error}; taking every run that state.json does not record as done", flush=True)
        submissions, jobs = [], {}
    return slurm.run_statuses([run.key for run in runs], state, submissions, jobs, out), jobs


def submit_to_slurm(args: Args, name: str, protocol: dict, runs: list[Run], out: str, state: dict):
    """--slurm: the runs neither finished nor queued or running, as one job array."""
    config = slurm_settings(args, protocol)
    statuses, jobs = slurm_runs(runs, out, state, args.dry_run)
    chosen = {
        s.index: s.key
        for s in statuses
        if s.status not in ("finished", *slurm.ACTIVE)
        and (args.run_index is None or s.index == args.run_index)
        and (not args.only or runs[s.index].name in args.only)
    }
    active = [s for s in statuses if s.status in slurm.ACTIVE]
    if active:
        print(f"{len(active)} runs queued or running already, not submitted again", flush=True)
    if not chosen:
        print(f"[{name}] nothing to submit: {sum(s.status == 'finished' for s in statuses)}/{len(runs)} runs done")
        return
    command = [sys.executable, os.path.abspath(__file__), "--protocol", os.path.abspath(protocol_path(args.protocol))]
    command += ["--out", out]
    # A preparation still queued or running from an earlier submission is waited for, not started a second time.
    preparing = slurm.active_prepare_job(slurm.read_submissions(out), jobs)
    prepare_job = bool(unprepared(protocol, out)) and preparing is None
    if args.dry_run:
        for index in chosen:
            print(f"{index} {runs[index].key}: python {runs[index].script} {' '.join(runs[index].flags)}")
        if prepare_job:
            print(
                "\n# the prepare job (sbatch --parsable):\n" + slurm.prepare_script(config, name, out, command), end=""
            )
        dependency = " ".join(["sbatch --parsable", *slurm.dependency(preparing or prepare_job and "<prepare job>")])
        print(f"\n# the job array ({dependency}):\n" + slurm.array_script(config, name, out, command, list(chosen)))
        print(f"(dry run: {len(chosen)} runs would be submitted; nothing submitted)")
        return
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    submission = slurm.submit(config, name, out, command, chosen, prepare_job, after=preparing)
    after = f" after the prepare job {submission['prepare_job_id']}" if submission["prepare_job_id"] else ""
    print(f"[{name}] submitted job array {submission['job_id']}{after}: {len(chosen)} runs, one task each")
    print(f"watch it with: python bench/results.py --protocol {args.protocol} --out {out} --slurm-status")


def print_slurm_status(args: Args, name: str, protocol: dict, runs: list[Run], out: str, state: dict):
    """--slurm-status: each run's state, then the summary of what has finished."""
    submissions = slurm.read_submissions(out)
    if not submissions:
        fail(f"no SLURM submission recorded in {out}/slurm.json; submit with --slurm")
    statuses, jobs = slurm_runs(runs, out, state, dry_run=False)
    width = max(len(run.key) for run in runs)
    for s in statuses:
        print(f"{s.index:4d} {s.key:{width}} {s.status:13} {s.detail}")
    prepare_job = submissions[-1].get("prepare_job_id")
    if prepare_job:
        task = (jobs.get(prepare_job) or {}).get(0)
        log = os.path.join(out, "slurm", f"{prepare_job}-prepare.out")
        print(f"prepare job {prepare_job}: {task.state if task else 'gone from SLURM'}; log {log}")
    counts = {status: sum(s.status == status for s in statuses) for status in slurm.STATUSES}
    print(f"[{name}] " + ", ".join(f"{n} {status}" for status, n in counts.items()), flush=True)
    if counts["failed"] or counts["not submitted"]:
        print(f"submit them again with: python bench/results.py --protocol {args.protocol} --out {out} --slurm")
    write_summary(name, protocol, runs, out, state, args.summary_dir or os.path.join(REPO, "docs", "results", name))


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
    if args.run_index is not None and not 0 <= args.run_index < len(runs):
        fail(f"--run-index {args.run_index} is out of range: {name} has runs 0 to {len(runs) - 1}")
    if args.slurm and args.slurm_status:
        fail("--slurm submits, --slurm-status reports: give one of them")
    state = read_state(out)
    try:
        if args.slurm:
            return submit_to_slurm(args, name, protocol, runs, out, state)
        if args.slurm_status:
            return print_slurm_status(args, name, protocol, runs, out, state)
    except slurm.SlurmError as error:
        fail(str(error))
    if args.dry_run:
        for index, run in enumerate(runs):
            print(f"{index} {run.key}: python {run.script} {' '.join(run.flags)}")
        return
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    state = restore_finished_runs(runs, out, state, summary_dir)
    if args.summary_only:
        write_summary(name, protocol, runs, out, state, summary_dir)
        return
    if args.prepare_only:
        return prepare(protocol, out)
    if args.run_index is not None:
        return run_one(name, protocol, runs, args.run_index, out, state)
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
