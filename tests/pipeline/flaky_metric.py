"""A real top-1 accuracy metric that misbehaves on chosen calls, to exercise trial failure paths.

Used as ``metric: {name: tests.pipeline.flaky_metric:accuracy, higher_is_better: true}``.
``FLAKY_METRIC_DIR`` names a folder holding ``fail_at`` (JSON: call number -> "raise" | "nan" |
"exit"); every call appends one line to ``calls`` there, so the count is shared by all Ray
worker processes. "raise" raises like a broken metric, "nan" returns NaN like a model whose
outputs overflowed, "exit" kills the worker process like the OOM killer would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pipeline.metrics import top1_accuracy


def accuracy(outputs: dict[str, np.ndarray], targets: np.ndarray) -> float:
    value = top1_accuracy(next(iter(outputs.values())), targets)
    folder = os.environ.get("FLAKY_METRIC_DIR")
    if not folder:
        return value
    d = Path(folder)
    with open(d / "calls", "a") as f:
        f.write(f"{os.getpid()}\n")
    call = len((d / "calls").read_text().splitlines())
    plan = json.loads((d / "fail_at").read_text()) if (d / "fail_at").exists() else {}
    action = plan.get(str(call))
    if action == "raise":
        raise RuntimeError(f"injected failure on metric call {call}")
    if action == "nan":
        return float("nan")
    if action == "exit":
        os._exit(3)
    return value


def error_rate(outputs: dict[str, np.ndarray], targets: np.ndarray) -> float:
    """1 - top-1 accuracy: a lower-is-better metric (``higher_is_better: false``)."""
    return 1.0 - top1_accuracy(next(iter(outputs.values())), targets)
