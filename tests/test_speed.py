"""bench/speed.py: --baseline imports the scripts of a git revision apart from the working tree's, a revision it
cannot read is a one-line error, the configurations (given sizes and the small ones) are measured once each, and
the runners alternate in whole actor cycles. Nothing here times a train step."""

import dataclasses
import subprocess
import sys
import types

import pytest
from conftest import FROM_SCRATCH, REPO, load_script, script_environment

SPEED = load_script("speed", REPO / "bench")


def git(repo, *command) -> bytes:
    return subprocess.run(["git", "-C", str(repo), *command], capture_output=True, check=True).stdout


def test_baseline_of_head_is_its_own_module_read_from_git(tmp_path):
    commit, modules = SPEED.load_baseline("HEAD", ["sac"], tmp_path)
    baseline, working = modules["sac"], SPEED.load_script("sac")
    assert commit == git(REPO, "rev-parse", "HEAD").decode().strip()
    assert (tmp_path / "sac.py").read_bytes() == git(REPO, "show", "HEAD:from_scratch/sac.py")
    assert baseline.__file__ == str(tmp_path / "sac.py") and working.__file__ == str(FROM_SCRATCH / "sac.py")
    assert baseline.__name__ != working.__name__
    assert baseline.Args is not working.Args and baseline.td_target is not working.td_target
    assert baseline.Args().exp_name == "sac"  # the scripts name their runs after their file, kept in the copy


def test_baseline_from_before_the_package_imports_its_own_run_utils(tmp_path):
    """Revisions before sac_flow_utils/ import from_scratch/run_utils.py: it comes with their scripts."""
    before = "690a87b"  # the last commit with from_scratch/run_utils.py
    _, modules = SPEED.load_baseline(before, ["sac_flow_gru"], tmp_path)
    assert (tmp_path / "run_utils.py").read_bytes() == git(REPO, "show", f"{before}:from_scratch/run_utils.py")
    assert modules["sac_flow_gru"].run_utils.__file__ == str(tmp_path / "run_utils.py")


@pytest.fixture
def two_revisions(tmp_path, monkeypatch):
    """A repository whose from_scratch/sac.py says "old" at HEAD~1 and "new" at HEAD, standing in for this one."""
    repo = tmp_path / "repo"
    (repo / "from_scratch").mkdir(parents=True)
    git(repo, "init", "--quiet")
    for revision in ("old", "new"):
        (repo / "from_scratch" / "sac.py").write_text(f"REVISION = {revision!r}\n")
        git(repo, "add", "from_scratch/sac.py")
        git(repo, "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "--quiet", "-m", revision)
    monkeypatch.setattr(SPEED, "REPO", repo)
    return repo


def test_baseline_takes_the_scripts_of_the_given_revision(two_revisions, tmp_path):
    commit, modules = SPEED.load_baseline("HEAD~1", ["sac"], tmp_path)
    assert modules["sac"].REVISION == "old"
    assert commit == git(two_revisions, "rev-parse", "HEAD~1").decode().strip()


def test_baseline_without_a_script_is_a_one_line_error(two_revisions, tmp_path):
    with pytest.raises(SystemExit) as error:
        SPEED.load_baseline("HEAD", ["sac", "sac_flow_gru"], tmp_path)
    message = str(error.value)
    assert message.startswith("error: --baseline HEAD has no from_scratch/sac_flow_gru.py") and "\n" not in message


def test_unknown_revision_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as error:
        SPEED.load_baseline("no-such-revision", ["sac"], tmp_path)
    message = str(error.value)
    assert message.startswith("error: --baseline no-such-revision is not a commit") and "\n" not in message
    assert not list(tmp_path.iterdir())


def test_unknown_revision_fails_the_command_before_any_measurement():
    """What a user sees: one line on stderr and a non-zero exit, within the time of the imports."""
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "speed.py"), "--quick", "--baseline", "no-such-revision"],
        env=script_environment(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: --baseline no-such-revision is not a commit")
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


DEFAULTS = types.SimpleNamespace(critic_hidden=1024, batch_size=512)  # a script's Args


@pytest.mark.parametrize(
    "flags, defaults, labels",
    [
        ([], DEFAULTS, ["critic1024_batch512", "critic256_batch256"]),
        (["--critic-hidden", "512"], DEFAULTS, ["critic512_batch512", "critic256_batch256"]),
        (["--batch-size", "128"], DEFAULTS, ["critic1024_batch128", "critic256_batch256"]),
        (["--critic-hidden", "256", "--batch-size", "256"], DEFAULTS, ["critic256_batch256"]),
        ([], types.SimpleNamespace(critic_hidden=256, batch_size=256), ["critic256_batch256"]),
        (["--no-small-config"], DEFAULTS, ["critic1024_batch512"]),
    ],
)
def test_configurations_are_the_given_sizes_then_the_small_ones_once(flags, defaults, labels):
    configs = SPEED.configurations(SPEED.parse_options(flags), defaults)
    assert list(configs) == labels
    for label, config in configs.items():
        assert label == f"critic{config['critic_hidden']}_batch{config['batch_size']}"


def test_configured_args_change_only_the_sizes():
    sac = load_script("sac")
    args = SPEED.configured_args(sac, {"critic_hidden": 256, "batch_size": 128}, num_seeds=3)
    assert (args.critic_hidden, args.batch_size, args.num_seeds) == (256, 128, 3)
    changed = {"critic_hidden", "batch_size", "num_seeds"}
    for field in dataclasses.fields(args):
        if field.name not in changed:
            assert getattr(args, field.name) == getattr(sac.Args(), field.name), field.name


def test_a_baseline_without_the_sizes_is_a_one_line_error():
    @dataclasses.dataclass
    class Args:
        batch_size: int = 512

    older = types.SimpleNamespace(Args=Args, __file__="/tmp/baseline/sac.py")
    with pytest.raises(SystemExit) as error:
        SPEED.configured_args(older, {"critic_hidden": 256, "batch_size": 256})
    assert str(error.value).startswith("error: /tmp/baseline/sac.py: ") and "critic_hidden" in str(error.value)


def test_runners_alternate_in_whole_actor_cycles_after_a_warm_up():
    calls = []

    class Runner:
        def __init__(self, name, policy_delay):
            self.name, self.args = name, types.SimpleNamespace(policy_delay=policy_delay)

        def step(self):
            calls.append(self.name)

    first_call_s, calls_per_s = SPEED.alternating_rates({"a": Runner("a", 3), "b": Runner("b", 2)}, 2, 1)
    warm_up, rounds = calls[:10], calls[10:]
    assert warm_up == ["a"] * 6 + ["b"] * 4  # two cycles each: each starts the rounds at the start of a cycle
    assert rounds == (["a"] * 3 + ["b"] * 2) * 2
    assert set(first_call_s) == set(calls_per_s) == {"a", "b"} and all(rate > 0 for rate in calls_per_s.values())


def test_the_table_has_a_row_per_script_and_configuration(capsys):
    figures = dict.fromkeys(SPEED.COLUMNS[:8], 1.0) | {"baseline_updates_per_s": 8.0, "vs_baseline": 1.25}
    results = {
        "device": "cpu",
        "matmul_gflops": 100.0,
        "baseline": {"ref": "main", "commit": "0123456789abcdef"},
        "configs": {
            label: {"scripts": {"sac_flow_gru": figures, "sac": figures}}
            for label in ("critic1024_batch512", "critic256_batch256")
        },
        "random_phase": {},
    }
    SPEED.print_results(results)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "baseline main (0123456789ab)"
    assert lines[2].split()[:2] == ["script", "config"] and "vs_baseline" in lines[2].split()
    assert all(line.split()[6] == "1.25" for line in lines[3:])  # vs_baseline, the fifth figure
    rows = [line.split()[:2] for line in lines[3:]]
    assert rows == [
        ["sac", "critic1024_batch512"],
        ["sac", "critic256_batch256"],
        ["sac_flow_gru", "critic1024_batch512"],
        ["sac_flow_gru", "critic256_batch256"],
    ]


def test_random_phase_rate_is_the_script_s_console_rate_over_the_environment_s_own(monkeypatch):
    calls = []

    def console(name, flags, **_):
        calls.append((name, flags))
        return "step 300/300 | random actions: 1234.5 steps/s, 0s left | latest return nan\n"

    monkeypatch.setattr(SPEED, "run_script", console)
    figures = SPEED.random_phase_rates("sac", env_id="Pendulum-v1", steps=300)
    ((name, flags),) = calls
    option = dict(zip(flags[::2], flags[1::2]))
    assert name == "sac" and option["--env-id"] == "Pendulum-v1" and option["--total-timesteps"] == "300"
    assert int(option["--learning-starts"]) > 300  # the whole run acts at random
    assert figures["random_phase_sps"] == 1234.5 and figures["env_sps"] > 0
    assert figures["random_phase_fraction"] == pytest.approx(1234.5 / figures["env_sps"])


def test_end_to_end_sps_is_the_training_rate_of_the_script_s_last_console_line(monkeypatch, tmp_path):
    calls = []

    def console(name, flags, folder):
        calls.append((name, folder))
        return (
            "step 4999/6000 | random actions: 900.0 steps/s, 0s left | latest return 12.0\n"
            "step 5000/6000 | training: compiled and took the first step in 9s\n"
            "step 5500/6000 | training: 80.5 steps/s, 6s left | latest return 20.0\n"
            "step 6000/6000 | training: 75.25 steps/s, 0s left | latest return 21.0\n"
        )

    monkeypatch.setattr(SPEED, "run_script", console)
    assert SPEED.end_to_end_sps("sac", SPEED.SMALL_CONFIG, folder=tmp_path) == 75.25
    assert calls == [("sac", tmp_path)]
