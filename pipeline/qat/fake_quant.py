"""PyTorch fake quantizers that reproduce the deployed numerics of ``exporters.numerics``.

What the ONNX quantizer deploys per format (``exporters/numerics.py`` is the source of
truth; ``tests/pipeline/qat/test_fake_quant.py`` checks each function here bit for bit
against it and each layer against ONNX Runtime's output of the exported candidate):

=============  ==============================================================  =========================
format         weights                                                         activations
=============  ==============================================================  =========================
int8 static    symmetric per output channel, ``s = absmax/127``, rne(w/s)      symmetric per tensor,
               bias (Gemm/Conv): int32, ``s_b = s_x * s_w``                     calibrated range, sat [-128,127];
                                                                               Conv output quantized too
int8 dynamic   symmetric per output channel (Conv: per tensor)                 uint8 per call (per batch):
                                                                               DynamicQuantizeLinear
fp8 (E4M3FN)   per tensor, ``s = std(w)/std(E4M3)``, sat +-448, rne            per tensor, ``s = amax/448``,
               bias (Gemm/Conv): int32, ``s_b = s_x * s_w`` (per tensor)       amax from MinMax (global min/max)
int4           blocks of B along K (Conv: along I*kh*kw), ``s = v/-8`` (v the  unchanged (weight only)
               signed extreme), MLAS ``roundf(w/s + 8) - 8``; embeddings rne(w/s)
bf16           bf16 (rne), bias too                                            input and output rounded to bf16
=============  ==============================================================  =========================

Library use. The affine int8 paths call PyTorch's own fake-quant kernels
(``torch.fake_quantize_per_channel_affine`` / ``torch.fake_quantize_per_tensor_affine``):
their rounding (half to even, ``x / s``), saturation and straight-through gradient (zero
outside the range) match ORT's QuantizeLinear exactly — checked bit for bit in the tests.
Written by hand, because no kernel provides them:

* int4 blocks: the deployed rule has a *signed* per-block scale (``v/-8``) and MLAS rounds
  ``roundf(x*(1/s) + 8) - 8`` (ties up); torch's kernels need positive scales and round half
  to even, and torchao's int4 QAT (``IntxFakeQuantizeConfig``; read in torchao 0.18's
  ``choose_qparams_affine``) uses ``absmax/7.5`` scales - a different grid from the one
  MatMulNBits deploys. (torchao is also not a dependency of this project.)
* fp8: weights use ORT's std rule (``std/100.06``), which no fp8 fake-quant library
  (torchao's float8 among them: ``amax/448``) implements; activations use ``amax/448`` over
  the calibration set (what the quantizer deploys, replacing ORT's std rule, which clipped
  transformer outliers), a static scale rather than torchao's per-call/delayed amax; the cast
  itself is torch's ``float8_e4m3fn``.
* bf16: a cast round trip (``x.to(bfloat16).float()``, round to nearest even, as ORT's Cast).
* dynamic int8: the scale/zero point of DynamicQuantizeLinear is computed here (3 lines);
  the rounding is again ``torch.fake_quantize_per_tensor_affine``.

Gradients are straight-through: identity for weights (their scale follows from the weight
itself, so nothing is ever "outside the range" for long), and identity inside / zero outside
the representable range for activations (torch's kernels do this for int8; the fp8 path
mirrors it).
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np

from pipeline.formats import Calibration, Format, Int8Activations
from pipeline.formats import registry as formats
from pipeline.plan import LayerChoice

try:  # keep `import pipeline.qat.fake_quant` cheap to inspect; torch is needed to use it
    import torch
    import torch.nn as nn
except ImportError:  # pragma: no cover
    torch = None  # type: ignore[assignment]
    nn = None  # type: ignore[assignment]

from exporters import numerics
from exporters.quant.calibration import ENTROPY_NUM_BINS as _ENTROPY_NUM_BINS
from exporters.quant.calibration import ENTROPY_NUM_QUANTIZED_BINS as _ENTROPY_NUM_QUANTIZED_BINS

INT8_QMIN, INT8_QMAX = numerics.INT8_SATURATE_MIN, numerics.INT8_SATURATE_MAX
E4M3_MAX = float(numerics.E4M3_MAX)
E4M3_STD = float(numerics.E4M3_STD)
F32_TINY = float(np.finfo(np.float32).tiny)

# The calibrator settings exporters.quant runs ORT's calibrators with: Percentile at
# onnxruntime's create_calibrator defaults, Entropy with the quantizer's own bins
# (exporters.quant.calibration). MinMax (int8 minmax and every fp8 activation) needs none.
PERCENTILE_SETTINGS = dict(num_bins=2048, percentile=99.999, symmetric=True)
ENTROPY_SETTINGS = dict(num_bins=_ENTROPY_NUM_BINS, num_quantized_bins=_ENTROPY_NUM_QUANTIZED_BINS, symmetric=False)
# Calibration statistics are kept as arrays up to this many elements per tensor (ORT keeps
# them all); past it they are folded into the histogram batch by batch.
MAX_KEPT_ELEMENTS = 1 << 25


# --------------------------------------------------------------------------- STE helpers
def _ste(x, y):
    """Forward exactly ``y``, backward identity to ``x``. (The common ``x + (y - x).detach()``
    is not exact in floating point: it can move ``y`` by an ulp off the deployed grid.)"""
    return y.detach() + (x - x.detach())


def _ste_masked(x, y, lo, hi):
    """Forward ``y``; gradient 1 where ``lo <= x <= hi`` and 0 elsewhere (clipped)."""
    mask = ((x >= lo) & (x <= hi)).to(x.dtype)
    return y.detach() + (x - x.detach()) * mask


# --------------------------------------------------------------------------- scales (no grad)
def int8_weight_scale(w, axis: int | None):
    """:func:`exporters.numerics.int8_weight_scale` in torch: ``2*absmax/254`` in float64, stored float32."""
    w = w.detach()
    if axis is None:
        absmax = w.abs().amax()
    else:
        dims = [d for d in range(w.dim()) if d != axis % w.dim()]
        absmax = w.abs().amax(dim=dims)
    s64 = (2.0 * absmax.double()) / float(2 * numerics.INT8_WEIGHT_QMAX)
    return torch.where(s64 < F32_TINY, torch.ones_like(s64), s64).float()


def int8_activation_scale(rmin: float, rmax: float) -> float:
    return float(numerics.int8_activation_scale(rmin, rmax))


def fp8_weight_scale(w):
    """ORT's fp8 weight scale, ``std(w)/std(E4M3)`` per tensor (std in float64, stored float32;
    numpy's float32 std in the exporter can differ in the last bit)."""
    std = w.detach().double().std(correction=0).float()
    return std / torch.tensor(E4M3_STD, dtype=torch.float32)


# --------------------------------------------------------------------------- fake quantizers
def fake_int8_per_channel(w, axis: int | None):
    """Symmetric int8 weight (per channel along ``axis``, or per tensor), rne(w/s), STE."""
    s = int8_weight_scale(w, axis)
    if axis is None:
        y = torch.fake_quantize_per_tensor_affine(w.detach(), float(s), 0, INT8_QMIN, INT8_QMAX)
    else:
        zp = torch.zeros(s.shape, dtype=torch.int32, device=w.device)
        y = torch.fake_quantize_per_channel_affine(w.detach(), s, zp, axis % w.dim(), INT8_QMIN, INT8_QMAX)
    return _ste(w, y), s


def _roundf(x):
    """C ``roundf`` (ties away from zero) exactly as ``numerics._roundf``: no ``floor(x + 0.5)``,
    which would round 0.49999997 up."""
    t = torch.trunc(x)
    return t + torch.where((x - t).abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


def fake_int4_blocks(w2d, block_size: int, rounding: str = "half_up"):
    """:func:`exporters.numerics.int4_block_quantize` + dequantize for a 2-D ``[N, K]`` weight, STE.

    Per block of ``block_size`` along K: ``v`` = the element of largest magnitude (ties: the
    negative one), ``s = v / -8`` (negative when v > 0); all-zero block -> 0.
    ``half_up`` (MLAS: MatMulNBits and the Conv path), in float32:
    ``clip(roundf(w * (1/s) + 8), 0, 15) - 8``; ``half_even`` (GatherBlockQuantized):
    ``clip(rint(w / s), -8, 7)``. Returns (fake-quantized weight, scales ``[N, ceil(K/B)]``).
    """
    n, k = w2d.shape
    nb = -(-k // block_size)
    x = w2d.detach().float()
    if nb * block_size != k:
        x = torch.nn.functional.pad(x, (0, nb * block_size - k))
    blocks = x.reshape(n, nb, block_size)
    hi = blocks.amax(dim=2)
    lo = blocks.amin(dim=2)
    v = torch.where(hi.abs() > lo.abs(), hi, lo)
    s = (v / -8.0)[:, :, None]
    zero = s == 0
    safe = torch.where(zero, torch.ones_like(s), s)
    if rounding == "half_up":
        recip = torch.where(zero, torch.zeros_like(s), 1.0 / safe)
        q = _roundf(blocks * recip + 8.0).clamp(0, 15) - 8.0
    elif rounding == "half_even":
        q = torch.where(zero, torch.zeros_like(blocks), torch.round(blocks / safe))
    else:
        raise ValueError(f"rounding must be 'half_up' or 'half_even', got {rounding!r}")
    q = q.clamp(numerics.INT4_QMIN, numerics.INT4_QMAX)
    y = (q * s).reshape(n, nb * block_size)[:, :k]
    return _ste(w2d, y), s.reshape(n, nb)


def _fp8_round(v):
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def fake_fp8(x, scale, weight: bool = True):
    """``e4m3fn(sat448(x / s)) * s``; identity STE for weights, clipped STE for activations."""
    s = scale if torch.is_tensor(scale) else torch.tensor(float(scale), dtype=torch.float32, device=x.device)
    xf = x.float()
    y = (_fp8_round(xf.detach() / s) * s).to(x.dtype)
    if weight:
        return _ste(x, y)
    lim = E4M3_MAX * float(s)
    return _ste_masked(x, y, -lim, lim)


def fake_bf16(x):
    """float32 -> bfloat16 -> float32 (round to nearest even), identity STE."""
    return _ste(x, x.detach().to(torch.bfloat16).to(x.dtype))


def fake_int8_static(x, scale: float):
    """Static int8 activation: symmetric per tensor, zero point 0, saturating to [-128, 127]."""
    return torch.fake_quantize_per_tensor_affine(x.float(), float(scale), 0, INT8_QMIN, INT8_QMAX).to(x.dtype)


def dynamic_qparams(x):
    """DynamicQuantizeLinear's (scale, zero point) over the whole tensor, float32 as ORT."""
    xd = x.detach().float()
    lo = torch.clamp(xd.amin(), max=0.0)
    hi = torch.clamp(xd.amax(), min=0.0)
    scale = (hi - lo) / torch.tensor(255.0, dtype=torch.float32)
    if float(scale) == 0.0:
        return None, None
    zp = torch.clamp(torch.round(0.0 - lo / scale), 0, 255).to(torch.int32)
    return scale, zp


def fake_int8_dynamic(x):
    """DynamicQuantizeLinear + dequantize: uint8 asymmetric, scale per call, clipped STE."""
    scale, zp = dynamic_qparams(x)
    if scale is None:  # an all-zero tensor quantizes to zeros
        return x * 0
    return torch.fake_quantize_per_tensor_affine(x.float(), scale, zp, 0, 255).to(x.dtype)


INT32_MIN, INT32_MAX = float(np.iinfo(np.int32).min), float(np.iinfo(np.int32).max)


def fake_int8_bias(b, input_scale: float, weight_scale):
    """int32 Gemm/Conv bias of a static int8 or an fp8 layer (:func:`exporters.numerics.int8_bias_quantize`):
    ``s_b = s_x * s_w`` (float32 product; per channel for int8, per tensor for fp8), rne in
    float64, saturating to int32, STE."""
    s = (torch.tensor(float(input_scale), dtype=torch.float32) * weight_scale.detach().float())
    q = torch.round(b.detach().double() / s.double()).clamp(INT32_MIN, INT32_MAX)
    return _ste(b, (q.float() * s).to(b.dtype))


# --------------------------------------------------------------------------- modules
class WeightFakeQuant(nn.Module if nn is not None else object):
    """A ``torch.nn.utils.parametrize`` parametrization: ``weight -> deployed(weight)``.

    ``kind`` is the layer kind from the layer table (linear / matmul / conv / embedding);
    the weight is in torch's layout (Linear/in_proj ``[N, K]``, Conv ``[O, I, kh, kw]``,
    Embedding ``[V, D]``), whose dim 0 is the output channel (row) in every case.
    ``enabled=False`` makes it the identity (fp32 / calibration mode).
    """

    def __init__(self, choice: LayerChoice, kind: str, name: str = ""):
        super().__init__()
        self.choice = choice
        self.kind = kind
        self.layer_name = name
        self.enabled = True
        self.last_scale = None  # int8 (per channel) / fp8 (per tensor) weight scale of the last forward, for the bias
        fmt = choice.format
        if fmt not in (Format.INT8, Format.INT4, Format.FP8, Format.BF16):
            raise ValueError(f"{name}: no weight fake quantizer for format {fmt}")

    def forward(self, w):
        if not self.enabled:
            return w
        fmt = self.choice.format
        if fmt is Format.BF16:
            return fake_bf16(w)
        if fmt is Format.FP8:
            self.last_scale = fp8_weight_scale(w)
            return fake_fp8(w, self.last_scale, weight=True)
        if fmt is Format.INT8:
            per_tensor = (self.kind == "conv" and self.choice.int8_activations is Int8Activations.DYNAMIC)
            y, s = fake_int8_per_channel(w, None if per_tensor else 0)
            self.last_scale = s if not per_tensor else s.expand(w.shape[0])
            return y
        # int4: blocks along the reduction axis of each output row
        rounding = "half_even" if self.kind == "embedding" else "half_up"
        y, _ = fake_int4_blocks(w.reshape(w.shape[0], -1), self.choice.int4_block_size, rounding)
        return y.reshape(w.shape)

    def describe(self) -> str:
        c = self.choice
        if c.format is Format.INT4:
            return f"int4 block {c.int4_block_size}"
        if c.format is Format.INT8:
            return f"int8 {c.int8_activations}"
        return c.format.value


class BiasFakeQuant(nn.Module if nn is not None else object):
    """Parametrization of a static-int8 or fp8 Gemm/Conv bias: int32 with ``s_x * s_w``.

    (fp8 too: the quantizer writes an fp8 layer's bias as ORT's WeightBiasQuantization would
    round it - see ``exporters.quant.ort_passes.fp8_int32_biases``.)"""

    def __init__(self, weight_q: WeightFakeQuant, input_q: "ActivationFakeQuant"):
        super().__init__()
        # plain attributes, not submodules: they are registered on the layer already
        object.__setattr__(self, "_weight_q", weight_q)
        object.__setattr__(self, "_input_q", input_q)
        self.enabled = True

    def forward(self, b):
        wq, iq = self._weight_q, self._input_q
        if not self.enabled or wq.last_scale is None or iq.scale is None:
            return b
        return fake_int8_bias(b, iq.scale, wq.last_scale)


class ActivationFakeQuant:
    """Fake quantizer of one activation tensor (a layer's input, or a Conv's output).

    ``kind``: ``int8_static`` and ``fp8`` need calibration (ranges observed on the model
    with ORT's own collectors and settings; fp8 always MinMax, scale ``amax/448``),
    ``int8_dynamic`` computes its scale per call like DynamicQuantizeLinear, ``bf16`` rounds.
    """

    def __init__(self, kind: str, calibration: Calibration = Calibration.MINMAX, name: str = ""):
        if kind not in ("int8_static", "int8_dynamic", "fp8", "bf16"):
            raise ValueError(f"unknown activation quantizer kind {kind!r}")
        self.kind = kind
        self.calibration = Calibration(calibration)
        self.name = name
        self.mode = "fp32"
        self.scale: float | None = None
        self.range: tuple[float, float] | None = None
        self.reset()

    @property
    def needs_calibration(self) -> bool:
        return formats.qat_kind_calibrated(self.kind)

    def set_mode(self, mode: str) -> None:
        self.mode = mode

    # -- calibration --------------------------------------------------------
    def reset(self) -> None:
        self._min = math.inf
        self._max = -math.inf
        self._kept: list[np.ndarray] = []
        self._kept_elems = 0
        self._collector = None

    def _histogram_method(self) -> str | None:
        if self.kind == "fp8":
            return None  # MinMax, whatever the int8 calibration (exporters.quant.ort_passes)
        if self.calibration is Calibration.PERCENTILE:
            return "percentile"
        if self.calibration is Calibration.ENTROPY:
            return "entropy"
        return None

    def _new_collector(self):
        from onnxruntime.quantization.calibrate import HistogramCollector

        method = self._histogram_method()
        if method == "percentile":
            s = PERCENTILE_SETTINGS
            return HistogramCollector(method, s["symmetric"], s["num_bins"], 128, s["percentile"], "same")
        s = ENTROPY_SETTINGS
        return HistogramCollector(method, s["symmetric"], s["num_bins"], s["num_quantized_bins"], 99.999, "same")

    def _flush(self) -> None:
        if not self._kept:
            return
        if self._collector is None:
            self._collector = self._new_collector()
        with contextlib.redirect_stdout(io.StringIO()):  # ORT's collectors print progress
            self._collector.collect({"x": np.concatenate(self._kept)})
        self._kept, self._kept_elems = [], 0

    def observe(self, x) -> None:
        a = x.detach().float().cpu().numpy().ravel()
        if a.size == 0:
            return
        self._min = min(self._min, float(a.min()))
        self._max = max(self._max, float(a.max()))
        if self._histogram_method() is not None:
            self._kept.append(a.copy())
            self._kept_elems += a.size
            if self._kept_elems > MAX_KEPT_ELEMENTS:
                self._flush()

    def finalize(self) -> None:
        """Turn the observed statistics into the deployed scale."""
        if self._min == math.inf:
            raise RuntimeError(f"QAT calibration: activation of {self.name!r} was never observed "
                               "(the layer is not reached by forward() on the calibration data)")
        method = self._histogram_method()
        if method is None:  # MinMax: global min / max over all batches
            if self.kind == "fp8":
                self.scale = float(numerics.fp8_activation_scale(self._min, self._max))
                self.range = (-E4M3_MAX * self.scale, E4M3_MAX * self.scale)
                return
            self.range = (self._min, self._max)
            self.scale = int8_activation_scale(*self.range)
            return
        self._flush()
        with contextlib.redirect_stdout(io.StringIO()):
            result = self._collector.compute_collection_result()["x"]
        rmin, rmax = float(result[0]), float(result[1])
        self.range = (rmin, rmax)
        self.scale = int8_activation_scale(rmin, rmax)
        self._collector = None

    # -- forward --------------------------------------------------------------
    def __call__(self, x):
        if not torch.is_tensor(x) or not x.is_floating_point():
            return x
        if self.mode == "observe":
            if self.needs_calibration:
                self.observe(x)
            return x
        if self.mode != "qat":
            return x
        if self.kind == "bf16":
            return fake_bf16(x)
        if self.kind == "int8_dynamic":
            return fake_int8_dynamic(x)
        if self.scale is None:
            raise RuntimeError(f"QAT: activation quantizer of {self.name!r} used before calibration")
        if self.kind == "int8_static":
            return fake_int8_static(x, self.scale)
        return fake_fp8(x, self.scale, weight=False)


def input_quantizer(choice: LayerChoice, kind: str, calibration: Calibration, name: str = "") -> ActivationFakeQuant | None:
    """The quantizer of a layer's input as deployed, or None (weight-only / embedding); the kind
    comes from the format's family (``pipeline.formats``: ``qat_input_kind``)."""
    act = None if kind == "embedding" else formats.qat_input_kind(choice)
    return None if act is None else ActivationFakeQuant(act, calibration, name=f"{name}:input")


def output_quantizer(choice: LayerChoice, kind: str, calibration: Calibration, name: str = "") -> ActivationFakeQuant | None:
    """The quantizer of a layer's output as deployed: bf16 rounds it; static int8 Conv
    outputs are quantized (ORT fuses a Conv into QLinearConv only then); others stay float
    (the family's ``qat_output_kind``)."""
    act = None if kind == "embedding" else formats.qat_output_kind(choice, "Conv" if kind == "conv" else kind)
    return None if act is None else ActivationFakeQuant(act, calibration, name=f"{name}:output")
