"""``precision-search sensitivity``: table printed, PNG/CSV/JSON written, one MLflow run (SQLite)."""

from __future__ import annotations

import csv
import shutil

from pipeline.cli import main
from tests.pipeline.sensitivity.conftest import EVAL_LIMIT, FRAGILE_FACTORY


def test_cli_writes_files_and_logs_to_mlflow(fragile_config, fragile_search_table, tmp_path, capsys):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    rc = main(["sensitivity", "--config", "search_spaces/digits_mlp.yaml",
               "--set", f"workdir={fragile_config.workdir}", "--set", f"model.factory={FRAGILE_FACTORY}",
               "--set", "name=digits-mlp-fragile", "--set", "measure.runs=5", "--set", "measure.warmup=1",
               "--set", "measure.energy.min_seconds=0.05", "--set", "measure.energy.repeats=1",
               "--eval-limit", str(EVAL_LIMIT), "--out", str(out), "--tracking-uri", uri])
    assert rc == 0
    text = capsys.readouterr().out
    # by default the table the search reads: the formats ORT CPU runs natively, from the search's cache
    assert "read from the cache" in text and "Spearman" in text and "fc1" in text
    assert "left out: bf16, fp8" in text and "--formats" in text
    png, = out.glob("*.png")
    assert png.stat().st_size > 5_000
    rows = list(csv.DictReader(next(out.glob("*.csv")).open()))
    assert {r["layer"] for r in rows} == {"fc1", "fc2", "fc3", "fc4"}
    assert all("subset" in r["eval"] for r in rows)
    assert {r["format"] for r in rows} == {"int8", "int4"}
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["digits-mlp-fragile"], output_format="list")
    assert run.data.tags["precision_search.kind"] == "sensitivity"
    assert "reference_accuracy" in run.data.metrics
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "sensitivity")}
    assert {f"sensitivity/{png.name}", "sensitivity/table.json"} <= names


def test_cli_names_a_bad_format(capsys):
    rc = main(["sensitivity", "--config", "search_spaces/digits_mlp.yaml", "--formats", "int3"])
    assert rc == 2
    assert "--formats" in capsys.readouterr().err


def test_cli_logs_to_the_store_the_search_uses_by_default(fragile_config, fragile_search_table, tmp_path, capsys,
                                                         monkeypatch):
    """No --tracking-uri, no MLFLOW_TRACKING_URI: the workdir's mlflow.db, as `search` (and `make ui`) use."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work = tmp_path / "w"
    shutil.copytree(fragile_config.work_path, work / fragile_config.name)  # the cached table, without re-measuring
    rc = main(["sensitivity", "--config", "search_spaces/digits_mlp.yaml", "--set", f"workdir={work}",
               "--set", f"model.factory={FRAGILE_FACTORY}", "--set", "name=digits-mlp-fragile",
               "--set", "measure.runs=5", "--set", "measure.warmup=1", "--set", "measure.energy.min_seconds=0.05",
               "--set", "measure.energy.repeats=1", "--eval-limit", str(EVAL_LIMIT), "--out", str(tmp_path / "o")])
    assert rc == 0
    db = (work / "mlflow.db").resolve()
    assert f"logged to MLflow (sqlite:///{db})" in " ".join(capsys.readouterr().out.split())
    (run,) = mlflow.MlflowClient(f"sqlite:///{db}").search_runs(
        [mlflow.MlflowClient(f"sqlite:///{db}").get_experiment_by_name("digits-mlp-fragile").experiment_id])
    assert run.data.tags["precision_search.kind"] == "sensitivity"
    # created by `sensitivity` first: artifacts beside the store, as the search's, not in ./mlruns of the cwd
    exp = mlflow.MlflowClient(f"sqlite:///{db}").get_experiment_by_name("digits-mlp-fragile")
    assert exp.artifact_location == (db.parent / "mlartifacts" / "digits-mlp-fragile").as_uri()


def test_an_experiment_on_a_database_without_a_server_keeps_its_artifacts_in_the_workdir(tmp_path):
    from pipeline.tracking.experiments import artifact_location

    url = "postgresql://postgres@127.0.0.1:5432/test"
    assert artifact_location(url, "e", tmp_path) == (tmp_path.resolve() / "mlartifacts" / "e").as_uri()
    assert artifact_location("http://127.0.0.1:5000", "e", tmp_path) is None  # the server stores them
    assert artifact_location(f"sqlite:///{tmp_path / 'm.db'}", "e") == (tmp_path.resolve() / "mlartifacts" / "e").as_uri()
