"""Bad data and broken metrics give one error naming the field and the fix, checked with real ONNX Runtime.

The digits MLP's FP32 reference (one float32 input of 64 features) is the model; the data sources
below are what users get wrong: the wrong dtype, the wrong width, the wrong name, no rows, targets
that do not fit the metric.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import ConfigError
from pipeline.data import Dataset

ROWS = 40


def wrong_dtype():
    return (np.random.default_rng(0).random((ROWS, 64)) * 16).astype(np.int64)


def wrong_width():
    return np.zeros((ROWS, 32), np.float32)


def wrong_name():
    return {"pixels": np.zeros((ROWS, 64), np.float32)}


def good_x():
    from pipeline.examples.digits import mlp_eval

    return mlp_eval()[0]


def short_labels():
    return np.zeros(3, np.int64)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The digits MLP's reference export (ONNX path) and its config."""
    from tests.conftest import _config

    from pipeline.evaluate import Evaluator

    cfg = _config("digits_mlp.yaml", tmp_path_factory.mktemp("work"))
    return cfg, Evaluator(cfg).reference.onnx_path


def _with_eval(cfg, source, targets=None, **measure):
    data = cfg.data.model_copy(update={"eval": cfg.data.eval.model_copy(update={"source": source})})
    if targets is not None:
        from pipeline.config import TargetsSpec

        data = data.model_copy(update={"targets": TargetsSpec(source=targets)})
    return cfg.model_copy(update={"data": data, "measure": cfg.measure.model_copy(update=measure)})


def test_onnx_input_specs_read_the_models_inputs(reference):
    from pipeline.data_check import onnx_input_specs

    _, onnx_path = reference
    (spec,) = onnx_input_specs(onnx_path).values()
    assert spec.name == "input" and spec.shape[1:] == (64,) and spec.dtype == np.float32


@pytest.mark.parametrize("source, message", [
    ("wrong_dtype", r"data.eval.source: input 'input': dtype int64, the model takes float32; return "
                    r"np.asarray\(x, dtype=np.float32\)"),
    ("wrong_width", r"data.eval.source: input 'input': shape \(40, 32\), the model takes \(N, 64\)"),
    ("wrong_name", r"data.eval.source: missing model input\(s\) \['input'\]; the source returned \['pixels'\]"),
])
def test_check_data_names_the_field_and_the_fix_before_any_run(reference, source, message):
    from pipeline.data_check import check_data

    cfg, onnx_path = reference
    bad = _with_eval(cfg, f"tests.pipeline.test_data_check:{source}", "tests.pipeline.test_data_check:short_labels")
    with pytest.raises(ConfigError, match=message):
        check_data(bad, onnx_path)


def test_check_data_passes_good_split_data_and_reports_it(reference):
    from pipeline.data_check import check_data

    cfg, onnx_path = reference
    ok = _with_eval(cfg, "tests.pipeline.test_data_check:good_x", "tests.pipeline.test_data_check:short_labels",
                    eval_batch_size=50)
    summary = check_data(ok, onnx_path)
    assert summary.eval_rows == 360 and summary.eval_batch_size == 50 and summary.targets == "array (3,) int64"
    assert summary.inputs == {"input": "(360, 64) float32"}
    assert check_data(cfg).calibration_rows == 359  # without the model: the data's own checks only


def test_run_dataset_errors_are_named_not_raw_tracebacks(reference):
    from pipeline.backends import resolve_backend
    from pipeline.data_check import onnx_input_specs
    from pipeline.measure import run_dataset

    _, onnx_path = reference
    session = resolve_backend("ort-cpu")[0].open(onnx_path)
    empty = Dataset({"input": np.zeros((0, 64), np.float32)})
    with pytest.raises(ConfigError, match="data.eval.source: the set has no rows"):
        run_dataset(session, empty, 8)  # not numpy's "need at least one array to concatenate"
    with pytest.raises(ConfigError, match=r"the model needs input\(s\) \['input'\] but the source returned \['x'\]"):
        run_dataset(session, Dataset({"x": np.zeros((4, 64), np.float32)}), 8)
    narrow = Dataset({"input": np.zeros((4, 32), np.float32)})
    with pytest.raises(ConfigError, match=r"data.eval.source: the arrays do not fit .*\n  - input 'input': shape"):
        run_dataset(session, narrow, 8, input_specs=onnx_input_specs(onnx_path))
    with pytest.raises(RuntimeError, match=r"the first batch of data.eval \(input \(4, 32\) float32\) failed"):
        run_dataset(session, narrow, 8)
    out = run_dataset(session, Dataset({"input": np.zeros((20, 64), np.float32)}), 8)
    assert next(iter(out.values())).shape == (20, 10)


def test_evaluator_fails_once_with_the_field_for_bad_data_and_a_raising_metric(reference, tmp_path):
    from pipeline.evaluate import Evaluator
    from pipeline.formats import Format
    from pipeline.measure import MetricError, ReferenceFailure
    from pipeline.plan import QuantPlan

    cfg, _ = reference
    ev = Evaluator(_with_eval(cfg, "tests.pipeline.test_data_check:wrong_dtype",
                              "tests.pipeline.test_data_check:short_labels"))
    with pytest.raises(ConfigError, match="data.eval.source: the arrays do not fit the model's inputs"):
        _ = ev.reference_accuracy
    ev = Evaluator(_with_eval(cfg, "tests.pipeline.test_data_check:good_x",
                              "tests.pipeline.test_data_check:short_labels"))
    with pytest.raises(MetricError, match=r"(?s)metric.name: accuracy raised ValueError: accuracy needs one label "
                                          r"per output row: 360 rows but 3 targets.*fix metric.output"):
        _ = ev.reference_accuracy
    # a trial says the same, as the study's failure (every trial would fail alike), before building its candidate
    with pytest.raises(ReferenceFailure, match="the FP32 reference could not be scored: metric.name: accuracy raised"):
        ev.evaluate(QuantPlan.uniform(Format.INT8), tmp_path / "int8", energy=False)
    assert not (tmp_path / "int8").exists() or not list((tmp_path / "int8").glob("*.onnx"))
