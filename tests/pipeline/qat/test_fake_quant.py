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


MIXED = {"a": "int8-static", "b": "fp8", "c": "bf16", "d": "int4"}

MODELS = {"mixed": (Mixed, (16, 40)), "lin2d": (Lin2D, (16, 40)), "lin3d": (Lin3D, (4, 5, 40)), "conv": (Conv, (4, 4, 6, 6)),
          "emb": (Emb, None), "attn": (Attn, (4, 6, 32))}


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


@pytest.mark.parametrize("name,fmt", CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_fake_quantized_layer_equals_onnx_runtime(name, fmt, references, tmp_path):
    from exporters.onnx_quant import quantize_model
    from pipeline.backends.ort_cpu import OrtSession
    from pipeline.qat.train import call_model, to_tensors
    from pipeline.qat.wrap import QATModel

    cfg, adapter, ref = references[name]
    fmt, _, method = fmt.partition("/")
    calibration = Calibration(method or "minmax")
    if fmt == "mixed":
        choices = {n: _choice(MIXED[n]) for n in ref.layer_table.names}
    else:
        choices = {n: _choice(fmt) for n in ref.layer_table.names}
    calib = [_feeds(ref, b) for b in np.split(data(name)[0], 3)]  # 3 equal batches of 32
    built = quantize_model(ref.onnx_path, ref.layer_table, choices, calib, calibration, tmp_path / "c.onnx")
    x = _inputs(name, 32, seed=99)  # fresh inputs, partly outside the calibrated range
    got_ort = OrtSession(built.path, ["CPUExecutionProvider"]).run(_feeds(ref, x))[0]

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
