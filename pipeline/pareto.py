"""Pareto front, hypervolume and knee point over objective vectors.

Pure functions on plain arrays, so the search (live progress, the MLflow front
table), ``front`` and ``promote --policy knee`` all compute the same thing from
whatever they hold (Optuna trials or MLflow runs).

Directions are ``"maximize"`` / ``"minimize"`` per objective. Internally every
objective is turned into a loss (maximised ones are negated) so that "smaller is
better" everywhere, which is also what Optuna's hypervolume code expects.

Hypervolume uses Optuna's exact WFG implementation (``optuna._hypervolume``,
pinned with optuna==5.0.0) rather than a re-implementation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Direction = str  # "maximize" | "minimize"


def _check(points: Sequence[Sequence[float]] | np.ndarray, directions: Sequence[Direction]) -> np.ndarray:
    arr = np.asarray(points, dtype=float)
    if arr.size == 0:
        return arr.reshape(0, len(directions))
    if arr.ndim != 2 or arr.shape[1] != len(directions):
        raise ValueError(f"points must be an (n, {len(directions)}) array, got shape {arr.shape}")
    bad = [d for d in directions if d not in ("maximize", "minimize")]
    if bad:
        raise ValueError(f"directions must be 'maximize' or 'minimize', got {bad}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("points must be finite (failed trials have no objective values; leave them out)")
    return arr


def to_losses(points, directions: Sequence[Direction]) -> np.ndarray:
    """Objective vectors as losses (smaller is better on every axis)."""
    arr = _check(points, directions)
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    return arr * signs


def dominates(a, b, directions: Sequence[Direction]) -> bool:
    """``a`` is at least as good as ``b`` everywhere and strictly better somewhere."""
    la, lb = to_losses([a, b], directions)
    return bool(np.all(la <= lb) and np.any(la < lb))


def pareto_front(points, directions: Sequence[Direction]) -> list[int]:
    """Indices of the non-dominated points, in input order.

    Duplicated points are all kept (two trials with identical objectives are
    both on the front; neither dominates the other).
    """
    losses = to_losses(points, directions)
    n = len(losses)
    keep = []
    for i in range(n):
        others = np.delete(losses, i, axis=0)
        if others.size == 0:
            keep.append(i)
            continue
        dominated = np.any(np.all(others <= losses[i], axis=1) & np.any(others < losses[i], axis=1))
        if not dominated:
            keep.append(i)
    return keep


def hypervolume(points, directions: Sequence[Direction], reference) -> float:
    """Volume dominated by ``points`` and bounded by ``reference`` (same units as points).

    Points that do not improve on the reference in every objective contribute
    nothing (they are dropped rather than rejected, so a moving set of trials
    can always be scored). Returns 0.0 when no point qualifies.
    """
    from optuna._hypervolume import compute_hypervolume

    losses = to_losses(points, directions)
    ref = to_losses([reference], directions)[0]
    if losses.size == 0:
        return 0.0
    inside = losses[np.all(losses < ref, axis=1)]
    if inside.size == 0:
        return 0.0
    front = inside[pareto_front(inside, ["minimize"] * inside.shape[1])]
    return float(compute_hypervolume(front, ref, assume_pareto=True))


def knee_point(points, directions: Sequence[Direction], scale: tuple[Sequence[float], Sequence[float]] | None = None
               ) -> int:
    """Index of the knee of a front: the balanced trade-off.

    Each objective is normalised so 0 is its best and 1 its worst, and the knee is the point closest (L2) to
    the ideal point (0, ..., 0). With ``scale`` = (ideal, reference), the hypervolume's box: accuracy is
    measured in shares of the accuracy budget (FP32 accuracy = 0, the drop limit = 1) and each cost in shares
    of the worst uniform baseline's, so the knee weighs what the user allowed against what one format
    everywhere costs. Without it each objective is min-max normalised over the front: then a front whose
    accuracies differ by one eval row stretches that row to the same weight as a 20x latency range, and noise
    picks the knee (why the search passes its box). Only non-dominated points are candidates, so passing all
    trials or only the front gives the same answer. Objectives that do not vary carry no trade-off and are
    ignored. Ties go to the earlier index, so the result is deterministic.
    """
    losses = to_losses(points, directions)
    if len(losses) == 0:
        raise ValueError("knee_point needs at least one point")
    front = pareto_front(losses, ["minimize"] * losses.shape[1])
    sub = losses[front]
    lo, hi = sub.min(axis=0), sub.max(axis=0)
    if scale is not None:
        best, worst = to_losses([scale[0]], directions)[0], to_losses([scale[1]], directions)[0]
        if np.all(worst - best > 0):
            lo, hi = best, worst
    span = hi - lo
    varying = (sub.max(axis=0) - sub.min(axis=0)) > 0
    if not np.any(varying):
        return front[0]
    # better than the ideal (accuracy above FP32's) is no distance from it
    norm = np.maximum((sub[:, varying] - lo[varying]) / span[varying], 0.0)
    dist = np.linalg.norm(norm, axis=1)
    return front[int(np.argmin(dist))]


def normalized_hypervolume(points, directions: Sequence[Direction], reference, ideal) -> float:
    """Hypervolume after scaling every axis so ``ideal`` maps to 0 and ``reference`` to 1.

    The result is the fraction of the box between the ideal and the reference
    point that the points dominate (it can exceed 1 only for points better than
    the ideal), comparable across studies whose objectives have different units.
    Axes where ideal and reference coincide carry no volume: the result is 0.
    """
    losses = to_losses(points, directions)
    ref = to_losses([reference], directions)[0]
    best = to_losses([ideal], directions)[0]
    span = ref - best
    if np.any(span <= 0):
        return 0.0
    scaled = (losses - best) / span
    return hypervolume(scaled, ["minimize"] * len(directions), np.ones(len(directions)))
