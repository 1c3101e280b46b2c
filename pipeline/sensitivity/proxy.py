"""A cheap sensitivity proxy: weight quantization error weighted by input-activation energy.

For a layer ``y = W x`` the output error of quantizing the weight alone is ``dW x``; with input
channels roughly uncorrelated, ``E||dW x||^2 ~ sum_k E[x_k^2] ||dW[:, k]||^2``. Divided by the
same sum for ``W`` itself it is the layer's relative output error (the weighting AWQ and GPTQ
use). It needs no quantized artifact, only the reference weights, one probe run and the format's
numerics from :mod:`exporters.numerics` (the rules the quantizer writes), so it costs seconds on
any model. It leaves out activation quantization (static int8, fp8 activations) and how the
error propagates to the metric, hence it is always checked against the artifact
(:func:`rank_correlation`) before it stands in for it.
"""

from __future__ import annotations

import numpy as np

from exporters import numerics
from pipeline.formats import Format
from pipeline.layers import Layer
from pipeline.sensitivity.probe import LayerProbe

PROXY_DESCRIPTION = ("relative output error: (sum_k E[x_k^2] ||dW_k||^2 + sum_k E[dx_k^2] ||W_k||^2) / "
                     "sum_k E[x_k^2] ||W_k||^2 (x: the layer's input on calibration rows; dW: the format's weight "
                     "rounding error; dx: its activation rounding error where the format quantizes activations, "
                     "uniform-rounding model)")

# Relative mean squared rounding error of a float format with m mantissa bits, per element: the
# relative error is uniform in +-2^-(m+1), so its variance is 2^-2(m+1) / 3.
_FP8_REL_VAR = 2.0 ** (-2 * 4) / 3  # E4M3: 3 mantissa bits
_BF16_REL_VAR = 2.0 ** (-2 * 8) / 3  # 7 mantissa bits


def _canonical(w: np.ndarray, layer: Layer, probe: LayerProbe | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The weight as rows = output channels, columns = the reduction axis (the layout the int8 and
    int4 rules quantize along), and per column the index of the input channel it reads."""
    op = layer.onnx_op
    if op == "Conv":
        o, i = w.shape[0], w.shape[1]
        spatial = int(np.prod(w.shape[2:])) if w.ndim > 2 else 1
        cols = np.repeat(np.arange(i), spatial)
        return w.reshape(o, i * spatial), cols
    if op == "Gather":
        return w, None  # a table [V, D]: rows are tokens, no input channels to weight by
    if op == "Gemm" and probe is not None and probe.trans_b:
        return w, np.arange(w.shape[1])
    return w.T, np.arange(w.shape[0])  # MatMul / Gemm(transB=0): stored [K, N]


def fake_quant(rows: np.ndarray, fmt: Format, int4_block_size: int = 32) -> np.ndarray:
    """The weight as the quantizer would store it, dequantized (rows = output channels)."""
    rows = np.asarray(rows, dtype=np.float32)
    if fmt is Format.FP32:
        return rows
    if fmt is Format.BF16:
        return numerics.bf16_round(rows)
    if fmt is Format.FP8:
        return numerics.fp8_fake_quant(rows, numerics.fp8_weight_scale(rows))
    if fmt is Format.INT8:
        s = numerics.int8_weight_scale(rows, 0)
        return numerics.int8_dequantize(numerics.int8_quantize(rows, s, 0), s, 0)
    if fmt is Format.INT4:
        return numerics.int4_fake_quant(rows, int4_block_size)
    raise ValueError(f"no proxy for format {fmt}")


def activation_noise(fmt: Format, probe: LayerProbe | None, int8_activations: str = "static") -> tuple[float, float]:
    """(absolute, relative) mean squared rounding error per input element the format adds to the
    layer's input: int8 rounds to a grid of step s (variance s^2/12; s = absmax/127 static, or
    range/255 dynamic), fp8 and bf16 round relative to each value. Weight-only forms add none."""
    if probe is None or probe.activation is None:
        return 0.0, 0.0  # an embedding lookup: only the table is quantized
    if fmt is Format.INT8:
        step = (probe.absmax / 127) if str(int8_activations) == "static" else (probe.hi - probe.lo) / 255
        return step * step / 12, 0.0
    if fmt is Format.FP8:
        return 0.0, _FP8_REL_VAR
    if fmt is Format.BF16:
        return 0.0, _BF16_REL_VAR
    return 0.0, 0.0


def proxy_score(w: np.ndarray, layer: Layer, probe: LayerProbe | None, fmt: Format, int4_block_size: int = 32,
                int8_activations: str = "static") -> float:
    """Relative output error of ``layer`` with ``fmt`` (0 = exact): weight and activation rounding."""
    rows, cols = _canonical(np.asarray(w, dtype=np.float32), layer, probe)
    d = (fake_quant(rows, fmt, int4_block_size) - rows).astype(np.float64)
    col_err = (d * d).sum(axis=0)
    col_w = (rows.astype(np.float64) ** 2).sum(axis=0)
    weights = np.ones_like(col_err)
    ms = probe.channel_ms if probe is not None else None
    weighted = cols is not None and ms is not None and probe.group == 1 and cols.max(initial=-1) < ms.shape[0]
    if weighted:
        weights = ms[cols]
    den = float((weights * col_w).sum())
    if den <= 0:
        return 0.0
    absolute, relative = activation_noise(fmt, probe, int8_activations)
    act = (absolute * float(col_w.sum()) + relative * den) if weighted else 0.0
    return float(((weights * col_err).sum() + act) / den)


def rank_correlation(pairs: list[tuple[float, float]]) -> float | None:
    """Spearman's rho of (proxy, artifact) pairs; None with fewer than 3 pairs or a constant side."""
    if len(pairs) < 3:
        return None
    from scipy.stats import spearmanr

    a, b = zip(*pairs)
    if len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)
