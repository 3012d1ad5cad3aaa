"""The command line: the run options every script's Args has, --resume's saved args, and the checks that end a bad
command with one line before anything is written."""

import dataclasses
import netrc
import os
import urllib.parse

import tyro

from sac_flow_utils import checkpoints, gym_tasks


@dataclasses.dataclass
class RunArgs:
    """The run options every script's Args has (its own fields follow them in --help)."""

    track: bool = False
    """log to Weights & Biases (needs `wandb login`, WANDB_API_KEY, or WANDB_MODE=offline)"""
    wandb_project_name: str = "sac-flow"
    """the wandb project"""
    wandb_entity: str | None = None
    """the wandb entity (team); None uses your default"""
    save_model: bool = False
    """save the final parameters to runs/<run_name>/<exp_name>.flax"""
    checkpoint_every: int = 0
    """steps between checkpoints (runs/<run_name>/checkpoint.flax, the replay buffer included); 0: none"""
    resume: str | None = None
    """continue runs/<run_name> from its checkpoint with its saved args; flags given here win"""
    checkpoint_on_exit: bool = True
    """on Ctrl-C (SIGINT) or SIGTERM (cluster preemption): finish the step, write the checkpoint, exit 130 or 143"""


def parse_args(args_class: type, script: str):
    """The command line, and with --resume the run's checkpoint: its saved args, overridden by the flags given."""
    args = tyro.cli(args_class)
    if args.resume is None:
        return args, None
    saved_args, checkpoint = checkpoints.read_run(args.resume, script)
    try:
        saved = args_class(**{**saved_args, "resume": args.resume})
    except TypeError as error:
        raise SystemExit(f"error: {args.resume}/args.json does not match this script's Args: {error}")
    for field in dataclasses.fields(args_class):  # one line for a value of the wrong type (a hand edit, say)
        value, default = getattr(saved, field.name), field.default
        if value is None or default is None:
            continue
        expected = (int, float) if type(default) is float else type(default)
        if not isinstance(value, expected) or (isinstance(value, bool) and type(default) is not bool):
            name = type(default).__name__
            raise SystemExit(f"error: {args.resume}/args.json: {field.name} is {value!r}, not of type {name}")
    missing = [field for field in dataclasses.fields(args_class) if field.name not in saved_args]
    if missing:  # a run made by an older version: say which settings it did not record
        defaults = ", ".join(f"--{field.name.replace('_', '-')} {getattr(saved, field.name)}" for field in missing)
        print(f"note: {args.resume}/args.json has no {', '.join(field.name for field in missing)}; this version's "
              f"defaults apply ({defaults}) unless given as flags", flush=True)  # fmt: skip
    return tyro.cli(args_class, default=saved), checkpoint


def check_args(args, positive: tuple, non_negative: tuple, problems: list):
    """One line for the first field out of its range, the first of the script's `problems` (condition, message),
    --track without a wandb login, or --capture-video without moviepy or a renderer."""
    for name in positive:
        if getattr(args, name) <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in non_negative:
        if getattr(args, name) < 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for problem, message in problems:
        if problem:
            raise SystemExit(f"error: {message}")
    if getattr(args, "capture_video", False):
        try:
            import moviepy  # noqa: F401  (gymnasium's RecordVideo writes with it)
        except ImportError:
            raise SystemExit("error: --capture-video needs moviepy: pip install -r requirements.txt")
        gym_tasks.check_renderer(args.env_id)
    if args.track and not wandb_login_available():
        raise SystemExit(
            "error: --track needs a wandb login: run `wandb login`, set WANDB_API_KEY, or set WANDB_MODE=offline"
        )


def wandb_login_available() -> bool:
    """True when wandb can log: offline/disabled mode, an API key in the environment, or a netrc entry."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
