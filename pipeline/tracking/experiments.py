"""MLflow experiments and logged models that are not one study's record: where a new experiment keeps its
artifacts, a non-ONNX file as a logged model, and the sensitivity table's own run (``precision-search
sensitivity``). Below :mod:`pipeline.tracking.record` (which uses them) and above the sensitivity package
(whose table it logs), so the sensitivity code itself never imports MLflow's tracking layer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.tracking import schema as S

if TYPE_CHECKING:
    from pipeline.sensitivity.table import SensitivityTable

DEFAULT_ARTIFACTS = "mlartifacts"  # beside a server-less store: <db folder>/mlartifacts/<experiment>


def artifact_location(uri: str, experiment: str, workdir: str | Path | None = None) -> str | None:
    """Where a new experiment's artifacts go when no server decides it (MLflow's own default is ./mlruns in
    whatever folder the command ran from: the repository, a home folder...): for a SQLite store
    ``mlartifacts/<experiment>`` next to the database; for another database URL (PostgreSQL, MySQL: no
    server) ``<workdir>/mlartifacts/<experiment>``; None for a tracking server (it stores them)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.resolve().parent / DEFAULT_ARTIFACTS / experiment).as_uri()
    if "://" in uri and not uri.startswith(("http://", "https://", "databricks", "file:")) and workdir is not None:
        return (Path(workdir).resolve() / DEFAULT_ARTIFACTS / experiment).as_uri()
    return None


def ensure_experiment(client, uri: str, name: str, workdir: str | Path | None = None, tags: dict | None = None) -> str:
    """The experiment's id, created (with :func:`artifact_location`) when it does not exist."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location=artifact_location(uri, name, workdir), tags=tags)
    return exp.experiment_id


def log_file_model(client, run_id: str, art: Path, plan_summary: str) -> str:
    """A non-ONNX artifact (a ``.tflite`` flatbuffer) as the run's logged model ``candidate``: MLflow has no
    flavor for it, so the file goes into a LoggedModel of its own (model_type = its suffix), which the
    registry can version like the ONNX ones; ``load`` says how to run it. Returns the model id."""
    import shutil
    import tempfile

    model = client.create_logged_model(client.get_run(run_id).info.experiment_id, name=S.ARTIFACT_MODEL,
                                       source_run_id=run_id, model_type=art.suffix.lstrip("."),
                                       tags={S.VTAG_PLAN: plan_summary[:2000]})
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy2(art, Path(tmp) / art.name)
        client.log_model_artifacts(model.model_id, tmp)
    client.finalize_logged_model(model.model_id, "READY")
    return model.model_id


def log_sensitivity(t: "SensitivityTable", files: list[Path], tracking_uri: str, experiment: str,
                    workdir: str | Path | None = None) -> str:
    """One MLflow run holding the sensitivity table (as an MLflow table and the CSV/JSON) and the heat map."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    # created where the search's own experiment would be (artifacts beside the store, not in ./mlruns)
    mlflow.set_experiment(experiment_id=ensure_experiment(mlflow.MlflowClient(tracking_uri), tracking_uri, experiment,
                                                          workdir))
    rows = {"layer": [], "format": [], "drop": [], "execution": [], "size_share": [], "latency_share_estimate": []}
    for c in t.cells:
        cost = t.cost(c.layer)
        rows["layer"].append(c.layer)
        rows["format"].append(c.format.value)
        rows["drop"].append(c.drop)
        rows["execution"].append(c.execution)
        rows["size_share"].append(cost.size_share)
        rows["latency_share_estimate"].append(cost.latency_share)
    with mlflow.start_run(run_name=f"sensitivity-{t.model}") as run:
        mlflow.set_tags({"precision_search.kind": "sensitivity", "backend": t.backend, "device": t.device,
                         "sensitivity.source": t.source, "sensitivity.eval": t.eval_label,
                         "sensitivity.latency_source": t.latency_source, "sensitivity.cache_key": t.cache_key})
        mlflow.log_params({"metric": t.metric, "formats": ",".join(f.value for f in t.formats),
                           "layers": len(t.layers), "plan_defaults": t.plan_defaults})
        mlflow.log_metric("reference_accuracy", t.reference_accuracy)
        if t.proxy and t.proxy.spearman is not None:
            mlflow.log_metric("proxy_spearman", t.proxy.spearman)
        mlflow.log_table(rows, artifact_file="sensitivity/table.json")
        for f in files:
            mlflow.log_artifact(str(f), artifact_path="sensitivity")
        return run.info.run_id
