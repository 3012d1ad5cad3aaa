"""Plot runs/*/metrics.csv: mean ± 95% confidence interval over seeds, one panel per env, one line per script.

Reads every run directory under --runs-dir that holds args.json and metrics.csv (rows global_step,key,value).
Runs are grouped by (exp_name, env): exp_name is the script's name unless --exp-name changed it, env is args.json's
env_id (from_scratch/) or env_name (offline_to_online/). For the chosen --key (default eval/episodic_return) each
group becomes one line: the mean over its runs and the 95% Student-t confidence interval of that mean,

    mean ± t_{0.975, n−1} · s / √n        s: the sample standard deviation over the n runs at that step

against global_step (environment steps; for offline-to-online runs, offline updates and then online steps, with a
dashed line where the online phase starts). With one run a group shows its curve without an interval.

Common step grid. Runs of one group may log a key at different steps (charts/episodic_return is logged at each
episode end). If the group's runs logged the key at no more than --points distinct steps in all (evaluation keys,
logged at the same steps by every seed), those steps are the grid and each run's values are used as logged
(linearly interpolated at steps only other runs logged). Otherwise the group's step range is cut into --points
equal-width bins: each run contributes the mean of its values in a bin (plotted at the bin's centre), and a bin
where a run logged nothing takes the linear interpolation between that run's neighbouring bins. A run never
counts outside its own first..last logged step, so n drops where some runs are shorter (e.g. still running).

The figure goes to --out (default plot.png). An existing file is never overwritten unless --overwrite is given.

Usage (from the repository root):
    python tools/plot_runs.py                                           # all runs, eval/episodic_return
    python tools/plot_runs.py --key charts/episodic_return --env Hopper-v4 Walker2d-v4 --out hopper_walker.png
    python tools/plot_runs.py --script sac sac_flow_transformer --out sac_vs_flow_t.png --overwrite
    python tools/plot_runs.py --key eval/success --env cube-triple-play-singletask-task4-v0 --out cube.png
"""

import argparse
import csv
import json
import math
import os
from dataclasses import dataclass

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt

# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30; larger df use the Cornish-Fisher series below.
T_975 = [
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
]  # fmt: skip
Z_975 = 1.959964


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: the table for df <= 30, else z + (z³ + z)/(4 df) + (5z⁵ + 16z³ + 3z)/(96 df²) (error < 1e-4)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass
class Run:
    """One run directory's args.json and metrics.csv."""

    name: str
    """the run directory's name"""
    exp_name: str
    """args.json's exp_name (the script's file stem unless --exp-name changed it)"""
    env: str
    """args.json's env_id (from_scratch/) or env_name (offline_to_online/)"""
    offline_steps: int | None
    """offline_to_online runs: offline updates before the online phase (global_step continues from there)"""
    series: dict
    """key -> (steps, values): float64 arrays in logged order, finite values only"""


@dataclass
class Curve:
    """One (exp_name, env) group's line on its common step grid."""

    steps: np.ndarray
    mean: np.ndarray
    """mean over the runs with a value at each step"""
    lower: np.ndarray
    """mean − half-width of the 95% interval (NaN where fewer than 2 runs have a value)"""
    upper: np.ndarray
    num_runs: np.ndarray
    """runs with a value at each step"""


def fail(message: str):
    """One line on stderr, exit code 1."""
    raise SystemExit(f"error: {message}")


def read_run(run_dir: str) -> Run | None:
    """One run directory, or None when it is not a readable run (no or bad args.json / metrics.csv)."""
    try:
        with open(os.path.join(run_dir, "args.json")) as f:
            args = json.load(f)
        env = args.get("env_id", args.get("env_name"))
        exp_name = args["exp_name"]
        rows: dict[str, tuple[list, list]] = {}
        with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
            reader = csv.reader(f)
            if next(reader, None) != ["global_step", "key", "value"]:
                return None
            for row in reader:
                try:  # a run still being written may end in a partial row
                    step, key, value = int(row[0]), row[1], float(row[2])
                except (IndexError, ValueError):
                    continue
                if math.isfinite(value):
                    steps, values = rows.setdefault(key, ([], []))
                    steps.append(step)
                    values.append(value)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, csv.Error):
        return None
    if env is None:
        return None
    series = {key: (np.array(steps, np.float64), np.array(values, np.float64)) for key, (steps, values) in rows.items()}
    offline_steps = args.get("offline_steps")
    offline_steps = offline_steps if isinstance(offline_steps, int) else None
    return Run(os.path.basename(run_dir), str(exp_name), str(env), offline_steps, series)


def load_runs(runs_dir: str) -> tuple[list[Run], int]:
    """Every readable run under runs_dir, sorted by name, and the number of directories that were not readable."""
    if not os.path.isdir(runs_dir):
        fail(f"no runs directory {runs_dir} (train a script first, or pass --runs-dir)")
    runs, skipped = [], 0
    for name in sorted(os.listdir(runs_dir)):
        path = os.path.join(runs_dir, name)
        if not os.path.isdir(path):
            continue
        run = read_run(path)
        if run is None:
            skipped += 1
        else:
            runs.append(run)
    return runs, skipped


def select_runs(runs: list[Run], envs: list[str] | None, scripts: list[str] | None) -> list[Run]:
    """The runs whose env is in envs and whose exp_name is in scripts (None: any); 'sac.py' matches 'sac'."""
    scripts = None if scripts is None else {s.removesuffix(".py") for s in scripts}
    return [
        run
        for run in runs
        if (envs is None or run.env in envs) and (scripts is None or run.exp_name in scripts)
    ]  # fmt: skip


def step_grid(step_arrays: list[np.ndarray], max_points: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The group's common grid: (the distinct logged steps, None) when there are at most max_points of them,
    else (the centres of max_points equal-width bins over the group's step range, the bin edges)."""
    distinct = np.unique(np.concatenate(step_arrays))
    if len(distinct) <= max_points:
        return distinct, None
    edges = np.linspace(distinct[0], distinct[-1], max_points + 1)
    return (edges[:-1] + edges[1:]) / 2, edges


def resample(steps: np.ndarray, values: np.ndarray, grid: np.ndarray, edges: np.ndarray | None) -> np.ndarray:
    """One run's values on the grid (see the module docstring); NaN outside the run's own logged steps."""
    if edges is None:
        points, inverse = np.unique(steps, return_inverse=True)  # average repeated steps
    else:
        points_index = np.clip(np.searchsorted(edges, steps, side="right") - 1, 0, len(grid) - 1)
        points, inverse = np.unique(points_index, return_inverse=True)
        points = grid[points]  # the centres of the bins this run logged in
    point_values = np.bincount(inverse, weights=values) / np.bincount(inverse)
    out = np.interp(grid, points, point_values)
    out[(grid < points[0]) | (grid > points[-1])] = np.nan
    return out


def mean_and_interval(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """values: (runs, steps) with NaN for missing. Returns mean, lower, upper, n per step: the mean over the runs
    with a value and its 95% Student-t interval mean ± t_{0.975, n−1} · s / √n (lower/upper NaN where n < 2).
    Every column must have at least one value."""
    present = np.isfinite(values)
    n = present.sum(axis=0)
    filled = np.where(present, values, 0.0)
    mean = filled.sum(axis=0) / n
    squares = np.where(present, (values - mean) ** 2, 0.0).sum(axis=0)
    half = np.full(values.shape[1], np.nan)
    for j in np.flatnonzero(n >= 2):
        half[j] = t_quantile_975(int(n[j]) - 1) * math.sqrt(squares[j] / (n[j] - 1)) / math.sqrt(n[j])
    return mean, mean - half, mean + half, n


def group_curves(runs: list[Run], key: str, max_points: int = 100, band: str = "ci") -> dict[tuple[str, str], Curve]:
    """(exp_name, env) -> the group's Curve for key, for every group where at least one run logged key. band "ci":
    the 95% interval of the mean; "range": the lowest and highest run (with 2 or 3 seeds the t interval is mostly
    the t quantile's width: 12.7 standard errors at n = 2)."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        if key in run.series:
            groups.setdefault((run.exp_name, run.env), []).append(run)
    curves = {}
    for group, members in sorted(groups.items()):
        grid, edges = step_grid([run.series[key][0] for run in members], max_points)
        values = np.stack([resample(*run.series[key], grid, edges) for run in members])
        keep = np.isfinite(values).any(axis=0)  # a gap between runs that do not overlap
        mean, lower, upper, n = mean_and_interval(values[:, keep])
        if band == "range":
            lower, upper = np.nanmin(values[:, keep], axis=0), np.nanmax(values[:, keep], axis=0)
        curves[group] = Curve(grid[keep], mean, lower, upper, n)
    return curves


def draw(curves: dict[tuple[str, str], Curve], runs: list[Run], key: str, out: str, band: str = "ci"):
    """One panel per env, one line (and interval band) per script, same colour for a script in every panel."""
    envs = sorted({env for _, env in curves})
    scripts = sorted({script for script, _ in curves})
    colours = {script: plt.get_cmap("tab10")(i % 10) for i, script in enumerate(scripts)}
    columns = min(3, len(envs))
    rows = math.ceil(len(envs) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(envs) :]:
        ax.set_visible(False)
    for ax, env in zip(axes.flat, envs):
        for script in scripts:
            curve = curves.get((script, env))
            if curve is None:
                continue
            label = f"{script} (n={int(curve.num_runs.max())})"
            ax.plot(curve.steps, curve.mean, color=colours[script], label=label, linewidth=1.5)
            ax.fill_between(curve.steps, curve.lower, curve.upper, color=colours[script], alpha=0.2, linewidth=0)
        offline_steps = {run.offline_steps for run in runs if run.env == env and key in run.series}
        if None in offline_steps:
            ax.set_xlabel("global_step (environment steps)")
        else:
            ax.set_xlabel("global_step (offline updates, then online steps)")
            if len(offline_steps) == 1:
                ax.axvline(offline_steps.pop(), color="grey", linestyle="--", linewidth=1, label="online starts")
        ax.set_title(env)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    what = "mean ± 95% CI over seeds (Student t)" if band == "ci" else "mean and range (lowest to highest) over seeds"
    figure.suptitle(f"{key}: {what}")
    figure.tight_layout()
    figure.savefig(out, format="png", dpi=120)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", default="runs", help="directory holding the run directories (default: runs)")
    parser.add_argument("--key", default="eval/episodic_return", help="metric to plot (default: eval/episodic_return)")
    parser.add_argument("--env", nargs="+", help="only these envs (env_id or OGBench env_name); default: all")
    parser.add_argument(
        "--script", nargs="+", help="only these scripts (exp_name, e.g. sac sac_flow_gru); default: all"
    )
    parser.add_argument("--out", default="plot.png", help="output PNG (default: plot.png)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (refused otherwise)")
    parser.add_argument("--points", type=int, default=100, help="at most this many grid steps per line (default 100)")
    parser.add_argument(
        "--band",
        choices=["ci", "range"],
        default="ci",
        help="shaded band: the 95%% interval of the mean (ci, default) or the lowest to highest run (range)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    if args.points < 2:
        fail(f"--points must be >= 2, got {args.points}")
    if os.path.exists(args.out) and not args.overwrite:
        fail(f"{args.out} already exists; pass --overwrite to replace it or choose another --out")
    runs, skipped = load_runs(args.runs_dir)
    if not runs:
        fail(f"no runs in {args.runs_dir} (no directory with a readable args.json and metrics.csv)")
    selected = select_runs(runs, args.env, args.script)
    if not selected:
        available = sorted({f"{run.exp_name}/{run.env}" for run in runs})
        shown = ", ".join(available[:8]) + (f", ... ({len(available)} in all)" if len(available) > 8 else "")
        filters = "".join(f" --{name} {' '.join(v)}" for name, v in (("env", args.env), ("script", args.script)) if v)
        fail(f"no runs in {args.runs_dir} match{filters}; available script/env: {shown}")
    curves = group_curves(selected, args.key, args.points, args.band)
    if not curves:
        keys = sorted({key for run in selected for key in run.series})
        shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
        fail(f"no selected run logged {args.key}; keys: {shown or 'none'}")
    out_dir = os.path.dirname(args.out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    draw(curves, selected, args.key, args.out, args.band)
    lines = ", ".join(f"{script}/{env} n={int(c.num_runs.max())}" for (script, env), c in curves.items())
    directories = "directory" if skipped == 1 else "directories"
    note = f" (skipped {skipped} {directories} without a readable args.json and metrics.csv)" if skipped else ""
    print(f"wrote {args.out}: {args.key} for {lines}{note}")


if __name__ == "__main__":
    main()
