"""Pick a candidate from a study's Pareto front and promote it into the MLflow Model Registry.

The study's MLflow record (names in :mod:`pipeline.tracking_schema`) is the only
input: one parent run per study, one child run per trial carrying its state, its
``pareto`` tag, its metrics (``TrialResult.flat_metrics``), its plan, its result
and its ONNX model (an MLflow 3 *logged model* named ``candidate``). Reading
from MLflow rather than from the Optuna storage means ``promote`` works against
any tracking server the search wrote to, from any machine.

Promotion registers the trial's logged model (``models:/m-...``) as a version of
one registered model, tags it with its plan, metrics, backend and energy source,
writes a model card (version description + ``model_card.md`` next to the model
and on the trial run) and points an alias (default ``champion``) at it.
A trial is promoted at most once per registered model: promoting it again
re-points the alias and refreshes the card instead of creating a new version.
Trials that failed, are dominated, or lack their model are refused, with why.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pipeline import tracking_schema as S

log = logging.getLogger(__name__)

POLICIES = ("max-accuracy", "min-energy", "knee")

# Objective name (config.search.objectives) -> child-run metric, and whether lower is better.
# Accuracy's direction depends on the task metric (mse: lower is better) and is passed in.
OBJECTIVE_METRICS: dict[str, str] = {
    "accuracy": "accuracy",
    "energy": "joules_per_inference",
    "latency": "latency_ms_p50",
    "size": "size_bytes",
}

FP32_BASELINE = "uniform-fp32"
MODEL_CARD = "model_card.md"
ENGINE_IN_MODEL = "tensorrt"  # folder inside the logged model that holds a TensorRT engine, where built

# Tags set on registered model versions (besides the run tags copied as-is).
VTAG_STUDY = S.TAG_STUDY
VTAG_TRIAL_NUMBER = S.TAG_TRIAL_NUMBER
VTAG_RUN_ID = S.VTAG_RUN_ID
VTAG_PLAN = S.VTAG_PLAN
VTAG_PLAN_SUMMARY = S.VTAG_PLAN_SUMMARY
VTAG_POLICY = S.VTAG_POLICY
VTAG_ENGINE = S.VTAG_ENGINE
VTAG_METRIC_PREFIX = "metric."
VTAG_SAVING_PREFIX = "saving_vs_fp32."
COPIED_RUN_TAGS = (S.TAG_BACKEND, S.TAG_DEVICE, S.TAG_ENERGY_SOURCE, S.TAG_EXECUTION, S.TAG_METHOD, S.TAG_BASELINE,
                   S.TAG_CONFIG_HASH)
MAX_TAG_VALUE = 90_000  # MLflow caps registry tag values at 100,000 characters
TAG_FEASIBLE = S.TAG_FEASIBLE  # trial: "false" when the accuracy-drop constraint is broken (pipeline.tracking)
TAG_ENERGY_OBJECTIVE = S.TAG_ENERGY_OBJECTIVE  # parent run: "energy" | "latency" (pipeline.tracking)


class PromotionError(ValueError):
    """A promotion that is refused; the message says why and what to do instead."""


# --------------------------------------------------------------------------- tracking URI
def default_tracking_uri(workdir: str | Path = ".precision-search") -> str:
    """The search's default (``MLFLOW_TRACKING_URI``, else ``sqlite:///<workdir>/mlflow.db``), so that
    ``search``, ``promote`` and ``load`` always agree on one store."""
    from pipeline.tracking import default_tracking_uri as search_default

    return search_default(workdir)


# --------------------------------------------------------------------------- reading a study
@dataclass(frozen=True)
class TrialRecord:
    """One trial as the search logged it (a child run)."""

    run_id: str
    number: int
    state: str
    pareto: bool
    baseline: str | None
    metrics: dict[str, float]
    tags: dict[str, str]
    fail_reason: str | None = None

    @property
    def complete(self) -> bool:
        return self.state == "COMPLETE"

    @property
    def label(self) -> str:
        return f"#{self.number}" + (f" ({self.baseline})" if self.baseline else "")

    @property
    def energy_source(self) -> str | None:
        return self.tags.get(S.TAG_ENERGY_SOURCE)

    def metric(self, name: str) -> float | None:
        v = self.metrics.get(name)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


@dataclass
class StudyRecord:
    """A study's parent run and all of its trials."""

    experiment_id: str
    experiment_name: str
    study: str
    parent_run_id: str
    parent_tags: dict[str, str]
    trials: list[TrialRecord] = field(default_factory=list)

    def trial(self, number: int) -> TrialRecord | None:
        matches = [t for t in self.trials if t.number == number]
        # A trial number is logged once; if a rerun logged it twice, the latest run wins (search order).
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


def _search_all_runs(client, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None):
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _tag_filter(key: str, value: str) -> str:
    return f"tags.`{key}` = '{value}'"


def _escape(value: str) -> str:
    return value.replace("'", "\\'")


def open_study(client, experiment: str, study: str | None = None) -> StudyRecord:
    """The study's record in ``experiment``: the named study, or the latest one when ``study`` is None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise PromotionError(
            f"no MLflow experiment {experiment!r} at {client.tracking_uri}: run `precision-search search` first, "
            "or point MLFLOW_TRACKING_URI / --tracking-uri at the server the search logged to"
        )
    filt = _tag_filter(S.TAG_ROLE, S.ROLE_STUDY)
    if study:
        filt += " and " + _tag_filter(S.TAG_STUDY, _escape(study))
    parents = client.search_runs([exp.experiment_id], filter_string=filt, max_results=1,
                                 order_by=["attributes.start_time DESC"])
    if not parents:
        what = f"study {study!r}" if study else "any study"
        raise PromotionError(f"experiment {experiment!r} has no parent run for {what} "
                             f"(tag {S.TAG_ROLE}={S.ROLE_STUDY}); check --study")
    return _study_record(client, exp, parents[0])


def study_from_parent(client, parent_run_id: str) -> StudyRecord:
    """The study whose parent run is ``parent_run_id`` (what the search holds at the end)."""
    parent = client.get_run(parent_run_id)
    if parent.data.tags.get(S.TAG_ROLE) != S.ROLE_STUDY:
        raise PromotionError(f"run {parent_run_id} is not a study's parent run (tag {S.TAG_ROLE}={S.ROLE_STUDY} missing)")
    return _study_record(client, client.get_experiment(parent.info.experiment_id), parent)


def _study_record(client, exp, parent) -> StudyRecord:
    children = _search_all_runs(
        client, [exp.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and " + _tag_filter(S.TAG_ROLE, S.ROLE_TRIAL),
        order_by=["attributes.start_time DESC"],
    )
    trials = []
    for run in children:
        tags = run.data.tags
        try:
            number = int(tags[S.TAG_TRIAL_NUMBER])
        except (KeyError, ValueError):
            log.warning("run %s has no valid %s tag; ignored", run.info.run_id, S.TAG_TRIAL_NUMBER)
            continue
        trials.append(TrialRecord(
            run_id=run.info.run_id, number=number, state=tags.get(S.TAG_STATE, run.info.status),
            pareto=tags.get(S.TAG_PARETO, "false").lower() == "true", baseline=tags.get(S.TAG_BASELINE) or None,
            metrics=dict(run.data.metrics), tags=dict(tags), fail_reason=tags.get(S.TAG_FAIL_REASON),
        ))
    # Keep the latest run per trial number (children are newest first), then order by number.
    seen: dict[int, TrialRecord] = {}
    for t in trials:
        seen.setdefault(t.number, t)
    return StudyRecord(experiment_id=exp.experiment_id, experiment_name=exp.name,
                       study=parent.data.tags.get(S.TAG_STUDY, ""), parent_run_id=parent.info.run_id,
                       parent_tags=dict(parent.data.tags), trials=sorted(seen.values(), key=lambda t: t.number))


# --------------------------------------------------------------------------- policies
@dataclass(frozen=True)
class Budget:
    """Limits a policy must respect. ``None`` means no limit."""

    max_energy_j: float | None = None  # joules per inference
    max_latency_ms: float | None = None  # p50 at the configured batch size
    max_accuracy_drop: float | None = None  # versus the FP32 reference, in metric units (>0 = worse)


@dataclass(frozen=True)
class Choice:
    trial: TrialRecord
    policy: str  # one of POLICIES, or "trial" for an explicit --trial N
    reason: str


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


def _quality(t: TrialRecord, higher_is_better: bool) -> float:
    acc = t.metric("accuracy")
    if acc is None:
        return -math.inf
    return acc if higher_is_better else -acc


def _fmt(v: float | None, unit: str = "", digits: int = 4) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}g}{unit}"


def _energy_or_none(t: TrialRecord) -> float | None:
    return t.metric(OBJECTIVE_METRICS["energy"])


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
    if t.tags.get(TAG_FEASIBLE) == "false":
        drop = t.metric("accuracy_drop")
        raise PromotionError(f"trial {t.number} of study {study.study!r} breaks the accuracy-drop limit "
                             f"(drop {_fmt(drop)} versus FP32), so it is not on the Pareto front")
    if not t.pareto:
        front = ", ".join(x.label for x in study.front) or "empty"
        raise PromotionError(f"trial {t.number} of study {study.study!r} is not on the Pareto front (another trial "
                             f"is at least as good on every objective); front: {front}")
    return t


def choose(study: StudyRecord, policy: str, budget: Budget = Budget(), *, objectives: Iterable[str] = ("accuracy", "energy", "size"),
           higher_is_better: bool = True) -> Choice:
    """Apply a promotion policy to the study's Pareto front.

    - ``max-accuracy``: best task metric among front trials within the energy and/or latency budget
      (at least one budget is required: without one, the answer is simply the FP32 model).
    - ``min-energy``: lowest J/inference among front trials whose accuracy drop is within
      ``max_accuracy_drop``.
    - ``knee``: the front's knee point on the study's objectives (:func:`pipeline.pareto.knee_point`).
    """
    front = study.front
    if not front:
        raise PromotionError(f"study {study.study!r} has no completed trial on the Pareto front "
                             f"({len(study.trials)} trial(s) logged); run or finish the search first")
    if policy == "max-accuracy":
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
                lat = t.metric("latency_ms_p50")
                if lat is None or lat > budget.max_latency_ms:
                    continue
            pool.append(t)
        if not pool:
            if budget.max_energy_j is not None:
                es = [e for e in (_energy_or_none(t) for t in front) if e is not None]
                notes.append(f"lowest energy on the front: {_fmt(min(es) if es else None, ' J/inference')}")
            if budget.max_latency_ms is not None:
                ls = [x for x in (t.metric("latency_ms_p50") for t in front) if x is not None]
                notes.append(f"lowest latency on the front: {_fmt(min(ls) if ls else None, ' ms')}")
            raise PromotionError("no trial on the front meets the budget (" + "; ".join(notes) + "); relax it")
        best = max(pool, key=lambda t: (_quality(t, higher_is_better), -(_energy_or_none(t) or 0.0),
                                        -(t.metric("size_bytes") or 0.0)))
        limits = []
        if budget.max_energy_j is not None:
            limits.append(f"energy <= {budget.max_energy_j:g} J/inference")
        if budget.max_latency_ms is not None:
            limits.append(f"latency p50 <= {budget.max_latency_ms:g} ms")
        reason = (f"most accurate of {len(pool)} front trial(s) within {' and '.join(limits)}: "
                  f"accuracy {_fmt(best.metric('accuracy'))}")
        return Choice(best, policy, reason)

    if policy == "min-energy":
        limit = budget.max_accuracy_drop
        if limit is None:
            raise PromotionError("policy min-energy needs an accuracy limit: --max-accuracy-drop D "
                                 "(or search.max_accuracy_drop in the config)")
        with_energy = [t for t in front if _energy_or_none(t) is not None]
        if not with_energy:
            raise PromotionError("policy min-energy: no trial on the front has an energy measurement "
                                 "(joules_per_inference); use --policy knee, or max-accuracy --max-latency-ms")
        pool = [t for t in with_energy if (d := accuracy_drop(study, t, higher_is_better)) is not None and d <= limit]
        if not pool:
            drops = [d for d in (accuracy_drop(study, t, higher_is_better) for t in with_energy) if d is not None]
            raise PromotionError(f"no trial on the front has an accuracy drop <= {limit:g} (smallest: "
                                 f"{_fmt(min(drops) if drops else None)}); raise --max-accuracy-drop")
        require_one_energy_source(pool, "min-energy")
        best = min(pool, key=lambda t: (_energy_or_none(t), -_quality(t, higher_is_better)))
        reason = (f"lowest energy ({_fmt(_energy_or_none(best), ' J/inference')}, {best.energy_source or 'unknown'}) "
                  f"of {len(pool)} front trial(s) with accuracy drop <= {limit:g}")
        return Choice(best, policy, reason)

    if policy == "knee":
        objs = [o for o in objectives if o in OBJECTIVE_METRICS]
        if len(front) == 1:
            return Choice(front[0], policy, "the only trial on the front")
        keys = _objective_keys(front, objs)
        missing = [o for o in objs if o not in keys]
        if len(keys) < 2:
            raise PromotionError(f"policy knee needs at least two objectives measured on every front trial; have "
                                 f"{sorted(keys)} (missing on some: {missing}); use --policy max-accuracy or min-energy")
        latency_slot = study.parent_tags.get(TAG_ENERGY_OBJECTIVE) == "latency"
        if "energy" in keys and not (latency_slot and keys["energy"].startswith(OBJECTIVE_PREFIX)):
            require_one_energy_source(front, "knee (energy is one of its objectives)")
        idx = _knee_index(front, keys, higher_is_better)
        what = ", ".join("energy slot (holding latency p50: energy was only estimated)"
                         if (o == "energy" and latency_slot and keys[o].startswith(OBJECTIVE_PREFIX)) else o
                         for o in keys)
        reason = f"knee point of the {len(front)}-trial front on {what}" + (
            f" ({', '.join(missing)} not measured on every trial, left out)" if missing else "")
        return Choice(front[idx], policy, reason)

    raise PromotionError(f"unknown policy {policy!r}: use one of {list(POLICIES)} or --trial N")


OBJECTIVE_PREFIX = S.METRIC_OBJECTIVE_PREFIX  # the search logs the exact values Optuna optimised as objective.<name>


def _objective_keys(front: list[TrialRecord], objectives: list[str]) -> dict[str, str]:
    """objective -> metric holding it on every front trial.

    Prefers ``objective.<name>``: what the study itself optimised (e.g. latency in
    the energy slot when energy was only estimated), so the knee here is the knee
    the search reported; falls back to the raw measurement.
    """
    keys = {}
    for o in objectives:
        for key in (OBJECTIVE_PREFIX + o, OBJECTIVE_METRICS[o]):
            if all(t.metric(key) is not None for t in front):
                keys[o] = key
                break
    return keys


def _knee_index(front: list[TrialRecord], keys: dict[str, str], higher_is_better: bool) -> int:
    """Index of the knee among ``front``, computed by the search's own :func:`pipeline.pareto.knee_point`."""
    from pipeline.pareto import knee_point

    points = [[t.metric(k) for k in keys.values()] for t in front]
    directions = ["maximize" if (o == "accuracy" and higher_is_better) else "minimize" for o in keys]
    return int(knee_point(points, directions))


# --------------------------------------------------------------------------- promotion
@dataclass
class Promotion:
    """What ``promote`` did."""

    registered_name: str
    version: str
    alias: str
    trial_number: int
    run_id: str
    model_id: str
    source: str
    created: bool  # False when the trial was already registered and only the alias/card were refreshed
    policy: str
    reason: str
    model_card: str
    engine: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.registered_name}@{self.alias}"


TAG_MODEL_URI = S.TAG_MODEL_URI  # set by pipeline.tracking: models:/m-... of the candidate
TAG_MODEL_MISSING = S.TAG_MODEL_MISSING  # set by pipeline.tracking when the file was gone


def find_logged_model(client, study: StudyRecord, t: TrialRecord):
    """The trial's ONNX logged model (``mlflow.onnx.log_model(name="candidate")``), checked to hold its files."""
    from mlflow.exceptions import MlflowException

    if t.tags.get(TAG_MODEL_MISSING):
        raise PromotionError(f"trial {t.number} has no logged model: {t.tags[TAG_MODEL_MISSING]}")
    model = None
    uri = t.tags.get(TAG_MODEL_URI, "")
    if uri.startswith("models:/m-"):
        try:
            model = client.get_logged_model(uri[len("models:/"):])
        except MlflowException:
            model = None
    if model is None:
        models = client.search_logged_models(
            experiment_ids=[study.experiment_id],
            filter_string=f"source_run_id = '{t.run_id}' AND name = '{S.ARTIFACT_MODEL}'",
        )
        if not models:
            raise PromotionError(f"trial {t.number} has no logged model {S.ARTIFACT_MODEL!r} (run {t.run_id}); "
                                 "its artifact was never uploaded, so there is nothing to register")
        model = max(models, key=lambda m: m.creation_timestamp or 0)
    files = {f.path for f in client.list_logged_model_artifacts(model.model_id)}
    if "MLmodel" not in files or not any(p.endswith(".onnx") for p in files):
        raise PromotionError(f"trial {t.number}: logged model {model.model_id} is incomplete (files: {sorted(files)}); "
                             "the upload was interrupted; rerun the trial")
    return model


def run_artifact_text(client, run_id: str, path: str) -> str | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception:  # noqa: BLE001 - absent artifact: MlflowException or OSError by store
            return None
        return Path(local).read_text()


def trial_result(client, t: TrialRecord) -> dict[str, Any] | None:
    """The trial's ``result.json`` (a ``TrialResult`` as JSON), or None when it was not logged."""
    text = run_artifact_text(client, t.run_id, S.ARTIFACT_RESULT)
    return json.loads(text) if text else None


def _run_has_artifact_dir(client, run_id: str, path: str) -> bool:
    try:
        return bool(client.list_artifacts(run_id, path))
    except Exception:  # noqa: BLE001
        return False


@dataclass(frozen=True)
class Savings:
    """The candidate versus the FP32 baseline of the same study (percent saved; >0 = better)."""

    fp32: TrialRecord | None
    energy_pct: float | None
    latency_pct: float | None
    size_pct: float | None
    accuracy_delta: float | None  # candidate - FP32, in metric units

    def as_tags(self) -> dict[str, str]:
        out = {}
        for k in ("energy_pct", "latency_pct", "size_pct", "accuracy_delta"):
            v = getattr(self, k)
            if v is not None:
                out[VTAG_SAVING_PREFIX + k] = f"{v:.4g}"
        return out


def _saving(ref: float | None, val: float | None) -> float | None:
    if ref is None or val is None or ref <= 0:
        return None
    return 100.0 * (ref - val) / ref


def savings_vs_fp32(study: StudyRecord, t: TrialRecord) -> Savings:
    fp32 = study.fp32_baseline
    ref_acc = fp32.metric("accuracy") if fp32 else t.metric("reference_accuracy")
    acc = t.metric("accuracy")
    return Savings(
        fp32=fp32,
        energy_pct=_saving(fp32.metric("joules_per_inference"), t.metric("joules_per_inference")) if fp32 else None,
        latency_pct=_saving(fp32.metric("latency_ms_p50"), t.metric("latency_ms_p50")) if fp32 else None,
        size_pct=_saving(fp32.metric("size_bytes"), t.metric("size_bytes")) if fp32 else None,
        accuracy_delta=(acc - ref_acc) if (acc is not None and ref_acc is not None) else None,
    )


def _version_tags(study: StudyRecord, choice: Choice, plan_yaml: str, result: dict | None, savings: Savings,
                  engine: str | None) -> dict[str, str]:
    t = choice.trial
    tags = {VTAG_STUDY: study.study, VTAG_TRIAL_NUMBER: str(t.number), VTAG_RUN_ID: t.run_id,
            VTAG_POLICY: choice.policy, VTAG_PLAN: plan_yaml[:MAX_TAG_VALUE]}
    if result and result.get("plan_summary"):
        tags[VTAG_PLAN_SUMMARY] = str(result["plan_summary"])[:MAX_TAG_VALUE]
    for key in COPIED_RUN_TAGS:
        if t.tags.get(key):
            tags[key] = t.tags[key]
    for name, value in sorted(t.metrics.items()):
        tags[VTAG_METRIC_PREFIX + name] = f"{value:.6g}"
    tags.update(savings.as_tags())
    if engine:
        tags[VTAG_ENGINE] = engine
    return tags


def _existing_version(client, name: str, run_id: str):
    try:
        versions = client.search_model_versions(f"name = '{_escape(name)}' and run_id = '{run_id}'")
    except Exception:  # noqa: BLE001 - registered model does not exist yet
        return None
    versions = [v for v in versions if v.tags.get(VTAG_RUN_ID, run_id) == run_id]
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _ensure_registered_model(client, name: str, study: StudyRecord) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, tags={S.TAG_EXPERIMENT: study.experiment_name},
            description=f"Precision-search candidates of experiment {study.experiment_name!r}. "
                        "Each version is one trial's ONNX model; see its model card.")


def _copy_engine(client, t: TrialRecord, model_id: str) -> str | None:
    """Attach the trial's TensorRT engine (run artifact ``engine/``) to its logged model, once."""
    if not _run_has_artifact_dir(client, t.run_id, S.ARTIFACT_ENGINE):
        return None
    present = [f.path for f in client.list_logged_model_artifacts(model_id, ENGINE_IN_MODEL)]
    if not present:
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(t.run_id, S.ARTIFACT_ENGINE, tmp)
            client.log_model_artifacts(model_id, local, ENGINE_IN_MODEL)
        present = [f.path for f in client.list_logged_model_artifacts(model_id, ENGINE_IN_MODEL)]
    engines = [p for p in present if p.endswith((".engine", ".plan", ".trt"))] or present
    return engines[0] if engines else None


@contextmanager
def _global_tracking_uri(uri: str):
    """MLflow 3.17's SQL registry store resolves ``models:/m-...`` through the *global* tracking URI
    (``MlflowClient().get_logged_model`` in ``SqlAlchemyStore.create_model_version``, marked TODO
    upstream), not the client's. Align the global URI for that one call."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):
        yield


def promote(client, study: StudyRecord, choice: Choice, *, registry_name: str, alias: str = "champion",
            metric_name: str = "accuracy", tracking_uri: str | None = None) -> Promotion:
    """Register ``choice.trial``'s model (once), tag it, write its model card and point ``alias`` at it."""
    t = check_promotable(study, choice.trial)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", alias or "") or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise PromotionError(f"alias {alias!r} is not usable: letters, digits, '_' or '-', not 'latest' or 'v<N>'")
    model = find_logged_model(client, study, t)
    plan_yaml = run_artifact_text(client, t.run_id, S.ARTIFACT_PLAN)
    result_text = run_artifact_text(client, t.run_id, S.ARTIFACT_RESULT)
    result = json.loads(result_text) if result_text else None
    if plan_yaml is None and result and result.get("plan_yaml"):
        plan_yaml = result["plan_yaml"]
    if plan_yaml is None:
        raise PromotionError(f"trial {t.number} has no {S.ARTIFACT_PLAN} or {S.ARTIFACT_RESULT} artifact: the "
                             "plan that produced the model is unknown, so it cannot be promoted reproducibly")

    engine = _copy_engine(client, t, model.model_id)
    savings = savings_vs_fp32(study, t)
    tags = _version_tags(study, choice, plan_yaml, result, savings, engine and f"{ENGINE_IN_MODEL}/{Path(engine).name}")

    _ensure_registered_model(client, registry_name, study)
    source = f"models:/{model.model_id}"
    existing = _existing_version(client, registry_name, t.run_id)
    if existing is None:
        with _global_tracking_uri(client.tracking_uri):
            mv = client.create_model_version(registry_name, source, run_id=t.run_id, tags=tags,
                                             model_id=model.model_id)
        version, created = str(mv.version), True
    else:
        version, created = str(existing.version), False
        for k, v in tags.items():
            client.set_model_version_tag(registry_name, version, k, v)

    card = model_card(study, choice, registry_name=registry_name, version=version, alias=alias, plan_yaml=plan_yaml,
                      result=result, savings=savings, engine=engine, metric_name=metric_name, tracking_uri=tracking_uri)
    client.update_model_version(registry_name, version, description=card)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_CARD
        path.write_text(card)
        client.log_artifact(t.run_id, str(path))
        client.log_model_artifact(model.model_id, str(path))
    client.set_registered_model_alias(registry_name, alias, version)
    client.set_tag(t.run_id, S.TAG_REGISTERED, f"{registry_name}/{version}")
    client.set_tag(study.parent_run_id, f"{S.TAG_ALIAS_PREFIX}{alias}", f"{registry_name}/{version} (trial {t.number})")
    return Promotion(registered_name=registry_name, version=version, alias=alias, trial_number=t.number,
                     run_id=t.run_id, model_id=model.model_id, source=source, created=created, policy=choice.policy,
                     reason=choice.reason, model_card=card, engine=engine)


def explicit_choice(study: StudyRecord, number: int) -> Choice:
    t = check_promotable(study, study.trial(number), number)
    return Choice(t, "trial", f"trial {number} chosen explicitly")


# --------------------------------------------------------------------------- model card
def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.1f} %"


def _energy_label(t: TrialRecord) -> str:
    src = t.energy_source
    if not src or src == "none" or t.metric("joules_per_inference") is None:
        return "not measured"
    return "estimated (no energy meter readable)" if src == "estimated" else f"metered ({src.upper()})"


def model_card(study: StudyRecord, choice: Choice, *, registry_name: str, version: str, alias: str, plan_yaml: str,
               result: dict[str, Any] | None, savings: Savings, engine: str | None = None, metric_name: str = "accuracy",
               tracking_uri: str | None = None) -> str:
    """Markdown: what this version is, how it was measured, what it saves versus FP32, and how to load it."""
    t = choice.trial
    m = (result or {}).get("measurement") or {}
    energy = m.get("energy") or {}
    fp32 = savings.fp32
    uri = f"models:/{registry_name}@{alias}"

    def row(label: str, key: str, unit: str, saving: float | None, scale: float = 1.0, digits: int = 4) -> str:
        v = t.metric(key)
        r = fp32.metric(key) if fp32 else None
        f = lambda x: "n/a" if x is None else f"{x * scale:.{digits}g}{unit}"  # noqa: E731
        return f"| {label} | {f(v)} | {f(r)} | {_pct(saving)} |"

    lines = [
        f"# {registry_name} v{version} (`@{alias}`)",
        "",
        f"Trial **{t.number}** of study **{study.study}** (experiment `{study.experiment_name}`, run `{t.run_id}`)"
        + (f", uniform baseline `{t.baseline}`" if t.baseline else ", a mixed-precision plan") + ".",
        f"Chosen by: **{choice.policy}** — {choice.reason}.",
        "",
        f"Plan: `{(result or {}).get('plan_summary', '')}`" if result and result.get("plan_summary") else "",
        "",
        "## Measured on the exported artifact",
        "",
        f"Backend `{t.tags.get(S.TAG_BACKEND, m.get('backend', '?'))}` on `{t.tags.get(S.TAG_DEVICE, m.get('device', '?'))}`"
        + (f", batch {m['batch_size']}" if m.get("batch_size") else "")
        + (f", {m['threads']} thread(s)" if m.get("threads") else "")
        + (f", {m['runtime_version']}" if m.get("runtime_version") else "")
        + f"; execution: {t.tags.get(S.TAG_EXECUTION, 'unknown')}.",
        f"Energy: {_energy_label(t)}" + (f" — {energy['meter']}" if energy.get("meter") and energy.get("source") != "estimated" else "")
        + (f" — {energy['meter'].removeprefix('estimated: ')}" if energy.get("meter") and energy.get("source") == "estimated" else "")
        + (f"; idle: {energy['idle_handling']}" if energy.get("idle_handling") else "") + ".",
        "",
        "| | this model | FP32 baseline | saving vs FP32 |",
        "|---|---|---|---|",
        f"| {metric_name} | {_fmt(t.metric('accuracy'))} | {_fmt(fp32.metric('accuracy') if fp32 else t.metric('reference_accuracy'))} "
        f"| {'n/a' if savings.accuracy_delta is None else f'{savings.accuracy_delta:+.4g} (change)'} |",
        row("latency p50", "latency_ms_p50", " ms", savings.latency_pct),
        row("energy", "joules_per_inference", " mJ/inference", savings.energy_pct, scale=1e3),
        row("size", "size_bytes", " MB", savings.size_pct, scale=1e-6),
        row("effective bits/weight", "effective_bits_per_weight", "", None, digits=3),
        row("carbon", "gco2e_per_1m_inferences", " gCO2e/1M inf.", savings.energy_pct),
        "",
    ]
    if fp32 is None:
        lines += ["FP32 comparison: this study has no completed `uniform-fp32` baseline, so savings are not "
                  "computed (accuracy is compared with the logged FP32 reference where available).", ""]
    else:
        lines += [f"FP32 baseline: trial {fp32.number} ({_energy_label(fp32)} energy), same backend and device.", ""]
    layers = (result or {}).get("layers") or []
    if layers:
        observed = any(l.get("kernel") for l in layers)
        lines += ["## Layers", "", "| layer | op | format | runs as | kernel | params | detail |",
                  "|---|---|---|---|---|---|---|"]
        for l in layers:
            lines.append(f"| `{l.get('name')}` | {l.get('onnx_op', '')} | {l.get('format')} | {l.get('execution')} | "
                         f"{l.get('kernel') or 'not observed'} | {l.get('params', 0):,} | {l.get('detail', '')} |")
        lines += ["", "`runs as` is read from the runtime's optimized graph (the `kernel` it runs) where the backend can "
                      "be observed, else from the static native/emulated table."
                  if observed else "`runs as` comes from the static native/emulated table: this backend's kernels "
                                   "were not observed."]
        emulated = [l.get("name") for l in layers if l.get("execution") == "emulated"]
        if emulated:
            lines += ["", f"{len(emulated)} layer(s) are **emulated** on this backend (no native kernel runs their format "
                          "here): the measured latency/energy reflect emulation, not the format's potential."]
        lines.append("")
    lines += ["## Plan", "", "```yaml", plan_yaml.rstrip(), "```", ""]
    if engine:
        lines += ["## TensorRT engine", "", f"Stored with the model at `{ENGINE_IN_MODEL}/{Path(engine).name}`. "
                  "An engine only runs on the GPU model and TensorRT version that built it.", ""]
    env = f"MLFLOW_TRACKING_URI={tracking_uri} " if tracking_uri else ""
    lines += [
        "## Load it",
        "",
        "```bash",
        f"{env}precision-search load {registry_name}@{alias}",
        "```",
        "",
        "```python",
        "import mlflow, onnxruntime as ort",
        *( [f"mlflow.set_tracking_uri({tracking_uri!r})"] if tracking_uri else [] ),
        f"path = mlflow.artifacts.download_artifacts({uri!r})",
        "session = ort.InferenceSession(f\"{path}/model.onnx\", providers=[\"CPUExecutionProvider\"])",
        "# or: model = mlflow.onnx.load_model(" + repr(uri) + ")  # onnx.ModelProto",
        "```",
        "",
    ]
    return "\n".join(l for l in lines if l is not None)


# --------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    """A registered version downloaded to disk, with what the registry says about it."""

    uri: str
    name: str
    version: str
    folder: Path
    onnx_path: Path
    tags: dict[str, str]
    engine_path: Path | None = None

    def session(self, providers: list[str] | None = None):
        """An ONNX Runtime session on the downloaded model (CPU unless providers say otherwise)."""
        import onnxruntime as ort

        from pipeline.backends.ort_cpu import session_options

        opts = session_options()  # the settings the search measured with
        return ort.InferenceSession(str(self.onnx_path), sess_options=opts,
                                    providers=providers or ["CPUExecutionProvider"])


def model_uri(ref: str) -> str:
    """``NAME@alias`` / ``NAME/3`` / ``models:/...`` -> a ``models:/`` URI."""
    ref = ref.strip()
    if ref.startswith("models:/"):
        return ref
    if "@" in ref or "/" in ref:
        return f"models:/{ref}"
    raise PromotionError(f"{ref!r}: give NAME@ALIAS (e.g. digits-mlp@champion), NAME/VERSION, or a models:/ URI")


def load_registered(client, ref: str, dst: str | Path) -> LoadedModel:
    """Resolve ``ref`` in the registry, download its files into ``dst`` and find the ONNX file."""
    import mlflow.artifacts
    import yaml
    from mlflow.exceptions import MlflowException

    uri = model_uri(ref)
    body = uri[len("models:/"):]
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        elif "/" in body and not body.startswith("m-"):
            name, version = body.rsplit("/", 1)
            mv = client.get_model_version(name, version)
        else:
            raise PromotionError(f"{uri}: not a registered model reference (use NAME@ALIAS or NAME/VERSION)")
    except MlflowException as exc:
        raise PromotionError(f"{uri}: not found in the registry at {client._registry_uri}: {exc.message}") from None
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    # Download from the version's storage location rather than through models:/ — MLflow 3.17's
    # models:/ artifact repository resolves names with the *global* registry URI, not this client's.
    storage = client.get_model_version_download_uri(mv.name, str(mv.version))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=storage, dst_path=str(dst),
                                                     tracking_uri=client.tracking_uri))
    meta = yaml.safe_load((local / "MLmodel").read_text()) if (local / "MLmodel").exists() else {}
    data = ((meta.get("flavors") or {}).get("onnx") or {}).get("data")
    onnx_path = local / data if data else next(iter(sorted(local.glob("*.onnx"))), None)
    if onnx_path is None or not onnx_path.exists():
        raise PromotionError(f"{uri}: the downloaded model has no ONNX file (files: {sorted(p.name for p in local.iterdir())})")
    engine = mv.tags.get(VTAG_ENGINE)
    return LoadedModel(uri=uri, name=mv.name, version=str(mv.version), folder=local, onnx_path=onnx_path,
                       tags=dict(mv.tags), engine_path=(local / engine) if engine else None)
