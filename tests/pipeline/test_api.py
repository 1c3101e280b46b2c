"""The Python API on an in-memory torch model and arrays (digits), with the real runtimes.

ONNX Runtime measures, Optuna samples, Ray runs the trials (workers get the model through Ray's
object store), MLflow records into SQLite. Also: ``import pipeline`` stays light, the API names
survive submodule imports, errors name the argument, and the README's Python API block
runs verbatim in a fresh interpreter.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import pipeline
from pipeline.config import ConfigError
from pipeline.examples.digits import calibration_data, eval_data, train_data

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _own_stores(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PRECISION_SEARCH_STORAGE", raising=False)


@pytest.fixture(scope="module")
def model():
    """A model that only exists in memory (no factory, no checkpoint), left in training mode."""
    x, y = train_data()
    torch.manual_seed(0)
    m = torch.nn.Sequential(OrderedDict(fc1=torch.nn.Linear(64, 64), act=torch.nn.ReLU(), fc2=torch.nn.Linear(64, 10)))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(120):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    return m


@pytest.fixture(scope="module")
def data():
    x_cal, _ = calibration_data()
    x_eval, y_eval = eval_data()
    return x_cal, x_eval, y_eval


FAST = {"measure": {"runs": 3, "warmup": 1, "energy": {"min_seconds": 0.05, "repeats": 1}}}


def test_import_pipeline_is_light():
    code = ("import sys, pipeline; heavy = [m for m in ('torch', 'onnxruntime', 'optuna', 'ray', 'mlflow', "
            "'tensorflow', 'pipeline.api') if m in sys.modules]; assert not heavy, heavy; "
            "assert callable(pipeline.search) and 'search' in dir(pipeline)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


def test_api_names_survive_importing_submodules_of_the_same_name():
    import pipeline.evaluate
    import pipeline.layers
    from pipeline.evaluate import Evaluator
    from pipeline.layers import LayerTable

    assert pipeline.layers.LayerTable is LayerTable and pipeline.evaluate.Evaluator is Evaluator
    assert callable(pipeline.layers) and callable(pipeline.evaluate) and callable(pipeline.quantize)
    assert "in-memory" in (pipeline.search.__doc__ or "") or "Search per-layer" in pipeline.search.__doc__
    with pytest.raises(AttributeError):
        pipeline.quantize.nothing_here  # noqa: B018 - no pipeline/quantize.py: a clear AttributeError


def test_layers_quantize_and_evaluate_an_in_memory_model(model, data, tmp_path):
    x_cal, x_eval, y_eval = data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()

    table = pipeline.layers(model, sample_inputs=x_cal[:2], workdir=tmp_path)
    assert table.names == ["fc1", "fc2"] and table.quantizable_share() == 1.0
    assert "2 quantizable layers" in table.describe()

    art = pipeline.quantize(model, "int8", calibration=x_cal, out=tmp_path / "out" / "int8.onnx", workdir=tmp_path)
    assert Path(art.path) == tmp_path / "out" / "int8.onnx" and [l.format.value for l in art.layers] == ["int8"] * 2
    got = ort.InferenceSession(art.path, providers=["CPUExecutionProvider"]).run(None, {"input": x_eval})[0]
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x_eval)).numpy()
    model.train()
    assert (got.argmax(1) == want.argmax(1)).mean() > 0.95

    # Data as a callable returning (inputs, targets); the plan as a dict; the result a TrialResult.
    res = pipeline.evaluate(model, {"layers": {"fc1": "int4", "*": "int8"}}, eval_data=lambda: (x_eval, y_eval),
                            calibration=x_cal, backend="ort-cpu", workdir=tmp_path, settings=FAST)
    m = res.measurement
    assert m.backend == "ort-cpu" and res.plan_summary == "fc1=int4(b32) fc2=int8"
    assert m.reference_accuracy == pytest.approx((want.argmax(1) == y_eval).mean())
    assert abs(m.accuracy - m.reference_accuracy) < 0.05 and Path(res.artifact_path).exists()

    # A metric as a callable over all outputs and the targets; lower is better here.
    def error_rate(outputs, targets):
        return float((outputs["output"].argmax(1) != targets).mean())

    res2 = pipeline.evaluate(model, "fp32", eval_data=x_eval, targets=y_eval, calibration=x_cal, metric=error_rate,
                             higher_is_better=False, backend="ort-cpu", workdir=tmp_path, settings=FAST)
    assert res2.measurement.accuracy == pytest.approx(1 - m.reference_accuracy)
    assert res2.measurement.accuracy_drop == pytest.approx(0.0)

    assert model.training, "the API put the caller's model in eval mode"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the caller's weights changed"


def test_targets_are_any_structure_the_metric_reads(model, data, tmp_path):
    """Targets are not tied to input rows (the data contract): here a dict, read by a callable
    metric with keyword arguments; and a built-in named metric on the same model."""
    x_cal, x_eval, y_eval = data
    targets = {"labels": y_eval, "classes": list(range(10))}

    def recall_of(outputs, targets, cls):
        pred, labels = outputs["output"].argmax(1), targets["labels"]
        return float((pred[labels == cls] == cls).mean())

    res = pipeline.evaluate(model, "fp32", eval_data=x_eval, targets=targets, calibration=x_cal, metric=recall_of,
                            backend="ort-cpu", workdir=tmp_path, settings={**FAST, "metric": {"kwargs": {"cls": 3}}})
    with torch.no_grad():
        pred = model(torch.from_numpy(x_eval)).argmax(1).numpy()
    assert res.measurement.accuracy == pytest.approx((pred[y_eval == 3] == 3).mean())
    res2 = pipeline.evaluate(model, "int8", eval_data=x_eval, targets=y_eval, calibration=x_cal, metric="macro_f1",
                             backend="ort-cpu", workdir=tmp_path, settings=FAST)
    assert res2.measurement.metric == "macro_f1" and 0.8 < res2.measurement.accuracy <= 1.0


def test_quantize_an_onnx_file(model, data, tmp_path):
    x_cal, x_eval, _ = data
    path = tmp_path / "model.onnx"
    torch.onnx.export(model.eval(), (torch.from_numpy(x_cal[:2]),), str(path), dynamo=True, input_names=["input"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False, report=False)
    model.train()
    assert pipeline.layers(path).names == ["fc1", "fc2"]  # named after the weights, as torch wrote them
    art = pipeline.quantize(path, {"layers": {"fc2": "int8", "*": "int4"}}, calibration=x_cal, workdir=tmp_path)
    assert [(l.name, l.format.value) for l in art.layers] == [("fc1", "int4"), ("fc2", "int8")]
    out = ort.InferenceSession(art.path, providers=["CPUExecutionProvider"]).run(None, {"input": x_eval})[0]
    assert out.shape == (len(x_eval), 10)


def test_bad_arguments_name_the_argument(model, data, tmp_path):
    x_cal, x_eval, y_eval = data
    with pytest.raises(ConfigError, match="^model: expected a torch.nn.Module"):
        pipeline.layers(object(), sample_inputs=x_cal[:2])
    with pytest.raises(ConfigError, match="^sample_inputs:"):
        pipeline.layers(model)
    with pytest.raises(ConfigError, match="^targets:"):
        pipeline.evaluate(model, "int8", eval_data=x_eval, calibration=x_cal, workdir=tmp_path)
    with pytest.raises(ConfigError, match="^plan:"):
        pipeline.evaluate(model, 8, eval_data=x_eval, targets=y_eval, workdir=tmp_path)
    with pytest.raises(ValueError, match="match no quantizable layer"):
        pipeline.evaluate(model, {"layers": {"conv9": "int8"}}, eval_data=x_eval, targets=y_eval, calibration=x_cal,
                          workdir=tmp_path)


def test_search_an_in_memory_model_over_ray(model, data, tmp_path):
    import mlflow
    import optuna
    import ray

    assert not ray.is_initialized()
    x_cal, x_eval, y_eval = data
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    kw = dict(calibration=x_cal, eval_data=x_eval, targets=y_eval, formats=["fp32", "int8", "int4"],
              objectives=["accuracy", "size"], workdir=tmp_path / "work", tracking_uri=uri, parallel=2,
              settings=FAST, energy=False)
    summary = pipeline.search(model, trials=4, **kw)
    assert not ray.is_initialized(), "the Ray the API started is shut down again"
    assert summary.trials_complete == 4 and summary.trials_failed == 0, "a Ray worker could not get the model"
    assert summary.front and all(r.state == "COMPLETE" for r in summary.front)
    runs = mlflow.MlflowClient(uri).search_runs([summary.experiment_id])
    assert sum(1 for r in runs if r.info.run_id != summary.parent_run_id) == 4

    # Same model and data: the same study, resumed (content-hashed names), one more trial.
    again = pipeline.search(model, trials=5, **kw)
    assert again.study == summary.study and again.trials_complete == 5
    from pipeline.search.storage import study_counts

    # measured: 5, counted in the storage (search.sensitivity.seed: auto seeded this study: a proposal its table
    # rules out is PRUNED, a seed equal to a measured plan is told its values, and seeds not reached yet wait
    # in the storage, to run first when the study is resumed)
    counts = study_counts(optuna.load_study(study_name=summary.study, storage=summary.storage))
    assert (counts.complete, counts.failed, counts.running) == (5, 0, 0)


def _first_python_block(text: str) -> str:
    """The first python block of the README's "## Python API" section."""
    section = text.split("\n## Python API\n", 1)
    assert len(section) == 2, "README.md has no '## Python API' section"
    match = re.search(r"```python\n(.*?)```", section[1].split("\n## ", 1)[0], re.S)
    assert match, "the README's Python API section has no python code block"
    return match.group(1)


def test_docs_python_block_runs_verbatim(tmp_path):
    """The README's Python API section, first python block, verbatim in a fresh interpreter."""
    code = _first_python_block((ROOT / "README.md").read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PRECISION_SEARCH_STORAGE")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "quantizable layers" in proc.stdout and "Pareto front:" in proc.stdout
    assert (tmp_path / "digits-int8.onnx").exists()


@pytest.mark.keras
def test_an_in_memory_keras_model(data, tmp_path):
    """A keras.Model from memory: the layer table, and one plan measured in ONNX Runtime."""
    pytest.importorskip("tensorflow", reason="TensorFlow is not installed: pip install -e '.[keras]'")
    from pipeline.models.keras_adapter import import_tf

    _, keras = import_tf(1)
    x_cal, x_eval, y_eval = data
    keras.utils.set_random_seed(0)
    inp = keras.Input((64,), name="input")
    h = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(32, name="fc1")(inp))
    model = keras.Model(inp, keras.layers.Dense(10, name="fc2")(keras.layers.ReLU()(h)))
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x_train, y_train = train_data()
    model.fit(x_train, y_train, epochs=5, batch_size=64, verbose=0)
    before = [w.copy() for w in model.get_weights()]

    table = pipeline.layers(model, sample_inputs=x_cal[:2], workdir=tmp_path)
    assert table.names == ["fc1", "fc2"]
    res = pipeline.evaluate(model, "int8", eval_data=x_eval, targets=y_eval, calibration=x_cal, backend="ort-cpu",
                            workdir=tmp_path, settings=FAST)
    m = res.measurement
    keras_accuracy = float((np.asarray(model(x_eval, training=False)).argmax(1) == y_eval).mean())
    assert m.reference_accuracy == pytest.approx(keras_accuracy) and keras_accuracy > 0.85
    assert m.accuracy_drop < 0.05
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
