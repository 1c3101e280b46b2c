"""Pick a candidate from a study's Pareto front: the promotion policies, budgets and refusals.

The study's MLflow record (read by :func:`pipeline.tracking.record.read_study`) is
the only input, so ``promote`` works against any tracking server the search wrote
to, from any machine. Policies: ``max-accuracy`` (within an energy and/or latency
budget), ``min-<objective>`` for every cost objective in the registry
(:mod:`pipeline.objectives`: ``min-energy``, ``min-latency``, ``min-size``, ...,
within an accuracy-drop limit) and ``knee``. Trials that failed, are dominated or
break the accuracy-drop limit are refused, with why.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline import objectives as O
from pipeline.search.records import StudyRecord, TrialRecord, accuracy_drop, fmt
from pipeline.tracking import schema as S
from pipeline.tracking.record import RecordError

OBJECTIVE_PREFIX = S.METRIC_OBJECTIVE_PREFIX  # the search logs the exact values Optuna optimised as objective.<name>


class PromotionError(RecordError):
    """A promotion that is refused; the message says why and what to do instead."""


def policies() -> tuple[str, ...]:
    """max-accuracy, min-<objective> for every objective that is minimised, and knee."""
    return ("max-accuracy", *(f"min-{o.name}" for o in O.all_objectives() if o.direction == "minimize"), "knee")


@dataclass(frozen=True)
class Budget:
    """Limits a policy must respect. ``None`` means no limit."""

    max_energy_j: float | None = None  # joules per inference
    max_latency_ms: float | None = None  # p50 at the configured batch size
    max_accuracy_drop: float | None = None  # versus the FP32 reference, in metric units (>0 = worse)


@dataclass(frozen=True)
class Choice:
    trial: TrialRecord
    policy: str  # one of policies(), or "trial" for an explicit --trial N
    reason: str


def _quality(t: TrialRecord, higher_is_better: bool) -> float:
    acc = t.metric("accuracy")
    if acc is None:
        return -math.inf
    return acc if higher_is_better else -acc


def _measured(t: TrialRecord, metric: str) -> float | None:
    """``metric`` as the front was decided on: the interleaved re-measurement's ``<metric>_remeasured`` where the
    trial has one (latency, metered energy), else the trial's own in-search value."""
    again = t.metric(f"{metric}_remeasured")
    return again if again is not None else t.metric(metric)


def _energy_or_none(t: TrialRecord) -> float | None:
    return _measured(t, O.get("energy").metric)


def require_one_energy_source(trials: Iterable[TrialRecord], policy: str) -> str | None:
    """The energy source shared by ``trials`` (None if none says); refuses a mix.

    Joules from NVML, RAPL and the CPU-time estimate are different quantities
    (metered numbers include idle power, the estimate does not, NVML covers the
    GPU and RAPL the CPU package), so a policy must not rank one against another.
    """
    by_source: dict[str, list[str]] = {}
    for t in trials:
        by_source.setdefault(t.energy_source or "unknown", []).append(t.label)
    if len(by_source) <= 1:
        return next(iter(by_source), None)
    listing = "; ".join(f"{src}: {', '.join(labels)}" for src, labels in sorted(by_source.items()))
    raise PromotionError(
        f"policy {policy} compares energy, but the candidate trials' energy sources differ ({listing}); joules "
        f"from {' and '.join(sorted(by_source))} are not comparable. Promote a trial explicitly with --trial N, "
        "use a policy that does not compare energy, or re-run the study with one measure.energy.meter")


def check_promotable(study: StudyRecord, t: TrialRecord | None, number: int | None = None) -> TrialRecord:
    """Refuse trials that are missing, unfinished, failed or dominated, saying which and why."""
    if t is None:
        known = ", ".join(str(x.number) for x in study.trials[:30]) or "none"
        raise PromotionError(f"study {study.study!r} has no trial {number}; logged trials: {known}")
    if t.state != "COMPLETE":
        why = f": {t.fail_reason}" if t.fail_reason else ""
        raise PromotionError(f"trial {t.number} of study {study.study!r} is {t.state}{why}; only completed trials "
                             "on the Pareto front can be promoted")
    if t.tags.get(S.TAG_FEASIBLE) == "false":
        drop = t.metric("accuracy_drop")
        raise PromotionError(f"trial {t.number} of study {study.study!r} breaks the accuracy-drop limit "
                             f"(drop {fmt(drop)} versus FP32), so it is not on the Pareto front")
    if not t.pareto:
        front = ", ".join(x.label for x in study.front) or "empty"
        raise PromotionError(f"trial {t.number} of study {study.study!r} is not on the Pareto front (another trial "
                             f"is at least as good on every objective); front: {front}")
    return t


def explicit_choice(study: StudyRecord, number: int) -> Choice:
    t = check_promotable(study, study.trial(number), number)
    return Choice(t, "trial", f"trial {number} chosen explicitly")


def _max_accuracy(front: list[TrialRecord], policy: str, budget: Budget, higher_is_better: bool) -> Choice:
    if budget.max_energy_j is None and budget.max_latency_ms is None:
        raise PromotionError("policy max-accuracy needs a budget: --max-energy-j J and/or --max-latency-ms MS "
                             "(without one the most accurate candidate is just FP32)")
    if budget.max_energy_j is not None:
        require_one_energy_source(front, "max-accuracy with --max-energy-j")
    pool, notes = [], []
    for t in front:
        if budget.max_energy_j is not None:
            e = _energy_or_none(t)
            if e is None or e > budget.max_energy_j:
                continue
        if budget.max_latency_ms is not None:
            lat = _measured(t, "latency_ms_p50")
            if lat is None or lat > budget.max_latency_ms:
                continue
        pool.append(t)
    if not pool:
        if budget.max_energy_j is not None:
            es = [e for e in (_energy_or_none(t) for t in front) if e is not None]
            notes.append(f"lowest energy on the front: {fmt(min(es) if es else None, ' J/inference')}")
        if budget.max_latency_ms is not None:
            ls = [x for x in (_measured(t, "latency_ms_p50") for t in front) if x is not None]
            notes.append(f"lowest latency on the front: {fmt(min(ls) if ls else None, ' ms')}")
        raise PromotionError("no trial on the front meets the budget (" + "; ".join(notes) + "); relax it")
    best = max(pool, key=lambda t: (_quality(t, higher_is_better), -(_energy_or_none(t) or 0.0),
                                    -(t.metric("size_bytes") or 0.0)))
    limits = []
    if budget.max_energy_j is not None:
        limits.append(f"energy <= {budget.max_energy_j:g} J/inference")
    if budget.max_latency_ms is not None:
        limits.append(f"latency p50 <= {budget.max_latency_ms:g} ms")
    reason = (f"most accurate of {len(pool)} front trial(s) within {' and '.join(limits)}: "
              f"accuracy {fmt(best.metric('accuracy'))}")
    return Choice(best, policy, reason)


def _min_objective(study: StudyRecord, front: list[TrialRecord], policy: str, obj: O.Objective, budget: Budget,
                   higher_is_better: bool) -> Choice:
    """Lowest ``obj`` among front trials whose accuracy drop is within the limit."""
    limit = budget.max_accuracy_drop
    if limit is None:
        raise PromotionError(f"policy {policy} needs an accuracy limit: --max-accuracy-drop D "
                             "(or search.max_accuracy_drop in the config)")
    value = lambda t: _measured(t, obj.metric)  # noqa: E731
    measured = [t for t in front if value(t) is not None]
    if not measured:
        raise PromotionError(f"policy {policy}: no trial on the front has a {obj.name} measurement "
                             f"({obj.metric}); use --policy knee, or max-accuracy --max-latency-ms")
    pool = [t for t in measured if (d := accuracy_drop(study, t, higher_is_better)) is not None and d <= limit]
    if not pool:
        drops = [d for d in (accuracy_drop(study, t, higher_is_better) for t in measured) if d is not None]
        raise PromotionError(f"no trial on the front has an accuracy drop <= {limit:g} (smallest: "
                             f"{fmt(min(drops) if drops else None)}); raise --max-accuracy-drop")
    # --max-latency-ms / --max-energy-j also bound a min-<objective> choice (they were ignored: a budget a user
    # gives is never dropped silently)
    limits = [f"accuracy drop <= {limit:g}"]
    for metric, cap, label in (("latency_ms_p50", budget.max_latency_ms, "latency p50 <= {:g} ms"),
                               (O.get("energy").metric, budget.max_energy_j, "energy <= {:g} J/inference")):
        if cap is not None:
            kept = [t for t in pool if (v := _measured(t, metric)) is not None and v <= cap]
            if not kept:
                raise PromotionError(f"no front trial within {', '.join(limits)} has {label.format(cap)}; relax it")
            pool, limits = kept, [*limits, label.format(cap)]
    if obj.one_source:
        require_one_energy_source(pool, policy)
    best = min(pool, key=lambda t: (value(t), -_quality(t, higher_is_better)))
    source = f", {best.energy_source or 'unknown'}" if obj.one_source else ""
    reason = (f"lowest {obj.name} ({fmt(value(best), obj.long_unit)}{source}) "
              f"of {len(pool)} front trial(s) with {' and '.join(limits)}")
    return Choice(best, policy, reason)


def _knee(study: StudyRecord, front: list[TrialRecord], policy: str, objectives: Iterable[str],
          higher_is_better: bool) -> Choice:
    objs = [o for o in objectives if o in O.names()]
    if len(front) == 1:
        return Choice(front[0], policy, "the only trial on the front")
    keys = _objective_keys(front, objs)
    missing = [o for o in objs if o not in keys]
    if len(keys) < 2:
        raise PromotionError(f"policy knee needs at least two objectives measured on every front trial; have "
                             f"{sorted(keys)} (missing on some: {missing}); use --policy max-accuracy or min-energy")
    latency_slot = study.parent_tags.get(S.TAG_ENERGY_OBJECTIVE) == "latency"
    holds_latency = lambda o: o == "energy" and latency_slot and keys[o].startswith(OBJECTIVE_PREFIX)  # noqa: E731
    for o in keys:
        if O.get(o).one_source and not holds_latency(o):
            require_one_energy_source(front, f"knee ({o} is one of its objectives)")
    chosen = [t for t in front if t.tags.get(S.TAG_KNEE) == "true"]
    if len(chosen) == 1:  # the search's own knee: decided on the interleaved re-measurement, as `front` shows it
        return Choice(chosen[0], policy, f"knee point of the {len(front)}-trial front, as the search decided it "
                                         "(on the interleaved re-measurement where there was one)")
    idx = _knee_index(front, keys, higher_is_better)
    what = ", ".join("energy slot (holding latency p50: energy was only estimated)" if holds_latency(o) else o
                     for o in keys)
    reason = f"knee point of the {len(front)}-trial front on {what}" + (
        f" ({', '.join(missing)} not measured on every trial, left out)" if missing else "")
    return Choice(front[idx], policy, reason)


def choose(study: StudyRecord, policy: str, budget: Budget = Budget(), *,
           objectives: Iterable[str] = ("accuracy", "energy", "size"), higher_is_better: bool = True) -> Choice:
    """Apply a promotion policy to the study's Pareto front.

    - ``max-accuracy``: best task metric among front trials within the energy and/or latency budget
      (at least one budget is required: without one, the answer is simply the FP32 model).
    - ``min-<objective>`` (e.g. ``min-energy``): lowest value among front trials whose accuracy drop is
      within ``max_accuracy_drop``.
    - ``knee``: the front's knee point on the study's objectives (:func:`pipeline.pareto.knee_point`).
    """
    front = study.front
    if not front:
        raise PromotionError(f"study {study.study!r} has no completed trial on the Pareto front "
                             f"({len(study.trials)} trial(s) logged); run or finish the search first")
    if policy == "max-accuracy":
        return _max_accuracy(front, policy, budget, higher_is_better)
    if policy == "knee":
        return _knee(study, front, policy, objectives, higher_is_better)
    if policy in policies() and policy.startswith("min-"):
        return _min_objective(study, front, policy, O.get(policy[len("min-"):]), budget, higher_is_better)
    raise PromotionError(f"unknown policy {policy!r}: use one of {list(policies())} or --trial N")


def _objective_keys(front: list[TrialRecord], objectives: list[str]) -> dict[str, str]:
    """objective -> metric holding it on every front trial.

    Prefers ``objective.<name>``: what the study itself optimised (e.g. latency in
    the energy slot when energy was only estimated), so the knee here is the knee
    the search reported; falls back to the raw measurement.
    """
    keys = {}
    for o in objectives:
        for key in (OBJECTIVE_PREFIX + o, O.get(o).metric):
            if all(t.metric(key) is not None for t in front):
                keys[o] = key
                break
    return keys


def _knee_index(front: list[TrialRecord], keys: dict[str, str], higher_is_better: bool) -> int:
    """Index of the knee among ``front``, computed by the search's own :func:`pipeline.pareto.knee_point`."""
    from pipeline.pareto import knee_point

    points = [[t.metric(k) for k in keys.values()] for t in front]
    directions = [("maximize" if higher_is_better else "minimize") if o == "accuracy" else O.get(o).direction
                  for o in keys]
    return int(knee_point(points, directions))
