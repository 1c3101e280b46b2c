"""What a backend's build takes and gives (shared by the plugins and the shared ONNX build)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.results import LayerReport

__all__ = ["BuildInputs", "BuiltArtifact"]


@dataclass
class BuildInputs:
    """What a backend builds a candidate from (shared by all candidates of one evaluator).

    ``source`` is what to quantize: the FP32 reference, or the export of a QAT fine-tune;
    ``model`` a QAT-tuned framework model for backends that convert from the framework
    (``builds_from = "framework"``); ``adapter`` the framework adapter that loads/exports it.
    """

    reference: Any  # pipeline.models.ReferenceModel
    calibration_feeds: Sequence[dict[str, np.ndarray]]
    source: Any = None  # ReferenceModel to quantize; None: the reference
    adapter: Any = None
    model: Any = None


@dataclass
class BuiltArtifact:
    """A candidate artifact and its per-layer report."""

    path: str
    layers: list[LayerReport]
    extra: dict = field(default_factory=dict)
