"""Task metrics, computed over ALL eval outputs and the targets at once.

Whole-set computation matters: a ranking metric such as Spearman over sentence
pairs is not the mean of per-batch Spearmans, and a pair-level metric on an
embedder needs both sentences' embeddings, wherever the batches cut.

A built-in reads one output array (``metric.output``) and the targets; a custom
``pkg.mod:fn`` gets every output, keyed by name, and the targets in whatever
structure ``data.targets`` returned, plus ``metric.kwargs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[..., float]  # fn(output: ndarray, targets, **options) -> float
    higher_is_better: bool
    doc: str = ""


def _labels(targets: Any, n: int, name: str) -> np.ndarray:
    t = np.asarray(targets).reshape(-1)
    if len(t) != n:
        raise ValueError(f"{name} needs one label per output row: {n} rows but {len(t)} targets")
    return t


def _predictions(outputs: np.ndarray) -> np.ndarray:
    """Class ids: argmax over the last axis of logits/probabilities, or ``> 0`` for one logit per row."""
    o = np.asarray(outputs)
    if o.ndim > 1 and o.shape[-1] > 1:
        return o.reshape(-1, o.shape[-1]).argmax(axis=-1)
    return (o.reshape(-1) > 0).astype(np.int64)


def top1_accuracy(outputs: np.ndarray, targets: Any) -> float:
    pred = _predictions(outputs)
    return float((pred == _labels(targets, len(pred), "accuracy")).mean())


def top_k_accuracy(outputs: np.ndarray, targets: Any, k: int | None = None) -> float:
    k = k or 5
    o = np.asarray(outputs)
    if o.ndim < 2 or o.shape[-1] < 2:
        raise ValueError(f"top_k_accuracy needs one score per class (rows x classes); the output is {o.shape}")
    o = o.reshape(-1, o.shape[-1])
    t = _labels(targets, len(o), "top_k_accuracy")
    top = np.argpartition(-o, min(k, o.shape[-1]) - 1, axis=-1)[:, :k]
    return float((top == t[:, None]).any(axis=-1).mean())


def _f1_per_class(pred: np.ndarray, true: np.ndarray, classes: np.ndarray) -> np.ndarray:
    out = []
    for c in classes:
        tp = np.sum((pred == c) & (true == c))
        denom = np.sum(pred == c) + np.sum(true == c)
        out.append(2.0 * tp / denom if denom else 0.0)
    return np.asarray(out)


def f1(outputs: np.ndarray, targets: Any) -> float:
    """Binary F1 of class 1 (labels 0/1)."""
    pred = _predictions(outputs)
    true = _labels(targets, len(pred), "f1")
    if not np.isin(true, (0, 1)).all():
        raise ValueError(f"f1 is binary (labels 0/1; class 1 is positive), got labels {np.unique(true)[:10]}; "
                         "use macro_f1 for several classes")
    return float(_f1_per_class(pred, true, np.array([1]))[0])


def macro_f1(outputs: np.ndarray, targets: Any) -> float:
    """Unweighted mean of per-class F1 over the classes present in the targets or predictions."""
    pred = _predictions(outputs)
    true = _labels(targets, len(pred), "macro_f1")
    return float(_f1_per_class(pred, true, np.union1d(true, pred)).mean())


def _regression(outputs: np.ndarray, targets: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    o = np.asarray(outputs, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64)
    if t.size != o.size:
        raise ValueError(f"{name} needs one target per output value: output {o.shape} vs targets {t.shape}")
    return o.reshape(-1), t.reshape(-1)


def mse(outputs: np.ndarray, targets: Any) -> float:
    o, t = _regression(outputs, targets, "mse")
    return float(np.mean((o - t) ** 2))


def mae(outputs: np.ndarray, targets: Any) -> float:
    o, t = _regression(outputs, targets, "mae")
    return float(np.mean(np.abs(o - t)))


def r2(outputs: np.ndarray, targets: Any) -> float:
    o, t = _regression(outputs, targets, "r2")
    ss_tot = np.sum((t - t.mean()) ** 2)
    if ss_tot == 0:
        raise ValueError("r2 is undefined when every target is equal")
    return float(1.0 - np.sum((o - t) ** 2) / ss_tot)


def pair_scores(outputs: np.ndarray, targets: Any, pairs: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(predicted score, gold score) per pair.

    Without ``pairs`` the output is one score per row. With it, the output holds
    one embedding per row and a pair's score is the cosine similarity of its two
    rows: ``halves`` pairs row i with row N+i (all first sentences, then all
    second ones), ``interleaved`` row 2i with 2i+1; targets ``{"pairs": (N, 2)
    row indices, "scores": (N,)}`` name the rows of each pair themselves.
    """
    o = np.asarray(outputs, dtype=np.float64)
    if isinstance(targets, dict) and "pairs" in targets:
        if "scores" not in targets:
            raise ValueError("pair targets need both `pairs` ((N, 2) row indices) and `scores` ((N,) gold)")
        idx = np.asarray(targets["pairs"])
        gold = np.asarray(targets["scores"], dtype=np.float64).reshape(-1)
        if idx.ndim != 2 or idx.shape[1] != 2 or len(idx) != len(gold) or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"targets.pairs must be (N, 2) integer row indices and targets.scores (N,): got "
                             f"pairs {idx.shape} {idx.dtype}, scores {gold.shape}")
        if len(idx) and (idx.min() < 0 or idx.max() >= len(o)):
            raise ValueError(f"targets.pairs index rows 0..{len(o) - 1} of the output; found {idx.min()}..{idx.max()}")
        a, b = o[idx[:, 0]], o[idx[:, 1]]
    elif pairs is None:
        s = o.reshape(-1)
        gold = np.asarray(targets, dtype=np.float64).reshape(-1)
        if s.shape != gold.shape:
            hint = (" (one embedding per row? set metric.pairs: halves|interleaved to score pairs of rows)"
                    if o.ndim == 2 and len(o) == 2 * len(gold) else "")
            raise ValueError(f"needs one score per target: output {o.shape} vs targets {gold.shape}{hint}")
        return s, gold
    else:
        gold = np.asarray(targets, dtype=np.float64).reshape(-1)
        if len(o) != 2 * len(gold):
            raise ValueError(f"metric.pairs: {pairs} needs two output rows per gold score: {len(o)} rows "
                             f"for {len(gold)} scores")
        a, b = (o[: len(gold)], o[len(gold):]) if pairs == "halves" else (o[0::2], o[1::2])
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12), gold


def spearman(outputs: np.ndarray, targets: Any, pairs: str | None = None) -> float:
    from scipy.stats import spearmanr

    s, gold = pair_scores(outputs, targets, pairs)
    rho = spearmanr(s, gold).statistic
    return float(rho) if np.isfinite(rho) else float("nan")


def pearson(outputs: np.ndarray, targets: Any, pairs: str | None = None) -> float:
    s, gold = pair_scores(outputs, targets, pairs)
    if len(s) < 2 or s.std() == 0 or gold.std() == 0:
        return float("nan")
    return float(np.corrcoef(s, gold)[0, 1])


BUILTIN_METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("accuracy", top1_accuracy, True, "top-1: argmax of the output vs integer labels (> 0 for one logit)"),
    Metric("top_k_accuracy", top_k_accuracy, True, "label among the k highest scores (metric.k, default 5)"),
    Metric("f1", f1, True, "binary F1 of class 1"),
    Metric("macro_f1", macro_f1, True, "mean per-class F1"),
    Metric("mse", mse, False, "mean squared error"),
    Metric("mae", mae, False, "mean absolute error"),
    Metric("r2", r2, True, "coefficient of determination"),
    Metric("spearman", spearman, True, "rank correlation; metric.pairs scores embedding pairs by cosine"),
    Metric("pearson", pearson, True, "linear correlation; metric.pairs scores embedding pairs by cosine"),
)}
PAIR_METRICS = frozenset({"spearman", "pearson"})  # the ones metric.pairs applies to


def select_output(outputs: dict[str, np.ndarray], output_key: str | int) -> str:
    """The output a built-in reads: by name, or by position in the model's output order."""
    names = list(outputs)
    if isinstance(output_key, int):
        if not -len(names) <= output_key < len(names):
            raise ValueError(f"metric.output {output_key} is out of range; the model has outputs {names}")
        return names[output_key]
    if output_key not in outputs:
        raise ValueError(f"metric.output {output_key!r} is not a model output; outputs are {names}")
    return output_key


def compute_metric(name: str, output_key: str | int, outputs: dict[str, np.ndarray], targets: Any,
                   **options: Any) -> float:
    """Apply a built-in metric to one output, or a custom ``pkg:fn`` to all outputs.

    ``options``: ``k`` / ``pairs`` for the built-ins that take them (None values are
    dropped); for a custom metric, keyword arguments passed through to it.
    """
    if name in BUILTIN_METRICS:
        key = select_output(outputs, output_key)
        opts = {k: v for k, v in options.items() if v is not None}
        return float(BUILTIN_METRICS[name].fn(outputs[key], targets, **opts))
    from pipeline.importing import import_object

    return as_float(import_object(name)(outputs, targets, **options), name)


def as_float(value: Any, name: str) -> float:
    """A metric's return value as a float; anything but one real number is a TypeError saying what came."""
    arr = np.asarray(value) if not isinstance(value, (str, bytes)) else None
    if arr is None or arr.size != 1 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"{name} returned {type(value).__name__} {value!r:.80}; a metric returns one float")
    return float(arr.reshape(()))


def metric_options(spec: Any) -> dict[str, Any]:
    """The keyword options a ``MetricSpec`` passes to :func:`compute_metric`."""
    if spec.name in BUILTIN_METRICS:
        return {k: v for k, v in (("k", spec.k), ("pairs", spec.pairs)) if v is not None}
    return dict(spec.kwargs)


def accuracy_drop(reference: float, value: float, higher_is_better: bool) -> float:
    """Positive when ``value`` is worse than ``reference``."""
    return (reference - value) if higher_is_better else (value - reference)
