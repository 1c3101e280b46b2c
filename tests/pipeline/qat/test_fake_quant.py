"""QAT fake quantizers against what is deployed.

Two levels:

1. Each torch fake-quant function against its ``exporters.numerics`` rule, bit for bit, on
   random tensors (including the awkward cases: all-zero channels/blocks, ties, values past
   the fp8 and int8 ranges).
2. Each layer kind x format: a randomly initialised torch layer with fake quantization
   attached (:class:`pipeline.qat.wrap.QATModel`, calibrated on the calibration batches)
   against ONNX Runtime running the candidate that ``exporters.onnx_quant`` builds from the
   TorchAdapter export of the same layer, on fresh random inputs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from exporters import numerics
from pipeline.formats import Calibration, Format, Int8Activations
from pipeline.plan import LayerChoice
from pipeline.qat import fake_quant as fq

RNG = np.random.default_rng(20261129)
THIS = "tests.pipeline.qat.test_fake_quant"


# ============================================================================ level 1: functions
def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


@pytest.mark.parametrize("shape,axis", [((24, 40), 0), ((8, 4, 3, 3), 0), ((40, 24), 1), ((16, 32), None)])
def test_int8_weight_matches_numerics(shape, axis):
    w = RNG.standard_normal(shape).astype(np.float32) * np.float32(0.05)
    if axis is not None:
        idx = [slice(None)] * len(shape)
        idx[axis] = 1
        w[tuple(idx)] = 0.0  # an all-zero channel: scale falls back to 1
    scale = numerics.int8_weight_scale(w, axis)
    want = numerics.int8_dequantize(numerics.int8_quantize(w, scale, axis), scale, axis)
    got, s = fq.fake_int8_per_channel(_t(w), axis)
    np.testing.assert_array_equal(s.numpy(), scale)
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("rounding", ["half_up", "half_even"])
def test_int4_blocks_match_numerics(block, rounding):
    w = RNG.standard_normal((12, 150)).astype(np.float32)  # 150: the last block is padded
    w[3, :block] = 0.0  # an all-zero block
    w[4, 5] = -np.abs(w[4, :block]).max() * 2  # a negative extreme
    w[5, 7] = np.abs(w[5, :block]).max() * 2  # a positive extreme: s < 0, clips at +7 on the other side
    w[6, :block] = 0.0
    w[6, 0], w[6, 1] = 1.0, -1.0  # |+a| == |-a|: numerics picks the negative one
    w[7, :16] = (np.arange(16) - 8 + 0.5).astype(np.float32) * 0.25  # exact ties x/s = k + 0.5
    w[7, 16] = -2.0
    q, s = numerics.int4_block_quantize(w, block, rounding)
    want = numerics.int4_block_dequantize(q, s, block)
    got, gs = fq.fake_int4_blocks(_t(w), block, rounding)
    np.testing.assert_array_equal(gs.numpy(), s)
    np.testing.assert_array_equal(got.numpy(), want)


def test_fp8_matches_numerics_including_saturation():
    w = RNG.standard_normal((32, 48)).astype(np.float32) * np.float32(0.02)
    w[0, 0] = 1.0  # ~50 std: saturates at 448 * s
    s = numerics.fp8_weight_scale(w)
    gs = fq.fp8_weight_scale(_t(w))
    assert abs(float(gs) - float(s)) <= 2 * np.spacing(np.float32(s))  # std summation order: last bits
    want = numerics.fp8_fake_quant(w, s)
    got = fq.fake_fp8(_t(w), torch.tensor(float(s)))
    np.testing.assert_array_equal(got.numpy(), want)
    assert float(got.abs().max()) == pytest.approx(448.0 * float(s), rel=1e-6)


def test_bf16_and_static_int8_activation_match_numerics():
    x = RNG.standard_normal((16, 64)).astype(np.float32) * np.float32(3.0)
    np.testing.assert_array_equal(fq.fake_bf16(_t(x)).numpy(), numerics.bf16_round(x))
    s = numerics.int8_activation_scale(-2.0, 2.5)  # inputs reach past the range: saturate to [-128, 127]
    want = numerics.int8_dequantize(numerics.int8_quantize(x, s), s)
    np.testing.assert_array_equal(fq.fake_int8_static(_t(x), float(s)).numpy(), want)


@pytest.mark.parametrize("shift", [0.0, 1.5, -1.5])
def test_dynamic_int8_matches_dynamic_quantize_linear(shift):
    x = (RNG.standard_normal((8, 40)) + shift).astype(np.float32)
    q, s, zp = numerics.dynamic_quantize_linear(x)
    want = ((q.astype(np.int32) - int(zp)).astype(np.float32) * s).astype(np.float32)
    np.testing.assert_array_equal(fq.fake_int8_dynamic(_t(x)).numpy(), want)


def test_bias_rule_matches_numerics():
    b = RNG.standard_normal(24).astype(np.float32)
    sw = numerics.int8_weight_scale(RNG.standard_normal((24, 40)).astype(np.float32), 0)
    q, s = numerics.int8_bias_quantize(b, 0.0123, sw)
    got = fq.fake_int8_bias(_t(b), 0.0123, _t(sw))
    np.testing.assert_array_equal(got.numpy(), (q.astype(np.float64) * s).astype(np.float32))


def test_straight_through_gradients():
    w = _t(RNG.standard_normal((8, 64)).astype(np.float32)).requires_grad_()
    for fn in (lambda v: fq.fake_int8_per_channel(v, 0)[0], lambda v: fq.fake_int4_blocks(v, 32)[0],
               lambda v: fq.fake_fp8(v, fq.fp8_weight_scale(v)), fq.fake_bf16):
        w.grad = None
        fn(w).sum().backward()
        np.testing.assert_array_equal(w.grad.numpy(), np.ones((8, 64), np.float32))
    x = _t(np.array([-3.0, -0.5, 0.5, 3.0], np.float32)).requires_grad_()
    fq.fake_int8_static(x, 1.0 / 127).sum().backward()  # range [-1, 1]: the outer two are clipped
    np.testing.assert_array_equal(x.grad.numpy(), [0, 1, 1, 0])


def test_forward_is_exactly_the_deployed_value_when_the_input_is_far_larger():
    """The straight-through forward must be the fake-quantized value itself. ``x + (y - x).detach()``
    is not: with |x| >> |y| (an activation far past the fp8 range saturates to 448*s) ``y - x``
    rounds to x's precision and the sum comes back off the deployed grid (3e7 -> 4.0, not 4.48)."""
    s = np.float32(0.01)
    x = np.array([3e7, -3e7, 1e9, -2.5e8, 4.4, -4.48, 0.013, 1e5], np.float32)
    want = numerics.fp8_fake_quant(x, s)
    assert np.abs(want).max() == np.float32(448) * s  # the large ones saturate
    xt = _t(x).requires_grad_()
    got = fq.fake_fp8(xt, torch.tensor(s), weight=False)
    np.testing.assert_array_equal(got.detach().numpy(), want)
    got.sum().backward()  # clipped straight-through: no gradient past the range
    np.testing.assert_array_equal(xt.grad.numpy(), (np.abs(x) <= 448 * s).astype(np.float32))

    # a weight outlier past 448 std (possible once a tensor has > 448**2 elements) saturates too
    w = RNG.standard_normal((512, 512)).astype(np.float32) * np.float32(0.01)
    w[0, 0], w[1, 1] = 1e4, -3e3
    sw = numerics.fp8_weight_scale(w)
    assert abs(w[0, 0]) > 448 * sw
    got_w = fq.fake_fp8(_t(w).requires_grad_(), torch.tensor(float(sw)), weight=True)
    np.testing.assert_array_equal(got_w.detach().numpy(), numerics.fp8_fake_quant(w, sw))
    w4 = _t(np.array([[2e7, -1.0, 3e-3, 0.5] * 8], np.float32)).requires_grad_()  # int4 block: 2e7 dominates
    q, sc = numerics.int4_block_quantize(w4.detach().numpy(), 32, "half_up")
    np.testing.assert_array_equal(fq.fake_int4_blocks(w4, 32)[0].detach().numpy(),
                                  numerics.int4_block_dequantize(q, sc, 32))
    bf = _t(np.array([1e30, 3.0e-30, -7.1e12], np.float32)).requires_grad_()
    np.testing.assert_array_equal(fq.fake_bf16(bf).detach().numpy(), numerics.bf16_round(bf.detach().numpy()))


# ============================================================================ level 2: layers vs ORT
class Lin2D(nn.Module):  # -> Gemm (bias inside the node)
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(40, 24)

    def forward(self, x):
        return self.fc(x)


class Lin3D(nn.Module):  # -> MatMul + Add (bias outside the node)
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(40, 24)

    def forward(self, x):
        return self.fc(x)


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)  # K = 36: two int4 blocks of 32, the last padded

    def forward(self, x):
        return self.conv(x)


class Emb(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 40)

    def forward(self, ids):
        return self.emb(ids)


class Attn(nn.Module):  # MultiheadAttention: in_proj (MatMul) and out_proj (Gemm) via F.linear
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class Mixed(nn.Module):  # one model, four formats: the fp8 layer calibrates behind an int8 one
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(40, 32)
        self.b = nn.Linear(32, 32)
        self.c = nn.Linear(32, 32)
        self.d = nn.Linear(32, 24)

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = torch.relu(self.b(x))
        x = torch.relu(self.c(x))
        return self.d(x)


class Shared(nn.Module):  # one Linear called three times: three ONNX nodes (fc, fc#2, fc#3)
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        x = torch.relu(self.fc(x))
        x = torch.relu(self.fc(x))
        return self.fc(x)


class SharedNoBias(Shared):  # the same, without a bias: one weight under a different format per call
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32, bias=False)


class SharedConv(nn.Module):  # one Conv called twice: per call an input and an output scale, an int32 bias
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.conv(x)))


class ConvChain(nn.Module):  # c1 -> c2 with nothing in between: c2 reads c1's output DequantizeLinear
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(self.c1(x))))


class SharedAttn(nn.Module):  # one MultiheadAttention called twice (F.linear route, per call)
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 2, batch_first=True)

    def forward(self, x):
        x = self.attn(x, x, x, need_weights=False)[0]
        return self.attn(x, x, x, need_weights=False)[0]


# Per-layer plans ("fmt" of a case): every call of a shared module is its own layer-table row.
PLANS = {
    "mixed": {"a": "int8-static", "b": "fp8", "c": "bf16", "d": "int4"},  # fp8 calibrated behind int8
    # one weight, three deployed grids (bias-free: exporters.onnx_quant shares one bias initializer
    # between the calls' nodes, so a per-call int8 bias would leak into the others - see the report)
    "per-call": {"fc": "int8-static", "fc#2": "fp8", "fc#3": "bf16"},  # fp8 behind an int8 call of itself
    "per-call-2": {"fc": "fp8", "fc#2": "int8-static", "fc#3": "int4"},
    # an fp32 / fp8 Conv reading an int8-static Conv's output DQ, its output feeding a quantizer
    # (ORT's WeightBiasQuantization used to run c2 int8, or round its fp8 bias; see ort_passes)
    "chain-fp32": {"c1": "int8-static", "c2": "fp32", "c3": "int8-static"},
    "chain-fp8": {"c1": "int8-static", "c2": "fp8", "c3": "int8-static"},
    "chain-bf16": {"c1": "int8-static", "c2": "bf16", "c3": "fp8"},
}

MODELS = {"mixed": (Mixed, (16, 40)), "lin2d": (Lin2D, (16, 40)), "lin3d": (Lin3D, (4, 5, 40)), "conv": (Conv, (4, 4, 6, 6)),
          "emb": (Emb, None), "attn": (Attn, (4, 6, 32)), "shared": (Shared, (16, 32)),
          "shared_nb": (SharedNoBias, (16, 32)), "shared_conv": (SharedConv, (4, 4, 6, 6)), "shared_attn": (SharedAttn, (4, 6, 32)),
          "chain": (ConvChain, (4, 4, 6, 6))}


def make(name: str):
    torch.manual_seed(sum(map(ord, name)))
    model = MODELS[name][0]()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def _inputs(name: str, n: int, seed: int):
    rng = np.random.default_rng(seed)
    shape = MODELS[name][1]
    if shape is None:
        return rng.integers(0, 50, size=(n, 7)).astype(np.int64)
    return (rng.standard_normal((n,) + shape[1:]) * 1.5).astype(np.float32)


def data(name: str, n: int = 96, seed: int = 1):
    return _inputs(name, n, seed), None


def _config(name: str, workdir: Path):
    from pipeline.config import parse_config

    return parse_config({
        "name": f"fq-{name}",
        "model": {"factory": f"{THIS}:make", "kwargs": {"name": name}},
        "data": {"calibration": {"source": f"{THIS}:data", "kwargs": {"name": name}},
                 "eval": {"source": f"{THIS}:data", "kwargs": {"name": name, "seed": 2}}},
        "workdir": str(workdir),
    })


CASES = [
    ("lin2d", "int8-static"), ("lin2d", "int8-dynamic"), ("lin2d", "int4"), ("lin2d", "fp8"), ("lin2d", "bf16"),
    ("lin3d", "int8-static"), ("lin3d", "int8-dynamic"), ("lin3d", "int4"), ("lin3d", "fp8"), ("lin3d", "bf16"),
    ("conv", "int8-static"), ("conv", "int8-dynamic"), ("conv", "int4"), ("conv", "fp8"), ("conv", "bf16"),
    ("emb", "int8"), ("emb", "int4"), ("emb", "fp8"), ("emb", "bf16"),
    ("attn", "int8-static"), ("attn", "int8-dynamic"), ("attn", "int4"), ("attn", "fp8"), ("attn", "bf16"),
    ("lin2d", "int8-static/percentile"), ("lin2d", "int8-static/entropy"), ("mixed", "mixed"),
    ("shared", "int8-static"), ("shared", "int8-dynamic"), ("shared", "int4"), ("shared", "fp8"), ("shared", "bf16"),
    ("shared_nb", "per-call"), ("shared_nb", "per-call-2"), ("shared_conv", "int8-static"), ("shared_conv", "fp8"),
    ("shared_attn", "int8-static"), ("shared_attn", "fp8"),
    ("chain", "chain-fp32"), ("chain", "chain-fp8"), ("chain", "chain-bf16"),
]


def _choice(fmt: str) -> LayerChoice:
    if fmt.startswith("int8"):
        acts = Int8Activations.DYNAMIC if fmt.endswith("dynamic") else Int8Activations.STATIC
        return LayerChoice(format=Format.INT8, int8_activations=acts)
    return LayerChoice(format=Format(fmt), int4_block_size=32)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    from pipeline.models.torch_adapter import TorchAdapter

    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    logging.getLogger("onnxscript").setLevel(logging.WARNING)
    work = tmp_path_factory.mktemp("fq")
    out = {}
    for name in MODELS:
        cfg = _config(name, work)
        adapter = TorchAdapter(cfg)
        out[name] = (cfg, adapter, adapter.export_reference(cfg.work_path))
    return out


def _feeds(ref, x):
    return {ref.input_names[0]: x}


def _ort(path, disabled: list[str] | None = None):
    """A CPU session with all graph optimizations, except the ``disabled`` transformers."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled or [])


def _plan_choices(fmt: str, ref) -> dict[str, LayerChoice]:
    if fmt in PLANS:
        assert set(PLANS[fmt]) == set(ref.layer_table.names), ref.layer_table.names
        return {n: _choice(PLANS[fmt][n]) for n in ref.layer_table.names}
    return {n: _choice(fmt) for n in ref.layer_table.names}


@pytest.mark.parametrize("name,fmt", CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_fake_quantized_layer_equals_onnx_runtime(name, fmt, references, tmp_path):
    from exporters.onnx_quant import quantize_model
    from pipeline.backends.ort.session import OrtSession
    from pipeline.qat.train import call_model, to_tensors
    from pipeline.qat.wrap import QATModel

    cfg, adapter, ref = references[name]
    fmt, _, method = fmt.partition("/")
    calibration = Calibration(method or "minmax")
    choices = _plan_choices(fmt, ref)
    calib = [_feeds(ref, b) for b in np.split(data(name)[0], 3)]  # 3 equal batches of 32
    built = quantize_model(ref.onnx_path, ref.layer_table, choices, calib, calibration, tmp_path / "c.onnx")
    x = _inputs(name, 32, seed=99)  # fresh inputs, partly outside the calibrated range
    got_ort = OrtSession(built.path, ["CPUExecutionProvider"]).run(_feeds(ref, x))[0]  # default optimizations

    model = adapter.load_model()
    qm = QATModel(model, choices, calibration, {l.name: l.onnx_op for l in ref.layer_table})
    qm.calibrate([to_tensors(b) for b in calib], call_model)
    qm.set_mode("qat")
    with torch.no_grad():
        got_torch = call_model(model, to_tensors(_feeds(ref, x))).numpy()
    qm.detach()
    with torch.no_grad():
        fp32 = call_model(model, to_tensors(_feeds(ref, x))).numpy()

    err = np.abs(got_torch - got_ort)
    quant_err = np.abs(fp32 - got_ort).max()
    scale = np.abs(got_ort).max()
    print(f"{name:6s} {fmt:13s} max|torch-ort| {err.max():.3e}  max|fp32-ort| {quant_err:.3e}  max|y| {scale:.2f}  "
          f"frac>1e-5 {(err > 1e-5 * scale).mean():.4f}")
    assert quant_err > 10 * err.max(), "the comparison must be able to see quantization at all"
    np.testing.assert_allclose(got_torch, got_ort, rtol=1e-5, atol=1e-5 * scale)


SCALE_RTOL = 4 * float(np.finfo(np.float32).eps)  # a few ulps


def _calibrated(name: str, fmt: str, references, tmp_path):
    """(reference, deployed artifact, QATModel calibrated on the same batches) for one case."""
    from exporters.onnx_quant import quantize_model
    from pipeline.qat.train import call_model, to_tensors
    from pipeline.qat.wrap import QATModel

    _, adapter, ref = references[name]
    choices = _plan_choices(fmt, ref)
    calib = [_feeds(ref, b) for b in np.split(data(name)[0], 3)]
    built = quantize_model(ref.onnx_path, ref.layer_table, choices, calib, Calibration.MINMAX, tmp_path / "c.onnx")
    qm = QATModel(adapter.load_model(), choices, Calibration.MINMAX, {l.name: l.onnx_op for l in ref.layer_table})
    qm.calibrate([to_tensors(b) for b in calib], call_model)
    return ref, built.path, qm, [to_tensors(b) for b in calib]


def test_fp8_is_calibrated_behind_the_int8_layers(references, tmp_path):
    """exporters.onnx_quant runs its fp8 pass on the graph with the int8-static QDQ already in
    place: QAT's fp8 scales must be those (bit for bit), and observing on FP32 would miss them."""
    from tests.pipeline.qat.deployed import input_scale

    ref, artifact, qm, batches = _calibrated("mixed", "mixed", references, tmp_path)
    nodes = {l.name: l.onnx_node for l in ref.layer_table}
    by_name = {c.name: c for c in qm.calls()}
    assert by_name["a"].input_q.kind == "int8_static" and by_name["b"].input_q.kind == "fp8"
    for layer in ("a", "b"):
        np.testing.assert_allclose(by_name[layer].input_q.scale, input_scale(artifact, nodes[layer]),
                                   rtol=SCALE_RTOL, err_msg=layer)

    from pipeline.qat.train import call_model

    fp8 = by_name["b"].input_q  # the same statistics, observed on the FP32 model instead
    fp8.reset()
    qm.set_mode("observe")
    with torch.no_grad():
        for b in batches:
            call_model(qm.model, b)
    fp8.finalize()
    moved = abs(fp8.scale / input_scale(artifact, nodes["b"]) - 1)
    print(f"fp8 scale observed on FP32 vs behind int8: relative difference {moved:.2e}")
    assert moved > 10 * SCALE_RTOL  # ~170 ulps here
    qm.detach()


@pytest.mark.parametrize("name,fmt", [("shared_conv", "int8-static"), ("shared_nb", "per-call"),
                                      ("shared_attn", "fp8")])
def test_each_call_of_a_shared_layer_has_its_own_scale(name, fmt, references, tmp_path):
    """A module called k times is k ONNX nodes (``name``, ``name#2``, ...), each with its own
    calibrated input scale: QAT holds one quantizer per call, equal to its node's scale."""
    from tests.pipeline.qat.deployed import input_scale

    ref, artifact, qm, _ = _calibrated(name, fmt, references, tmp_path)
    table = {l.name: l for l in ref.layer_table}
    calls = {c.name: c for c in qm.calls()}
    assert set(calls) == set(table)  # every row of the layer table, shared or not, is one call
    scales = {}
    for n, call in calls.items():
        if call.input_q is None or not call.input_q.needs_calibration:
            continue
        scales[n] = np.float32(call.input_q.scale)
        # equal up to fp32 round-off upstream (torch and ORT sum the earlier layers differently)
        np.testing.assert_allclose(scales[n], input_scale(artifact, table[n].onnx_node, weight=table[n].weight),
                                   rtol=SCALE_RTOL, err_msg=n)
    values = sorted(scales.values())
    assert len(values) >= 2 and all(b > a * (1 + 10 * SCALE_RTOL) for a, b in zip(values, values[1:]))  # distinct
    qm.detach()


def test_a_module_called_more_often_than_exported_is_an_error(references):
    from pipeline.qat.train import call_model, to_tensors
    from pipeline.qat.wrap import QATModel

    _, adapter, ref = references["shared"]
    model = adapter.load_model()
    choices = {"fc": _choice("int8-dynamic"), "fc#2": _choice("int8-dynamic")}  # the table has fc#3 too
    with QATModel(model, choices) as qm:  # no layer table given: two calls known
        qm.set_mode("qat")
        with pytest.raises(RuntimeError, match=r"'fc' was called more than 2 time\(s\)"):
            call_model(model, to_tensors(_feeds(ref, _inputs("shared", 4, seed=3))))
    with QATModel(model, choices, onnx_ops={l.name: l.onnx_op for l in ref.layer_table}) as qm:
        qm.set_mode("qat")  # with the table: fc#3 is a third (fp32) call
        assert call_model(model, to_tensors(_feeds(ref, _inputs("shared", 4, seed=3)))).shape == (4, 32)
        assert [c.name for c in qm.calls()] == ["fc", "fc#2", "fc#3"]


@pytest.mark.parametrize("name,fmt", [("shared_conv", "fp8"), ("shared_attn", "fp8"), ("chain", "chain-fp8")])
def test_fp8_biases_are_deployed_as_ort_runs_them(name, fmt, references, tmp_path):
    """ORT's WeightBiasQuantization (every default session) rounds the fp32 bias of an fp8
    Conv/Gemm whose output feeds a quantizer to int32 at s_x*s_w. The quantizer now writes every
    fp8 Gemm/Conv bias in that form itself and QAT mirrors it, so the transformer has nothing
    left to change: the optimized graph is the same with and without it, and fake quantization
    equals the default session."""
    import onnx
    import onnxruntime as ort

    from pipeline.qat.train import call_model, to_tensors

    ref, artifact, qm, _ = _calibrated(name, fmt, references, tmp_path)
    x = _inputs(name, 32, seed=99)
    qm.set_mode("qat")
    with torch.no_grad():
        got = call_model(qm.model, to_tensors(_feeds(ref, x))).numpy()
    qm.detach()

    graphs = {}
    for tag, disabled in (("default", []), ("without", ["WeightBiasQuantization"])):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(tmp_path / f"{tag}.onnx")
        ort.InferenceSession(str(artifact), opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        graphs[tag] = onnx.load(opts.optimized_model_filepath).graph
    assert [(n.op_type, list(n.input)) for n in graphs["default"].node] == \
        [(n.op_type, list(n.input)) for n in graphs["without"].node], "WeightBiasQuantization changed the graph"

    # the written form: each fp8 layer's bias is an int32 DequantizeLinear at s_x * s_w
    model = onnx.load(str(artifact))
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    plan = _plan_choices(fmt, ref)
    nodes = {l.onnx_node for l in ref.layer_table if l.onnx_op in ("Gemm", "Conv") and plan[l.name].format is Format.FP8}
    checked = 0
    for n in model.graph.node:
        if n.name not in nodes or len(n.input) < 3 or not n.input[2]:
            continue
        dq = producer[n.input[2]]
        assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].data_type == onnx.TensorProto.INT32, n.name
        s_b = onnx.numpy_helper.to_array(inits[dq.input[1]])
        s_x, s_w = (onnx.numpy_helper.to_array(inits[producer[n.input[i]].input[1]]) for i in (0, 1))
        assert s_b.shape == () and s_b == np.float32(s_x) * np.float32(s_w), n.name  # per tensor
        checked += 1
    assert checked >= 1

    deployed = _ort(artifact).run(None, _feeds(ref, x))[0]
    scale = np.abs(deployed).max()
    np.testing.assert_allclose(got, deployed, rtol=1e-5, atol=1e-5 * scale)
