"""What a trial run records about its layers: the ``layers.csv`` artifact and the execution tag.

Kept apart from :mod:`pipeline.tracking.record` (which talks to MLflow) because these are pure
functions of a :class:`~pipeline.results.TrialResult`, shared by the run record and easy to test.
"""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.results import TrialResult


# S.ARTIFACT_LAYERS, per trial run: one row per layer (format, native/emulated, the kernel observed,
# detail), the same rows as result.json's ``layers`` in a form a spreadsheet or pandas opens.
LAYER_CSV_FIELDS = ("name", "onnx_op", "format", "execution", "kernel", "params", "detail")


def layers_csv(result: "TrialResult") -> str:
    """The trial's layer table as CSV; ``kernel`` is empty where the backend was not observed."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(LAYER_CSV_FIELDS)
    for l in result.layers:
        w.writerow([l.name, l.onnx_op, l.format.value, l.execution, l.kernel or "", l.params, l.detail])
    return buf.getvalue()


def execution_tag(result: "TrialResult") -> str:
    """native if every non-FP32 layer ran natively, emulated if none did, else mixed."""
    kinds = {l.execution for l in result.layers if l.format.value != "fp32"}
    if not kinds:
        return "native"
    return kinds.pop() if len(kinds) == 1 else "mixed"
