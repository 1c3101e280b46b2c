"""THE trial record and study record: what the front, the plots, ``front``, the review and ``promote`` show.

One :class:`TrialRecord` whether it was read from the Optuna storage
(:func:`build_records`, during and after a search) or from the MLflow record
(:func:`pipeline.tracking.record.read_study`, for ``promote`` and the review), so
the savings, the accuracy drop and the energy label are computed once, here, for
both. Also the front's bookkeeping: Pareto membership, the knee, the fixed
hypervolume box and the front summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from pipeline.objectives import ObjectiveInfo, energy_label, objective_infos
from pipeline.pareto import knee_point, normalized_hypervolume
from pipeline.results import TrialResult
from pipeline.search import storage as A
from pipeline.search.remeasured import NOISY_SOURCES

FP32_BASELINE = "uniform-fp32"  # the uniform FP32 baseline's label (search_spaces.space.uniform_baselines)
# The plan in brief (ResolvedPlan.brief: format counts, what differs from the nearest uniform baseline,
# method): a trial's Optuna user attribute and its MLflow child run's param of the same name.
T_PLAN_BRIEF = "plan_brief"


# -- small helpers, defined once --------------------------------------------------------------------
def saving(ref: float | None, val: float | None) -> float | None:
    """Percent saved versus ``ref`` (>0 = better), or None when it cannot be computed."""
    if ref is None or val is None or ref <= 0:
        return None
    return 100.0 * (ref - val) / ref


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.1f} %"


def fmt(v: float | None, unit: str = "", digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}{unit}"


class TrialRecord(BaseModel):
    """One trial: its state, objective values, metrics and where its MLflow run is."""

    number: int
    state: str  # COMPLETE | FAIL | RUNNING | WAITING
    baseline: str | None = None
    values: dict[str, float] = {}  # objective slot -> the value Optuna was told (Optuna side)
    metrics: dict[str, float] = {}  # TrialResult.flat_metrics() (and objective.<name> on the MLflow side)
    feasible: bool | None = None
    on_front: bool = False
    knee: bool = False
    run_id: str | None = None
    plan_summary: str = ""  # every layer's format (ResolvedPlan.summary)
    plan_brief: str = ""  # ResolvedPlan.brief; "" for trials recorded before it existed
    fail_reason: str = ""
    orphaned: bool = False
    retry_of: int | None = None
    duplicate_of: int | None = None  # a proposal of an already measured plan: told that trial's values
    energy_source: str | None = None  # nvml | rapl | estimated, from the trial's result
    params: dict[str, Any] = {}
    tags: dict[str, str] = {}  # the MLflow child run's tags (MLflow side only)
    # After the interleaved re-measurement (pipeline.search.remeasure): ``values`` hold the re-measured
    # latency/energy, these the trial's own in-search ones; ``remeasured`` names the method.
    values_in_search: dict[str, float] = {}
    on_front_in_search: bool | None = None
    remeasured: str = ""

    @property
    def short_plan(self) -> str:
        """The plan as tables show it: the brief (Optuna attribute or MLflow param), else the full summary."""
        return self.plan_brief or str(self.params.get(T_PLAN_BRIEF) or "") or self.plan_summary

    @property
    def pareto(self) -> bool:
        return self.on_front

    @property
    def complete(self) -> bool:
        return self.state == "COMPLETE"

    @property
    def label(self) -> str:
        return f"#{self.number}" + (f" ({self.baseline})" if self.baseline else "")

    @property
    def energy_label(self) -> str:
        return energy_label(self.energy_source, self.metric("joules_per_inference"))

    def metric(self, name: str) -> float | None:
        v = self.metrics.get(name)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


@dataclass
class StudyRecord:
    """A study's parent run and all of its trials (read from MLflow)."""

    experiment_id: str
    experiment_name: str
    study: str
    parent_run_id: str
    parent_tags: dict[str, str]
    trials: list[TrialRecord] = field(default_factory=list)
    parent_params: dict[str, str] = field(default_factory=dict)

    @property
    def objectives(self) -> list[str] | None:
        """The objectives the study optimised (its parent run's ``objectives`` param), None if not recorded."""
        names = self.parent_params.get("objectives")
        return names.split(",") if names else None

    @property
    def higher_is_better(self) -> bool | None:
        """The direction the study optimised its metric in (``accuracy`` in ``directions``), None if not recorded:
        the study's own, not whatever config a later command is given (a study made by the Python API with a
        lower-is-better metric read through a config that names another)."""
        names, dirs = self.objectives, self.parent_params.get("directions", "").split(",")
        if not names or "accuracy" not in names or len(dirs) != len(names):
            return None
        return dirs[names.index("accuracy")] == "maximize"

    def trial(self, number: int) -> TrialRecord | None:
        matches = [t for t in self.trials if t.number == number]
        return matches[0] if matches else None

    @property
    def front(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.complete and t.pareto]

    @property
    def fp32_baseline(self) -> TrialRecord | None:
        done = [t for t in self.trials if t.baseline == FP32_BASELINE and t.complete]
        return done[0] if done else None

    @property
    def uniform_baselines(self) -> list[TrialRecord]:
        return sorted((t for t in self.trials if t.baseline), key=lambda t: t.number)


def accuracy_drop(study: StudyRecord, t: TrialRecord, higher_is_better: bool) -> float | None:
    """The trial's logged drop, or one computed against the FP32 baseline of the same study."""
    drop = t.metric("accuracy_drop")
    if drop is not None:
        return drop
    ref = t.metric("reference_accuracy")
    if ref is None and study.fp32_baseline is not None:
        ref = study.fp32_baseline.metric("accuracy")
    acc = t.metric("accuracy")
    if ref is None or acc is None:
        return None
    return (ref - acc) if higher_is_better else (acc - ref)


# -- from the Optuna storage ------------------------------------------------------------------------
def study_objectives(study, metric: str | None = None) -> list[ObjectiveInfo]:
    attrs = study.user_attrs
    names = attrs.get(A.A_OBJECTIVES) or [f"objective_{i}" for i in range(len(study.directions))]
    dirs = [d.name.lower() for d in study.directions]
    acc_dir = dirs[names.index("accuracy")] if "accuracy" in names else "maximize"
    return objective_infos(names, metric or attrs.get("metric", "accuracy"), acc_dir == "maximize",
                           attrs.get(A.A_ENERGY_MODE), attrs.get(A.A_ENERGY_SOURCE, ""))


def build_records(study, infos: list[ObjectiveInfo]) -> list[TrialRecord]:
    """Every trial of the study, with Pareto membership (feasible, non-dominated) and the knee."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    repaired = study.user_attrs.get(A.A_RUN_IDS) or {}  # runs re-logged into the current MLflow store
    front_numbers = {t.number for t in study.best_trials}
    records = []
    for t in trials:
        ua = t.user_attrs
        result = ua.get(A.T_RESULT)
        metrics = {}
        energy_source = None
        if result:
            try:
                parsed = TrialResult.model_validate(result)
                metrics = parsed.flat_metrics()
                energy_source = parsed.measurement.energy.source if parsed.measurement.energy else None
            except Exception:  # noqa: BLE001 - a record from another version still shows its values
                metrics = {}
        duplicate_of = ua.get(A.T_DUPLICATE_OF)
        feasible = None
        if t.state == TrialState.COMPLETE and t.constraints:
            feasible = all(v <= 0 for v in t.constraints.values())
        records.append(TrialRecord(
            number=t.number, state=t.state.name, baseline=ua.get(A.T_BASELINE),
            values=dict(zip([o.name for o in infos], t.values)) if t.values else {},
            metrics=metrics, feasible=feasible,
            # a duplicate repeats its original's point: the front lists the measured trial once
            on_front=t.number in front_numbers and duplicate_of is None,
            run_id=repaired.get(str(t.number)) or ua.get(A.T_RUN_ID), plan_summary=ua.get(A.T_PLAN_SUMMARY, ""),
            plan_brief=ua.get(T_PLAN_BRIEF, ""),
            fail_reason=ua.get(A.T_FAIL_REASON, ""),
            orphaned=bool(ua.get(A.T_ORPHANED) or ua.get(A.T_SYSTEM_RETRIED)),  # both retried, neither counted
            retry_of=ua.get(A.T_RETRY_OF), duplicate_of=duplicate_of, energy_source=energy_source,
            params=dict(t.params),
        ))
    remeasured = study.user_attrs.get(A.A_REMEASURED)
    if remeasured:  # the final front and knee are decided on the interleaved re-measurement
        from pipeline.search.remeasured import apply_remeasured

        apply_remeasured(records, infos, remeasured)
    front = [r for r in records if r.on_front]
    if front:
        pts = [[r.values[o.name] for o in infos] for r in front]
        box = scoring_box(records, infos, study.user_attrs.get(A.A_HV_BOX))
        front[knee_point(pts, [o.direction for o in infos], scale=box)].knee = True
    return records


def scoring_box(records: list[TrialRecord], infos: list[ObjectiveInfo],
                box: dict[str, list[float]] | None) -> tuple[list[float], list[float]] | None:
    """(ideal, reference) the hypervolume and the knee are measured in: the study's fixed box
    (:func:`hypervolume_box`), with the time-decided axes re-fixed from the re-measured baselines once the
    re-measurement replaced those values (the accuracy bounds do not move). None before the box is fixed."""
    if not box:
        return None
    reference = list(box["reference"])
    timed_baselines = [r for r in records if r.baseline and r.remeasured and r.feasible is not False]
    for i, o in enumerate(infos):
        if o.source in NOISY_SOURCES and timed_baselines:
            reference[i] = float(max(r.values[o.name] for r in timed_baselines))
    return list(box["ideal"]), reference


def hypervolume_box(records: list[TrialRecord], infos: list[ObjectiveInfo], reference_accuracy: float | None,
                    max_drop: float | None, baselines: bool = True) -> dict[str, list[float]] | None:
    """The fixed box hypervolume is measured in, or None while it cannot be fixed yet.

    Ideal point: the FP32 reference's accuracy at zero cost. Reference point: the
    accuracy-drop limit, and for each cost the worst value among the uniform
    baselines (so the box is "what one format everywhere spans"). It is fixed once
    every baseline has finished (without baselines: the first five completed
    trials) and stored with the study, so the hypervolume only ever grows as the
    search finds better trade-offs, and a resumed study keeps the same box.
    """
    done = [r for r in records if r.state == "COMPLETE" and r.duplicate_of is None]
    if baselines:
        base = [r for r in records if r.baseline and not r.orphaned]
        if not base or any(r.state in ("RUNNING", "WAITING") for r in base):
            return None
        box_trials = [r for r in base if r.state == "COMPLETE"]
    else:
        box_trials = sorted(done, key=lambda r: r.number)[:5]
        if len(box_trials) < 5:
            return None
    if not box_trials:
        return None
    ref_point, ideal = [], []
    for o in infos:
        vals = [r.values[o.name] for r in box_trials]
        if o.name == "accuracy":
            best = max(vals) if o.direction == "maximize" else min(vals)
            ref_acc = reference_accuracy if reference_accuracy is not None else best
            sign = 1.0 if o.direction == "maximize" else -1.0
            floor = ref_acc - sign * max_drop if max_drop else (min(vals) if sign > 0 else max(vals))
            ideal.append(float(ref_acc))
            ref_point.append(float(floor))
        else:
            ideal.append(0.0)
            ref_point.append(float(max(vals)))
    return {"reference": ref_point, "ideal": ideal}


def front_summary(records: list[TrialRecord], infos: list[ObjectiveInfo],
                  box: dict[str, list[float]] | None) -> dict[str, float]:
    """front_size, trial counts and (once the box is fixed) the normalised hypervolume of the feasible trials."""
    done = [r for r in records if r.state == "COMPLETE" and r.duplicate_of is None]
    out = {
        "front_size": float(sum(r.on_front for r in records)),
        "trials_complete": float(len(done)),
        "trials_failed": float(sum(r.state == "FAIL" and not r.orphaned for r in records)),
        "trials_duplicate": float(sum(r.duplicate_of is not None for r in records)),
    }
    feasible = [r for r in done if r.feasible is not False]
    if box is None or not feasible:
        return out
    dirs = [o.direction for o in infos]
    remeasured = [r for r in feasible if r.remeasured]
    if not remeasured:
        pts = [[r.values[o.name] for o in infos] for r in feasible]
        out["hypervolume"] = normalized_hypervolume(pts, dirs, box["reference"], box["ideal"])
        return out
    # After the interleaved re-measurement the time-decided values of the re-measured trials are on another
    # scale than the box (fixed from the baselines' in-search timings) and than the trials not re-measured:
    # the hypervolume is taken over the re-measured trials, in the box re-fixed from the re-measured
    # baselines (the accuracy bounds do not move); the in-search one is kept beside it.
    pts = [[(r.values_in_search or r.values)[o.name] for o in infos] for r in feasible]
    out["hypervolume_in_search"] = normalized_hypervolume(pts, dirs, box["reference"], box["ideal"])
    ideal, reference = scoring_box(records, infos, box)
    pts = [[r.values[o.name] for o in infos] for r in remeasured]
    out["hypervolume"] = normalized_hypervolume(pts, dirs, reference, ideal)
    return out

