"""bench/results.py: protocols expand to the runs a user would type, and a protocol interrupted and started again
resumes its run, skips the finished ones and writes the summary."""

import csv
import multiprocessing
import os
import signal
import subprocess
import sys

import pytest
import tyro
from conftest import REPO, load_script, script_environment

RESULTS = load_script("results", REPO / "bench")
TINY_PROTOCOL = """
metrics: [eval/episodic_return]
checkpoint_every: 200
random_policy_episodes: 2
groups:
  - scripts: [from_scratch/sac.py, {script: from_scratch/sac.py, name: sac_wide, flags: {actor-hidden: 64}}]
    env_flag: env-id
    envs: [Pendulum-v1]
    seeds: [1]
    flags: {total-timesteps: 600, learning-starts: 200, batch-size: 16, critic-hidden: 32, actor-hidden: 32,
            buffer-size: 1000, eval-every: 200, eval-episodes: 1, console-every: 100}
"""


PROTOCOLS = sorted(path.stem for path in (REPO / "bench" / "protocols").glob("*.yaml"))


@pytest.mark.parametrize("name", PROTOCOLS)
def test_every_protocol_parses_with_each_script_s_own_args(name):
    """Each run's flags parse with the script's own Args (the flag names and values a protocol gives exist)."""
    _, protocol = RESULTS.load_protocol(name)
    runs = RESULTS.protocol_runs(protocol, "/tmp/out")
    assert len({run.key for run in runs}) == len(runs)
    for run in runs:
        module = load_script(run.script.split("/")[1].removesuffix(".py"), REPO / run.script.split("/")[0])
        args = tyro.cli(module.Args, args=run.flags)
        assert args.exp_name == run.name and args.seed == run.seed and args.checkpoint_every > 0


def test_protocol_flags_expand_lists_and_booleans():
    flags = RESULTS.as_flags({"critic-hidden-dims": [256, 256], "track": True, "autotune": False, "x": "{out}/d"}, "o")
    assert flags == ["--critic-hidden-dims", "256", "256", "--track", "--no-autotune", "--x", "o/d"]


@pytest.mark.long
def test_interrupted_protocol_resumes_and_summarises(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_PROTOCOL)
    command = [sys.executable, str(REPO / "bench" / "results.py"), "--protocol", str(tmp_path / "tiny.yaml")]
    command += ["--out", str(tmp_path / "out"), "--summary-dir", str(tmp_path / "summary")]
    process = subprocess.Popen(command, cwd=tmp_path, env=script_environment(), stdout=subprocess.PIPE, text=True)
    for line in process.stdout:  # stop the second run half-way
        if "run 2/2" in line:
            for line in process.stdout:
                if "step 300/600" in line:
                    process.send_signal(signal.SIGINT)
                    break
            break
    process.communicate(timeout=300)
    assert process.returncode == 130
    state = RESULTS.read_state(str(tmp_path / "out"))
    assert state["sac/Pendulum-v1/1"]["done"] and not state["sac_wide/Pendulum-v1/1"]["done"]

    again = subprocess.run(command, cwd=tmp_path, env=script_environment(), capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming" in again.stdout and "run 1/2" not in again.stdout  # the finished run is skipped
    with open(tmp_path / "summary" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    steps = {(row["script"], int(row["step"])) for row in rows}
    assert steps >= {("sac", 600), ("sac_wide", 200), ("sac_wide", 600), ("random", 0)}
    assert (tmp_path / "summary" / "eval_episodic_return.png").exists()


@pytest.mark.long
def test_protocol_killed_outright_resumes_the_run_it_left(tmp_path):
    """SIGKILL to the tool and its script (the end of a batch job) leaves state.json without the run: the next
    sitting resumes the run directory it left instead of starting the run anew in a second one."""
    (tmp_path / "tiny.yaml").write_text(TINY_PROTOCOL)
    command = [sys.executable, str(REPO / "bench" / "results.py"), "--protocol", str(tmp_path / "tiny.yaml")]
    command += ["--out", str(tmp_path / "out"), "--summary-dir", str(tmp_path / "summary"), "--only", "sac"]
    process = subprocess.Popen(command, cwd=tmp_path, env=script_environment(), stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        if "step 400/600" in line:  # after the checkpoint at 200 steps
            break
    script_pids = subprocess.run(
        ["pgrep", "-P", str(process.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    for pid in [process.pid, *map(int, script_pids)]:
        os.kill(pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert not (tmp_path / "out" / "state.json").exists()

    again = subprocess.run(command, cwd=tmp_path, env=script_environment(), capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming" in again.stdout
    assert len(list((tmp_path / "out" / "runs").iterdir())) == 1
    assert RESULTS.read_state(str(tmp_path / "out"))["sac/Pendulum-v1/1"]["done"]


def test_summary_steps_are_environment_steps_done_in_both_folders(tmp_path):
    """Both folders log the evaluation after step N at global_step N, and the summary keeps it there."""
    protocol = {"metrics": ["eval/success", "eval/episodic_return"], "groups": [], "checkpoint_every": 1}
    runs, state = [], {}
    for script, logged_step in (("from_scratch/sac.py", 30000), ("offline_to_online/qc_fql.py", 30000)):
        run = RESULTS.Run(script.split("/")[1][:-3], script, "env", 1, [])
        run_dir = tmp_path / run.name
        run_dir.mkdir()
        (run_dir / "metrics.csv").write_text(f"global_step,key,value\n{logged_step},eval/episodic_return,5.0\n")
        runs.append(run)
        state[run.key] = {"run_dir": str(run_dir), "done": True, "seconds": 1.0}
    RESULTS.write_summary("test", protocol, runs, str(tmp_path), state, str(tmp_path / "summary"))
    with open(tmp_path / "summary" / "summary.csv") as f:
        assert {(row["script"], int(row["step"])) for row in csv.DictReader(f)} == {("sac", 30000), ("qc_fql", 30000)}


def test_finished_runs_of_a_committed_summary_are_not_run_again(tmp_path):
    """A fresh clone (or a machine that lost its work tree) has the committed summary.csv and runs.json but no run
    directories: the finished runs are rebuilt from the summary's rows and skipped, the unfinished one is not."""
    protocol = {"metrics": ["eval/episodic_return"], "checkpoint_every": 1}
    protocol["groups"] = [
        {"scripts": ["from_scratch/sac.py"], "env_flag": "env-id", "envs": ["Hopper-v4"], "seeds": [1, 2]}
    ]
    first_out, summary = tmp_path / "first", tmp_path / "summary"
    runs = RESULTS.protocol_runs(protocol, str(first_out))
    state = {}
    for run, steps in zip(runs, ([1000, 2000], [1000])):
        run_dir = first_out / "runs" / f"Hopper-v4__sac__{run.seed}__1"
        run_dir.mkdir(parents=True)
        lines = [f"{step},eval/episodic_return,{step + run.seed}" for step in steps]
        (run_dir / "metrics.csv").write_text("global_step,key,value\n" + "\n".join(lines) + "\n")
        (run_dir / "args.json").write_text(f'{{"exp_name": "sac", "env_id": "Hopper-v4", "seed": {run.seed}}}')
        state[run.key] = {"run_dir": str(run_dir), "done": len(steps) == 2, "seconds": 60.0 * run.seed}
    RESULTS.write_summary("test", protocol, runs, str(first_out), state, str(summary))
    written = (summary / "summary.csv").read_text()

    fresh_out = tmp_path / "fresh"
    restored = RESULTS.restore_finished_runs(runs, str(fresh_out), {}, str(summary))
    assert restored == {"sac/Hopper-v4/1": {"run_dir": str(fresh_out / "runs" / "Hopper-v4__sac__1__restored"),
                                            "done": True, "seconds": 60}}  # fmt: skip
    assert RESULTS.read_state(str(fresh_out)) == restored
    RESULTS.write_summary("test", protocol, runs, str(fresh_out), restored, str(summary))
    rows = {(row["seed"], row["step"], row["value"]) for row in csv.DictReader(open(summary / "summary.csv"))}
    assert (
        rows
        == {("1", "1000", "1001.0"), ("1", "2000", "2001.0")}
        != {(row["seed"], row["step"], row["value"]) for row in csv.DictReader(written.splitlines())}
    )  # the unfinished run's rows go with its directory; the finished run's rows are kept as they were


def test_sittings_with_disjoint_runs_keep_each_other_s_entries(tmp_path):
    # Two sittings (--only a, --only b) started from the same state.json, each recording its own run.
    RESULTS.record_run(str(tmp_path), "a/env/1", {"run_dir": "ra", "done": False, "seconds": 1.0})
    first, second = RESULTS.read_state(str(tmp_path)), RESULTS.read_state(str(tmp_path))
    first.update(RESULTS.record_run(str(tmp_path), "a/env/1", {"run_dir": "ra", "done": True, "seconds": 5.0}))
    second.update(RESULTS.record_run(str(tmp_path), "b/env/1", {"run_dir": "rb", "done": True, "seconds": 7.0}))
    on_disk = RESULTS.read_state(str(tmp_path))
    assert (
        on_disk
        == second
        == {
            "a/env/1": {"run_dir": "ra", "done": True, "seconds": 5.0},
            "b/env/1": {"run_dir": "rb", "done": True, "seconds": 7.0},
        }
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["state.json", "state.lock"]  # no temporary file


def record_many(out: str, prefix: str):
    for i in range(40):
        RESULTS.record_run(out, f"{prefix}/env/{i}", {"run_dir": None, "done": True, "seconds": 1.0})


def test_processes_recording_at_once_lose_no_entry(tmp_path):
    """SLURM array tasks (or sittings) that end at the same moment each merge their entry into state.json: the lock
    on state.lock keeps one process's read-merge-replace from overwriting another's entry."""
    processes = [
        multiprocessing.get_context("fork").Process(target=record_many, args=(str(tmp_path), p)) for p in "abcd"
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0, 0, 0, 0]
    assert len(RESULTS.read_state(str(tmp_path))) == 4 * 40
