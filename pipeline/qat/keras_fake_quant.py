"""TensorFlow fake-quant ops for Keras QAT: the rules of :mod:`exporters.numerics` written in TF,
with straight-through gradients, so a Keras fine-tune trains the grid the ONNX quantizer writes
(see :mod:`pipeline.qat.keras_qat` for how they are attached to layers)."""

from __future__ import annotations

import numpy as np

from exporters import numerics

E4M3_STD = float(numerics.E4M3_STD)
E4M3_MAX = float(numerics.E4M3_MAX)
INT8_QMIN, INT8_QMAX = numerics.INT8_SATURATE_MIN, numerics.INT8_SATURATE_MAX


# --------------------------------------------------------------------------- TF fake quant
def _tf():
    from pipeline.models.keras_adapter import import_tf

    return import_tf()[0]


def _ste(x, y):
    """Forward exactly ``y``, gradient identity to ``x`` (``x + sg(y - x)`` would round when |x| >> |y|)."""
    tf = _tf()
    return tf.stop_gradient(y) + (x - tf.stop_gradient(x))


def _ste_masked(x, y, lo, hi):
    tf = _tf()
    mask = tf.cast((x >= lo) & (x <= hi), x.dtype)
    return tf.stop_gradient(y) + (x - tf.stop_gradient(x)) * mask


def int8_weight_scale(w, axis: int | None):
    """``numerics.int8_weight_scale``: ``2*absmax/254`` in float64, float32; < tiny -> 1."""
    tf = _tf()
    a = tf.abs(tf.stop_gradient(w))
    if axis is None:
        absmax = tf.reduce_max(a)
    else:
        axes = [d for d in range(len(w.shape)) if d != axis % len(w.shape)]
        absmax = tf.reduce_max(a, axis=axes)
    s64 = 2.0 * tf.cast(absmax, tf.float64) / float(2 * numerics.INT8_WEIGHT_QMAX)
    tiny = float(np.finfo(np.float32).tiny)
    return tf.cast(tf.where(s64 < tiny, tf.ones_like(s64), s64), tf.float32)


def _per_axis(s, ndim: int, axis: int | None):
    tf = _tf()
    if axis is None:
        return s
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return tf.reshape(s, shape)


def fake_int8_weight(w, axis: int | None):
    """Symmetric int8 weight, rne(w/s) (the range [-127, 127] holds by construction); STE."""
    tf = _tf()
    s = int8_weight_scale(w, axis)
    sb = _per_axis(s, len(w.shape), axis)
    q = tf.clip_by_value(tf.math.rint(tf.stop_gradient(w) / sb), INT8_QMIN, INT8_QMAX)
    return _ste(w, q * sb), s


def fake_int8_static(x, scale):
    """Static int8 activation: ``sat(rne(x/s)) * s``, zero point 0; clipped STE."""
    tf = _tf()
    q = tf.clip_by_value(tf.math.rint(tf.stop_gradient(x) / scale), INT8_QMIN, INT8_QMAX)
    return _ste_masked(x, q * scale, INT8_QMIN * scale, INT8_QMAX * scale)


def fake_int8_dynamic(x):
    """DynamicQuantizeLinear + dequantize over the whole tensor (uint8, per call); clipped STE."""
    tf = _tf()
    xd = tf.stop_gradient(x)
    lo = tf.minimum(tf.reduce_min(xd), 0.0)
    hi = tf.maximum(tf.reduce_max(xd), 0.0)
    scale = (hi - lo) / tf.constant(255.0, tf.float32)
    safe = tf.where(scale > 0, scale, tf.ones_like(scale))
    zp = tf.clip_by_value(tf.math.rint(0.0 - lo / safe), 0.0, 255.0)
    q = tf.clip_by_value(tf.math.rint(xd / safe) + zp, 0.0, 255.0)
    y = tf.where(scale > 0, (q - zp) * safe, tf.zeros_like(xd))
    return _ste_masked(x, y, (0.0 - zp) * safe, (255.0 - zp) * safe)


def fp8_weight_scale(w):
    """``std(w)/std(E4M3)`` per tensor (std in float64, stored float32)."""
    tf = _tf()
    std = tf.cast(tf.math.reduce_std(tf.cast(tf.stop_gradient(w), tf.float64)), tf.float32)
    return std / tf.constant(E4M3_STD, tf.float32)


def _e4m3(v):
    tf = _tf()
    v = tf.clip_by_value(v, -E4M3_MAX, E4M3_MAX)  # QuantizeLinear saturates; the cast alone gives NaN
    return tf.cast(tf.cast(v, tf.dtypes.experimental.float8_e4m3fn), tf.float32)


def fake_fp8(x, scale, weight: bool):
    tf = _tf()
    y = _e4m3(tf.stop_gradient(x) / scale) * scale
    if weight:
        return _ste(x, y)
    return _ste_masked(x, y, -E4M3_MAX * scale, E4M3_MAX * scale)


def fake_bf16(x):
    tf = _tf()
    return _ste(x, tf.cast(tf.cast(tf.stop_gradient(x), tf.bfloat16), tf.float32))


def _roundf(x):
    """C ``roundf`` (ties away from zero), as ``numerics._roundf``."""
    tf = _tf()
    t = tf.math.floor(tf.abs(x)) * tf.sign(x)  # trunc
    return t + tf.where(tf.abs(x - t) >= 0.5, tf.sign(x), tf.zeros_like(x))


def fake_int4_blocks(w2d, block_size: int):
    """``numerics.int4_block_quantize(rounding="half_up")`` + dequantize for ``[N, K]``; STE.

    MLAS's rule in float32: ``clip(roundf(w * (1/s) + 8), 0, 15) - 8`` (exact ties go up).
    """
    tf = _tf()
    n, k = int(w2d.shape[0]), int(w2d.shape[1])
    nb = -(-k // block_size)
    x = tf.stop_gradient(w2d)
    if nb * block_size != k:
        x = tf.pad(x, [[0, 0], [0, nb * block_size - k]])
    blocks = tf.reshape(x, [n, nb, block_size])
    hi = tf.reduce_max(blocks, axis=2)
    lo = tf.reduce_min(blocks, axis=2)
    v = tf.where(tf.abs(hi) > tf.abs(lo), hi, lo)
    s = (v / tf.constant(-8.0, tf.float32))[:, :, None]
    zero = tf.equal(s, 0.0)
    recip = tf.where(zero, tf.zeros_like(s), tf.constant(1.0, tf.float32) / tf.where(zero, tf.ones_like(s), s))
    q = tf.clip_by_value(_roundf(blocks * recip + tf.constant(8.0, tf.float32)), 0.0, 15.0) - 8.0
    y = tf.reshape(q * s, [n, nb * block_size])[:, :k]
    return _ste(w2d, y)


def fake_int8_bias(b, input_scale, weight_scale):
    """int32 bias of a static int8 Conv: ``s_b = s_x * s_w`` (float32), rne in float64; STE."""
    tf = _tf()
    s = tf.cast(input_scale, tf.float32) * weight_scale
    q = tf.math.rint(tf.cast(tf.stop_gradient(b), tf.float64) / tf.cast(s, tf.float64))
    info = np.iinfo(np.int32)
    q = tf.clip_by_value(q, float(info.min), float(info.max))
    return _ste(b, tf.cast(q, tf.float32) * s)
