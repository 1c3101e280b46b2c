"""pipeline.tracking against a real MLflow SQLite store, with a real measured candidate."""

from __future__ import annotations

import csv
import io

import mlflow
import onnx
import pytest
import yaml

from pipeline.tracking import schema as S
from pipeline.plan import QuantPlan
from pipeline.objectives import ObjectiveInfo
from pipeline.search.records import TrialRecord
from pipeline.tracking.plots import front_csv, plot_front, plot_front_png
from pipeline.tracking.record import StudyTracker, default_tracking_uri


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow SQLite store for the module (creating one runs MLflow's migrations: seconds)."""
    return tmp_path_factory.mktemp("mlflow-store")


@pytest.fixture(scope="module")
def measured(mlp_config, tmp_path_factory):
    """One real candidate (uniform int8 over the digits MLP), quantized and measured."""
    from pipeline.evaluate import Evaluator

    out = tmp_path_factory.mktemp("int8")
    return Evaluator(mlp_config).evaluate(QuantPlan.uniform("int8"), out)


OBJ = [
    ObjectiveInfo(name="accuracy", direction="maximize", source="accuracy", label="accuracy"),
    ObjectiveInfo(name="energy", direction="minimize", source="latency", label="latency p50 (ms)"),
    ObjectiveInfo(name="size", direction="minimize", source="size", label="size (bytes)"),
]


def _records():
    base = dict(state="COMPLETE", plan_summary="fc1=int8 fc2=int8")
    return [
        TrialRecord(number=0, baseline="uniform-fp32", values={"accuracy": 0.97, "energy": 0.1, "size": 400.0},
                    feasible=True, on_front=True, **base),
        TrialRecord(number=1, baseline="uniform-int8", values={"accuracy": 0.96, "energy": 0.05, "size": 120.0},
                    feasible=True, on_front=True, knee=True, **base),
        TrialRecord(number=2, values={"accuracy": 0.80, "energy": 0.04, "size": 80.0}, feasible=False, **base),
        TrialRecord(number=3, values={"accuracy": 0.95, "energy": 0.2, "size": 300.0}, feasible=True, **base),
        TrialRecord(number=4, state="FAIL", fail_reason="boom"),
    ]


def test_default_store_is_sqlite_in_the_workdir_and_env_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(tmp_path / "w") == f"sqlite:///{(tmp_path / 'w').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert default_tracking_uri(tmp_path / "w") == "http://tracking.example:5000"


def test_parent_and_child_runs_hold_the_record(store, measured, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work = store
    tr = StudyTracker("exp-a", "study-1", work, "cafe")
    assert tr.uri == f"sqlite:///{work.resolve()}/mlflow.db"
    exp = tr.client.get_experiment(tr.experiment_id)
    assert exp.artifact_location == (work.resolve() / "mlartifacts" / "exp-a").as_uri()
    # the same study finds its parent again (resume); another study gets its own
    assert StudyTracker("exp-a", "study-1", work, "cafe").parent_run_id == tr.parent_run_id
    assert StudyTracker("exp-a", "study-2", work, "cafe").parent_run_id != tr.parent_run_id

    plan = QuantPlan.model_validate(yaml.safe_load(measured.plan_yaml))
    run_id = tr.start_trial(3, "uniform-int8", measured.plan_yaml, measured.plan_summary,
                            {"fc1": "int8", "fc2": "int8", "fc3": "int8", "fc4": "int8"},
                            {"method": plan.method, "calibration": "minmax"})
    run = tr.client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags[S.TAG_STATE] == "RUNNING"
    tr.finish_trial(run_id, measured, {"accuracy": measured.measurement.accuracy}, True, 1.5)

    run = tr.client.get_run(run_id)
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert run.info.status == "FINISHED"
    assert tags["mlflow.parentRunId"] == tr.parent_run_id
    assert tags[S.TAG_STUDY] == "study-1" and tags[S.TAG_ROLE] == S.ROLE_TRIAL
    assert tags[S.TAG_TRIAL_NUMBER] == "3" and tags[S.TAG_STATE] == "COMPLETE"
    assert tags[S.TAG_BASELINE] == "uniform-int8" and tags[S.TAG_METHOD] == "ptq"
    assert tags[S.TAG_BACKEND] == measured.measurement.backend
    assert tags[S.TAG_DEVICE] == measured.measurement.device
    assert tags[S.TAG_EXECUTION] in ("native", "emulated", "mixed")
    assert tags[S.TAG_ENERGY_SOURCE] == (measured.measurement.energy.source if measured.measurement.energy else "none")
    assert params["layer.fc1"] == "int8" and params["plan"] == measured.plan_summary
    assert set(measured.flat_metrics()) <= set(metrics)
    assert metrics["accuracy"] == pytest.approx(measured.measurement.accuracy)
    files = {a.path for a in tr.client.list_artifacts(run_id)}
    assert {S.ARTIFACT_PLAN, S.ARTIFACT_RESULT} <= files
    assert QuantPlan.model_validate(yaml.safe_load(
        mlflow.artifacts.load_text(f"runs:/{run_id}/{S.ARTIFACT_PLAN}"))) == plan

    # the candidate is an ONNX-flavor model: it loads back and it can be registered
    model_uri = tags["precision_search.model_uri"]
    loaded = mlflow.onnx.load_model(model_uri)
    assert isinstance(loaded, onnx.ModelProto)
    assert len(loaded.graph.node) == len(onnx.load(measured.artifact_path).graph.node)
    version = mlflow.register_model(f"runs:/{run_id}/{S.ARTIFACT_MODEL}", "digits-mlp-test")
    assert int(version.version) == 1 and version.source == model_uri


def test_failed_trial_is_failed_with_its_reason(store, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tr = StudyTracker("exp-b", "s", store, "cafe")
    run_id = tr.start_trial(0, None, "layers: {'*': fp8}\n", "fc1=fp8", {"fc1": "fp8"}, {"method": "ptq"})
    tr.fail_trial(run_id, "non-finite values (NaN/Inf) in model output(s) ['output']", 0.3)
    run = tr.client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[S.TAG_STATE] == "FAIL"
    assert "NaN" in run.data.tags[S.TAG_FAIL_REASON]
    assert tr.run_status(run_id) == ("FAILED", "FAIL")
    assert tr.trial_runs() == {0: [run_id]}


def test_front_refresh_tags_children_and_writes_table_and_plots(store, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tr = StudyTracker("exp-c", "s", store, "cafe")
    records = _records()
    for r in records:
        r.run_id = tr.start_trial(r.number, r.baseline, "layers: {}\n", r.plan_summary, {}, {"method": "ptq"})
    tr.update_front(records, OBJ, {"front_size": 2, "hypervolume": 0.3}, step=5, plots=True)
    for r in records:
        if r.state == "COMPLETE":
            assert tr.client.get_run(r.run_id).data.tags[S.TAG_PARETO] == ("true" if r.on_front else "false")
    parent = tr.client.get_run(tr.parent_run_id)
    assert parent.data.metrics["front_size"] == 2 and parent.data.metrics["hypervolume"] == 0.3
    arts = {a.path for a in tr.client.list_artifacts(tr.parent_run_id, "pareto")}
    assert {S.ARTIFACT_FRONT_TABLE, S.ARTIFACT_FRONT_PLOT_PNG, S.ARTIFACT_FRONT_PLOT_SVG} <= arts
    rows = list(csv.DictReader(io.StringIO(mlflow.artifacts.load_text(
        f"runs:/{tr.parent_run_id}/{S.ARTIFACT_FRONT_TABLE}"))))
    assert [int(r["trial"]) for r in rows] == [0, 1]  # the front only, best accuracy first
    assert rows[1]["knee"] == "True" and rows[1]["baseline"] == "uniform-int8"
    # a trial leaving the front is untagged on the next refresh
    records[0].on_front = False
    tr.update_front(records, OBJ, {"front_size": 1}, step=6, plots=False)
    assert tr.client.get_run(records[0].run_id).data.tags[S.TAG_PARETO] == "false"


def test_plots_label_baselines_and_mark_the_front(tmp_path):
    png, svg = tmp_path / "f.png", tmp_path / "f.svg"
    plot_front(_records(), OBJ, [png, svg], title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = svg.read_text()
    assert text.lstrip().startswith(("<?xml", "<svg")) and svg.stat().st_size < 500_000  # renders in MLflow
    # the legend and labels a reviewer reads (matplotlib writes SVG text as comments + paths)
    for words in ("Pareto front", "uniform baselines", "FP32 reference", "all int8", "knee (trial",
                  "over the accuracy-drop limit"):
        assert words in text, words
    # no completed trials yet: still a valid image, no exception
    plot_front_png([TrialRecord(number=0, state="FAIL")], OBJ, tmp_path / "empty.png")
    assert (tmp_path / "empty.png").stat().st_size > 0
    assert front_csv([], OBJ).startswith("trial,baseline,knee,feasible,accuracy")


def test_role_group_params_are_logged_under_legal_keys(store, monkeypatch):
    """``search.group_layers: role`` names its Optuna params ``group:...layer.*.query``; MLflow refuses ``*``."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tr = StudyTracker("exp-groups", "s", store, "cafe")
    knobs = {"method": "ptq", "group:enc.layer.*.attention.self.query": "int8", "layer:head(1)": "int4"}
    run_id = tr.start_trial(0, None, "layers: {}\n", "int8x2", {"enc.layer.0.attention.self.query": "int8"}, knobs)
    params = tr.client.get_run(run_id).data.params
    assert params["group:enc.layer.all.attention.self.query"] == "int8"
    assert params["layer:head_1_"] == "int4"
    assert params[S.PARAM_LAYER_PREFIX + "enc.layer.0.attention.self.query"] == "int8"
