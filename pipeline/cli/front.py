"""``precision-search front``: the Pareto front of a study, one row per trial on it.

Reads the Optuna study only (no Ray, no MLflow server needed); the MLflow run id
of each row is printed so it can be opened in the UI or promoted.
"""

from __future__ import annotations

import json

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline.hints import command
from pipeline.cli.common import add_config_arg, load, same_study_args

# Wide enough for per-layer plans when the output is a log file (rich assumes 80 columns there).
console = Console(width=None if Console().is_terminal else 400)  # logs and pipes get the full table


def register(sub) -> None:
    p = sub.add_parser("front", help="print the Pareto front of a study (one row per trial on it)")
    add_config_arg(p)
    p.add_argument("--study", default=None, help="study name (default: the config's name)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL (default: $PRECISION_SEARCH_STORAGE or sqlite:///<workdir>/<name>/optuna.db)")
    p.add_argument("--all", action="store_true", help="list every trial, not only the front")
    p.add_argument("--full", action="store_true",
                   help="show every layer's format in the plan column (default: the plan in brief: format counts and "
                        "what differs from the nearest uniform baseline)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.search.records import build_records, study_objectives
    from pipeline.search.storage import A_ENERGY_NOTE, A_ENERGY_PIN, A_ENERGY_SOURCE, A_PARENT_RUN, open_study

    from pipeline.cli.stores import read_storage

    cfg = load(args)
    study = open_study(cfg, args.study, read_storage(cfg, args.storage, args.config))
    # The study's own metric and its direction (a study made by the Python API may have a lower-is-better
    # custom metric while the config given here names another): labels and verdicts follow the study.
    recorded = study.user_attrs.get("metric")
    infos = study_objectives(study, recorded or cfg.metric.name)
    hib = next((o.direction == "maximize" for o in infos if o.name == "accuracy"), bool(cfg.metric.higher_is_better))
    records = build_records(study, infos)
    shown = records if args.all else [r for r in records if r.on_front]
    first = infos[0]
    shown.sort(key=lambda r: (r.values.get(first.name, float("-inf") if first.direction == "maximize" else float("inf")),),
               reverse=first.direction == "maximize")
    attrs = study.user_attrs
    pin = attrs.get(A_ENERGY_PIN) or {}
    verdict = remeasure_verdict(records, attrs, hib)
    if args.json:
        print(json.dumps({
            "study": study.study_name,
            "objectives": [o.model_dump() for o in infos],
            "energy_note": attrs.get(A_ENERGY_NOTE, ""),
            "energy_source": attrs.get(A_ENERGY_SOURCE, ""),
            "energy_meter_pinned": pin.get("meter", ""),
            "energy_sources_shown": energy_sources(shown),
            "mlflow_parent_run_id": attrs.get(A_PARENT_RUN),
            "rows": [r.model_dump(mode="json") for r in shown],
            "latency_method": verdict.label if verdict else "in-search",
            "timing_batch_size": cfg.measure.batch_size,
            "eval_batch_size": cfg.measure.eval_batch,
            "remeasure": verdict.sentences if verdict else [],
        }, indent=2))
        return 0
    print_front(shown, infos, title=f"study {study.study_name}: "
                + (f"all {len(shown)} trials" if args.all else
                   # of the finished trials: enqueued seeds not yet run are not counted
                   f"Pareto front ({len(shown)} of {sum(r.state not in ('WAITING', 'RUNNING') for r in records)} trials)")
                # What decides every row's numbers besides its plan (dynamic INT8 scales per eval batch):
                + f"; timing batch {cfg.measure.batch_size}, eval batch {cfg.measure.eval_batch}",
                energy_source=attrs.get(A_ENERGY_SOURCE), full=args.full,
                promote=command("promote", "--config", args.config, "--study", study.study_name, "--policy", "knee",
                                *same_study_args(args)))
    if recorded and recorded != cfg.metric.name:
        console.print(escape(f"note: study {study.study_name!r} was scored with metric {recorded!r} "
                             f"({'higher' if hib else 'lower'} is better), not the config's {cfg.metric.name!r}: "
                             "its own metric and direction are shown"), soft_wrap=True)
    if pin.get("meter"):
        console.print(escape(f"energy meter pinned to {pin['meter']} ({pin.get('by', '')})"))
    note = attrs.get(A_ENERGY_NOTE)
    if note:
        console.print(f"energy objective: {escape(note)}")
    if verdict:
        for line in verdict.sentences:
            console.print(escape(line))
    if not shown:
        console.print("[yellow]the front is empty: no finished trial meets the accuracy-drop constraint yet[/yellow]")
    return 0


def remeasure_verdict(records, attrs, higher_is_better: bool = True):
    """The interleaved re-measurement's comparison (front vs FP32 and each uniform format), or None."""
    from pipeline.search.storage import A_REMEASURED

    data = attrs.get(A_REMEASURED)
    if not data:
        return None
    from pipeline.search.remeasured import RemeasureReport
    from pipeline.tracking.remeasure import comparison

    try:
        report = RemeasureReport.model_validate(data)
    except Exception:  # noqa: BLE001 - a report from another version: show the in-search numbers only
        return None
    if not report.error and not any(getattr(r, "remeasured", "") for r in records):
        return None  # trials finished after it: the front is the in-search one until the next re-measurement
    return comparison(records, report, higher_is_better)


def energy_sources(records) -> dict[str, list[int]]:
    """energy source -> trial numbers, over the completed, measured trials among ``records``."""
    out: dict[str, list[int]] = {}
    for r in records:
        if r.state == "COMPLETE" and getattr(r, "duplicate_of", None) is None and r.energy_source:
            out.setdefault(r.energy_source, []).append(r.number)
    return out


def print_front(records, infos, title: str, energy_source: str | None = None, promote: str | None = None,
                full: bool = False) -> None:
    """The front as a table, with its notes; ``promote`` is the command that promotes the knee (a hint that
    runs verbatim, :func:`pipeline.hints.command`)."""
    """The table; the energy column names its source, and a mix of sources is called out."""
    sources = energy_sources(records)
    if not energy_source or energy_source == "none":
        energy_source = next(iter(sources)) if len(sources) == 1 else ("mixed" if sources else None)
    from pipeline.search.remeasure import NOISY_SOURCES

    method = next((r.remeasured for r in records if getattr(r, "remeasured", "")), "")
    t = Table(title=title, title_justify="left")
    t.add_column("trial", justify="right")
    t.add_column("baseline")
    for o in infos:
        header = o.header
        if o.source == "energy" and energy_source:
            header += f" ({energy_source})"
        if method and o.source in NOISY_SOURCES:  # the final number, then the trial's own
            t.add_column(header + " re-measured", justify="right")
            t.add_column(f"{o.shown} in-search", justify="right")
        else:
            t.add_column(header, justify="right")
    if method:
        t.add_column("latency IQR ms", justify="right")
    t.add_column("drop", justify="right")
    t.add_column("bits/w", justify="right")
    t.add_column("plan", overflow="fold")
    for r in records:
        cells = [str(r.number) + (" *" if r.knee else ""), r.baseline or ""]
        extra = (sum(o.source in NOISY_SOURCES for o in infos) + 1) if method else 0
        if getattr(r, "duplicate_of", None) is not None:
            cells += ["-"] * (len(infos) + extra + 2) + [f"duplicate of trial {r.duplicate_of} (not measured again)"]
            t.add_row(*cells)
            continue
        if r.state != "COMPLETE":
            why = r.fail_reason.splitlines()[0] if r.fail_reason else ""
            cells += ["-"] * (len(infos) + extra) + ["-", "-", f"[red]{r.state}[/red] {escape(why)}"]
            t.add_row(*cells)
            continue
        for o in infos:
            v = r.values.get(o.name)
            if method and o.source in NOISY_SOURCES:
                cells.append("-" if v is None or not r.remeasured else o.format(v))  # not re-measured: no final number
                before = (r.values_in_search or r.values).get(o.name)
                cells.append("-" if before is None else o.format(before))
            else:
                cells.append("-" if v is None else o.format(v))
        if method:
            iqr = r.metrics.get("latency_iqr_ms_remeasured")
            cells.append("-" if iqr is None else f"{iqr:.3g}")
        drop = r.metrics.get("accuracy_drop")
        flag = "" if r.feasible is not False else " [red](infeasible)[/red]"
        cells.append(("-" if drop is None else f"{drop:+.4f}") + flag)
        bits = r.metrics.get("effective_bits_per_weight")
        cells.append("-" if bits is None else f"{bits:.2f}")
        cells.append(escape(r.plan_summary if full else r.short_plan))
        t.add_row(*cells)
    console.print(t)
    if len(sources) > 1:
        listing = "; ".join(f"{s}: trial(s) {', '.join(map(str, n))}" for s, n in sorted(sources.items()))
        console.print(f"[bold yellow]warning:[/bold yellow] energy sources differ across these trials "
                      f"({escape(listing)}): their energy values are not comparable")
    notes = [f"{o.column}: {o.label}" for o in infos if o.source != o.name]
    if method:
        notes.append(f"re-measured = {method} (median of all runs, alternating between the variants; IQR = "
                     "spread): the front and the knee are decided on it; in-search = one timing per trial during "
                     "the search, kept for reference")
    if any(r.knee for r in records):
        notes.append("* knee point (balanced trade-off; "
                     + (f"promote it: {promote}" if promote else "`promote --policy knee` picks it") + ")")
    if not full and any(" · " in r.short_plan for r in records):
        notes.append("plan: format counts, then what differs from the nearest uniform baseline, [method, "
                     "calibration]; every layer: --full, or the run's `plan` and layer.* params in MLflow")
    notes.append("MLflow child runs are named <baseline|trial>-<trial number>; --json gives their run ids")
    for n in notes:
        console.print(escape(n))

