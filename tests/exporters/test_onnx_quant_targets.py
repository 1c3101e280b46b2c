"""exporters.onnx_quant targets: the ``tensorrt`` target writes standard-ONNX QDQ forms that
TensorRT's parser takes, with the same numbers as the ``ort`` target (real ORT runs both)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporters import numerics
from exporters.onnx_quant import UnsupportedPlan, quantize_model
from exporters.tensorrt import layer_precisions, prepare_for_tensorrt, tensorrt_problems
from pipeline.backends import native
from pipeline.formats import Calibration, Format, Int8Activations, QuantTarget
from pipeline.layers import Layer, LayerTable
from pipeline.plan import LayerChoice

V, D, H, O, T = 40, 64, 48, 10, 6  # vocab, embedding dim, hidden, outputs, tokens
RNG = np.random.default_rng(7)
TABLE = RNG.standard_normal((V, D)).astype(np.float32)
W1 = (RNG.standard_normal((D, H)) * 0.2).astype(np.float32)  # MatMul weight [K, N]
W2 = (RNG.standard_normal((O, H)) * 0.2).astype(np.float32)  # Gemm weight [N, K], transB=1
B2 = (RNG.standard_normal(O) * 0.1).astype(np.float32)


def _model(path) -> LayerTable:
    """ids -> Gather(table) -> MatMul(W1) -> Relu -> ReduceMean over tokens -> Gemm(W2, transB) -> y."""
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
        helper.make_node("MatMul", ["emb", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("ReduceMean", ["r", "axes"], ["pooled"], name="pool", keepdims=0),
        helper.make_node("Gemm", ["pooled", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    inits = [numpy_helper.from_array(TABLE, "table"), numpy_helper.from_array(W1, "w1"),
             numpy_helper.from_array(W2, "w2"), numpy_helper.from_array(B2, "b2"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")]
    graph = helper.make_graph(
        nodes, "targets", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", T])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", O])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)

    def layer(name, op, weight, arr, kind):
        return Layer(name=name, kind=kind, module_type=kind, onnx_node=name, onnx_op=op, weight=weight,
                     weight_shape=tuple(arr.shape), params=int(arr.size))

    return LayerTable(layers=[layer("embed", "Gather", "table", TABLE, "embedding"),
                              layer("fc1", "MatMul", "w1", W1, "linear"), layer("fc2", "Gemm", "w2", W2, "linear")])


def _ids(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, size=(n, T)).astype(np.int64)


def _feeds():
    return [{"ids": _ids(8, s)} for s in range(4)]


def _build(tmp_path, formats: dict[str, str], target: QuantTarget, block: int = 32,
           act: Int8Activations = Int8Activations.STATIC):
    ref = tmp_path / "ref.onnx"
    table = _model(ref)
    choices = {k: LayerChoice(format=Format(v), int4_block_size=block, int8_activations=act) for k, v in formats.items()}
    out = tmp_path / f"{target.value}-{'-'.join(formats.values())}.onnx"
    return quantize_model(ref, table, choices, _feeds(), Calibration.MINMAX, out, workdir=tmp_path / "w", target=target)


def _run(path, ids, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = level
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]


BASIC = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC

PLANS = [
    {"embed": "int8", "fc1": "int4", "fc2": "int4"},
    {"embed": "int4", "fc1": "int8", "fc2": "fp8"},
    {"embed": "fp8", "fc1": "bf16", "fc2": "int8"},
    {"embed": "bf16", "fc1": "fp32", "fc2": "int4"},
]


@pytest.mark.parametrize("formats", PLANS, ids=["-".join(p.values()) for p in PLANS])
def test_tensorrt_target_has_nothing_tensorrt_refuses_and_computes_what_the_ort_target_does(formats, tmp_path):
    trt = _build(tmp_path, formats, QuantTarget.TENSORRT)
    model = onnx.load(trt.path)
    onnx.checker.check_model(model, full_check=True)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}  # no com.microsoft ops
    assert tensorrt_problems(onnx.load(prepare_for_tensorrt(trt.path).path)) == []
    ort_q = _build(tmp_path, formats, QuantTarget.ORT)
    ids = _ids(16, seed=123)
    # The tensorrt target's artifact is built by TensorRT, not run by ORT; on ORT it is checked at
    # ORT_ENABLE_BASIC, where no fusion changes its int4 layers' activations (see the last test).
    got, want = _run(trt.path, ids, BASIC), _run(ort_q.path, ids)
    # Same stored numbers; only the kernels differ (fp32 GEMM on dequantized int4 weights vs MLAS
    # MatMulNBits, DQ of the whole table vs GatherBlockQuantized): float rounding, nothing more.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # and both differ from FP32 when a layer is quantized (the check above is not vacuous)
    assert not np.allclose(_run(tmp_path / "ref.onnx", ids), got, rtol=1e-6, atol=1e-7)


def test_tensorrt_target_int4_gemm_is_a_blocked_dq_matmul_with_the_shared_int4_rule(tmp_path):
    q = _build(tmp_path, {"embed": "fp32", "fc1": "int4", "fc2": "int4"}, QuantTarget.TENSORRT, block=32)
    assert {l.name: l.realisation for l in q.layers} == {"embed": native.FP32, "fc1": native.QDQ_INT4,
                                                         "fc2": native.QDQ_INT4}
    model = onnx.load(q.path)
    nodes = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    for name, w_kn in (("fc1", W1), ("fc2", W2.T)):  # the Gemm is rewritten as MatMul [K, N] + Add
        mm = nodes[name]
        assert mm.op_type == "MatMul"  # keeps its layer's node name
        dq = next(n for n in model.graph.node if n.output[0] == mm.input[1])
        assert dq.op_type == "DequantizeLinear" and len(dq.input) == 2  # no zero point: symmetric
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        assert attrs == {"axis": 0, "block_size": 32}
        assert inits[dq.input[0]].data_type == TensorProto.INT4
        stored_q = numerics.unpack_int4(inits[dq.input[0]].raw_data, w_kn.size).reshape(w_kn.shape)
        stored_s = numpy_helper.to_array(inits[dq.input[1]])
        # numerics' rule is written for [N, K] rows; the MatMul weight is [K, N]
        want_q, want_s = numerics.int4_block_quantize(w_kn.T, 32, rounding="half_up")
        np.testing.assert_array_equal(stored_q, want_q.T)
        np.testing.assert_array_equal(stored_s, want_s.T)
    assert layer_precisions(model)["fc1"] == "int4-weight-only"


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
def test_tensorrt_target_embedding_is_dequantize_then_gather_with_the_ort_targets_numbers(fmt, tmp_path):
    formats = {"embed": fmt, "fc1": "fp32", "fc2": "fp32"}
    trt = _build(tmp_path, formats, QuantTarget.TENSORRT)
    layer = next(l for l in trt.layers if l.name == "embed")
    assert layer.realisation == f"dq-gather-{fmt}" and layer.format is Format(fmt)
    model = onnx.load(trt.path)
    gather = next(n for n in model.graph.node if n.name == "embed")
    dq = next(n for n in model.graph.node if n.output[0] == gather.input[0])
    assert gather.op_type == "Gather" and dq.op_type == "DequantizeLinear"
    stored = {t.name: t for t in model.graph.initializer}[dq.input[0]]
    assert stored.data_type == {"int8": TensorProto.INT8, "int4": TensorProto.INT4,
                                "fp8": TensorProto.FLOAT8E4M3FN}[fmt]
    ort_q = _build(tmp_path, formats, QuantTarget.ORT)
    ids = _ids(16, seed=5)
    np.testing.assert_allclose(_run(trt.path, ids), _run(ort_q.path, ids), rtol=1e-6, atol=1e-6)
    assert native.execution("tensorrt", Format(fmt), layer.realisation) == "emulated"


def test_tensorrt_target_refuses_dynamic_int8_with_the_fix(tmp_path):
    with pytest.raises(UnsupportedPlan, match=r"int8_activations: static"):
        _build(tmp_path, {"embed": "fp32", "fc1": "int8", "fc2": "fp32"}, QuantTarget.TENSORRT,
               act=Int8Activations.DYNAMIC)
    # the ort target writes it
    q = _build(tmp_path, {"embed": "fp32", "fc1": "int8", "fc2": "fp32"}, QuantTarget.ORT, act=Int8Activations.DYNAMIC)
    assert {l.name: l.realisation for l in q.layers}["fc1"] == native.DYNAMIC_INT8


def test_tensorrt_target_biases_are_float_with_the_int8_layers_numbers(tmp_path):
    """ORT's static int8 pass stores biases int32 behind a DequantizeLinear, which TensorRT's Q/DQ
    layers do not take: the tensorrt target folds them to the fp32 values they dequantize to."""
    formats = {"embed": "fp32", "fc1": "fp32", "fc2": "int8"}
    trt, ort_q = _build(tmp_path, formats, QuantTarget.TENSORRT), _build(tmp_path, formats, QuantTarget.ORT)
    int32 = lambda m: [t.name for t in m.graph.initializer if t.data_type == TensorProto.INT32]  # noqa: E731
    assert int32(onnx.load(ort_q.path))  # the ort target has an int32 bias (the fold has work to do)
    assert int32(onnx.load(trt.path)) == []
    ids = _ids(16, seed=9)
    np.testing.assert_array_equal(_run(trt.path, ids, BASIC), _run(ort_q.path, ids, BASIC))


def test_ort_runs_the_int4_qdq_form_with_int8_activations_unless_told_otherwise(tmp_path):
    """Why the tensorrt target is checked at ORT_ENABLE_BASIC above: at EXTENDED and up, ORT fuses
    DequantizeLinear(int4) + MatMul into MatMulNBits with the session's
    ``session.qdq_matmulnbits_accuracy_level`` (default 4: activations quantized to int8 per block
    on the CPU), which is not the weight-only fp32-activation layer TensorRT builds. With the level
    set to 0 (as pipeline.backends.ort_cpu sessions do) the fused kernel computes what the graph says."""
    q = _build(tmp_path, {"embed": "fp32", "fc1": "fp32", "fc2": "int4"}, QuantTarget.TENSORRT)
    ids = _ids(16, seed=3)
    written = _run(q.path, ids, BASIC)
    default = _run(q.path, ids)
    assert np.abs(default - written).max() > 1e-4 * np.abs(written).max()  # int8 activations show
    from pipeline.backends.ort.session import OrtSession

    fp32_acts = OrtSession(q.path, ["CPUExecutionProvider"]).run({"ids": ids})[0]  # the backend's session
    np.testing.assert_allclose(fp32_acts, written, rtol=1e-5, atol=1e-5 * np.abs(written).max())
