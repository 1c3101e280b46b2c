"""The proxy's arithmetic on real numerics (exporters.numerics), without a model."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.formats import Format
from pipeline.layers import Layer
from pipeline.sensitivity.probe import LayerProbe, _macs
from pipeline.sensitivity.proxy import proxy_score, rank_correlation

RNG = np.random.default_rng(0)
W = RNG.normal(size=(64, 32)).astype(np.float32)  # MatMul weight [K, N]
LAYER = Layer(name="l", kind="linear", module_type="Linear", onnx_node="n", onnx_op="MatMul", weight="w",
              weight_shape=(64, 32), params=64 * 32)


def _probe(absmax: float, ms: np.ndarray | None = None) -> LayerProbe:
    return LayerProbe(name="l", op="MatMul", activation="x", channel_ms=np.ones(64) if ms is None else ms,
                      absmax=absmax, lo=-absmax, hi=absmax)


def test_lower_precision_scores_higher():
    p = _probe(3.0)
    scores = [proxy_score(W, LAYER, p, f) for f in (Format.FP32, Format.BF16, Format.INT8, Format.INT4)]
    assert scores[0] == 0.0 and scores == sorted(scores)


def test_an_activation_outlier_hurts_static_int8_but_not_weight_only_int4():
    calm, spiky = _probe(3.0), _probe(300.0)
    assert proxy_score(W, LAYER, spiky, Format.INT8) > 100 * proxy_score(W, LAYER, calm, Format.INT8)
    assert proxy_score(W, LAYER, spiky, Format.INT4) == pytest.approx(proxy_score(W, LAYER, calm, Format.INT4))


def test_weight_error_counts_where_the_input_is_driven():
    w = W.copy()
    w[0, :] *= 50  # a big input row: int4 blocks along K hold it
    driven, idle = np.ones(64), np.ones(64)
    driven[1:32] = 10.0  # channels sharing block 0 with the big row are strongly driven
    idle[1:32] = 1e-3
    assert proxy_score(w, LAYER, _probe(3, driven), Format.INT4) > proxy_score(w, LAYER, _probe(3, idle), Format.INT4)


def test_macs_count_output_positions():
    assert _macs(100, "Gemm", (8, 10), 8) == 100
    assert _macs(100, "MatMul", (8, 64, 10), 8) == 6400  # per sample: 64 tokens
    assert _macs(100, "Conv", (8, 16, 5, 5), 8) == 2500
    assert _macs(100, "Gather", (8, 64, 10), 8) == 0


def test_rank_correlation_needs_three_varied_pairs():
    assert rank_correlation([(1, 1), (2, 2)]) is None
    assert rank_correlation([(1, 0), (2, 0), (3, 0)]) is None
    assert rank_correlation([(1, 1), (2, 3), (3, 2), (4, 4)]) == pytest.approx(0.8)
