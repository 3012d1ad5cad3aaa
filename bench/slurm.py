"""A results protocol on SLURM: one job array, one array task per run (used by bench/results.py --slurm).

`python bench/results.py --protocol NAME --out DIR --slurm` writes an `sbatch --array` script whose task i runs
`python bench/results.py --protocol NAME --out DIR --run-index i`: run i of the protocol's run list (the order of
--dry-run), resumed from its checkpoint when its run directory has one. The runs, their console logs, state.json
and the summary live in DIR, which every node must see (a shared file system). Each submission is recorded in
DIR/slurm.json (the array job id and the run of each task), its script in DIR/slurm/<job id>.sbatch and each task's
output in DIR/slurm/<job id>_<task>.out, appended to across restarts.

- Finished runs (state.json "done") and runs queued or running in an earlier submission are not submitted, so
  the same command submits what failed (or was never submitted), and `--run-index i` with --slurm submits one run.
- The protocol's `prepare` commands (a dataset to generate) run as a job of their own that the array depends on
  (afterok; the array is cancelled if it fails), not on the login node: generating cube-triple's dataset is CPU
  work that login nodes are not meant for, and the submission returns at once. Nothing to prepare: no such job.
- Time limits and preemption: the script asks for SIGTERM to the batch shell N seconds before the time limit
  (`--signal=B:TERM@N`; without B: a batch script without srun gets no signal at all), passes it on to the run
  (which writes its checkpoint and exits 143) and requeues its own task, up to max_restarts times
  (SLURM_RESTART_COUNT counts every restart, preemptions too). A preemption (or `scontrol requeue`) SIGTERMs every
  process of the task and puts it back in the queue itself; the run checkpoints the same way. `--requeue` allows
  both, `--open-mode=append` keeps the earlier sittings' output (SLURM truncates it on a restart otherwise).
- `--slurm-status` reads each task's state with `scontrol -o show job <job id>` (state, reason, restarts and exit
  code, one line per task) and, for a job SLURM has forgotten (MinJobAge after its end), falls back to state.json.

Why a generated sbatch script and not submitit: submitit would add a dependency, cloudpickles a Python callable
into the shared folder and runs it through srun, so the nodes need the same environment to unpickle it, and it
learns a task's state only from sacct, which needs slurmdbd (accounting): without it every task stays UNKNOWN. The
runs here are plain commands that already checkpoint on SIGTERM, so the array, the signal forwarding and the
requeue are a few lines of bash, and squeue/scontrol work with or without accounting.

Settings come from a `slurm:` mapping in the protocol file and from results.py's --slurm-* flags (the flags win):
partition, time, cpus (per task), gpus (per task, as --gres=gpu:<gpus>, e.g. 1 or a100:1), mem, options (extra
sbatch options, e.g. [qos=high, account=rl]), max_restarts, signal_seconds and parallel (at most this many tasks at
once, the array's %N).
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass

DEFAULTS = {
    "partition": None,
    "time": None,
    "cpus": None,
    "gpus": None,
    "mem": None,
    "options": [],
    "max_restarts": 10,
    "signal_seconds": 300,
    "parallel": None,
}
# SLURM job states (squeue(1) "JOB STATE CODES") by what they mean for a run that has not finished.
RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "RESIZING", "SUSPENDED", "STOPPED"}
PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
STATUSES = ("finished", "running", "pending", "failed", "not submitted")  # of a run, as --slurm-status shows it
ACTIVE = {"running", "pending"}


class SlurmError(Exception):
    """Bad settings or a SLURM command that failed; results.py prints it as one `error:` line."""


def settings(protocol: dict, flags: dict) -> dict:
    """The protocol's `slurm:` mapping, then the flags given (None or empty: not given), over the defaults."""
    from_protocol = protocol.get("slurm") or {}
    if not isinstance(from_protocol, dict):
        raise SlurmError("the protocol's slurm: must be a mapping (e.g. {gpus: 1, cpus: 4})")
    unknown = set(from_protocol) - set(DEFAULTS)
    if unknown:
        raise SlurmError(f"unknown slurm setting {', '.join(sorted(unknown))}; known: {', '.join(DEFAULTS)}")
    result = {**DEFAULTS, **from_protocol}
    result.update({key: value for key, value in flags.items() if value not in (None, (), []) and key != "options"})
    # Extra options add up: the flags' come after the protocol's, and sbatch takes the last of a repeated option.
    options = result["options"]
    result["options"] = [*([options] if isinstance(options, str) else options), *flags.get("options", ())]
    if isinstance(result["time"], int):  # YAML 1.1 reads 24:00:00 unquoted as 86400 (base 60)
        raise SlurmError(f'give the slurm time as a quoted string, e.g. "24:00:00", not {result["time"]}')
    for key in ("max_restarts", "signal_seconds", "parallel", "cpus"):
        value = result[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise SlurmError(f"slurm setting {key} must be a whole number >= 0, not {value!r}")
    return result


def array_spec(indices: list[int]) -> str:
    """[0, 1, 2, 4, 6, 7] -> "0-2,4,6-7" (sbatch --array's syntax)."""
    parts, indices = [], sorted(indices)
    start = previous = indices[0]
    for index in [*indices[1:], None]:
        if index is not None and index == previous + 1:
            previous = index
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = index
    return ",".join(parts)


def expand_spec(spec: str) -> list[int]:
    """scontrol's ArrayTaskId of tasks not yet started, e.g. "3-5,7%2" or "0-8:2", -> the task indices."""
    indices = []
    for part in spec.split("%")[0].split(","):
        bounds, _, step = part.partition(":")
        first, _, last = bounds.partition("-")
        indices += range(int(first), int(last or first) + 1, int(step or 1))
    return indices


def header(config: dict, job_name: str, out: str, output: str) -> list[str]:
    """The #SBATCH lines every job of a protocol shares; the extra options come last, so they can override."""
    lines = [
        f"--job-name={job_name}",
        f"--chdir={out}",  # the shared folder; the submitting directory may not exist on the nodes
        f"--output={output}",
        "--open-mode=append",  # a restart appends to the earlier sittings' output instead of truncating it
        "--requeue",  # may be put back in the queue: by a preemption, or by this script at the time limit
        f"--signal=B:TERM@{config['signal_seconds']}",  # B: to this batch shell, which has no srun steps
    ]
    if config["partition"]:
        lines.append(f"--partition={config['partition']}")
    if config["time"]:
        lines.append(f"--time={config['time']}")
    if config["cpus"]:
        lines.append(f"--cpus-per-task={config['cpus']}")
    if config["gpus"]:
        lines.append(f"--gres=gpu:{config['gpus']}")
    if config["mem"]:
        lines.append(f"--mem={config['mem']}")
    lines += ["--" + option.lstrip("-") for option in config["options"]]
    return [f"#SBATCH {line}" for line in lines]


def body(command: str, requeue_target: str, max_restarts: int) -> list[str]:
    """Runs `command` in the background and waits for it; SIGTERM is passed on to it and, when it stopped without
    finishing, the job requeues itself (the run then resumes from the checkpoint it wrote on the signal)."""
    return [
        "set -u",
        "restarts=${SLURM_RESTART_COUNT:-0}  # unset on the first start",
        'echo "[$(date "+%F %T")] job ${SLURM_JOB_ID} on $(hostname), restart ${restarts}"',
        "child=",
        "on_term() {",
        "  # Our own requeue SIGTERMs every process of the job again: ignore it from now on.",
        "  trap '' TERM",
        '  echo "[$(date "+%F %T")] SIGTERM: passing it on; the run writes its checkpoint and stops"',
        "  status=143",
        '  if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; wait "$child"; status=$?; fi',
        f'  if [ "$status" -ne 0 ] && [ "$restarts" -lt {max_restarts} ]; then',
        f'    echo "requeueing (restart $((restarts + 1)) of at most {max_restarts})"',
        f'    scontrol requeue "{requeue_target}" || echo "not requeued here (a preemption requeues it itself)"',
        "  fi",
        '  exit "$status"',
        "}",
        "trap on_term TERM",
        f"{command} &",
        "child=$!",
        'wait "$child"  # a trapped SIGTERM interrupts this wait; on_term then waits for the run to end',
        "status=$?",
        "trap '' TERM  # the run has ended: nothing left to stop or to requeue",
        'echo "[$(date "+%F %T")] exit ${status}"',
        'exit "$status"',
    ]


def array_script(config: dict, job_name: str, out: str, results_command: list[str], indices: list[int]) -> str:
    """The sbatch script of the job array: task i runs `results_command --run-index i`."""
    throttle = f"%{config['parallel']}" if config["parallel"] else ""
    lines = ["#!/bin/bash", f"#SBATCH --array={array_spec(indices)}{throttle}"]
    lines += header(config, job_name, out, os.path.join(out, "slurm", "%A_%a.out"))
    command = shlex.join(results_command) + ' --run-index "$SLURM_ARRAY_TASK_ID"'
    lines += body(command, "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}", config["max_restarts"])
    return "\n".join(lines) + "\n"


def prepare_script(config: dict, job_name: str, out: str, results_command: list[str]) -> str:
    """The sbatch script of the job that runs the protocol's preparation (no GPU) before the array starts."""
    lines = ["#!/bin/bash"]
    lines += header({**config, "gpus": None}, f"{job_name}-prepare", out, os.path.join(out, "slurm", "%j-prepare.out"))
    lines += body(shlex.join([*results_command, "--prepare-only"]), "${SLURM_JOB_ID}", config["max_restarts"])
    return "\n".join(lines) + "\n"


@dataclass
class Task:
    """One array task as scontrol shows it."""

    state: str  # JobState, e.g. RUNNING, PENDING, FAILED
    reason: str  # Reason, e.g. BeginTime, Dependency, NonZeroExitCode, None
    restarts: int
    exit_code: str  # "status:signal", e.g. 1:0


def field(line: str, key: str) -> str:
    match = re.search(rf"(?:^|\s){key}=(\S*)", line)
    return match.group(1) if match else ""


def parse_scontrol(text: str) -> dict[int, Task]:
    """`scontrol -o show job <array job id>` (one line per task; tasks not yet started share one line whose
    ArrayTaskId is a range) -> {task index: Task}; a job that is not an array (the prepare job) is task 0."""
    tasks = {}
    for line in text.splitlines():
        if "JobId=" not in line:
            continue
        spec = field(line, "ArrayTaskId") or "0"
        task = Task(
            state=field(line, "JobState"),
            reason=field(line, "Reason"),
            restarts=int(field(line, "Restarts") or 0),
            exit_code=field(line, "ExitCode"),
        )
        for index in expand_spec(spec):
            tasks[index] = task
    return tasks


def query_job(job_id: str) -> dict[int, Task] | None:
    """The tasks of one array job (or the one task of a plain job, as index 0); None when SLURM no longer knows
    the job (MinJobAge after its end)."""
    if shutil.which("scontrol") is None:
        raise SlurmError("scontrol is not on PATH (is this a SLURM login node?)")
    result = subprocess.run(
        ["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:
            return None
        raise SlurmError(f"scontrol show job {job_id} failed: {result.stderr.strip() or result.returncode}")
    return parse_scontrol(result.stdout)


def read_submissions(out: str) -> list[dict]:
    path = os.path.join(out, "slurm.json")
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            return json.load(f)["submissions"]
    except (OSError, ValueError, KeyError) as error:
        raise SlurmError(f"cannot read {path} ({error})")


def record_submission(out: str, submission: dict):
    submissions = [*read_submissions(out), submission]
    path = os.path.join(out, "slurm.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"submissions": submissions}, f, indent=1)
    os.replace(path + ".tmp", path)


@dataclass
class RunStatus:
    index: int
    key: str
    status: str  # finished, running, pending, failed or not submitted
    detail: str


def run_statuses(keys: list[str], state: dict, submissions: list[dict], jobs: dict, out: str) -> list[RunStatus]:
    """Each run's status: finished when state.json says so; otherwise its task's state in its latest submission
    (jobs: {job id: {task index: Task}, or None for a job SLURM has forgotten}), else what state.json recorded."""
    latest = {}
    for submission in submissions:
        for index in submission["runs"]:
            latest[int(index)] = submission["job_id"]
    statuses = []
    for index, key in enumerate(keys):
        entry = state.get(key, {})
        log = os.path.join(out, "logs", key.replace("/", "__") + ".log")
        if entry.get("done"):
            statuses.append(RunStatus(index, key, "finished", entry.get("run_dir") or ""))
            continue
        if index not in latest:
            statuses.append(RunStatus(index, key, "not submitted", ""))
            continue
        job_id = latest[index]
        name = f"{job_id}_{index}"
        logs = f"logs: {log}, {os.path.join(out, 'slurm', name + '.out')}"
        task = (jobs.get(job_id) or {}).get(index)
        if task is None:
            stopped = "stopped before the end" if entry else "never started"
            statuses.append(RunStatus(index, key, "failed", f"job {name} gone from SLURM, run {stopped}; {logs}"))
        elif task.state in RUNNING:
            statuses.append(RunStatus(index, key, "running", f"job {name}, restarts {task.restarts}"))
        elif task.state in PENDING:
            statuses.append(RunStatus(index, key, "pending", f"job {name} ({task.reason}), restarts {task.restarts}"))
        else:  # FAILED, TIMEOUT, CANCELLED, NODE_FAIL, OUT_OF_MEMORY ..., or COMPLETED without state.json's "done"
            what = f"{task.state} ({task.reason}, exit {task.exit_code}, restarts {task.restarts})"
            statuses.append(RunStatus(index, key, "failed", f"job {name} {what}; {logs}"))
    return statuses


def jobs_of(submissions: list[dict]) -> dict:
    """{job id: its tasks (None when forgotten)} for every submission's array job and prepare job."""
    ids = [s["job_id"] for s in submissions] + [s["prepare_job_id"] for s in submissions if s.get("prepare_job_id")]
    return {job_id: query_job(job_id) for job_id in dict.fromkeys(ids)}


def active_prepare_job(submissions: list[dict], jobs: dict) -> str | None:
    """The prepare job of an earlier submission still queued or running, if any."""
    for submission in reversed(submissions):
        task = (jobs.get(submission.get("prepare_job_id")) or {}).get(0)
        if task is not None and task.state in RUNNING | PENDING:
            return submission["prepare_job_id"]
    return None


def submitted_key(out: str, job_id: str, index: int) -> str | None:
    """The run key that the submission with this array job id gave task `index` (None if not recorded)."""
    for submission in read_submissions(out):
        if submission["job_id"] == job_id:
            return submission["runs"].get(str(index))
    return None


def dependency(job_id: str | None) -> list[str]:
    """sbatch options that start the array after job_id (a preparation) succeeded; if it fails, the array is
    cancelled instead of pending forever."""
    return [f"--dependency=afterok:{job_id}", "--kill-on-invalid-dep=yes"] if job_id else []


def sbatch(script: str, *options: str) -> str:
    """Submits a script (on stdin); returns the job id."""
    result = subprocess.run(
        ["sbatch", "--parsable", *options], input=script, capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        raise SlurmError(f"sbatch refused the job: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]  # "<id>" or "<id>;<cluster>"


def submit(
    config: dict,
    job_name: str,
    out: str,
    results_command: list[str],
    runs: dict[int, str],
    prepare: bool,
    after: str | None = None,
) -> dict:
    """Submits the prepare job (when `prepare`) and the job array of `runs` ({index: key}), which starts after the
    prepare job or after the job `after` (an earlier submission's, still preparing); records them in
    <out>/slurm.json and returns the submission."""
    if shutil.which("sbatch") is None:
        raise SlurmError("--slurm needs sbatch on PATH (is this a SLURM login node?)")
    os.makedirs(os.path.join(out, "slurm"), exist_ok=True)  # SLURM does not create the output's folder
    prepare_job_id = sbatch(prepare_script(config, job_name, out, results_command)) if prepare else None
    script = array_script(config, job_name, out, results_command, list(runs))
    try:
        job_id = sbatch(script, *dependency(prepare_job_id or after))
    except SlurmError:
        if prepare_job_id:
            subprocess.run(["scancel", prepare_job_id], check=False)
        raise
    with open(os.path.join(out, "slurm", f"{job_id}.sbatch"), "w") as f:
        f.write(script)
    submission = {
        "job_id": job_id,
        "prepare_job_id": prepare_job_id or after,  # the preparation this array waits for
        "runs": {str(index): key for index, key in runs.items()},
        "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    record_submission(out, submission)
    return submission
