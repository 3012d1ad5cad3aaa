"""bench/results.py --slurm (bench/slurm.py): the generated sbatch scripts, the task states read from scontrol, which
runs are submitted; and, where this machine can start a single-node SLURM (root, slurm-wlm and munge installed), a
tiny protocol run as a job array with one task preempted and one stopped at its "time limit", both resuming."""

import csv
import glob
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
from conftest import REPO, load_script, script_environment

RESULTS = load_script("results", REPO / "bench")
SLURM = RESULTS.slurm  # the module results.py uses, so that its SlurmError is the one raised
PROTOCOL = """
metrics: [eval/episodic_return]
checkpoint_every: 1000
slurm: {cpus: 2, time: "30:00", options: [comment=tiny]}
prepare:
  - script: offline_to_online/make_dataset.py
    creates: "{out}/data/cube-single-play-v0.npz"
    flags: {env-name: cube-single-play-v0, num-episodes: 1, num-val-episodes: 1, max-episode-steps: 20,
            dataset-dir: "{out}/data"}
groups:
  - scripts: [from_scratch/sac.py]
    env_flag: env-id
    envs: [NoSuchEnv-v0]
    seeds: [1]
  - scripts: [from_scratch/sac.py]
    env_flag: env-id
    envs: [Pendulum-v1]
    seeds: [1, 2]
    flags: {total-timesteps: 12000, learning-starts: 200, batch-size: 16, critic-hidden: 32, actor-hidden: 32,
            buffer-size: 1000, eval-every: 3000, eval-episodes: 1, console-every: 1000}
"""
KEYS = ["sac/NoSuchEnv-v0/1", "sac/Pendulum-v1/1", "sac/Pendulum-v1/2"]
SCONTROL = """\
JobId=7 ArrayJobId=7 ArrayTaskId=3-5%2 ArrayTaskThrottle=2 JobName=tiny UserId=root(0) JobState=PENDING Reason=JobArrayTaskLimit Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 ExitCode=0:0 RunTime=00:00:00
JobId=10 ArrayJobId=7 ArrayTaskId=2 ArrayTaskThrottle=2 JobName=tiny UserId=root(0) JobState=RUNNING Reason=None Dependency=(null) Requeue=1 Restarts=1 BatchFlag=1 ExitCode=0:0 RunTime=00:01:02
JobId=9 ArrayJobId=7 ArrayTaskId=1 ArrayTaskThrottle=2 JobName=tiny UserId=root(0) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 ExitCode=1:0 RunTime=00:00:09
JobId=8 ArrayJobId=7 ArrayTaskId=0 ArrayTaskThrottle=2 JobName=tiny UserId=root(0) JobState=COMPLETED Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 ExitCode=0:0 RunTime=00:00:30
"""  # noqa: E501  (scontrol -o show job 7 from SLURM 22.05, fields cut)


def test_array_spec_compresses_indices_and_expand_reads_scontrol_ranges():
    assert SLURM.array_spec([0, 1, 2, 4, 6, 7]) == "0-2,4,6-7"
    assert SLURM.array_spec([5]) == "5"
    assert SLURM.expand_spec("0-2,4,6-7%3") == [0, 1, 2, 4, 6, 7]
    assert SLURM.expand_spec("0-8:4") == [0, 4, 8]


def test_settings_flags_win_and_options_add_up():
    protocol = {"slurm": {"partition": "cpu", "time": "1:00:00", "gpus": 1, "options": ["qos=low"]}}
    config = SLURM.settings(protocol, {"partition": "gpu", "time": None, "cpus": 4, "options": ("--account=rl",)})
    assert config["partition"] == "gpu" and config["time"] == "1:00:00" and config["cpus"] == 4
    assert config["options"] == ["qos=low", "--account=rl"] and config["max_restarts"] == 10
    with pytest.raises(SLURM.SlurmError, match="unknown slurm setting gpu;"):
        SLURM.settings({"slurm": {"gpu": 1}}, {})
    with pytest.raises(SLURM.SlurmError, match="max_restarts must be a whole number"):
        SLURM.settings({"slurm": {"max_restarts": "many"}}, {})
    with pytest.raises(SLURM.SlurmError, match="quoted string"):
        SLURM.settings({"slurm": {"time": 86400}}, {})  # time: 24:00:00 unquoted in YAML


def test_array_script_runs_one_run_per_task_and_requeues_itself_on_sigterm(tmp_path):
    config = SLURM.settings({"slurm": {"gpus": "a100:1", "options": ["qos=high"]}}, {"mem": "32G", "parallel": 4})
    command = ["/venv/bin/python", "/repo/bench/results.py", "--protocol", "/repo/p.yaml", "--out", "/shared/out"]
    script = SLURM.array_script(config, "paper", "/shared/out", command, [0, 1, 2, 5])
    lines = script.splitlines()
    sbatch = [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]
    assert sbatch == [
        "--array=0-2,5%4",
        "--job-name=paper",
        "--chdir=/shared/out",
        "--output=/shared/out/slurm/%A_%a.out",
        "--open-mode=append",
        "--requeue",
        "--signal=B:TERM@300",
        "--gres=gpu:a100:1",
        "--mem=32G",
        "--qos=high",
    ]
    run = next(line for line in lines if line.endswith(" &"))
    assert run == " ".join(command) + ' --run-index "$SLURM_ARRAY_TASK_ID" &'
    handler = script[script.index("on_term() {") : script.index("trap on_term TERM")]
    assert handler.index("trap '' TERM") < handler.index('kill -TERM "$child"') < handler.index("scontrol requeue")
    assert 'scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' in handler
    assert "restarts=${SLURM_RESTART_COUNT:-0}" in script and '[ "$restarts" -lt 10 ]' in handler
    (tmp_path / "array.sh").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "array.sh")], check=True)  # valid bash

    prepare = SLURM.prepare_script(config, "paper", "/shared/out", command)
    assert "--gres" not in prepare and "#SBATCH --job-name=paper-prepare" in prepare and "--array" not in prepare
    assert " ".join(command) + " --prepare-only &" in prepare and 'scontrol requeue "${SLURM_JOB_ID}"' in prepare


def test_scontrol_lines_give_each_task_s_state():
    tasks = SLURM.parse_scontrol(SCONTROL)
    assert sorted(tasks) == [0, 1, 2, 3, 4, 5]
    assert (tasks[1].state, tasks[1].reason, tasks[1].exit_code) == ("FAILED", "NonZeroExitCode", "1:0")
    assert tasks[2].state == "RUNNING" and tasks[2].restarts == 1
    assert tasks[4].state == "PENDING" and tasks[4].reason == "JobArrayTaskLimit"


def test_run_statuses_combine_state_json_and_slurm():
    keys = [f"sac/Hopper-v4/{seed}" for seed in range(8)]
    state = {keys[0]: {"run_dir": "r0", "done": True}, keys[6]: {"run_dir": "r6", "done": False}}
    state[keys[2]] = {"run_dir": "r2", "done": True}  # finished, its task still completing: finished
    submissions = [{"job_id": "7", "runs": {str(i): keys[i] for i in range(6)}}]
    submissions.append({"job_id": "3", "runs": {"6": keys[6]}})  # an earlier job SLURM has forgotten
    statuses = SLURM.run_statuses(keys, state, submissions, {"7": SLURM.parse_scontrol(SCONTROL), "3": None}, "/o")
    assert [s.status for s in statuses] == [
        "finished",
        "failed",
        "finished",
        "pending",
        "pending",
        "pending",
        "failed",
        "not submitted",
    ]
    assert "FAILED (NonZeroExitCode, exit 1:0" in statuses[1].detail
    assert "/o/logs/sac__Hopper-v4__1.log" in statuses[1].detail and "/o/slurm/7_1.out" in statuses[1].detail
    assert "gone from SLURM" in statuses[6].detail


@pytest.fixture
def results_main(monkeypatch, capsys):
    """Runs bench/results.py's main() in this process with the given flags; returns (exit code or error, stdout)."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}

    def call(*flags):
        monkeypatch.setattr(sys, "argv", ["results.py", *flags])
        try:
            RESULTS.main()
            code = 0
        except SystemExit as exit:
            code = exit.code
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        return code, capsys.readouterr().out

    return call


def fake_slurm(folder):
    """sbatch and scontrol stand-ins on PATH: sbatch keeps each script and its options and answers job ids 100,
    101, ...; `scontrol -o show job N` prints the file scontrol.N, or fails as for a job SLURM has forgotten."""
    folder.mkdir()
    (folder / "sbatch").write_text(
        '#!/bin/sh\nn=$(ls "$(dirname "$0")" | grep -c "^job.*sh$")\ncat > "$(dirname "$0")/job$n.sh"\n'
        'echo "$@" > "$(dirname "$0")/job$n.options"\necho $((100 + n))\n'
    )
    (folder / "scontrol").write_text(
        '#!/bin/sh\ncat "$(dirname "$0")/scontrol.$4" 2>/dev/null && exit\n'
        'echo "slurm_load_jobs error: Invalid job id specified" >&2\nexit 1\n'
    )
    for name in ("sbatch", "scontrol"):
        (folder / name).chmod(stat.S_IRWXU)
    return folder


def test_submission_skips_finished_and_queued_runs_and_resubmits_failed_ones(tmp_path, results_main, monkeypatch):
    (tmp_path / "tiny.yaml").write_text(PROTOCOL)
    out = tmp_path / "out"
    out.mkdir()
    RESULTS.record_run(str(out), KEYS[0], {"run_dir": str(out / "r0"), "done": True, "seconds": 1.0})
    flags = ["--protocol", str(tmp_path / "tiny.yaml"), "--out", str(out), "--summary-dir", str(tmp_path / "sum")]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, stdout = results_main(*flags, "--slurm", "--dry-run")  # no SLURM needed to look
    assert code == 0 and "#SBATCH --array=1-2\n" in stdout and "#SBATCH --cpus-per-task=2" in stdout
    assert "2 runs would be submitted" in stdout and not (out / "slurm.json").exists()
    assert "#SBATCH --array=2\n" in results_main(*flags, "--slurm", "--dry-run", "--run-index", "2")[1]
    assert results_main(*flags, "--slurm")[0] == "error: --slurm needs sbatch on PATH (is this a SLURM login node?)"
    assert results_main(*flags, "--slurm-status")[0].startswith("error: no SLURM submission recorded in")
    assert results_main(*flags, "--run-index", "3")[0] == "error: --run-index 3 is out of range: tiny has runs 0 to 2"

    fake = fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}/usr/bin{os.pathsep}/bin")
    code, stdout = results_main(*flags, "--slurm", "--slurm-cpus", "1", "--slurm-option", "qos=high")
    assert code == 0 and "submitted job array 101 after the prepare job 100" in stdout, stdout
    assert (
        "--prepare-only &" in (fake / "job0.sh").read_text() and (fake / "job0.options").read_text() == "--parsable\n"
    )
    assert (fake / "job1.options").read_text() == "--parsable --dependency=afterok:100 --kill-on-invalid-dep=yes\n"
    script = (fake / "job1.sh").read_text()
    assert "#SBATCH --array=1-2\n" in script and "#SBATCH --cpus-per-task=1\n" in script
    assert script.index("#SBATCH --comment=tiny") < script.index("#SBATCH --qos=high")
    assert (out / "slurm" / "101.sbatch").read_text() == script
    submission = json.loads((out / "slurm.json").read_text())["submissions"][0]
    assert submission["job_id"] == "101" and submission["prepare_job_id"] == "100"
    assert submission["runs"] == {"1": KEYS[1], "2": KEYS[2]}

    # The dataset is still being made; task 1 failed, task 2 runs: --slurm-status says so, and --slurm submits
    # task 1 alone, after the same prepare job.
    (fake / "scontrol.100").write_text("JobId=100 JobName=tiny-prepare JobState=RUNNING Reason=None Restarts=0\n")
    (fake / "scontrol.101").write_text(SCONTROL.replace("ArrayJobId=7", "ArrayJobId=101"))
    code, stdout = results_main(*flags, "--slurm-status")
    assert code == 0 and "1 finished, 1 running, 0 pending, 1 failed, 0 not submitted" in stdout
    assert f"{out}/logs/sac__Pendulum-v1__1.log" in stdout and "submit them again with" in stdout
    assert f"prepare job 100: RUNNING; log {out}/slurm/100-prepare.out" in stdout
    assert (tmp_path / "sum" / "summary.csv").exists()
    code, stdout = results_main(*flags, "--slurm")
    assert code == 0 and "1 runs queued or running already" in stdout and "submitted job array 102" in stdout
    assert "#SBATCH --array=1\n" in (fake / "job2.sh").read_text()
    assert (fake / "job2.options").read_text() == "--parsable --dependency=afterok:100 --kill-on-invalid-dep=yes\n"

    # SLURM has forgotten the jobs: state.json decides (runs 1 and 2 not done: failed).
    (fake / "scontrol.100").unlink()
    (fake / "scontrol.101").unlink()
    code, stdout = results_main(*flags, "--slurm-status")
    assert (
        code == 0
        and "prepare job 100: gone from SLURM" in stdout
        and "1 finished, 0 running, 0 pending, 2 failed" in stdout
    )


def test_a_task_refuses_a_protocol_changed_since_submission(tmp_path, results_main, monkeypatch):
    (tmp_path / "tiny.yaml").write_text(PROTOCOL)
    (tmp_path / "out").mkdir()
    SLURM.record_submission(str(tmp_path / "out"), {"job_id": "5", "runs": {"1": "sac/Hopper-v4/1"}})
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "5")
    code, _ = results_main(
        "--protocol", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "out"), "--run-index", "1"
    )
    assert code == "error: tiny has changed since job 5 was submitted: run 1 is sac/Pendulum-v1/1, was sac/Hopper-v4/1"


# ---------------------------------------------------------------------------------------------------------------
# A real single-node SLURM (.ci/slurm-up, .ci/slurm-down).


@pytest.fixture
def slurm_cluster(tmp_path_factory):
    """A single-node SLURM started for this test and stopped after it, failed or not; skips, saying why, where
    SLURM cannot be started here. Yields the environment that reaches it (SLURM_CONF)."""
    folder = tmp_path_factory.mktemp("slurm")
    up = subprocess.run([REPO / ".ci" / "slurm-up", folder], capture_output=True, text=True, check=False)
    try:
        if up.returncode == 2:
            pytest.skip(f"no local SLURM: {up.stderr.strip()}")
        assert up.returncode == 0, f"SLURM did not start: {up.stderr}"
        yield script_environment({"SLURM_CONF": str(folder / "slurm.conf")})
    finally:
        subprocess.run([REPO / ".ci" / "slurm-down", folder], check=False, timeout=120)


def wait_for(condition, what: str, timeout: float = 600):
    start = time.time()
    while time.time() - start < timeout:
        result = condition()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.slurm
@pytest.mark.long
def test_protocol_as_a_job_array_survives_preemption_and_time_limit(tmp_path, slurm_cluster):
    """Three runs as one array: run 0 fails (an unknown environment) and is reported with its logs; run 1 is
    preempted (scontrol requeue) and run 2 gets the time-limit signal (SIGTERM to the batch shell, what
    --signal=B:TERM@N sends), each after its first checkpoint; both requeue, resume from that checkpoint in their one
    run directory and finish, and the summary holds both."""
    env = slurm_cluster
    (tmp_path / "tiny.yaml").write_text(PROTOCOL)
    out, summary = tmp_path / "out", tmp_path / "summary"
    results = [sys.executable, str(REPO / "bench" / "results.py"), "--protocol", str(tmp_path / "tiny.yaml")]
    results += ["--out", str(out), "--summary-dir", str(summary)]

    def run(*flags):
        done = subprocess.run([*results, *flags], env=env, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def scontrol(*flags):
        return subprocess.run(["scontrol", *flags], env=env, capture_output=True, text=True, check=False).stdout

    assert "submitted job array" in run("--slurm", "--slurm-cpus", "1")
    job = json.loads((out / "slurm.json").read_text())["submissions"][0]["job_id"]
    assert "#SBATCH --cpus-per-task=1\n" in (out / "slurm" / f"{job}.sbatch").read_text()  # the flag won
    prepare_job = json.loads((out / "slurm.json").read_text())["submissions"][0]["prepare_job_id"]

    def checkpoint_of(seed):
        return glob.glob(str(out / "runs" / f"Pendulum-v1__sac__{seed}__*" / "checkpoint.flax"))

    try:
        # Each stop as soon as that run's first checkpoint exists, with most of the run still to go.
        stops = {
            1: ["scontrol", "requeue", f"{job}_1"],  # a preemption: SIGTERM to every process, back in the queue
            2: ["scancel", "--batch", "--signal=TERM", f"{job}_2"],  # the time-limit signal: the batch shell only
        }

        def stop_runs_at_their_first_checkpoint():
            for seed, command in list(stops.items()):
                if checkpoint_of(seed):
                    subprocess.run(command, env=env, check=True)
                    del stops[seed]
            return not stops

        wait_for(stop_runs_at_their_first_checkpoint, "the first checkpoints of runs 1 and 2")

        def finished():
            state = RESULTS.read_state(str(out)) if (out / "state.json").exists() else {}
            return all(state.get(key, {}).get("done") for key in KEYS[1:])

        wait_for(finished, "runs 1 and 2 to finish")
    finally:
        print(scontrol("-o", "show", "job", job))
        for path in sorted((out / "slurm").glob("*.out")):
            print(f"--- {path.name}\n{path.read_text()[-3000:]}")
    tasks = SLURM.parse_scontrol(scontrol("-o", "show", "job", job))
    assert tasks[1].restarts == 1 and tasks[2].restarts == 1

    for index, seed in ((1, 1), (2, 2)):
        run_dirs = list((out / "runs").glob(f"Pendulum-v1__sac__{seed}__*"))
        assert len(run_dirs) == 1, run_dirs  # resumed in place, not started anew
        assert "resuming from step" in (out / "logs" / f"sac__Pendulum-v1__{seed}.log").read_text()
        task_output = (out / "slurm" / f"{job}_{index}.out").read_text()
        assert "restart 0" in task_output and "restart 1" in task_output  # --open-mode=append kept both sittings
        with open(run_dirs[0] / "metrics.csv") as f:
            evaluations = [int(row["global_step"]) for row in csv.DictReader(f) if row["key"] == "eval/episodic_return"]
        assert evaluations == [3000, 6000, 9000, 12000]  # continuous: nothing logged twice, nothing missing
    time_limited = (out / "slurm" / f"{job}_2.out").read_text()  # requeued by its own batch script, nothing else
    assert "requeueing (restart 1 of at most 10)" in time_limited and "not requeued here" not in time_limited

    assert (out / "data" / "cube-single-play-v0.npz").exists()  # made by the prepare job, before the array ran
    status = run("--slurm-status")
    assert f"prepare job {prepare_job}: COMPLETED" in status
    assert "2 finished, 0 running, 0 pending, 1 failed, 0 not submitted" in status
    failed = next(line for line in status.splitlines() if KEYS[0] in line)
    assert "FAILED (NonZeroExitCode, exit 1:0" in failed and str(out / "logs" / "sac__NoSuchEnv-v0__1.log") in failed
    with open(summary / "summary.csv") as f:
        final = {(row["seed"], row["step"]) for row in csv.DictReader(f)}
    assert {("1", "12000"), ("2", "12000")} <= final
    again = run("--slurm", "--dry-run")  # what would be submitted again: the failed run alone
    assert "#SBATCH --array=0\n" in again and "1 runs would be submitted" in again and "prepare job" not in again
