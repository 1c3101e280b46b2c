"""ONNX Runtime sessions as the ORT backends measure them (options from :mod:`exporters.ort_options`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exporters.ort_options import WEIGHT_ONLY_ACCURACY_LEVEL, session_options
from pipeline.backends.base import Session

__all__ = ["OrtSession", "WEIGHT_ONLY_ACCURACY_LEVEL", "session_options"]


class OrtSession(Session):
    """A session with ORT's default graph optimizations (ORT_ENABLE_ALL), none disabled: what a
    user who deploys the artifact gets. The quantizer writes its graphs so that ORT's session-time
    rewrites that would change the numbers (WeightBiasQuantization) find nothing to change
    (``exporters.quant.ort_passes``, ``exporters.quant.ort_session_forms``; checked in tests/exporters/test_ort_session_rewrites.py), so
    no transformer needs to be switched off here. One session setting is pinned:
    :data:`WEIGHT_ONLY_ACCURACY_LEVEL`."""

    def __init__(self, onnx_path: str | Path, providers: list, threads: int = 0):
        import onnxruntime as ort

        opts = session_options(threads)
        self._sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers)
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]
        self.providers = self._sess.get_providers()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._sess.run(self.output_names, feeds)
