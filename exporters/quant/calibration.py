"""Calibration feeds -> ONNX Runtime calibrators.

The product's :class:`pipeline.formats.Calibration` names ORT's calibrators for int8 ranges;
fp8 runs quantize_static with ORT's Distribution calibrator only because quantize_static
refuses any other calibrator for fp8; its std-based activation scales (std/100.06, which
clip everything past ~4.5 sigma) are then rewritten to amax/448 from ORT's MinMax
calibrator (exporters/quant/ort_passes.py). Weight scales keep ORT's std rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod

from pipeline.formats import Calibration

INT8_METHODS: dict[Calibration, CalibrationMethod] = {
    Calibration.MINMAX: CalibrationMethod.MinMax,
    Calibration.PERCENTILE: CalibrationMethod.Percentile,
    Calibration.ENTROPY: CalibrationMethod.Entropy,
}

FP8_METHOD = CalibrationMethod.Distribution

ENTROPY_NUM_BINS = 2048
ENTROPY_NUM_QUANTIZED_BINS = 255
"""Entropy (KL) calibrator settings: 2048 histogram bins, windows of 255 bins (the int8 levels).
quantize_static's own default, 128/128, leaves the KL search a single candidate - the full
range - so it would silently equal MinMax; the quantizer runs the calibrator with these and
hands the result to quantize_static as its calibration cache. QAT mirrors must use them too."""


class FeedsReader(CalibrationDataReader):
    """Hands ORT's calibrators the caller's input batches, once each, in order."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]):
        self._feeds = list(feeds)
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self._feeds):
            return None
        self._pos += 1
        return self._feeds[self._pos - 1]

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:  # used by CalibStridedMinMax
        self._feeds = self._feeds[start_index:end_index]
        self._pos = 0


def check_feeds(model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]]) -> None:
    """Every batch must feed exactly the graph's (non-initializer) inputs."""
    init_names = {t.name for t in model.graph.initializer}
    expected = {i.name for i in model.graph.input if i.name not in init_names}
    if not feeds:
        raise ValueError(
            "calibration_feeds is empty, but the plan has static int8 or fp8 layers that need "
            f"activation ranges: pass at least one batch {{{', '.join(sorted(expected))}: array}}"
        )
    for i, feed in enumerate(feeds):
        if not isinstance(feed, dict):
            raise TypeError(f"calibration_feeds[{i}] must be a dict of input name -> array, got {type(feed).__name__}")
        missing, extra = expected - set(feed), set(feed) - expected
        if missing or extra:
            raise ValueError(
                f"calibration_feeds[{i}] keys {sorted(feed)} do not match the model inputs {sorted(expected)}"
                + (f"; missing {sorted(missing)}" if missing else "")
                + (f"; unknown {sorted(extra)}" if extra else "")
            )
