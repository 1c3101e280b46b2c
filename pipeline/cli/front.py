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
from pipeline.cli.common import add_config_arg, load

# Wide enough for per-layer plans when the output is a log file (rich assumes 80 columns there).
console = Console(width=None if Console().is_terminal else 400)  # logs and pipes get the full table


def register(sub) -> None:
    p = sub.add_parser("front", help="print the Pareto front of a study (one row per trial on it)")
    add_config_arg(p)
    p.add_argument("--study", default=None, help="study name (default: the config's name)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL (default: $PRECISION_SEARCH_STORAGE or sqlite:///<workdir>/<name>/optuna.db)")
    p.add_argument("--all", action="store_true", help="list every trial, not only the front")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.search.records import build_records, study_objectives
    from pipeline.search.storage import A_ENERGY_NOTE, A_ENERGY_PIN, A_ENERGY_SOURCE, A_PARENT_RUN, open_study

    cfg = load(args)
    study = open_study(cfg, args.study, args.storage)
    infos = study_objectives(study, cfg.metric.name)
    records = build_records(study, infos)
    shown = records if args.all else [r for r in records if r.on_front]
    first = infos[0]
    shown.sort(key=lambda r: (r.values.get(first.name, float("-inf") if first.direction == "maximize" else float("inf")),),
               reverse=first.direction == "maximize")
    attrs = study.user_attrs
    pin = attrs.get(A_ENERGY_PIN) or {}
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
        }, indent=2))
        return 0
    print_front(shown, infos, title=f"study {study.study_name}: "
                + (f"all {len(shown)} trials" if args.all else f"Pareto front ({len(shown)} of {len(records)} trials)"),
                energy_source=attrs.get(A_ENERGY_SOURCE),
                promote=command("promote", "--config", args.config, "--study", study.study_name, "--policy", "knee"))
    if pin.get("meter"):
        console.print(escape(f"energy meter pinned to {pin['meter']} ({pin.get('by', '')})"))
    note = attrs.get(A_ENERGY_NOTE)
    if note:
        console.print(f"energy objective: {escape(note)}")
    if not shown:
        console.print("[yellow]the front is empty: no finished trial meets the accuracy-drop constraint yet[/yellow]")
    return 0


def energy_sources(records) -> dict[str, list[int]]:
    """energy source -> trial numbers, over the completed, measured trials among ``records``."""
    out: dict[str, list[int]] = {}
    for r in records:
        if r.state == "COMPLETE" and getattr(r, "duplicate_of", None) is None and r.energy_source:
            out.setdefault(r.energy_source, []).append(r.number)
    return out


def print_front(records, infos, title: str, energy_source: str | None = None, promote: str | None = None) -> None:
    """The front as a table, with its notes; ``promote`` is the command that promotes the knee (a hint that
    runs verbatim, :func:`pipeline.hints.command`)."""
    """The table; the energy column names its source, and a mix of sources is called out."""
    sources = energy_sources(records)
    if not energy_source or energy_source == "none":
        energy_source = next(iter(sources)) if len(sources) == 1 else ("mixed" if sources else None)
    t = Table(title=title, title_justify="left")
    t.add_column("trial", justify="right")
    t.add_column("baseline")
    for o in infos:
        header = o.header
        if o.source == "energy" and energy_source:
            header += f" ({energy_source})"
        t.add_column(header, justify="right")
    t.add_column("drop", justify="right")
    t.add_column("bits/w", justify="right")
    t.add_column("plan", overflow="fold")
    for r in records:
        cells = [str(r.number) + (" *" if r.knee else ""), r.baseline or ""]
        if getattr(r, "duplicate_of", None) is not None:
            cells += ["-"] * (len(infos) + 2) + [f"duplicate of trial {r.duplicate_of} (not measured again)"]
            t.add_row(*cells)
            continue
        if r.state != "COMPLETE":
            why = r.fail_reason.splitlines()[0] if r.fail_reason else ""
            cells += ["-"] * len(infos) + ["-", "-", f"[red]{r.state}[/red] {escape(why)}"]
            t.add_row(*cells)
            continue
        for o in infos:
            v = r.values.get(o.name)
            cells.append("-" if v is None else o.format(v))
        drop = r.metrics.get("accuracy_drop")
        flag = "" if r.feasible is not False else " [red](infeasible)[/red]"
        cells.append(("-" if drop is None else f"{drop:+.4f}") + flag)
        bits = r.metrics.get("effective_bits_per_weight")
        cells.append("-" if bits is None else f"{bits:.2f}")
        cells.append(escape(r.plan_summary))
        t.add_row(*cells)
    console.print(t)
    if len(sources) > 1:
        listing = "; ".join(f"{s}: trial(s) {', '.join(map(str, n))}" for s, n in sorted(sources.items()))
        console.print(f"[bold yellow]warning:[/bold yellow] energy sources differ across these trials "
                      f"({escape(listing)}): their energy values are not comparable")
    notes = [f"{o.column}: {o.label}" for o in infos if o.source != o.name]
    if any(r.knee for r in records):
        notes.append("* knee point (balanced trade-off; "
                     + (f"promote it: {promote}" if promote else "`promote --policy knee` picks it") + ")")
    notes.append("MLflow child runs are named <baseline|trial>-<trial number>; --json gives their run ids")
    for n in notes:
        console.print(escape(n))

