"""Task metrics, computed over all eval outputs and targets at once.

Whole-set computation matters: a ranking metric such as Spearman over sentence
pairs is not the mean of per-batch Spearmans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[np.ndarray, np.ndarray], float]
    higher_is_better: bool


def top1_accuracy(outputs: np.ndarray, targets: np.ndarray) -> float:
    outputs = np.asarray(outputs)
    pred = outputs.argmax(axis=-1) if outputs.ndim > 1 else (outputs > 0).astype(np.int64)
    return float((pred.reshape(-1) == np.asarray(targets).reshape(-1)).mean())


def mse(outputs: np.ndarray, targets: np.ndarray) -> float:
    o = np.asarray(outputs, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64).reshape(o.shape)
    return float(np.mean((o - t) ** 2))


def spearman(outputs: np.ndarray, targets: np.ndarray) -> float:
    from scipy.stats import spearmanr

    o = np.asarray(outputs, dtype=np.float64).reshape(-1)
    t = np.asarray(targets, dtype=np.float64).reshape(-1)
    if o.shape != t.shape:
        raise ValueError(f"spearman needs one score per target: outputs {o.shape} vs targets {t.shape}")
    rho = spearmanr(o, t).statistic
    return float(rho) if np.isfinite(rho) else float("nan")


BUILTIN_METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", top1_accuracy, True),
    "mse": Metric("mse", mse, False),
    "spearman": Metric("spearman", spearman, True),
}


def compute_metric(name: str, output_key: str | int, outputs: dict[str, np.ndarray], targets: np.ndarray) -> float:
    """Apply a built-in metric to one output, or a custom ``pkg:fn`` to all outputs."""
    if name in BUILTIN_METRICS:
        if isinstance(output_key, int):
            key = list(outputs)[output_key]
        else:
            if output_key not in outputs:
                raise ValueError(f"metric.output {output_key!r} is not a model output; outputs are {list(outputs)}")
            key = output_key
        return BUILTIN_METRICS[name].fn(outputs[key], targets)
    from pipeline.importing import import_object

    return float(import_object(name)(outputs, targets))


def accuracy_drop(reference: float, value: float, higher_is_better: bool) -> float:
    """Positive when ``value`` is worse than ``reference``."""
    return (reference - value) if higher_is_better else (value - reference)
