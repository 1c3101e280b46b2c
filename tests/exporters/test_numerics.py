"""exporters.numerics against the real ONNX Runtime pieces it claims to mirror.

Each test feeds the same data to a numerics function and to the ORT code path that writes or
runs that format (quantizer helpers, MatMulNBitsQuantizer, calibrators, and ORT CPU kernels
for QuantizeLinear / DynamicQuantizeLinear / Cast), and requires identical results.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import quant_utils
from onnxruntime.quantization.calibrate import HistogramCollector
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer, MatMulNBitsQuantizer

from exporters import numerics

RNG = np.random.default_rng(1234)


def _run_node(op: str, inputs: dict[str, np.ndarray], consts: dict[str, onnx.TensorProto], out_type: int, n_out: int = 1, **attrs):
    """Run one ONNX node in ORT on the CPU and return its outputs."""
    feeds = list(inputs)
    node = helper.make_node(op, feeds + list(consts), [f"y{i}" for i in range(n_out)], **attrs)
    vin = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in inputs.items()]
    outs = [helper.make_tensor_value_info(f"y{i}", out_type if i == 0 else TensorProto.FLOAT, None) for i in range(n_out)]
    if op == "DynamicQuantizeLinear":
        outs = [helper.make_tensor_value_info("y0", TensorProto.UINT8, None),
                helper.make_tensor_value_info("y1", TensorProto.FLOAT, None),
                helper.make_tensor_value_info("y2", TensorProto.UINT8, None)]
    graph = helper.make_graph([node], "g", vin, outs, list(consts.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


# ----------------------------------------------------------------------------- int8


def test_int8_weight_scale_and_values_match_ort_quantizer():
    w = RNG.standard_normal((6, 40)).astype(np.float32)
    w[2] = 0.0  # an all-zero channel: ORT falls back to scale 1
    w[3] *= 1e3
    scale = numerics.int8_weight_scale(w, axis=0)
    q = numerics.int8_quantize(w, scale, axis=0)
    for c in range(w.shape[0]):
        zp, s, qc = quant_utils.quantize_data(w[c], TensorProto.INT8, symmetric=True)
        assert zp == 0
        assert s.dtype == np.float32 and s == scale[c]
        np.testing.assert_array_equal(qc, q[c])
    assert scale[2] == 1.0
    assert q.min() >= -127 and q.max() <= 127  # symmetric range, -128 never produced for weights
    err = np.abs(numerics.int8_dequantize(q, scale, axis=0) - w)
    assert np.all(err <= scale[:, None] / 2 * (1 + 1e-6))


def test_int8_activation_scale_matches_ort_compute_scale_zp():
    for rmin, rmax in [(-3.0, 5.0), (0.5, 2.0), (-7.25, -1.0), (0.0, 0.0)]:
        qmin, qmax = quant_utils.get_qmin_qmax_for_qType(TensorProto.INT8, symmetric=True)
        zp, s = quant_utils.compute_scale_zp(np.array(rmin, np.float32), np.array(rmax, np.float32), qmin, qmax, symmetric=True)
        assert zp == 0
        assert numerics.int8_activation_scale(rmin, rmax) == np.float32(s)


def test_int8_quantize_matches_quantizelinear_including_saturation():
    s = np.float32(0.05)
    x = np.concatenate([RNG.standard_normal(500).astype(np.float32),
                        np.array([6.4, -6.4, -6.45, 100.0, -100.0, 0.025, -0.025, 0.075], np.float32)])
    (q_ort,) = _run_node("QuantizeLinear", {"x": x}, {"s": numpy_helper.from_array(s, "s"),
                         "zp": numpy_helper.from_array(np.int8(0), "zp")}, TensorProto.INT8)
    np.testing.assert_array_equal(numerics.int8_quantize(x, s), q_ort)
    assert q_ort.min() == -128  # activations saturate to the full int8 range


def test_dynamic_quantize_linear_matches_ort_kernel():
    for x in [RNG.standard_normal((3, 7, 16)).astype(np.float32) * 3 + 1,
              np.abs(RNG.standard_normal((4, 9)).astype(np.float32)),
              -np.abs(RNG.standard_normal((5,)).astype(np.float32))]:
        q_ort, s_ort, zp_ort = _run_node("DynamicQuantizeLinear", {"x": x}, {}, TensorProto.UINT8, n_out=3)
        q, s, zp = numerics.dynamic_quantize_linear(x)
        assert s == s_ort and zp == zp_ort
        np.testing.assert_array_equal(q, q_ort)


def test_int8_bias_matches_ort_formula():
    b = RNG.standard_normal(12).astype(np.float32)
    sx, sw = np.float32(0.02), (RNG.random(12).astype(np.float32) + 0.5) * np.float32(0.01)
    q, s = numerics.int8_bias_quantize(b, sx, sw)
    expected = np.rint(b.astype(np.float64) / (sx * sw).astype(np.float64)).astype(np.int32)
    np.testing.assert_array_equal(q, expected)
    assert np.all(np.abs(q.astype(np.float64) * s - b) <= s / 2 + 1e-12)


# ----------------------------------------------------------------------------- fp8


def test_e4m3_std_and_weight_scale_match_ort():
    assert numerics.E4M3_STD == pytest.approx(100.0577, abs=1e-3)
    w = RNG.standard_normal((32, 48)).astype(np.float32) * 0.1
    zp, s, q = quant_utils.quantize_data(w.ravel(), TensorProto.FLOAT8E4M3FN, symmetric=True)
    assert float(zp) == 0.0
    assert numerics.fp8_weight_scale(w) == s
    np.testing.assert_array_equal(numerics.fp8_quantize(w.ravel(), s).view(np.uint8), q.view(np.uint8))


def test_fp8_quantize_matches_quantizelinear_saturating_rne():
    s = np.float32(0.01)
    x = np.concatenate([RNG.standard_normal(2000).astype(np.float32) * 2,
                        np.array([4.48, 4.6, 10.0, -10.0, 1e6, 0.0, 1e-7, -3e-5], np.float32)])
    zp = helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0])
    (q_ort,) = _run_node("QuantizeLinear", {"x": x}, {"s": numpy_helper.from_array(s, "s"), "zp": zp}, TensorProto.FLOAT8E4M3FN)
    q = numerics.fp8_quantize(x, s)
    np.testing.assert_array_equal(q.view(np.uint8), np.asarray(q_ort).view(np.uint8))
    assert np.isfinite(q.astype(np.float32)).all()
    assert q.astype(np.float32).max() == numerics.E4M3_MAX  # saturated, not NaN
    # relative error of E4M3 (3 mantissa bits) inside the normal range: at most 2**-4
    v = x / s
    normal = (np.abs(v) >= 2.0**-6) & (np.abs(v) <= numerics.E4M3_MAX)
    rel = np.abs(q.astype(np.float32)[normal] - v[normal]) / np.abs(v[normal])
    assert rel.max() <= 2.0**-4


def test_fp8_activation_scale_is_amax_over_448():
    """The deployed fp8 activation rule: float32 ``amax/448`` of the MinMax range; 0 -> 1."""
    x = RNG.standard_normal(4096).astype(np.float32) * np.float32(0.3)
    x[17] = np.float32(-9.5)  # the extreme is negative: amax is |min|
    s = numerics.fp8_activation_scale(x.min(), x.max())
    assert s.dtype == np.float32 and s == np.float32(np.float32(9.5) / np.float32(448.0))
    assert numerics.fp8_quantize(x, s).astype(np.float32).min() == -numerics.E4M3_MAX  # amax maps to -448 exactly
    assert np.abs(numerics.fp8_fake_quant(x, s) - x).max() <= 2.0**-4 * 9.5  # nothing saturates
    assert numerics.fp8_activation_scale(0.0, 0.0) == np.float32(1.0)
    assert numerics.fp8_activation_scale(-0.0, 2.0) == numerics.fp8_activation_scale(-2.0, 1.0)


def test_distribution_std_matches_ort_histogram_collector():
    x = RNG.standard_normal((8, 64)).astype(np.float32) * 0.7 + 0.2
    col = HistogramCollector(method="distribution", symmetric=False, num_bins=2048, num_quantized_bins=128,
                             percentile=99.99, scenario="same")
    col.collect({"t": [x]})
    td = col.compute_collection_result()["t"]
    assert numerics.distribution_std(x) == pytest.approx(float(td.avg_std[1]), rel=1e-6)
    assert numerics.distribution_std(x) == pytest.approx(float(np.std(x)), rel=1e-2)


# ----------------------------------------------------------------------------- int4


def _nbits_quantize(w_kn: np.ndarray, block: int):
    """Run ORT's MatMulNBitsQuantizer on a one-MatMul model; return (q [N,K] signed, scales [N,nb])."""
    k, n = w_kn.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(w_kn, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    qz = MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=True)
    qz.process()
    inits = {t.name: numpy_helper.to_array(t) for t in qz.model.model.graph.initializer}
    packed, scales = inits["W_Q4"], inits["W_scales"]  # [N, nb, block/2] uint8, [N, nb]
    nib = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)[:, :k].astype(np.int8) - 8
    return nib, scales.reshape(n, -1), qz.model.model


@pytest.mark.parametrize("k,block", [(64, 32), (72, 32), (200, 64), (130, 128)])
def test_int4_matches_matmulnbits_bit_for_bit(k, block):
    w = RNG.standard_normal((k, 24)).astype(np.float32)
    w[:, 3] = 0.0  # all-zero column: scale 0, q 0
    q_ort, s_ort, _ = _nbits_quantize(w, block)
    q, s = numerics.int4_block_quantize(w.T, block, rounding="half_up")
    np.testing.assert_array_equal(s, s_ort)
    np.testing.assert_array_equal(q, q_ort)
    assert q.min() >= -8 and q.max() <= 7
    # the largest-magnitude element of every block maps to exactly -8
    assert np.all((q == -8).reshape(24, -1).any(axis=1) | (s.reshape(24, -1) == 0).all(axis=1))


def test_int4_tie_rounding_of_both_ort_paths():
    # one block of 16 with extreme -8 (so s = 1 exactly) and exact .5 ties
    block = np.array([-8.0, 2.5, -2.5, 0.5, -0.5, 1.5, 3.5, 6.5] + [0.0] * 8, np.float32)
    w_kn = np.stack([block, -block], axis=1)  # second column: extreme +8 -> s = -1
    q_ort, s_ort, _ = _nbits_quantize(w_kn, 16)
    q_up, s_up = numerics.int4_block_quantize(w_kn.T, 16, rounding="half_up")
    np.testing.assert_array_equal(q_up, q_ort)
    np.testing.assert_array_equal(s_up, s_ort)
    assert list(q_up[0, :8]) == [-8, 3, -2, 1, 0, 2, 4, 7]  # ties go up
    # ORT's numpy Gather path (quantize_ndarray) rounds ties to even
    packed, scales, _ = DefaultWeightOnlyQuantizer.quantize_ndarray(w_kn.T.copy(), 1, 16, True)
    q_gather = numerics.unpack_int4(packed.tobytes(), w_kn.size).reshape(2, 16)
    q_even, s_even = numerics.int4_block_quantize(w_kn.T, 16, rounding="half_even")
    np.testing.assert_array_equal(q_even, q_gather)
    np.testing.assert_array_equal(s_even, scales)
    assert list(q_even[0, :8]) == [-8, 2, -2, 0, 0, 2, 4, 6]


def test_int4_dequantized_error_bound():
    w = RNG.standard_normal((16, 256)).astype(np.float32)
    q, s = numerics.int4_block_quantize(w, 64)
    deq = numerics.int4_block_dequantize(q, s, 64)
    sb = np.repeat(s, 64, axis=1)
    ratio = w / sb
    # |s|/2 everywhere except the far side of the range, which clips at +7
    bound = np.where(ratio > 7.5, np.abs(w - 7 * sb), np.abs(sb) / 2)
    assert np.all(np.abs(deq - w) <= bound * (1 + 1e-6))


def test_int4_packing_matches_onnx():
    q = RNG.integers(-8, 8, size=37).astype(np.int8)
    t = helper.make_tensor("t", TensorProto.INT4, [37], numerics.pack_int4(q), raw=True)
    np.testing.assert_array_equal(numpy_helper.to_array(t).astype(np.int8), q)
    np.testing.assert_array_equal(numerics.unpack_int4(numerics.pack_int4(q), 37), q)


# ----------------------------------------------------------------------------- bf16


def test_bf16_round_matches_ort_cast_round_trip():
    x = np.concatenate([RNG.standard_normal(5000).astype(np.float32) * 100,
                        np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.4e38, 1e-40], np.float32)])
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["b"], to=TensorProto.BFLOAT16), helper.make_node("Cast", ["b"], ["y"], to=TensorProto.FLOAT)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(numerics.bf16_round(x), y)
    finite = np.isfinite(y) & (np.abs(x) > 1e-37)
    assert np.all(np.abs(y[finite] - x[finite]) <= numerics.BF16_REL_ERROR * np.abs(x[finite]))
    assert numerics.to_bf16(x).dtype == ml_dtypes.bfloat16
