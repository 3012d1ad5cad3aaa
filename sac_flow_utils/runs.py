"""A run's life outside the algorithm: its directory, lock and args.json; metrics.csv and wandb; the stop signals and
the divergence stop; console progress; the allocator setting every script starts with.

Step convention, in both folders: a row of metrics.csv is labelled with the number of steps completed when it was
logged, and a checkpoint of step N holds the state after N steps, so a resume keeps the rows labelled <= N."""

import csv
import ctypes
import dataclasses
import fcntl
import json
import os
import signal
import sys
import time
import uuid

import flax
import jax
import numpy as np


def new_run_dir(env_name: str, exp_name: str, seed: int, timestamp: int) -> str:
    run_dir = os.path.join("runs", f"{env_name}__{exp_name}__{seed}__{timestamp}")
    if os.path.exists(run_dir):
        raise SystemExit(f"error: {run_dir} already exists; not overwriting it")
    return run_dir


def lock_run_dir(run_dir: str):
    """Holds runs/<run_name>/.lock while the process lives (the system releases it however the process ends), so
    that a second process started on the same run (a resume run twice at once) refuses instead of mixing the two."""
    os.makedirs(run_dir, exist_ok=True)
    lock = open(os.path.join(run_dir, ".lock"), "w")  # noqa: SIM115  (open for the life of the run)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise SystemExit(f"error: {run_dir} is in use by another process of this run; not starting a second one")
    return lock


class MetricsLog:
    """Appends every metric to runs/<run_name>/metrics.csv and, with a wandb run, sends it there too.

    On resume from a checkpoint of step N, the rows labelled after N (logged by the interrupted run after its
    checkpoint) are dropped, since the resumed run logs those steps again, and the file is appended to.
    """

    def __init__(self, run_dir: str, wandb_run=None, resume_step: int | None = None):
        self.wandb_run = wandb_run
        path = os.path.join(run_dir, "metrics.csv")
        if resume_step is not None:
            kept, dropped = rows_up_to(path, resume_step)
            with open(path + ".tmp", "w", newline="") as f:
                csv.writer(f).writerows([["global_step", "key", "value"], *kept])
            os.replace(path + ".tmp", path)
            print(f"resuming from step {resume_step}: dropped {dropped} later rows of metrics.csv", flush=True)
        self.file = open(path, "w" if resume_step is None else "a", newline="")  # noqa: SIM115
        self.writer = csv.writer(self.file)
        if resume_step is None:
            self.writer.writerow(["global_step", "key", "value"])

    def log(self, global_step: int, metrics: dict):
        try:
            for key, value in metrics.items():
                self.writer.writerow([global_step, key, float(value)])
            self.file.flush()
        except OSError as error:  # e.g. a full disk
            raise SystemExit(f"error: cannot write {self.file.name} at step {global_step} ({error.strerror or error})")
        if self.wandb_run is not None:
            self.wandb_run.log({key: float(value) for key, value in metrics.items()}, step=global_step)

    def close(self, exit_code: int = 0):
        self.file.close()
        if self.wandb_run is not None:
            if exit_code != 0:  # stopped by a signal: wandb shows the run as preempted, to be resumed
                self.wandb_run.mark_preempting()
            self.wandb_run.finish(exit_code=exit_code)


def rows_up_to(path: str, step: int) -> tuple[list, int]:
    """The rows of metrics.csv labelled <= `step`, and how many others there are. A last row cut short (the process
    died while writing it) counts as dropped; any other row that is not global_step,key,value stops the resume with
    one line, before anything is changed."""
    try:
        with open(path, newline="") as f:
            header, *rows = list(csv.reader(f))
    except (OSError, ValueError, csv.Error) as error:
        raise SystemExit(f"error: cannot read {path} ({error}); nothing was changed")
    if header != ["global_step", "key", "value"]:
        raise SystemExit(f"error: {path} does not start with global_step,key,value; nothing was changed")
    kept = []
    for line, row in enumerate(rows, start=2):
        try:
            row_step, _, _ = int(row[0]), row[1], float(row[2])
            well_formed = len(row) == 3
        except (IndexError, ValueError):
            well_formed = False
        if not well_formed:
            if line == len(rows) + 1:
                continue  # cut short by the interruption
            raise SystemExit(f"error: {path} line {line} is not global_step,key,value: {row}; nothing was changed")
        if row_step <= step:
            kept.append(row)
    return kept, len(rows) - len(kept)


def open_runs(args, env_name: str, seeds: list, checkpoint: dict | None):
    """The run directories of `seeds` (with --resume: the resumed one), locked, with their args.json, wandb runs (with
    --track; one group for several seeds) and MetricsLogs: (run_dirs, wandb_ids, metrics logs, locks)."""
    timestamp = int(time.time())
    if checkpoint is None:
        run_dirs = [new_run_dir(env_name, args.exp_name, seed, timestamp) for seed in seeds]
        wandb_ids = [uuid.uuid4().hex[:8] for _ in seeds]
    else:
        run_dirs, wandb_ids = [args.resume], [checkpoint["wandb_id"]]
    locks = [lock_run_dir(run_dir) for run_dir in run_dirs]
    group = f"{env_name}__{args.exp_name}__{timestamp}" if len(seeds) > 1 else None
    resume_step = None if checkpoint is None else int(checkpoint["step"])
    one_seed = {"num_seeds": 1} if hasattr(args, "num_seeds") else {}
    logs = [  # each seed's args.json describes a single-seed run of that seed, so it can be resumed on its own
        open_run(run_dir, dataclasses.replace(args, seed=seed, resume=None, **one_seed), wandb_id, resume_step, group)
        for seed, run_dir, wandb_id in zip(seeds, run_dirs, wandb_ids)
    ]
    return run_dirs, wandb_ids, logs, locks


def open_run(run_dir: str, args, wandb_id: str, resume_step: int | None, group: str | None):
    """Writes the run's args.json (what --resume reads back), starts its wandb run with --track (the same id on
    resume, so the curves continue) and returns its MetricsLog."""
    config = dataclasses.asdict(args)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(config, f, indent=2)
    wandb_run = None
    if args.track:
        import wandb  # only with --track: importing it takes seconds

        wandb_run = wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            name=os.path.basename(run_dir),
            group=group,
            id=wandb_id,
            resume="allow",
            config=config,
            dir=run_dir,
            reinit="create_new",
        )
    return MetricsLog(run_dir, wandb_run, resume_step)


def catch_stop_signals() -> dict:
    """SIGINT (Ctrl-C) and SIGTERM (what clusters send before they preempt a job) only record the signal: the loop
    ends after its current step (or block of updates), writes the checkpoint and exits. A second Ctrl-C exits at once
    (a checkpoint being written then stays a .tmp file and the previous one is kept); further SIGTERMs change nothing,
    since a scheduler may send one to every process of the job and to the batch script that passes it on."""
    stop = {"signal": None}

    def handle(signum, _frame):
        if stop["signal"] is None:
            stop["signal"] = signum
        elif signum == signal.SIGINT:
            print("stopped at once by a second Ctrl-C (SIGINT)", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handle)
    return stop


def exit_interrupted(signum: int, step: int, total_steps: int, checkpoint_step: int | None, run_dirs: list):
    """The last line of a run stopped by a signal, with the command that continues it; exits 128 + signum."""
    if checkpoint_step is None:
        continuation = "no checkpoint was written (--no-checkpoint-on-exit), so it cannot be continued"
    else:
        commands = " ; ".join(f"python {sys.argv[0]} --resume {run_dir}" for run_dir in run_dirs)
        continuation = f"checkpoint at step {checkpoint_step}; continue with: {commands}"
    name = signal.Signals(signum).name
    print(f"interrupted by {name} at step {step}/{total_steps}; {continuation}", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def nonfinite_names(groups: dict) -> list[str]:
    """The names of the groups (name -> scalar or pytree) that hold a non-finite number; a scalar shows its value."""
    names = []
    for name, tree in groups.items():
        if not all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)):
            names.append(f"{name}={float(tree)}" if np.ndim(tree) == 0 else name)
    return names


def stop_on_divergence(run_dir: str, step: int, metrics: dict, state: dict, checkpoint_step: int | None):
    """Saves `state` to runs/<run_name>/nonfinite_state.flax for inspection and ends the run with one line naming the
    non-finite losses (else the parameter groups of `state`), the step and the last checkpoint (only ever written
    from a finite state)."""
    path = os.path.join(run_dir, "nonfinite_state.flax")
    with open(path, "wb") as f:
        f.write(flax.serialization.to_bytes(state))
    if checkpoint_step is None:
        kept = "no checkpoint was written (use --checkpoint-every N)"
    else:
        kept = f"last finite checkpoint: {os.path.join(run_dir, 'checkpoint.flax')} (step {checkpoint_step})"
    bad = nonfinite_names(metrics) or nonfinite_names(state) or ["action proposed by the updated policy"]
    raise SystemExit(f"error: non-finite {', '.join(bad)} at step {step}; state saved to {path}; {kept}")


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(max(seconds, 0)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    """The console's progress lines: `step s/total | <phase>: <rate> <unit>, <ETA> left | <status>`, at least every
    30 s and at the end of each phase. Rate and ETA are those of the current phase, evaluations left out. The first
    step of a phase compiles its jitted call: its line says so, and the rate is measured from after it."""

    def __init__(self, total_steps: int, step: int, every_seconds: float = 30.0):
        self.total_steps, self.every_seconds = total_steps, every_seconds
        self.printed = self.window_time = time.time()
        self.window_step = step

    def phase(self, name: str, step: int, last_step: int, unit: str = "steps/s", compiles: bool = True):
        """Starts phase `name` after `step` steps; it ends at `last_step`."""
        self.name, self.start_step, self.last_step, self.unit = name, step, last_step, unit
        self.start_time, self.compiled = time.time(), not compiles

    def leave_out(self, seconds: float):
        """Time the rates leave out (an evaluation)."""
        self.start_time += seconds
        self.window_time += seconds

    def rate(self, step: int) -> float:
        """Steps per second since the previous call (or the start): the speed row of metrics.csv."""
        now = time.time()
        rate = (step - self.window_step) / max(now - self.window_time, 1e-9)
        self.window_step, self.window_time = step, now
        return rate

    def report(self, step: int, status: str = "", force: bool = False):
        now = time.time()
        if not self.compiled:
            seconds = now - self.printed  # since the previous line, or the start
            print(f"step {step}/{self.total_steps} | {self.name}: compiled and took the first step in {seconds:.0f}s")
            self.start_step, self.start_time, self.printed, self.compiled = step, now, now, True
        elif force or step == self.last_step or now - self.printed >= self.every_seconds:
            rate = (step - self.start_step) / max(now - self.start_time, 1e-9)
            eta = format_duration((self.last_step - step) / max(rate, 1e-9))
            line = f"step {step}/{self.total_steps} | {self.name}: {rate:.1f} {self.unit}, {eta} left"
            print(line + (f" | {status}" if status else ""), flush=True)
            self.printed = now


def reuse_freed_memory():
    """Linux (glibc): keep the memory that XLA frees for its next call instead of returning it to the system.

    Every call of a train step allocates its temporary arrays anew (~65 MB for the CrossQ critic at batch 512). By
    default glibc maps blocks that large freshly from the system and unmaps them when they are freed, so every call
    page-faults them in again; served from the heap, the train step ran 10-25 % faster on a 2-core CPU
    (bench/speed.py --default-malloc shows the difference). Elsewhere (macOS, musl) nothing changes.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters, from glibc's <malloc.h>
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**30)
