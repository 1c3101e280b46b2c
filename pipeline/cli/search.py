"""``precision-search search``: run (or resume) a multi-objective per-layer precision study.

Running the same command again resumes the study: finished trials are kept,
trials a killed driver left running are marked failed and retried.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
from collections.abc import Iterator

from rich.markup import escape

from pipeline.hints import command
from pipeline.cli.common import add_config_arg, parse_overrides, same_study_args
from pipeline.cli.front import console


def register(sub) -> None:
    p = sub.add_parser("search", help="Optuna multi-objective search over per-layer formats; trials run as Ray tasks")
    add_config_arg(p)
    p.add_argument("--trials", type=int, default=None,
                   help="finished trials the study should hold, baselines included (default: search.trials)")
    p.add_argument("--study", default=None, help="study name (default: the config's name); same name = resume")
    p.add_argument("--parallel", type=int, default=None,
                   help="trials in flight (default: what the Ray cluster holds at the configured threads per trial)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage, any SQLAlchemy URL (default: $PRECISION_SEARCH_STORAGE or "
                        "sqlite:///<workdir>/<name>/optuna.db)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///<workdir>/mlflow.db)")
    p.add_argument("--time-budget", default=None, metavar="DURATION",
                   help="stop proposing trials after this long (e.g. 20m, 90s, 1h, 1h30m; counted from the first "
                        "proposal, plus the sensitivity table when search.sensitivity.seed: auto measures it within a "
                        "third of the budget); trials in flight finish, and the study ends with the front of what "
                        "it measured")
    p.add_argument("--ray-address", default=None, help="Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no live view (one line per trial is still logged)")
    p.add_argument("--quiet", action="store_true", help="print only the final front")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.set_defaults(func=run)


@contextlib.contextmanager
def stdout_to_stderr(active: bool) -> Iterator[None]:
    """While ``--json`` is on, anything else printed to stdout goes to stderr.

    With an http tracking URI MLflow writes "View run ... at: ..." lines to
    ``sys.stdout`` whenever a run ends; other libraries may print too. Routing
    them to stderr keeps stdout one JSON document (and the links stay visible).
    """
    if not active:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def run(args) -> int:
    from pipeline.config import ConfigError, load_config
    from pipeline.search.budget import parse_duration
    from pipeline.search.runner import SearchOptions
    from pipeline.tracking.search import run_search

    if args.trials is not None and args.trials < 1:
        raise ConfigError("--trials: must be at least 1")
    if args.parallel is not None and args.parallel < 1:
        raise ConfigError("--parallel: must be at least 1")
    budget = None
    if args.time_budget is not None:
        try:
            budget = parse_duration(args.time_budget)
        except ValueError as exc:
            raise ConfigError(f"--time-budget: {exc}") from None
    cfg = load_config(args.config, overrides=parse_overrides(args.set))
    opts = SearchOptions(
        trials=args.trials, study=args.study, parallel=args.parallel, storage=args.storage,
        tracking_uri=args.tracking_uri, ray_address=args.ray_address,
        progress="off" if (args.quiet or args.json) else ("lines" if args.no_progress else "auto"),
        verbose=getattr(args, "verbose", False), time_budget_s=budget,
    )
    with stdout_to_stderr(args.json):
        summary = run_search(cfg, opts)
    # A study in which no trial completed has nothing to review or promote: a non-zero exit, so a script or
    # CI job that runs the search does not go on as if it had found something (the failed trials are kept).
    rc = 1 if summary.trials_complete == 0 and summary.trials_failed > 0 else 0
    if args.json:
        print(json.dumps(summary.model_dump(mode="json"), indent=2))
        return rc
    print_summary(summary, args.config, workdir=f"{cfg.work_root} ({cfg.work_where})", follow=same_study_args(args))
    if rc:
        console.print(f"[red]no trial completed[/red]: all {summary.trials_failed} failed (each one's reason was "
                      "printed as it ended, and is in its MLflow run); fix the cause and run the search again")
    return rc


def print_summary(summary, config_path: str = "<config>", workdir: str | None = None,
                  follow: list[str] | None = None) -> None:
    """The search's closing screen; ``follow``: the arguments its printed commands need to find this study."""
    follow = follow or []
    from pipeline.cli.front import print_front

    console.print()
    print_front(summary.front, summary.objectives,
                title=f"Pareto front of study {summary.study}: {len(summary.front)} trial(s) "
                      f"({summary.trials_complete} complete, {summary.trials_failed} failed"
                      + (f", {summary.trials_orphaned} orphaned by a stopped driver and retried"
                         if summary.trials_orphaned else "")
                + (f", {summary.trials_retried} lost their worker and were retried" if summary.trials_retried else "")
                + ")",
                energy_source=summary.energy_meter_pinned or None)
    hv = "-" if summary.hypervolume is None else f"{summary.hypervolume:.4f}"
    if summary.hypervolume is not None and summary.hypervolume_in_search is not None:
        hv += f" on the re-measured timings ({summary.hypervolume_in_search:.4f} on the in-search ones)"
    console.print(f"hypervolume {hv} (normalised: the share of the box from the accuracy-drop limit and the worst "
                  f"uniform baseline's costs to FP32 accuracy at zero cost that the feasible trials dominate); "
                  f"{summary.parallel} trial(s) in parallel, {summary.cpus_per_trial:g} CPU(s)"
                  + (f" + {summary.gpus_per_trial:g} GPU" if summary.gpus_per_trial else "") + " per trial")
    if summary.energy_note:
        console.print(f"energy objective: {escape(summary.energy_note)}")
    if summary.energy_meter_pinned:
        console.print(f"energy meter pinned to {summary.energy_meter_pinned}: every trial of this study is metered "
                      "by it (a worker without it fails its trial instead of switching source)")
    for sentence in summary.verdict:  # the re-measured front vs FP32, the baselines and the runtime's one-liner
        console.print(escape(sentence), soft_wrap=True)
    if summary.trials_duplicate:
        console.print(f"{summary.trials_duplicate} proposal(s) repeated an already measured plan: told the "
                      "original's values, not measured again, not counted in --trials")
    if summary.seeding:
        console.print(escape(summary.seeding), highlight=False, soft_wrap=True)
    if summary.stopped_early:
        console.print(f"[yellow]{escape(summary.stopped_early)}[/yellow]")
    if summary.orphans_recovered:
        console.print(f"resumed: {summary.orphans_recovered} orphaned trial(s) were marked failed and retried")
    for err in summary.tracking_errors:
        console.print(f"[yellow]warning:[/yellow] {escape(err)} (run the command again to reconcile MLflow)")
    if workdir:  # where everything of this config lives; front/promote/load/ui look here too
        console.print(escape(f"workdir: {workdir}"), soft_wrap=True)
    console.print(escape(f"Optuna study: {summary.storage} (study {summary.study})"), soft_wrap=True)
    console.print(escape(summary.ui_hint.replace("make ui,", make_ui(config_path) + ",", 1)), soft_wrap=True)
    console.print(f"  front table/plots: parent run artifacts pareto/front.csv, pareto/front.png, pareto/front.svg; "
                  f"front trials are tagged pareto=true")
    console.print(escape(f"  list it again: {command('front', '--config', config_path, '--study', summary.study, *follow)}"),
                  soft_wrap=True)  # never wrapped: a command is copied whole
    if summary.front:
        console.print(escape(f"  promote the knee: {command('promote', '--config', config_path, '--study', summary.study, '--policy', 'knee', *follow)}"),
                      soft_wrap=True)
    console.print(f"done in {summary.wall_seconds:.0f} s")


def make_ui(config_path: str) -> str:
    """``make ui`` for this config, runnable verbatim where the user is: plain ``make ui`` serves the default
    config's workdir, and ``make`` needs the repo's Makefile (``-C`` from elsewhere, then an absolute path)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    if Path.cwd().resolve() == repo:
        return f"make ui CONFIG={shlex.quote(config_path)}"
    return f"make -C {shlex.quote(str(repo))} ui CONFIG={shlex.quote(str(Path(config_path).resolve()))}"
