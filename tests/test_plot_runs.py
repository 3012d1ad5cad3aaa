"""tools/plot_runs.py: the mean and 95% interval over seeds against hand computations, the PNG, and its errors."""

import json
import math
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from conftest import REPO, load_script

PLOT_RUNS = REPO / "tools" / "plot_runs.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
T_975_DF1 = 12.706205  # Student t quantile 0.975 for 1 degree of freedom (two runs): tan(0.475 π)


@pytest.fixture(scope="module")
def plot_runs():
    return load_script("plot_runs", REPO / "tools")


def write_run(runs_dir, name: str, args: dict, rows: list[tuple[int, str, float]], extra: str = ""):
    run_dir = runs_dir / name
    run_dir.mkdir(parents=True)
    (run_dir / "args.json").write_text(json.dumps(args))
    lines = ["global_step,key,value"] + [f"{step},{key},{value}" for step, key, value in rows]
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n" + extra)


def two_seeds(runs_dir):
    """Two seeds of sac_flow_gru on Hopper-v4: seed 2 also logs at step 500 and runs on to step 3000."""
    write_run(
        runs_dir,
        "Hopper-v4__sac_flow_gru__1__100",
        {"exp_name": "sac_flow_gru", "env_id": "Hopper-v4", "seed": 1},
        [(0, "eval/episodic_return", 10.0), (1000, "eval/episodic_return", 20.0), (2000, "eval/episodic_return", 40.0),
         (1000, "losses/qf_loss", 1.0)],
    )  # fmt: skip
    write_run(
        runs_dir,
        "Hopper-v4__sac_flow_gru__2__100",
        {"exp_name": "sac_flow_gru", "env_id": "Hopper-v4", "seed": 2},
        [(0, "eval/episodic_return", 14.0), (500, "eval/episodic_return", 22.0), (1000, "eval/episodic_return", 30.0),
         (2000, "eval/episodic_return", 40.0), (3000, "eval/episodic_return", 50.0)],
        extra="3100,eval/episodic_ret",  # a row still being written when the plot was made
    )  # fmt: skip


def run_tool(*flags, cwd):
    return subprocess.run(
        [sys.executable, str(PLOT_RUNS), *flags], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_t_quantiles_against_numerical_integration(plot_runs):
    """P(T <= t_{0.975, df}) = 0.975, the t density integrated with the trapezoid rule."""
    for df in [1, 2, 4, 9, 30, 31, 45, 200]:
        q = plot_runs.t_quantile_975(df)
        x = np.linspace(0.0, q, 200_001)
        log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
        density = np.exp(log_norm - (df + 1) / 2 * np.log1p(x**2 / df))
        cdf = 0.5 + np.sum((density[1:] + density[:-1]) / 2 * np.diff(x))
        assert abs(cdf - 0.975) < 1e-5, (df, q, cdf)


def test_mean_and_interval_by_hand(plot_runs, tmp_path):
    two_seeds(tmp_path)
    runs, skipped = plot_runs.load_runs(str(tmp_path))
    assert skipped == 0 and len(runs) == 2
    curves = plot_runs.group_curves(runs, "eval/episodic_return")
    assert list(curves) == [("sac_flow_gru", "Hopper-v4")]
    curve = curves["sac_flow_gru", "Hopper-v4"]
    # The union of the logged steps; seed 1 at step 500 is the interpolation 15 of its 10 (step 0) and 20 (1000).
    # Seed 1 stops at 2000, so step 3000 has one run and no interval. The partial row at 3100 is not read.
    np.testing.assert_array_equal(curve.steps, [0, 500, 1000, 2000, 3000])
    np.testing.assert_array_equal(curve.num_runs, [2, 2, 2, 2, 1])
    seed1 = np.array([10.0, 15.0, 20.0, 40.0])
    seed2 = np.array([14.0, 22.0, 30.0, 40.0])
    # Two runs: s = |a − b| / √2, so the half-width t s / √2 = t |a − b| / 2.
    half = T_975_DF1 * np.abs(seed1 - seed2) / 2
    np.testing.assert_allclose(curve.mean, [12.0, 18.5, 25.0, 40.0, 50.0])
    np.testing.assert_allclose(curve.lower[:4], (seed1 + seed2) / 2 - half, rtol=1e-5)
    np.testing.assert_allclose(curve.upper[:4], (seed1 + seed2) / 2 + half, rtol=1e-5)
    assert np.isnan(curve.lower[4]) and np.isnan(curve.upper[4])


def test_range_band_is_the_lowest_and_highest_seed(plot_runs, tmp_path):
    two_seeds(tmp_path)
    runs, _ = plot_runs.load_runs(str(tmp_path))
    curve = plot_runs.group_curves(runs, "eval/episodic_return", band="range")["sac_flow_gru", "Hopper-v4"]
    seed1 = np.array([10.0, 15.0, 20.0, 40.0])
    seed2 = np.array([14.0, 22.0, 30.0, 40.0])
    np.testing.assert_allclose(curve.mean, [12.0, 18.5, 25.0, 40.0, 50.0])
    np.testing.assert_allclose(curve.lower, [*np.minimum(seed1, seed2), 50.0])  # one run at step 3000
    np.testing.assert_allclose(curve.upper, [*np.maximum(seed1, seed2), 50.0])


def test_binned_grid_by_hand(plot_runs, tmp_path):
    """More distinct steps than points: equal-width bins, the mean of each run's values in a bin, and an empty bin
    inside a run's range filled by interpolation between its neighbouring bins."""
    key = "charts/episodic_return"
    write_run(
        tmp_path, "a", {"exp_name": "sac", "env_id": "Ant-v4"}, [(0, key, 1), (10, key, 2), (20, key, 3), (30, key, 4)]
    )
    write_run(tmp_path, "b", {"exp_name": "sac", "env_id": "Ant-v4"}, [(5, key, 10), (25, key, 20), (30, key, 30)])
    runs, _ = plot_runs.load_runs(str(tmp_path))
    curve = plot_runs.group_curves(runs, key, max_points=3)["sac", "Ant-v4"]
    # Steps 0..30 in bins [0, 10), [10, 20), [20, 30] centred at 5, 15, 25.
    # Run a: 1 | 2 | (3 + 4)/2.  Run b: 10 | nothing: halfway between 10 (at 5) and 25 (at 25) = 17.5 | (20 + 30)/2.
    a = np.array([1.0, 2.0, 3.5])
    b = np.array([10.0, 17.5, 25.0])
    np.testing.assert_array_equal(curve.steps, [5, 15, 25])
    np.testing.assert_allclose(curve.mean, (a + b) / 2)
    np.testing.assert_allclose(curve.upper - curve.mean, T_975_DF1 * np.abs(a - b) / 2, rtol=1e-5)


def test_draws_a_png_per_selection(tmp_path):
    two_seeds(tmp_path / "runs")
    write_run(
        tmp_path / "runs",
        "cube-triple-play-singletask-task4-v0__fql__1__100",
        {"exp_name": "fql", "env_name": "cube-triple-play-singletask-task4-v0", "offline_steps": 1000},
        [(1000, "eval/episodic_return", -3.0), (2000, "eval/episodic_return", -1.0)],
    )
    (tmp_path / "runs" / "crashed_before_writing").mkdir()
    result = run_tool("--out", "figures/plot.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (
        "sac_flow_gru/Hopper-v4 n=2" in result.stdout
        and "fql/cube-triple-play-singletask-task4-v0 n=1" in result.stdout
    )
    assert "skipped 1" in result.stdout
    png = tmp_path / "figures" / "plot.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    height, width, _ = matplotlib.image.imread(png).shape
    assert width > height > 100  # two panels side by side

    # An existing figure is kept unless --overwrite is given.
    before = png.read_bytes()
    refused = run_tool("--out", "figures/plot.png", cwd=tmp_path)
    assert refused.returncode == 1 and png.read_bytes() == before
    assert (
        refused.stderr.strip()
        == "error: figures/plot.png already exists; pass --overwrite to replace it or choose another --out"
    )
    replaced = run_tool("--out", "figures/plot.png", "--overwrite", "--script", "sac_flow_gru.py", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert "fql" not in replaced.stdout and png.read_bytes() != before


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--runs-dir", "nowhere"], "error: no runs directory nowhere"),
        (["--env", "Walker2d-v4"], "error: no runs in runs match --env Walker2d-v4; available script/env: sac_flow_gru/Hopper-v4"),
        (["--key", "eval/success"], "error: no selected run logged eval/success; keys: eval/episodic_return, losses/qf_loss"),
    ],
)  # fmt: skip
def test_errors_are_one_line(tmp_path, flags, message):
    two_seeds(tmp_path / "runs")
    result = run_tool(*flags, cwd=tmp_path)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(message), result.stderr
    assert not (tmp_path / "plot.png").exists()
