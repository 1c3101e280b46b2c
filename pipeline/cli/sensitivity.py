"""``precision-search sensitivity``: per layer x format, the metric drop with only that layer quantized.

Measured on the artifact through the configured backend (an eval subset, labelled), cached per
reference model + eval data + format set + metric, printed as a table, written as a heat map PNG,
a CSV and JSON, and logged to MLflow (the store ``search`` uses: ``--tracking-uri``, else
``MLFLOW_TRACKING_URI``, else ``<workdir>/mlflow.db``).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cli.common import add_config_arg, console, load


def register(sub) -> None:
    p = sub.add_parser("sensitivity", help="per-layer sensitivity table and heat map (cached)")
    add_config_arg(p)
    p.add_argument("--eval-limit", type=int, default=None,
                   help="eval rows per single-layer candidate (default: search.sensitivity.eval_limit; 0 = all)")
    p.add_argument("--formats", default=None,
                   help="comma-separated, e.g. int8,int4 (default: the formats the search measures: search.formats "
                        "without fp32 and without those the backend only emulates, unless search.include_emulated)")
    p.add_argument("--layers", default=None,
                   help="comma-separated layer names (default: the searched layers: all but search.pin/exclude)")
    p.add_argument("--per-layer", action="store_true",
                   help="measure each layer alone even where the search groups layers (search.group_layers); "
                        "by default a grouped search's table measures each group as one candidate")
    p.add_argument("--proxy", action="store_true",
                   help="measure only --check-layers layers on the artifact, fill the rest from the proxy")
    p.add_argument("--check-layers", type=int, default=4, help="layers measured on the artifact with --proxy")
    p.add_argument("--no-cache", action="store_true", help="measure again even if a cached table exists")
    p.add_argument("--out", default=None, help="folder for the PNG/CSV/JSON (default: <workdir>/<name>/sensitivity)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db, as search)")
    p.add_argument("--rows", type=int, default=None, help="show only the N most sensitive layers")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pipeline.config import ConfigError
    from pipeline.formats import Format
    from pipeline.sensitivity import build_sensitivity
    from pipeline.sensitivity.render import heatmap, rich_table, summary_lines, write_csv
    from pipeline.tracking.experiments import log_sensitivity

    cfg = load(args)
    try:
        formats = [Format(f.strip()) for f in args.formats.split(",")] if args.formats else None
    except ValueError as exc:
        raise ConfigError(f"--formats: {exc}; use names from {[f.value for f in Format]}") from None
    eval_limit = -1 if args.eval_limit is None else (args.eval_limit or None)
    layers = [n.strip() for n in args.layers.split(",")] if args.layers else None
    groups, grouping, skip = None, "layer", None
    if formats is None and layers is None:
        # The search's own scope, so the cached table is the one `search` reads (search.sensitivity.seed).
        from pipeline.sensitivity.seeding import reference_for, table_scope

        scope = table_scope(cfg, reference_for(cfg).layer_table)
        formats, layers, skip = scope.formats, scope.layers, scope.skip or None
        if scope.groups and not args.per_layer and not args.proxy:
            groups, grouping = scope.groups, scope.grouping
            console.print(f"measured per {grouping} group ({len(groups)} groups of {len(layers)} layers), as the search "
                          "decides them (search.group_layers); --per-layer to measure each layer alone",
                          highlight=False, soft_wrap=True)
        if scope.left_out:
            console.print(f"left out: {', '.join(f.value for f in scope.left_out)} (only emulated on this backend, so "
                          "the search does not try them); --formats to measure them anyway",
                          highlight=False, soft_wrap=True)
        if not formats:
            raise ConfigError("search.formats: nothing to measure - every searched format besides fp32 is only "
                              "emulated on this backend; pass --formats or set search.include_emulated: true")
    with Progress(TextColumn("[bold]sensitivity[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console, transient=True) as bar:
        task = bar.add_task("exporting the reference", total=None)

        def progress(done: int, total: int, text: str) -> None:
            bar.update(task, completed=done, total=total, description=text)

        table = build_sensitivity(cfg, formats=formats, eval_limit=eval_limit, layers=layers,
                                  mode="proxy" if args.proxy else "artifact", check_layers=args.check_layers,
                                  use_cache=not args.no_cache, progress=progress, groups=groups, grouping=grouping,
                                  skip=skip)
    # Piped or logged output has no terminal width (rich assumes 80): give the table the room it needs.
    from rich.console import Console

    (console if console.is_terminal else Console(width=200)).print(rich_table(table, max_rows=args.rows))
    for line in summary_lines(table):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    out = Path(args.out) if args.out else cfg.work_path / "sensitivity"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"sensitivity-{table.cache_key}"
    files = [heatmap(table, out / f"{stem}.png"), write_csv(table, out / f"{stem}.csv")]
    json_path = out / f"{stem}.json"
    json_path.write_text(table.model_dump_json(indent=1))
    files.append(json_path)
    console.print("wrote " + ", ".join(str(f) for f in files), highlight=False, soft_wrap=True)
    from pipeline.tracking.record import default_tracking_uri
    from pipeline.urls import mask_url

    # The store `search` logs to (and `make ui` shows): --tracking-uri, $MLFLOW_TRACKING_URI, else the workdir's.
    uri = args.tracking_uri or default_tracking_uri(cfg.work_root)
    run_id = log_sensitivity(table, files, uri, cfg.tracking.experiment or cfg.name, cfg.work_root)
    console.print(f"logged to MLflow ({mask_url(uri)}), run {run_id}", highlight=False, soft_wrap=True)
    return 0
