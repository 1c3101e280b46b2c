"""``precision-search load NAME@ALIAS``: fetch a promoted model from the registry and run it with ONNX Runtime."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from pipeline.cli.common import add_store_args, console, tracking_uri


def register(sub) -> None:
    p = sub.add_parser(
        "load",
        help="download a registered model (NAME@ALIAS or NAME/VERSION) and run it with ONNX Runtime",
        description="Resolves the reference in the MLflow Model Registry, downloads the model and runs it with ONNX "
                    "Runtime: on the config's eval set (--config: reports the task metric next to the registered one), "
                    "on --input (.npy/.npz), or on one random batch as a smoke test.",
    )
    p.add_argument("model", nargs="?", help="NAME@ALIAS (e.g. digits-mlp@champion), NAME/VERSION or models:/... "
                   "(default with --config: its tracking.registry_name@tracking.alias, what `promote` registered)")
    p.add_argument("--config", "-c", help="evaluate on this config's eval set (data.eval) with its metric")
    p.add_argument("--input", help=".npy (single-input model) or .npz (one array per input name) to run")
    p.add_argument("--output", help="write the outputs to this .npz")
    p.add_argument("--dst", help="download folder (default: a temporary folder, removed afterwards)")
    p.add_argument("--provider", action="append",
                   help="ONNX Runtime execution provider (repeatable; default CPUExecutionProvider)")
    p.add_argument("--study", help="with --storage and --config: the study whose recorded MLflow URI to use "
                                   "(default: the config's name)")
    add_store_args(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _random_feeds(session, batch: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else batch for d in i.shape]
        if "float" in i.type:
            dtype = np.float16 if "float16" in i.type else np.float32
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
        elif "int" in i.type:
            # ones, not zeros: an all-zero attention mask masks every position and softmax returns NaN,
            # which would report a healthy model as "finite: False"; token id 1 exists in any vocabulary
            feeds[i.name] = np.ones(shape, dtype=np.int64 if "int64" in i.type else np.int32)
        elif "bool" in i.type:
            feeds[i.name] = np.ones(shape, dtype=bool)
        else:
            raise ValueError(f"input {i.name!r} has type {i.type}; pass --input")
    return feeds


def _file_feeds(path: str, session, onnx_path: Path) -> dict[str, np.ndarray]:
    """The arrays of ``--input``, checked against the model's inputs (names, ranks, fixed sizes, dtypes), so a
    wrong file ends in one line naming the input and what the model takes, not in ONNX Runtime's traceback."""
    from pipeline.config import ConfigError
    from pipeline.data_check import check_feeds, onnx_input_specs

    names = [i.name for i in session.get_inputs()]
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            feeds = {k: z[k] for k in z.files if k in names}
        missing = sorted(set(names) - set(feeds))
        if missing:
            raise ConfigError(f"--input {path}: no array named {missing} (the model's inputs are {names})")
    elif len(names) != 1:
        raise ConfigError(f"--input {path}: the model has inputs {names}; give an .npz with one array per name")
    else:
        feeds = {names[0]: np.load(path, allow_pickle=False)}
    problems = check_feeds(feeds, onnx_input_specs(onnx_path))
    if problems:
        raise ConfigError(f"--input {path}: the arrays do not fit the model's inputs:\n  - " + "\n  - ".join(problems))
    return feeds


def run(args) -> int:
    from mlflow import MlflowClient

    from pipeline.promotion.choose import PromotionError
    from pipeline.promotion.load import load_registered
    from pipeline.tracking.record import quiet_mlflow
    from pipeline.urls import mask_url

    quiet_mlflow()
    cfg = None
    if args.config:
        from pipeline.config import load_config

        cfg = load_config(args.config)
    if args.model is None:
        if cfg is None:
            console.print("[red]error:[/red] model: give NAME@ALIAS (e.g. digits-mlp@champion), or --config to load "
                          "what `promote` registered for it", highlight=False, soft_wrap=True)
            return 2
        args.model = f"{cfg.tracking.registry_name or cfg.name}@{cfg.tracking.alias}"
    uri = tracking_uri(args, cfg, args.study)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            loaded = load_registered(client, args.model, args.dst or tmp)
        except PromotionError as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            return 2
        session = loaded.session(args.provider)
        report: dict = {"uri": loaded.uri, "name": loaded.name, "version": loaded.version,
                        "onnx": str(loaded.onnx_path) if args.dst else loaded.onnx_path.name,
                        "trial": loaded.tags.get("precision_search.trial_number"),
                        "study": loaded.tags.get("precision_search.study"),
                        "providers": session.get_providers(), "tracking_uri": mask_url(uri),
                        "inputs": {i.name: [str(d) for d in i.shape] for i in session.get_inputs()},
                        "outputs": [o.name for o in session.get_outputs()],
                        "tensorrt_engine": loaded.tags.get("precision_search.tensorrt_engine")}
        out_names = report["outputs"]
        if cfg is not None:
            from pipeline.data import load_eval_set
            from pipeline.measure import task_metric

            ds = load_eval_set(cfg)  # inputs apart from targets (data.targets) or the old (inputs, targets) form
            names = {i.name for i in session.get_inputs()}
            chunks: dict[str, list] = {n: [] for n in out_names}
            for feeds in ds.batches(cfg.measure.eval_batch):
                for n, o in zip(out_names, session.run(out_names, {k: v for k, v in feeds.items() if k in names})):
                    chunks[n].append(o)
            outputs = {k: np.concatenate(v) for k, v in chunks.items()}
            report["rows"] = len(ds)
            if ds.targets is not None:
                report["metric"] = cfg.metric.name
                report["value"] = task_metric(cfg, outputs, ds.targets)
                reg = loaded.tags.get("metric.accuracy")
                report["registered_value"] = float(reg) if reg is not None else None
        else:
            feeds = _file_feeds(args.input, session, loaded.onnx_path) if args.input else _random_feeds(session)
            outs = session.run(out_names, feeds)
            outputs = dict(zip(out_names, outs))
            report["input"] = args.input or "random batch of 1 (smoke test)"
            report["output_shapes"] = {k: list(v.shape) for k, v in outputs.items()}
            report["finite"] = bool(all(np.all(np.isfinite(v)) for v in outs if np.issubdtype(v.dtype, np.floating)))
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            np.savez(args.output, **outputs)
            report["saved"] = args.output
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    console.print(f"[bold]{loaded.name} v{loaded.version}[/bold] ({loaded.uri}) — trial {report['trial']} of study "
                  f"{report['study']}, ONNX Runtime {report['providers']}", highlight=False, soft_wrap=True)
    if "value" in report:
        reg = report.get("registered_value")
        console.print(f"{report['metric']} on {report['rows']} eval rows: {report['value']:.4f}"
                      + (f" (registered: {reg:.4f})" if reg is not None else ""), highlight=False, soft_wrap=True)
    elif "output_shapes" in report:
        console.print(f"ran {report['input']}: outputs {report['output_shapes']}, finite: {report['finite']}",
                      highlight=False, soft_wrap=True)
    return 0
