"""exporters.tflite + the tflite backend: INT8 full-integer, selective and dynamic-range
conversion of a Keras model, measured through the TFLite interpreter.

The plan -> mode rules and the import hygiene need no TensorFlow and always run;
the conversions are marked ``keras`` and skipped without the [keras] extra.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exporters.tflite import (
    MODE_DYNAMIC_INT8,
    MODE_FLOAT,
    MODE_FULL_INT8,
    MODE_SELECTIVE_INT8,
    UnsupportedPlan,
    plan_mode,
)
from pipeline.backends.tflite import keras_tools
from pipeline.plan import QuantPlan

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["conv1", "conv2", "conv3", "fc1", "fc2"]
HAS_TF = importlib.util.find_spec("tensorflow") is not None
needs_tf = pytest.mark.skipif(not HAS_TF, reason="TensorFlow is not installed: pip install -e '.[keras]'")


# ------------------------------------------------------------------ no TF needed
@pytest.mark.parametrize("plan, mode, floats", [
    (QuantPlan.uniform("fp32"), MODE_FLOAT, NAMES),
    (QuantPlan.uniform("int8"), MODE_FULL_INT8, []),
    (QuantPlan(layers={"fc1": "fp32", "*": "int8"}), MODE_SELECTIVE_INT8, ["fc1"]),
    (QuantPlan(layers={"*": "int8"}, int8_activations="dynamic"), MODE_DYNAMIC_INT8, []),
])
def test_plan_mode(plan, mode, floats):
    assert plan_mode(plan.resolve(NAMES)) == (mode, floats)


@pytest.mark.parametrize("plan, match", [
    (QuantPlan(layers={"fc1": "int4", "*": "int8"}), r"fp32 and int8 layers only.*fc1.*int4"),
    (QuantPlan.uniform("bf16"), "bf16"),
    (QuantPlan.uniform("fp8"), "fp8"),
    (QuantPlan(layers={"fc1": "fp32", "*": "int8"}, int8_activations="dynamic"), "dynamic-range.*fc1"),
    (QuantPlan(layers={"fc1": {"format": "int8", "int8_activations": "dynamic"}, "*": "int8"}),
     "static and int8 dynamic"),
])
def test_unsupported_plans_are_refused_with_the_reason(plan, match):
    with pytest.raises(UnsupportedPlan, match=match):
        plan_mode(plan.resolve(NAMES))


def test_tflite_modules_do_not_import_tensorflow():
    code = ("import sys, pipeline.backends.tflite, exporters.tflite, pipeline.models.keras_adapter, "
            "pipeline.backends as b; b.available_backends(); "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TF imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_backend_is_registered_and_reports_native_int8_only():
    from pipeline.backends import available_backends
    from pipeline.formats.names import DYNAMIC_INT8, FP32, QDQ_FP8, QDQ_INT8
    from pipeline.backends.tflite import TFLiteBackend
    from pipeline.formats import Format

    assert "tflite" in available_backends()
    b = TFLiteBackend()
    assert b.execution(Format.INT8, QDQ_INT8) == "native"
    assert b.execution(Format.FP32, FP32) == "native"
    assert b.execution(Format.FP8, QDQ_FP8) == "emulated"
    ok, why = b.available()
    assert ok == HAS_TF or "[keras]" in why


# ------------------------------------------------------------------ with TF
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    pytest.importorskip("tensorflow", reason="TensorFlow is not installed: pip install -e '.[keras]'")
    from pipeline.examples.keras_digits import calibration, cnn, evaluation

    model = cnn()
    x, _ = calibration()
    reps = [{"input": x[i:i + 32]} for i in range(0, len(x), 32)]
    return model, reps, evaluation(), tmp_path_factory.mktemp("tflite")


@pytest.fixture(scope="module")
def converted(trained):
    from exporters.tflite import convert

    model, reps, _, out = trained
    plans = {
        "fp32": QuantPlan.uniform("fp32"),
        "int8": QuantPlan.uniform("int8"),
        "mix": QuantPlan(layers={"fc1": "fp32", "*": "int8"}),
        "dyn": QuantPlan(layers={"*": "int8"}, int8_activations="dynamic"),
    }
    return {k: convert(model, p.resolve(NAMES), reps, out / f"{k}.tflite", ["output"], tools=keras_tools()) for k, p in plans.items()}


def _accuracy(session, x, y) -> float:
    return float((session.run({"input": x})[0].argmax(1) == y).mean())


@needs_tf
@pytest.mark.keras
def test_float_tflite_matches_keras(trained, converted):
    from pipeline.backends import get_backend

    model, _, (x, y), _ = trained
    sess = get_backend("tflite").open(converted["fp32"].path, threads=1)
    assert sess.input_names == ["input"] and sess.output_names == ["output"]
    np.testing.assert_allclose(sess.run({"input": x})[0], np.asarray(model(x, training=False)), rtol=1e-4, atol=1e-4)
    assert {l.realisation for l in converted["fp32"].layers} == {"fp32"}


@needs_tf
@pytest.mark.keras
def test_full_integer_int8(trained, converted):
    from exporters.tflite import _interpreter, constant_bytes, effective_bits_per_weight
    from pipeline.backends import get_backend

    _, _, (x, y), _ = trained
    r = converted["int8"]
    assert r.mode == MODE_FULL_INT8 and r.calibration_used.startswith("tflite min/max")
    assert [(l.name, l.format.value, l.realisation) for l in r.layers] == [(n, "int8", "qdq-int8") for n in NAMES]
    interp = _interpreter(model_path=r.path, tools=keras_tools())
    assert interp.get_input_details()[0]["dtype"] == np.int8  # full integer: int8 in, int8 out
    assert interp.get_output_details()[0]["dtype"] == np.int8
    backend = get_backend("tflite")
    ref = _accuracy(backend.open(converted["fp32"].path), x, y)
    sess = backend.open(r.path, threads=1)
    assert ref - _accuracy(sess, x, y) < 0.03
    # static scales: a row's output does not depend on what it is batched with
    full = sess.run({"input": x[:7]})[0]
    np.testing.assert_array_equal(sess.run({"input": x[3:4]})[0], full[3:4])
    # int8 weights: about 8 bits per quantizable weight (plus per-channel scales), 4x smaller
    params = sum(int(np.prod(l.kernel.shape)) for l in trained[0].layers if hasattr(l, "kernel"))
    bits = effective_bits_per_weight(r.path, converted["fp32"].path, params, keras_tools())
    assert 8.0 <= bits < 9.5
    assert constant_bytes(r.path, keras_tools()) * 3 < constant_bytes(converted["fp32"].path, keras_tools())


@needs_tf
@pytest.mark.keras
def test_selective_int8_keeps_fp32_layers_float(trained, converted):
    from pipeline.backends import get_backend

    _, _, (x, y), _ = trained
    r = converted["mix"]
    got = {l.name: (l.format.value, l.realisation) for l in r.layers}
    assert got["fc1"] == ("fp32", "fp32")
    assert all(got[n] == ("int8", "qdq-int8") for n in NAMES if n != "fc1")
    sess = get_backend("tflite").open(r.path)
    assert _accuracy(get_backend("tflite").open(converted["fp32"].path), x, y) - _accuracy(sess, x, y) < 0.03


@needs_tf
@pytest.mark.keras
def test_dynamic_range_reports_what_tflite_left_float(converted):
    r = converted["dyn"]
    got = {l.name: l.realisation for l in r.layers}
    # TFLite's dynamic-range mode skips weights under 1024 elements: conv1 (144) and fc2 (640)
    assert got == {"conv1": "fp32", "conv2": "dynamic-int8", "conv3": "dynamic-int8",
                   "fc1": "dynamic-int8", "fc2": "fp32"}
    assert any(n.startswith("conv1: plan asked int8, TFLite stored fp32") for n in r.notes)


@needs_tf
@pytest.mark.keras
def test_backend_refuses_onnx_with_the_route_to_take(tmp_path):
    from pipeline.backends import BackendUnavailable, get_backend

    with pytest.raises(BackendUnavailable, match="exporters.tflite.convert"):
        get_backend("tflite").open(tmp_path / "candidate.onnx")


@needs_tf
@pytest.mark.keras
def test_trial_helpers_plug_into_measurement(tmp_path):
    """What a tflite trial does: reference + candidate from the adapter, measured by pipeline.measure."""
    pytest.importorskip("tensorflow", reason="TensorFlow is not installed: pip install -e '.[keras]'")
    from exporters.tflite import candidate, reference_artifact
    from pipeline.backends import get_backend
    from pipeline.config import load_config
    from pipeline.data import load_dataset
    from pipeline.measure import run_dataset, task_metric, time_batches
    from pipeline.models.keras_adapter import KerasAdapter

    cfg = load_config(ROOT / "search_spaces" / "digits_keras_cnn.yaml", overrides={"workdir": str(tmp_path)})
    adapter = KerasAdapter(cfg)
    ref = adapter.export_reference(tmp_path)
    feeds = list(load_dataset(cfg.data.calibration, cfg, "data.calibration").batches(32))
    ref_path = reference_artifact(adapter, ref, feeds, tools=keras_tools())
    assert Path(ref_path).parent == Path(ref.onnx_path).parent
    assert reference_artifact(adapter, ref, feeds, tools=keras_tools()) == ref_path  # cached
    plan = QuantPlan(layers={"conv1": "fp32", "*": "int8"})
    art = candidate(adapter, ref, plan, feeds, tmp_path / "trial" / "candidate.tflite", tools=keras_tools())
    assert [l.name for l in art.layers] == ref.layer_table.names
    assert {l.name: l.format.value for l in art.layers} == {n: c.format.value for n, c in plan.resolve(NAMES).items()}
    backend = get_backend("tflite")
    ev = load_dataset(cfg.data.eval, cfg, "data.eval")
    accs = {}
    for label, path in (("ref", ref_path), ("cand", art.path)):
        sess = backend.open(path, threads=1)
        assert sess.input_names == ref.input_names and sess.output_names == ref.output_names
        accs[label] = task_metric(cfg, run_dataset(sess, ev, 64), ev.targets)
        times = time_batches(sess, ev.fixed_batch(64), warmup=1, runs=3)
        assert len(times) == 3 and np.all(times > 0)
    assert accs["ref"] > 0.9 and accs["ref"] - accs["cand"] < 0.03


@pytest.mark.slow
def test_a_tflite_search_logs_every_trial_and_promotes_the_tflite_model(tmp_path, capsys, monkeypatch):
    """The TFLite backend's candidates are .tflite files: every trial is logged complete (the file as the run's
    logged model, not parsed as ONNX), the knee is promoted, and `load` says how to run it."""
    pytest.importorskip("tensorflow", reason="TensorFlow is not installed: pip install -e '.[keras]'")
    from mlflow import MlflowClient

    from pipeline.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--config", str(ROOT / "search_spaces" / "digits_keras_tflite.yaml"), "--tracking-uri", uri,
              "--set", f"workdir={tmp_path / 'w'}"]
    rc = main(["search", *common, "--trials", "3", "--parallel", "1", "--no-progress", "--set", "measure.runs=3",
               "--set", "measure.warmup=1", "--set", "measure.energy.min_seconds=0.05", "--set",
               "measure.energy.repeats=1", "--set", "measure.remeasure_rounds=0", "--set",
               "search.sensitivity.seed=false"])
    out = capsys.readouterr()
    assert rc == 0, out.out[-3000:] + out.err[-3000:]
    assert "finish_trial failed" not in out.out + out.err
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("digits-keras-tflite")
    trials = [r for r in client.search_runs([exp.experiment_id])
              if r.data.tags.get("precision_search.role") == "trial"]
    assert len(trials) == 3 and all(r.info.status == "FINISHED" for r in trials)
    assert all(r.data.tags.get("precision_search.state") == "COMPLETE" for r in trials)
    assert main(["promote", *common, "--policy", "knee"]) == 0
    assert "registered" in capsys.readouterr().out.lower()
    rc = main(["load", "digits-keras-tflite@champion", "--tracking-uri", uri, "--dst", str(tmp_path / "got")])
    got = capsys.readouterr()
    text = " ".join((got.out + got.err).split())
    assert rc == 2 and "is a TFLite model" in text and "tf.lite.Interpreter" in text, text[-2000:]
    assert list((tmp_path / "got").rglob("candidate.tflite"))
