"""What a default ONNX Runtime session runs must be what the quantizer wrote - Keras models.

tf2onnx writes a Keras Dense as MatMul + a float bias Add. ORT's MatMulAddFusion turned that
pair into a Gemm at session time and, for an int8-static or fp8 Dense followed (through Relu)
by a quantized layer, WeightBiasQuantization then rounded its float bias to int32: the
deployed model was neither the written one nor what Keras QAT trained. The Keras exporter now
writes a 2-D Dense as a Gemm (``pipeline.models.keras_adapter.fold_dense_bias``), whose bias
the quantizer writes as int32 itself. Each plan's artifact is opened with the ORT CPU
backend's session options, with and without WeightBiasQuantization: same optimized graph, same
outputs. Needs the [keras] extra.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

pytestmark = pytest.mark.keras
pytest.importorskip("tensorflow", reason="TensorFlow is not installed: pip install -e '.[keras]'")

from exporters.onnx_quant import quantize_model  # noqa: E402
from pipeline.backends.ort.session import session_options  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.models.keras_adapter import KerasAdapter  # noqa: E402
from pipeline.plan import QuantPlan  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from pipeline.data import load_dataset

    work = tmp_path_factory.mktemp("keras-ort")
    cfg = load_config(ROOT / "search_spaces" / "digits_keras_cnn.yaml", overrides={"workdir": str(work)})
    ref = KerasAdapter(cfg).export_reference(work)
    feeds = list(load_dataset(cfg.data.calibration, cfg, "data.calibration").head(128).batches(32))
    x = load_dataset(cfg.data.eval, cfg, "data.eval").inputs["input"][:64]
    return ref, feeds, x, work


PLANS = {
    "all-int8": QuantPlan.uniform("int8"),
    "all-fp8": QuantPlan.uniform("fp8"),
    "dense-int8-into-int8": QuantPlan(layers={"fc1": "int8", "fc2": "int8", "*": "fp32"}),
    "dense-int8-into-fp8": QuantPlan(layers={"fc1": "int8", "fc2": "fp8", "*": "fp32"}),
    "dense-fp8-into-int8": QuantPlan(layers={"fc1": "fp8", "fc2": "int8", "*": "fp32"}),
    "fp32-dense-behind-int8-conv": QuantPlan(layers={"conv3": "int8", "fc1": "fp32", "fc2": "int8", "*": "fp32"}),
    "mixed": QuantPlan(layers={"conv1": "int8", "conv2": "bf16", "conv3": "int4", "fc1": "int8", "fc2": "fp8"}),
    "dynamic-dense-into-int8": QuantPlan(layers={"conv3": "int8", "fc1": {"format": "int8", "int8_activations": "dynamic"},
                                                 "fc2": "int8", "*": "fp32"}),
}


def _session(path, out: Path, disabled=()):
    opts = session_options()
    opts.optimized_model_filepath = str(out)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))
    return sess, onnx.load(str(out)).graph


@pytest.mark.parametrize("label", list(PLANS))
def test_default_session_runs_the_written_keras_graph(digits, label):
    ref, feeds, x, work = digits
    plan = PLANS[label]
    out = Path(tempfile.mkdtemp(dir=work))
    q = quantize_model(ref.onnx_path, ref.layer_table, plan.resolve(ref.layer_table.names), feeds, plan.calibration,
                       out / "candidate.onnx", workdir=out)
    default, g_default = _session(q.path, out / "default.onnx")
    without, g_without = _session(q.path, out / "without.onnx", ["WeightBiasQuantization"])
    assert [(n.op_type, list(n.input)) for n in g_default.node] == [(n.op_type, list(n.input)) for n in g_without.node]
    np.testing.assert_array_equal(default.run(None, {"input": x})[0], without.run(None, {"input": x})[0])
    assert not [n.name for n in g_default.node if "MatMulAddFusion" in n.name], "a Dense was fused at session time"


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_dense_holds_an_int32_bias_in_the_file(digits, fmt):
    """The Dense is a Gemm in the reference, so its static-int8/fp8 bias is written as int32 at
    s_x * s_w by the quantizer - the form ORT would otherwise have produced on its own."""
    ref, feeds, _, work = digits
    rows = {l.name: l for l in ref.layer_table}
    assert rows["fc1"].onnx_op == rows["fc2"].onnx_op == "Gemm"
    plan = QuantPlan(layers={"fc1": fmt, "fc2": fmt, "*": "fp32"})
    out = Path(tempfile.mkdtemp(dir=work))
    q = quantize_model(ref.onnx_path, ref.layer_table, plan.resolve(ref.layer_table.names), feeds, plan.calibration,
                       out / "candidate.onnx", workdir=out)
    g = onnx.load(q.path).graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    for name in ("fc1", "fc2"):
        gemm = next(n for n in g.node if n.name == rows[name].onnx_node)
        dq = producer[gemm.input[2]]
        assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].data_type == onnx.TensorProto.INT32
    assert not [n for n in g.node if n.op_type in ("MatMul", "Add")]
