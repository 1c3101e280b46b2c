"""Bad input ends with one clear message naming the field or file and the fix, exit code 2, no traceback.

Each case runs the real ``precision-search search`` command line (:func:`pipeline.cli.main`, in this process,
output captured) on a tiny digits study in a fresh workdir. Every one of them is refused before Ray starts
and before any trial is asked, so nothing of a study is lost. (The corrupt, empty and foreign Optuna
databases, and an Optuna database lost under a live MLflow record, are in test_store_lost.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.servers import free_port

from tests.faults.helpers import search_args


def _mlflow_db(path: Path) -> str:
    from mlflow import MlflowClient

    uri = f"sqlite:///{path}"
    MlflowClient(uri).search_experiments()  # creates and migrates the store
    return uri


def _optuna_db(path: Path) -> str:
    import optuna

    url = f"sqlite:///{path}"
    optuna.create_study(study_name="other", storage=url)
    return url


def _checkpoint(path: Path) -> Path:
    from tests.faults.bad_models import mlp_checkpoint

    mlp_checkpoint(str(path))
    return path


# name -> (build extra args from tmp_path, the texts the message must contain)
CASES = {
    "factory raises": (lambda t: ["--set", "model.factory=tests.faults.bad_models:raising"],
                       ["model.factory", "the factory could not find its weights"]),
    "checkpoint of another architecture": (
        lambda t: ["--set", f"model.checkpoint={_checkpoint(t / 'other.pt')}"], ["model.checkpoint", "other.pt",
                                                                                  "does not fit"]),
    "empty eval set": (lambda t: ["--set", "data.eval.source=tests.faults.bad_models:empty_eval"],
                       ["data.eval.source", "0 rows"]),
    "workdir is a file": (lambda t: ["--set", f"workdir={_touch(t / 'afile')}"], ["workdir", "afile", "is a file"]),
    "storage driver not installed": (lambda t: ["--storage", "mysql://user:secret@localhost/optuna"],
                                     ["--storage", "MySQLdb", "not installed"]),
    "storage not a URL": (lambda t: ["--storage", "optuna.db"], ["--storage", "not a database URL"]),
    "storage database unknown": (lambda t: ["--storage", "nosuchdb://host/x"], ["--storage", "nosuchdb"]),
    "storage is a folder": (lambda t: ["--storage", f"sqlite:///{t}"], ["--storage", "is a folder"]),
    "storage is the MLflow store": (lambda t: ["--storage", _mlflow_db(t / "m.db")],
                                    ["--storage", "not an Optuna one", "MLflow"]),
    "storage and tracking uri the same database": (
        lambda t: ["--storage", "postgresql://postgres@127.0.0.1:5432/test",
                   "--tracking-uri", "postgresql+psycopg://postgres@127.0.0.1/test"],
        ["--storage and --tracking-uri name the same database", "alembic_version", "search_path"]),
    "tracking uri is a folder": (lambda t: ["--tracking-uri", f"sqlite:///{t}"], ["--tracking-uri", "is a folder"]),
    "tracking uri is an Optuna database": (lambda t: ["--tracking-uri", _optuna_db(t / "o.db")],
                                           ["--tracking-uri", "cannot be opened as an MLflow store"]),
    "tracking server down": (lambda t: ["--tracking-uri", f"http://127.0.0.1:{free_port()}"],
                             ["--tracking-uri", "does not answer"]),
    "batch size beyond memory": (lambda t: ["--set", "measure.batch_size=2000000000"],
                                 ["measure.batch_size", "GiB", "available"]),
    "trials zero": (lambda t: ["--trials", "0"], ["--trials"]),
    "parallel zero": (lambda t: ["--parallel", "0"], ["--parallel"]),
    "study name invalid": (lambda t: ["--study", "my study!"], ["--study", "not a valid study name"]),
    "time budget unreadable": (lambda t: ["--time-budget", "soon"], ["--time-budget"]),
    "override without =": (lambda t: ["--set", "measure.runs"], ["--set", "KEY=VALUE"]),
    "unknown config field": (lambda t: ["--set", "measure.bogus=1"], ["measure.bogus"]),
    "data source not importable": (lambda t: ["--set", "data.eval.source=no_such_module:fn"],
                                   ["data.eval.source", "no_such_module"]),
    "data keys not named like forward()'s arguments": (
        lambda t: ["--set", "model.factory=tests.faults.bad_models:two_input_mlp"]
        + [a for f in ("calibration", "eval", "train") for a in ("--set", f"data.{f}.source=tests.faults.bad_models:split_rows")],
        ["data.calibration.source", "unexpected keyword argument 'first'", "name them like forward()'s parameters"]),
    # the metric is scored on the FP32 reference before Ray starts (pipeline.search.preflight.check_metric)
    "metric output not a model output": (lambda t: ["--set", "metric.output=pred"],
                                         ["metric.output", "'pred'", "fix metric.output"]),
    "targets shorter than the eval set": (
        lambda t: ["--set", "data.eval.source=tests.faults.bad_models:eval_inputs",
                   "--set", "data.targets.source=tests.faults.bad_models:short_targets"],
        ["metric.name: accuracy", "(50,)", "data.targets"]),
    "config file missing": (lambda t: ["--config", str(t / "missing.yaml")], ["missing.yaml", "does not exist"]),
}


def _touch(p: Path) -> Path:
    p.write_text("not a folder")
    return p


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_message(case, tmp_path, capsys, monkeypatch):
    from pipeline.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PRECISION_SEARCH_STORAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    import logging

    monkeypatch.setattr(logging.root, "handlers", [])  # main() logs to this test's captured stderr
    import ray

    ray_before = ray.is_initialized()
    build, needles = CASES[case]
    extra = build(tmp_path)
    rc = main(search_args(tmp_path / "work", "--parallel", "1", "--quiet") + extra)
    out = capsys.readouterr()
    text = out.out + out.err
    assert rc == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert text.count("error:") == 1, text[-3000:]
    for n in needles:
        assert n in text, f"{n!r} not in {text[-2000:]!r}"
    assert "secret" not in text  # a password in a URL is never shown
    assert ray.is_initialized() == ray_before  # refused before Ray started
