"""exporters.tensorrt: graph preparation and analysis run everywhere (real ORT quantizers
make the inputs); engine builds need TensorRT and a GPU and skip with the reason otherwise."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from exporters.tensorrt import layer_precisions, prepare_for_tensorrt, promote_bf16_layers, tensorrt_problems

OPSET = 21
RNG = np.random.default_rng(0)
SIZES = (16, 32, 8)


def _bf16(a: np.ndarray) -> np.ndarray:
    return a.astype(ml_dtypes.bfloat16).astype(np.float32)


def _weights():
    ws = [RNG.standard_normal((a, b)).astype(np.float32) * 0.3 for a, b in zip(SIZES[:-1], SIZES[1:])]
    bs = [RNG.standard_normal(b).astype(np.float32) * 0.1 for b in SIZES[1:]]
    return ws, bs


WEIGHTS = _weights()


def mlp(gemm: bool = False) -> onnx.ModelProto:
    """x -> [MatMul+Add | Gemm] -> Relu -> [MatMul+Add | Gemm] -> y, dynamic batch."""
    ws, bs = WEIGHTS
    nodes, inits, cur = [], [], "x"
    for i, (w, b) in enumerate(zip(ws, bs)):
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = f"h{i}"
        if gemm:
            nodes.append(helper.make_node("Gemm", [cur, f"w{i}", f"b{i}"], [out], name=f"fc{i}"))
        else:
            nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [f"mm{i}"], name=f"fc{i}"))
            nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [out], name=f"add{i}"))
        cur = out
        if i < len(ws) - 1:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"], name=f"relu{i}"))
            cur = f"r{i}"
    nodes.append(helper.make_node("Identity", [cur], ["y"], name="out"))
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SIZES[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SIZES[-1]])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(m, full_check=True)
    return m


def cast_pair_bf16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The cast-bf16 realisation: bf16 weight initializers cast up, activations rounded by Cast pairs."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    new_nodes = []
    for node in g.node:
        if node.op_type in ("MatMul", "Gemm"):
            x, w = node.input[0], node.input[1]
            new_nodes.append(helper.make_node("Cast", [x], [f"{x}_bf"], to=TensorProto.BFLOAT16, name=f"{node.name}_xb"))
            new_nodes.append(helper.make_node("Cast", [f"{x}_bf"], [f"{x}_rt"], to=TensorProto.FLOAT, name=f"{node.name}_xf"))
            wa = numpy_helper.to_array(inits[w]).astype(ml_dtypes.bfloat16)
            g.initializer.remove(inits[w])
            g.initializer.append(numpy_helper.from_array(wa, f"{w}_bf16"))
            new_nodes.append(helper.make_node("Cast", [f"{w}_bf16"], [f"{w}_f"], to=TensorProto.FLOAT, name=f"{node.name}_wf"))
            node.input[0], node.input[1] = f"{x}_rt", f"{w}_f"
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    onnx.checker.check_model(model, full_check=True)
    return model


class _Reader:
    """ORT CalibrationDataReader over a few random batches."""

    def __init__(self, n: int = 8):
        self._it = iter([{"x": RNG.standard_normal((4, SIZES[0])).astype(np.float32)} for _ in range(n)])

    def get_next(self):
        return next(self._it, None)


def _static(tmp_path, name: str, **kw) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantFormat, quantize_static

    src, dst = tmp_path / "ref.onnx", tmp_path / f"{name}.onnx"
    onnx.save(mlp(), src)
    quantize_static(str(src), str(dst), _Reader(), quant_format=QuantFormat.QDQ, **kw)
    return onnx.load(str(dst))


def _x(n: int = 5) -> np.ndarray:
    return RNG.standard_normal((n, SIZES[0])).astype(np.float32)


# ---------------------------------------------------------------- bf16 promotion
@pytest.mark.parametrize("gemm", [False, True])
def test_promote_bf16_makes_gemms_bf16_and_keeps_the_graph_valid(gemm):
    model = cast_pair_bf16(mlp(gemm=gemm))
    assert set(layer_precisions(model).values()) == {"bf16-emulated (Cast round-trips, fp32 compute)"}

    promoted, names = promote_bf16_layers(model)
    assert names == ["fc0", "fc1"]
    onnx.checker.check_model(promoted, full_check=True)  # types must line up (bf16 GEMM, fp32 elsewhere)
    assert set(layer_precisions(promoted).values()) == {"bf16"}
    # The Cast-to-fp32 nodes that fed the GEMMs are gone; one Cast back to fp32 per GEMM was added.
    casts = [n for n in promoted.graph.node if n.op_type == "Cast"]
    assert sum(1 for n in casts if n.name.endswith("__out_to_fp32")) == 2
    assert not any(n.name.endswith(("_xf", "_wf")) for n in casts)
    if gemm:  # the fp32 bias is cast to bf16 for the bf16 Gemm
        assert sum(1 for n in casts if n.name.endswith("__bias_to_bf16")) == 2
    # Untouched: the original model object and the graph's interface.
    assert [i.name for i in promoted.graph.input] == ["x"] and [o.name for o in promoted.graph.output] == ["y"]
    assert sum(1 for n in model.graph.node if n.op_type == "Cast") == 6


@pytest.mark.parametrize("gemm", [False, True])
def test_promoted_graph_computes_bf16_gemms(gemm):
    """Reference-evaluate the rewrite and compare with an independent numpy bf16 computation."""
    model = cast_pair_bf16(mlp(gemm=gemm))
    promoted, _ = promote_bf16_layers(model)
    x = _x()
    got = ReferenceEvaluator(promoted).run(None, {"x": x})[0]
    ws, bs = WEIGHTS
    h = x
    for i, (w, b) in enumerate(zip(ws, bs)):
        acc = _bf16(h) @ _bf16(w)
        h = _bf16(_bf16(acc) + _bf16(b)) if gemm else _bf16(acc) + b  # bf16 output (and bf16 bias for Gemm)
        if i < len(ws) - 1:
            h = np.maximum(h, 0)
    np.testing.assert_allclose(got, h, rtol=3e-2, atol=3e-2)
    # And the emulated original agrees with fp32 math on bf16-rounded operands.
    emulated = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(emulated, got, rtol=5e-2, atol=5e-2)


def test_promote_bf16_is_idempotent_and_leaves_other_layers_alone():
    model = cast_pair_bf16(mlp())
    once, names = promote_bf16_layers(model)
    twice, again = promote_bf16_layers(once)
    assert names and again == []
    assert [n.name for n in twice.graph.node] == [n.name for n in once.graph.node]
    plain, none = promote_bf16_layers(mlp())
    assert none == [] and set(layer_precisions(plain).values()) == {"fp32"}


def test_promote_bf16_handles_conv():
    w = numpy_helper.from_array(RNG.standard_normal((4, 1, 3, 3)).astype(ml_dtypes.bfloat16), "w_bf16")
    b = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    nodes = [
        helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16),
        helper.make_node("Cast", ["xb"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["w_bf16"], ["wf"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["xf", "wf", "b"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    g = helper.make_graph(nodes, "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    promoted, names = promote_bf16_layers(m)
    assert names == ["conv"]
    # Conv accepts bf16 from opset 22 only: the rewrite moves the model there, and the result checks.
    assert [o.version for o in promoted.opset_import if o.domain == ""] == [22]
    onnx.checker.check_model(promoted, full_check=True)
    assert layer_precisions(promoted) == {"conv": "bf16"}
    x = RNG.standard_normal((1, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(ReferenceEvaluator(promoted).run(None, {"x": x})[0],
                               ReferenceEvaluator(m).run(None, {"x": x})[0], rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------- analysis on real ORT outputs
def test_symmetric_int8_qdq_is_tensorrt_ready(tmp_path):
    from onnxruntime.quantization import QuantType

    m = _static(tmp_path, "int8", per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    assert set(layer_precisions(m).values()) == {"int8"}
    assert tensorrt_problems(m) == []


def test_asymmetric_uint8_qdq_is_refused_with_the_fix(tmp_path):
    from onnxruntime.quantization import QuantType

    m = _static(tmp_path, "uint8", activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    problems = tensorrt_problems(m)
    assert problems
    text = "\n".join(problems)
    assert "uint8" in text and "QInt8" in text
    assert "zero point" in text and "ActivationSymmetric" in text


def test_fp8_qdq_is_read_as_fp8(tmp_path):
    from onnxruntime.quantization import CalibrationMethod, QuantType

    m = _static(tmp_path, "fp8", activation_type=QuantType.QFLOAT8E4M3FN, weight_type=QuantType.QFLOAT8E4M3FN,
                calibrate_method=CalibrationMethod.Distribution)
    assert set(layer_precisions(m).values()) == {"fp8"}
    assert tensorrt_problems(m) == []


def test_dynamic_int8_is_refused(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = tmp_path / "ref.onnx", tmp_path / "dyn.onnx"
    onnx.save(mlp(), src)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    m = onnx.load(str(dst))
    assert set(layer_precisions(m).values()) == {"int8 (dynamic activations)"}
    text = "\n".join(tensorrt_problems(m))
    assert "DynamicQuantizeLinear" in text and "MatMulInteger" in text and "int8_activations: static" in text


@pytest.mark.parametrize("fmt", ["qoperator", "qdq"])
def test_int4_forms(tmp_path, fmt):
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(mlp(), bits=4, block_size=16, is_symmetric=True,
                             quant_format=QuantFormat.QOperator if fmt == "qoperator" else QuantFormat.QDQ)
    q.process()
    m = q.model.model
    precisions = set(layer_precisions(m).values())
    problems = tensorrt_problems(m)
    if fmt == "qoperator":
        assert precisions == {"int4-weight-only (com.microsoft.MatMulNBits)"}
        assert problems and all("MatMulNBits" in p and "blocked DequantizeLinear" in p for p in problems)
    else:
        assert precisions == {"int4-weight-only"}
        assert problems == []


def test_prepare_writes_promoted_copy_only_when_needed(tmp_path):
    plain = tmp_path / "plain.onnx"
    onnx.save(mlp(), plain)
    p = prepare_for_tensorrt(plain)
    assert p.path == plain and p.bf16_promoted == [] and p.problems == []

    bf = tmp_path / "bf.onnx"
    onnx.save(cast_pair_bf16(mlp()), bf)
    p = prepare_for_tensorrt(bf)
    assert p.path == tmp_path / "bf.trt.onnx" and p.path.exists()
    assert p.bf16_promoted == ["fc0", "fc1"] and set(p.precisions.values()) == {"bf16"}


# ---------------------------------------------------------------- with the project's quantizer
def _quantized(tmp_path, formats: dict[str, str]) -> onnx.ModelProto:
    from exporters.onnx_quant import quantize_model
    from pipeline.formats import Calibration, Format
    from pipeline.layers import Layer, LayerTable
    from pipeline.plan import LayerChoice

    ref = tmp_path / "ref.onnx"
    onnx.save(mlp(), ref)
    ws, _ = WEIGHTS
    table = LayerTable(layers=[
        Layer(name=f"fc{i}", kind="linear", module_type="Linear", onnx_node=f"fc{i}", onnx_op="MatMul",
              weight=f"w{i}", weight_shape=tuple(w.shape), params=int(w.size))
        for i, w in enumerate(ws)
    ])
    choices = {k: LayerChoice(format=Format(v), int4_block_size=32) for k, v in formats.items()}
    feeds = [{"x": RNG.standard_normal((8, SIZES[0])).astype(np.float32)} for _ in range(4)]
    out = tmp_path / "candidate.onnx"
    q = quantize_model(ref, table, choices, feeds, Calibration.MINMAX, out, workdir=tmp_path / "work")
    return onnx.load(q.path)


def test_quantizer_output_bf16_and_int8_is_ready_for_tensorrt(tmp_path):
    m = _quantized(tmp_path, {"fc0": "bf16", "fc1": "int8"})
    assert layer_precisions(m) == {"fc0": "bf16-emulated (Cast round-trips, fp32 compute)", "fc1": "int8"}
    promoted, names = promote_bf16_layers(m)
    assert names == ["fc0"]
    onnx.checker.check_model(promoted, full_check=True)
    assert layer_precisions(promoted) == {"fc0": "bf16", "fc1": "int8"}
    assert tensorrt_problems(promoted) == []
    # The quantizer's output round trip is absorbed: the bf16 GEMM writes the bf16 tensor directly.
    fc0 = next(n for n in promoted.graph.node if n.name == "fc0")
    reader = next(n for n in promoted.graph.node if fc0.output[0] in n.input)
    assert reader.op_type == "Cast" and reader.attribute[0].i == TensorProto.FLOAT
    x = _x(6)
    np.testing.assert_allclose(ReferenceEvaluator(promoted).run(None, {"x": x})[0],
                               ReferenceEvaluator(m).run(None, {"x": x})[0], rtol=5e-2, atol=5e-2)


def test_quantizer_int4_matmul_is_refused_by_tensorrt_with_the_reason(tmp_path):
    m = _quantized(tmp_path, {"fc0": "int4", "fc1": "fp32"})
    problems = tensorrt_problems(m)
    assert len(problems) == 1 and "MatMulNBits" in problems[0]


# ---------------------------------------------------------------- TensorRT's Q/DQ rules (review fixes)
def test_int32_bias_dequantize_is_refused_with_the_fix(tmp_path):
    """ORT's QDQ quantizer writes Gemm biases as int32 + DequantizeLinear; TensorRT's Q/DQ take no int32."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    src, dst = tmp_path / "ref.onnx", tmp_path / "q.onnx"
    onnx.save(mlp(gemm=True), src)
    quantize_static(str(src), str(dst), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    m = onnx.load(str(dst))
    assert set(layer_precisions(m).values()) == {"int8"}
    problems = tensorrt_problems(m)
    assert len(problems) == 2  # one per Gemm bias
    assert all("int32 DequantizeLinear" in p and "QuantizeBias=False" in p for p in problems)

    # With fp32 biases the same graph is accepted.
    dst2 = tmp_path / "q_fp32_bias.onnx"
    quantize_static(str(src), str(dst2), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
    assert tensorrt_problems(onnx.load(str(dst2))) == []


def _int4_conv(block: int = 9, weight_rank: int = 2) -> tuple[onnx.ModelProto, np.ndarray]:
    """Conv whose weight is DequantizeLinear(int4, blocked along the flattened I*kh*kw axis) + Reshape:
    the form the quantizer writes for int4 Conv layers on the tensorrt target."""
    o, i, kh, kw = 4, 2, 3, 3
    k = i * kh * kw
    q = RNG.integers(-8, 8, size=(o, k)).astype(np.int8)
    scale = (RNG.random((o, k // block)) * 0.1 + 0.01).astype(np.float32)
    w_shape = [o, k] if weight_rank == 2 else [o, i, kh * kw]
    wq = helper.make_tensor("wq", TensorProto.INT4, w_shape, q.reshape(w_shape).flatten().tolist())
    sc_shape = [o, k // block] if weight_rank == 2 else [o, i, kh * kw // block]
    sc = numpy_helper.from_array(scale.reshape(sc_shape), "w_scale")
    shape = numpy_helper.from_array(np.array([o, i, kh, kw], np.int64), "w_shape")
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "w_scale"], ["w2d"], name="w_dq",
                         axis=weight_rank - 1, block_size=block),
        helper.make_node("Reshape", ["w2d", "w_shape"], ["w"], name="w_reshape"),
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    g = helper.make_graph(nodes, "int4conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, i, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, o, 6, 6])], [wq, sc, shape])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(m, full_check=True)
    w = (q.astype(np.float32) * np.repeat(scale, block, axis=1)).reshape(o, i, kh, kw)
    return m, w


def test_int4_conv_through_reshape_reads_as_int4_weight_only():
    m, w = _int4_conv()
    assert layer_precisions(m) == {"conv": "int4-weight-only"}
    assert tensorrt_problems(m) == []
    # The graph is real: ONNX Runtime runs it and its weight is the blocked dequantization.
    import onnxruntime as ort

    x = RNG.standard_normal((1, 2, 6, 6)).astype(np.float32)
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref_model = helper.make_model(
        helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "ref",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
                          [numpy_helper.from_array(w, "w")]),
        opset_imports=[helper.make_opsetid("", OPSET)])
    np.testing.assert_allclose(got, ReferenceEvaluator(ref_model).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_blocked_dequantize_of_a_3d_tensor_is_refused():
    m, _ = _int4_conv(block=3, weight_rank=3)
    problems = tensorrt_problems(m)
    assert len(problems) == 1 and "w_dq" in problems[0] and "rank-3" in problems[0] and "2-D" in problems[0]
