"""``precision-search promote``: pick a trial from the front and register it in the MLflow Model Registry."""

from __future__ import annotations

import json

from pipeline.hints import command
from pipeline.cli.common import add_config_arg, add_store_args, console, load, tracking_uri


def register(sub) -> None:
    p = sub.add_parser(
        "promote",
        help="register a front trial's model in the MLflow Model Registry and point an alias at it",
        description="Choose a candidate by policy (or --trial N) from a study's Pareto front, register its ONNX model "
                    "(and TensorRT engine, where built), tag it with its plan and metrics, write a model card, "
                    "and set an alias (default: tracking.alias, 'champion'). Promoting the same trial again "
                    "re-points the alias without creating a new version.",
    )
    add_config_arg(p)
    p.add_argument("--study", help="study name (default: the latest study of the config's experiment)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int, help="promote this trial number (must be complete and on the front)")
    from pipeline.promotion.choose import policies

    which.add_argument("--policy", choices=list(policies()),
                       help="max-accuracy: best metric within --max-energy-j/--max-latency-ms; "
                            "min-<objective> (min-energy, min-latency, min-size, ...): lowest value within "
                            "--max-accuracy-drop; knee: the front's knee point")
    p.add_argument("--max-energy-j", type=float, help="max-accuracy budget: joules per inference")
    p.add_argument("--max-latency-ms", type=float, help="max-accuracy budget: p50 latency in ms")
    p.add_argument("--max-accuracy-drop", type=float,
                   help="min-energy limit versus FP32, in metric units (default: search.max_accuracy_drop)")
    p.add_argument("--name", help="registered model name (default: tracking.registry_name, else the config's name)")
    p.add_argument("--alias", help="alias to set (default: tracking.alias)")
    add_store_args(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from mlflow import MlflowClient

    from pipeline.promotion.choose import Budget, choose, explicit_choice
    from pipeline.promotion.publish import promote
    from pipeline.tracking.record import RecordError, quiet_mlflow, read_study
    from pipeline.urls import mask_url

    quiet_mlflow()
    cfg = load(args)
    uri = tracking_uri(args, cfg, args.study)
    shown = mask_url(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = args.name or cfg.tracking.registry_name or cfg.name
    alias = args.alias or cfg.tracking.alias
    experiment = cfg.tracking.experiment or cfg.name
    drop = args.max_accuracy_drop if args.max_accuracy_drop is not None else cfg.search.max_accuracy_drop
    try:
        study = read_study(client, experiment, args.study)
        if args.trial is not None:
            choice = explicit_choice(study, args.trial)
        else:
            # the study's own objectives and metric direction, where its record has them (not the config's)
            hib = study.higher_is_better
            choice = choose(study, args.policy,
                            Budget(max_energy_j=args.max_energy_j, max_latency_ms=args.max_latency_ms,
                                   max_accuracy_drop=drop),
                            objectives=study.objectives or cfg.search.objectives,
                            higher_is_better=bool(cfg.metric.higher_is_better) if hib is None else hib)
        done = promote(client, study, choice, registry_name=name, alias=alias, metric_name=cfg.metric.name,
                       tracking_uri=uri)
    except RecordError as exc:  # a refused promotion (PromotionError) or a missing record
        console.print(f"[red]refused:[/red] {exc}", highlight=False, soft_wrap=True)
        return 2
    if args.json:
        print(json.dumps({"name": done.registered_name, "version": done.version, "alias": done.alias,
                          "uri": done.uri, "trial": done.trial_number, "run_id": done.run_id,
                          "model_id": done.model_id, "created": done.created, "policy": done.policy,
                          "reason": done.reason, "engine": done.engine, "tracking_uri": shown}, indent=2))
        return 0
    verb = "registered as new version" if done.created else "already registered as version"
    console.print(f"trial {done.trial_number} ({done.policy}: {done.reason})", highlight=False, soft_wrap=True)
    console.print(f"{verb} [bold]{done.registered_name} v{done.version}[/bold]; alias @{done.alias} -> v{done.version}",
                  highlight=False, soft_wrap=True)
    console.print(f"load it: {command('load', f'{done.registered_name}@{done.alias}', '--tracking-uri', shown)}",
                  highlight=False, soft_wrap=True)
    return 0
