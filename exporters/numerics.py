"""Reference numerics of every deployed format, in numpy: the single source of truth.

``exporters.onnx_quant`` writes the deployed ONNX artifact with ONNX Runtime's quantization
tools (and a few hand-written rewrites where those tools have no form). This module states,
in plain numpy, exactly which numbers those tools put in the graph and what the runtime then
computes, so that

* the tests can check the artifact bit for bit against these functions, and
* QAT fake-quant (PyTorch/Keras) can mirror them, so what was trained is what is deployed.

Every rule below was read from the installed onnxruntime 1.32 sources
(``quantization/quant_utils.py``, ``calibrate.py``, ``matmul_nbits_quantizer.py``, MLAS
``q4_dq.cpp``) and the ONNX operator specs, and is checked against real ORT output in
``tests/exporters/test_numerics.py`` and ``test_onnx_quant.py``.

Rules (``s`` = scale, ``q`` = stored integer, all scales float32):

=============  =========================  ===============================================  ================================
format         tensor                     scale rule                                       quantize / range
=============  =========================  ===============================================  ================================
int8           weight, per output chan.   ``s = max(|min(w,0)|, |max(w,0)|) / 127``        ``q = rne(w / s)``, [-127, 127]
               (static and dynamic)       (float64 math, stored float32; s<tiny -> 1)      (symmetric, zero point 0)
int8 static    activation, per tensor     same rule on the calibrated ``[rmin, rmax]``     ``q = sat(rne(x / s))``,
                                          (MinMax / Percentile / Entropy range)            saturates to [-128, 127];
                                                                                           ORT CPU option: stored uint8
                                                                                           ``q + 128``, zero point 128
int8 static    Conv output, per tensor    same rule on the calibrated output range         as activations (QLinearConv)
int8 static    bias (Gemm/Conv)           ``s_b = s_x * s_w`` (per channel)                ``q = rne(b / s_b)`` int32
int8 dynamic   activation, per call       ``lo=min(x,0), hi=max(x,0), s=(hi-lo)/255``      uint8, ``zp = sat(rne(-lo/s))``,
                                          (DynamicQuantizeLinear, over the whole batch)    ``q = sat(rne(x/s) + zp)``
int8 dynamic   Conv weight, per tensor    int8 weight rule over the whole tensor           (ORT's ConvInteger path)
fp8 (E4M3FN)   weight, per tensor         ``s = std(w) / std(E4M3)`` (std of the 254       ``q = e4m3(sat448(x / s))``,
                                          finite E4M3FN values = 100.0577)                 round to nearest even
fp8 (E4M3FN)   activation, per tensor     ``s = amax / 448`` (float32; amax = max(|rmin|,  same; saturates at +-448
                                          |rmax|) from ORT's MinMax calibrator; 0 -> 1)
fp8 (E4M3FN)   bias (Gemm/Conv)           ``s_b = s_x * s_w`` (per tensor)                 ``q = rne(b / s_b)`` int32
int4           weight, blocks of B along  ``v`` = the block element of largest |v|          ``clip(round(x / s), -8, 7)``:
               the reduction axis K       (ties: the negative one); ``s = v / -8``          ``v`` maps to exactly -8;
               (MatMulNBits, Conv DQ,     (s can be negative); last block zero-padded;     MatMulNBits/Conv: ties up,
               GatherBlockQuantized)      all-zero block -> s = 0, q = 0                   ``x * (1/s)``; Gather: rne, x/s
bf16           inputs, weights, bias,     none (a type, not a scale)                       float32 -> bfloat16, round to
               layer output                                                                nearest even (ORT Cast)
int8 embed.    table row (per token)      int8 weight rule per row (axis 0)                stored uint8 ``q + 128``
fp8 embed.     table, per tensor          fp8 weight rule                                  as fp8 weights
int4 embed.    table, blocks along D      int4 rule, Gather variant                        as int4 weights
=============  =========================  ===============================================  ================================

``rne`` = round half to even (numpy ``rint``, ONNX QuantizeLinear); ``sat`` = clip to the
integer type's range. Dequantization is always ``(q - zp) * s`` in float32, and the layer then
computes in float32 (or int32 for int8: ORT's integer kernels accumulate exactly in int32 and
apply ``s_x * s_w`` once, which equals the float64 product of the dequantized values up to
float32 rounding of the result).

For the ``ort`` target the int8-static graph is written so that ORT's x86 CPU fuses every int8
MatMul/Gemm into its integer kernel (QGemm / MatMulIntegerToFloat, fp32 output): a shared
activation quantizer is repeated per layer (same tensor, scale and zero point) and a Relu/Clip
right after such a layer is written ``Max``/``Min`` (``exporters.quant.ort_passes``). Neither
changes a number in the table above, so QAT mirrors them as it mirrors the plain QDQ graph.
Nor does storing the int8-static activations as uint8 with zero point 128 (``quantize_model(...,
uint8_activations=True)``, ``ort`` target only: what ORT's x86 CPU converts int8 Q/DQ pairs to
anyway, written for every pair so that it also fuses Convs whose output has several readers):
``sat_u8(rne(x/s) + 128) = sat_s8(rne(x/s)) + 128`` and ``(q_u8 - 128) * s = q_s8 * s``, same scale.
The ``tensorrt`` target keeps signed int8, zero point 0.

Two ORT int4 paths round exact ties differently (MLAS: ``roundf(x * (1/s) + 8) - 8``, ties
up; GatherBlockQuantized's numpy code: ``rint(x / s)``, ties to even). A tie needs ``x / s``
to be exactly ``k + 0.5``, so fake-quant may use either; :func:`int4_block_quantize` takes
the variant as an argument so the tests can match both paths bit for bit.
"""

from __future__ import annotations

from typing import Literal

import ml_dtypes
import numpy as np

F32 = np.float32

# --------------------------------------------------------------------------- int8

INT8_WEIGHT_QMIN, INT8_WEIGHT_QMAX = -127, 127
"""Symmetric int8 weight range ORT uses (``ONNX_INT_TYPE_SYMMETRIC_RANGE``); -128 is never produced."""

INT8_SATURATE_MIN, INT8_SATURATE_MAX = -128, 127
"""QuantizeLinear saturates to the full int8 type, so run-time activations beyond the calibrated
range can reach -128 even though the scale was set for [-127, 127]."""


def _symmetric_scale(absmax: np.ndarray, qmax: int) -> np.ndarray:
    """ORT ``compute_scale_zp(symmetric=True)``: (2*absmax) / (2*qmax) in float64, stored float32.

    A scale below float32's smallest normal is replaced by 1.0 (ORT does the same), so an
    all-zero channel quantizes to zeros instead of dividing by zero.
    """
    absmax = np.asarray(absmax, dtype=F32)
    scale64 = (2.0 * absmax.astype(np.float64)) / np.float64(2 * qmax)
    tiny = np.finfo(F32).tiny
    return np.where(scale64 < tiny, F32(1.0), scale64.astype(F32)).astype(F32)


def _absmax(x: np.ndarray, axis: int | None) -> np.ndarray:
    """max(|min(x, 0)|, |max(x, 0)|) over everything but ``axis`` (all of x when axis is None)."""
    x = np.asarray(x, dtype=F32)
    if axis is None:
        lo, hi = np.minimum(x.min(), 0), np.maximum(x.max(), 0)
    else:
        axis = axis % x.ndim
        red = tuple(i for i in range(x.ndim) if i != axis)
        lo, hi = np.minimum(x.min(axis=red), 0), np.maximum(x.max(axis=red), 0)
    return np.maximum(np.abs(lo), np.abs(hi)).astype(F32)


def _per_axis(v: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Reshape a per-channel vector so it broadcasts along ``axis`` of an ndim tensor."""
    if axis is None or np.ndim(v) == 0:
        return np.asarray(v)
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.asarray(v).reshape(shape)


def int8_weight_scale(w: np.ndarray, axis: int | None) -> np.ndarray:
    """Symmetric int8 weight scale, one per channel along ``axis`` (None: one per tensor).

    ``axis`` is the output-channel axis of the weight as stored in ONNX: 1 for a MatMul
    weight [K, N], 0 for Gemm(transB=1) [N, K] and Conv [O, I, kh, kw], 0 for an
    embedding table [V, D] (one scale per token row).
    """
    return _symmetric_scale(_absmax(w, axis), INT8_WEIGHT_QMAX)


def int8_quantize(x: np.ndarray, scale: np.ndarray, axis: int | None = None, zero_point: int = 0) -> np.ndarray:
    """``sat(rne(x / s) + zp)`` to int8, the float32 division ORT and QuantizeLinear use."""
    x = np.asarray(x, dtype=F32)
    s = _per_axis(np.asarray(scale, dtype=F32), x.ndim, axis)
    q = np.rint(x / s) + zero_point
    return np.clip(q, INT8_SATURATE_MIN, INT8_SATURATE_MAX).astype(np.int8)


def int8_dequantize(q: np.ndarray, scale: np.ndarray, axis: int | None = None, zero_point: int = 0) -> np.ndarray:
    s = _per_axis(np.asarray(scale, dtype=F32), np.ndim(q), axis)
    return ((np.asarray(q, dtype=np.int32) - zero_point).astype(F32) * s).astype(F32)


def int8_activation_scale(rmin: float, rmax: float) -> np.float32:
    """Static int8 activation scale from a calibrated range: symmetric, zero point 0.

    Symmetric int8 (not uint8) activations are what TensorRT requires and what ORT's x86
    S8S8 kernels run; the range is widened to include 0 first.
    """
    absmax = max(abs(min(float(rmin), 0.0)), abs(max(float(rmax), 0.0)))
    return F32(_symmetric_scale(np.asarray(absmax, dtype=F32), INT8_WEIGHT_QMAX))


def int8_bias_quantize(b: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias of a static int8 Gemm/Conv: scale ``s_x * s_w`` (per channel), zero point 0.

    (ORT's weight-scale adjustment for overflowing biases is switched off by the quantizer,
    so ``s_w`` is always :func:`int8_weight_scale`; the product is taken in float32.)
    """
    s = (F32(input_scale) * np.asarray(weight_scale, dtype=F32)).astype(F32)
    q = np.rint(np.asarray(b, dtype=np.float64) / s.astype(np.float64))
    info = np.iinfo(np.int32)
    return np.clip(q, info.min, info.max).astype(np.int32), s


def dynamic_quantize_linear(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """ONNX DynamicQuantizeLinear: uint8 asymmetric over the whole tensor (the whole batch).

    Returns (q, scale, zero_point). Note the scale depends on every sample in the batch, so a
    dynamic-int8 layer's output for one sample can change with what it is batched with.
    """
    x = np.asarray(x, dtype=F32)
    lo = min(F32(0), x.min()) if x.size else F32(0)
    hi = max(F32(0), x.max()) if x.size else F32(0)
    scale = F32((F32(hi) - F32(lo)) / F32(255))
    if scale == 0:
        return np.zeros_like(x, dtype=np.uint8), scale, np.uint8(0)
    zp = np.uint8(np.clip(np.rint(F32(0) - F32(lo) / scale), 0, 255))
    q = np.clip(np.rint(x / scale) + np.float32(zp), 0, 255).astype(np.uint8)
    return q, scale, zp


# --------------------------------------------------------------------------- fp8

E4M3_MAX = 448.0
"""Largest finite float8e4m3fn value; QuantizeLinear (saturate=1) clips to +-448."""

_E4M3_VALUES = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(F32)
E4M3_STD = F32(np.std(_E4M3_VALUES[np.isfinite(_E4M3_VALUES)]))
"""Standard deviation of the 254 finite E4M3FN values (float32, as ORT computes it): 100.0577.

ORT scales fp8 tensors so that the tensor's std matches this std (``compute_scale_zp_float8``),
i.e. the largest E4M3 value 448 sits at about 4.48 standard deviations of the data.
"""


def fp8_scale_from_std(std: float) -> np.float32:
    """ORT's fp8 scale: ``std / std(E4M3)`` in float32. Deployed for weights only; ORT's
    activation scales are replaced by :func:`fp8_activation_scale`."""
    return F32(F32(std) / E4M3_STD)


def fp8_activation_scale(rmin: float, rmax: float) -> np.float32:
    """Per-tensor fp8 activation scale: ``amax / 448`` in float32, amax from a MinMax range.

    Not ORT's rule (``std / std(E4M3)``, :func:`fp8_scale_from_std`): that puts 448 at ~4.5
    standard deviations, and transformer activations reach 35-98 sigma, so their outliers
    were clipped (all-MiniLM-L6-v2 / STS-B: fp8 81.21 Spearman with the std rule, 86.92 with
    this one, fp32 86.72). ``exporters.quant.ort_passes.fp8_static_pass`` rewrites ORT's
    activation scales to this value, with the range from ORT's MinMax calibrator over the
    same feeds. ``amax = max(|rmin|, |rmax|)``; a scale below float32's smallest normal
    (amax == 0) becomes 1.0, as for int8.
    """
    amax = F32(max(abs(float(rmin)), abs(float(rmax))))
    s = F32(amax / F32(E4M3_MAX))
    return s if s >= np.finfo(F32).tiny else F32(1.0)


def fp8_weight_scale(w: np.ndarray) -> np.float32:
    """Per-tensor fp8 weight scale: numpy float32 std over the weight as stored in ONNX.

    (numpy's float32 std depends on the summation order, so a transposed copy of the same
    weight can differ in the last bit of the scale.)
    """
    return fp8_scale_from_std(np.std(np.asarray(w, dtype=F32).ravel()))


def distribution_std(x: np.ndarray, num_bins: int = 2048) -> np.float32:
    """The std ORT's Distribution calibrator reports for one array of activations (what ORT's
    own fp8 activation scale is computed from; no longer deployed, kept to show the difference).

    A histogram with ``num_bins`` bins over ``[-max|x|, max|x|]``, then mean/std of the bin
    centres weighted by counts. (Over several calibration batches ORT merges histograms, so
    its value differs slightly from this single-array one; QAT may use the plain std.)
    """
    x = np.asarray(x, dtype=F32).ravel()
    t = np.array(max(abs(x.min()), abs(x.max())), dtype=F32)
    hist, edges = np.histogram(x, num_bins, range=(-t, t))
    centres = (edges[:-1] + edges[1:]) * 0.5
    avg = (hist * centres).sum() / hist.sum()
    return F32(((hist * centres**2).sum() / hist.sum() - avg**2) ** 0.5)


def fp8_quantize(x: np.ndarray, scale: float) -> np.ndarray:
    """``e4m3fn(saturate(x / s))``: float32 division, clip to +-448, round to nearest even.

    (ml_dtypes alone turns out-of-range values into NaN; QuantizeLinear saturates.)
    """
    v = np.asarray(x, dtype=F32) / F32(scale)
    return np.clip(v, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)


def fp8_dequantize(q: np.ndarray, scale: float) -> np.ndarray:
    return (np.asarray(q).astype(F32) * F32(scale)).astype(F32)


def fp8_fake_quant(x: np.ndarray, scale: float) -> np.ndarray:
    return fp8_dequantize(fp8_quantize(x, scale), scale)


# --------------------------------------------------------------------------- int4

INT4_QMIN, INT4_QMAX = -8, 7

Int4Rounding = Literal["half_up", "half_even"]


def _roundf(x: np.ndarray) -> np.ndarray:
    """C ``roundf``: nearest integer, ties away from zero (exact for |x| < 2**23)."""
    t = np.trunc(x)
    return t + np.where(np.abs(x - t) >= 0.5, np.sign(x), 0).astype(x.dtype)


def int4_block_quantize(
    w: np.ndarray, block_size: int, rounding: Int4Rounding = "half_up"
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block-wise int4 of a 2-D weight ``w[N, K]``, blocks of ``block_size`` along K.

    Layout: rows are output channels (torch ``Linear.weight`` [out, in], a Conv weight
    flattened to [O, I*kh*kw], an embedding table [V, D]); each row is cut into
    ``ceil(K / B)`` blocks along the reduction axis, the last one zero-padded.
    For an ONNX MatMul weight [K, N] pass its transpose.

    Per block: ``v`` = element with the largest magnitude (a tie between +a and -a picks -a),
    ``s = v / -8`` (float32; negative when v > 0), so ``v`` itself quantizes to exactly -8 and
    the other sign reaches at most +7 (it clips at +7 when its magnitude exceeds 7.5|s|).
    ``rounding='half_up'`` is MLAS (MatMulNBits, and the Conv DQ path), in float32:
    ``clip(roundf(x * (1/s) + 8), 0, 15) - 8`` - rounding the offset value makes exact ties
    go up (2.5 -> 3, -2.5 -> -2); ``'half_even'`` is ORT's numpy Gather path:
    ``clip(rint(x / s), -8, 7)``. An all-zero block gets s = 0 and q = 0.

    Returns ``q`` int8 [N, K] with values in [-8, 7] and ``scales`` float32 [N, ceil(K/B)].
    """
    w = np.asarray(w, dtype=F32)
    if w.ndim != 2:
        raise ValueError(f"int4_block_quantize expects a 2-D [N, K] weight, got shape {w.shape}")
    n, k = w.shape
    nb = -(-k // block_size)
    padded = np.zeros((n, nb * block_size), dtype=F32)
    padded[:, :k] = w
    blocks = padded.reshape(n, nb, block_size)
    hi = blocks.max(axis=2)
    lo = blocks.min(axis=2)
    v = np.where(np.abs(hi) > np.abs(lo), hi, lo)
    scales = (v / F32(-8.0)).astype(F32)
    s = scales[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        if rounding == "half_up":
            recip = np.where(s != 0, F32(1.0) / s, F32(0.0)).astype(F32)
            shifted = ((blocks * recip).astype(F32) + F32(8.0)).astype(F32)
            q = np.clip(_roundf(shifted), 0, 15) - 8
        elif rounding == "half_even":
            q = np.where(s == 0, F32(0.0), np.rint(blocks / s))
        else:
            raise ValueError(f"rounding must be 'half_up' or 'half_even', got {rounding!r}")
    q = np.clip(q, INT4_QMIN, INT4_QMAX).astype(np.int8).reshape(n, nb * block_size)[:, :k]
    return np.ascontiguousarray(q), scales


def int4_block_dequantize(q: np.ndarray, scales: np.ndarray, block_size: int) -> np.ndarray:
    """Inverse of :func:`int4_block_quantize`: ``q * s`` per block, float32 [N, K]."""
    q = np.asarray(q)
    k = q.shape[1]
    s = np.repeat(np.asarray(scales, dtype=F32), block_size, axis=1)[:, :k]
    return (q.astype(F32) * s).astype(F32)


def int4_fake_quant(w: np.ndarray, block_size: int, rounding: Int4Rounding = "half_up") -> np.ndarray:
    q, s = int4_block_quantize(w, block_size, rounding)
    return int4_block_dequantize(q, s, block_size)


def pack_int4(q: np.ndarray) -> bytes:
    """ONNX int4 packing: consecutive elements in pairs, first one in the low nibble."""
    flat = np.asarray(q, dtype=np.int8).ravel()
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    lo = flat[0::2].astype(np.uint8) & 0x0F
    hi = (flat[1::2].astype(np.uint8) & 0x0F) << 4
    return (lo | hi).astype(np.uint8).tobytes()


def unpack_int4(raw: bytes, count: int, signed: bool = True) -> np.ndarray:
    """Inverse of :func:`pack_int4` (``signed=False`` reads uint4 nibbles 0..15)."""
    b = np.frombuffer(raw, dtype=np.uint8)
    nib = np.stack([b & 0x0F, b >> 4], axis=-1).ravel()[:count].astype(np.int8)
    if signed:
        nib = np.where(nib > 7, nib - 16, nib).astype(np.int8)
    return nib


# --------------------------------------------------------------------------- bf16

BF16_REL_ERROR = 2.0**-8
"""Largest relative rounding error of float32 -> bfloat16 (8 significant bits, half an ulp)."""


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 -> float32, round to nearest even (what ORT's Cast does, checked)."""
    return np.asarray(x, dtype=F32).astype(ml_dtypes.bfloat16).astype(F32)


def to_bf16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=F32).astype(ml_dtypes.bfloat16)
