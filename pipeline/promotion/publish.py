"""Promote a chosen trial into the MLflow Model Registry: register, tag, model card, alias.

Promotion registers the trial's logged model (``models:/m-...``) as a version of
one registered model, tags it with its plan, metrics, backend and energy source,
writes a model card (version description + ``model_card.md`` next to the model
and on the trial run) and points an alias (default ``champion``) at it.
A trial is promoted at most once per registered model: promoting it again
re-points the alias and refreshes the card instead of creating a new version.
"""

from __future__ import annotations

import json
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.promotion.choose import Choice, PromotionError, check_promotable
from pipeline.search.records import StudyRecord, TrialRecord, fmt, pct, saving
from pipeline.tracking import schema as S
from pipeline.tracking.record import RecordError, find_logged_model, run_artifact_text, run_has_artifact_dir

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


def savings_vs_fp32(study: StudyRecord, t: TrialRecord) -> Savings:
    fp32 = study.fp32_baseline
    ref_acc = fp32.metric("accuracy") if fp32 else t.metric("reference_accuracy")
    acc = t.metric("accuracy")
    return Savings(
        fp32=fp32,
        energy_pct=saving(fp32.metric("joules_per_inference"), t.metric("joules_per_inference")) if fp32 else None,
        latency_pct=saving(fp32.metric("latency_ms_p50"), t.metric("latency_ms_p50")) if fp32 else None,
        size_pct=saving(fp32.metric("size_bytes"), t.metric("size_bytes")) if fp32 else None,
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
    quoted = name.replace("'", "\\'")
    try:
        versions = client.search_model_versions(f"name = '{quoted}' and run_id = '{run_id}'")
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
    if not run_has_artifact_dir(client, t.run_id, S.ARTIFACT_ENGINE):
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
    try:
        model = find_logged_model(client, study, t)
    except RecordError as exc:
        raise PromotionError(str(exc)) from None
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



# --------------------------------------------------------------------------- model card
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
        return f"| {label} | {f(v)} | {f(r)} | {pct(saving)} |"

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
        + (f", timing batch {m['batch_size']}" if m.get("batch_size") else "")
        + (f", eval batch {m['eval_batch_size']}" if m.get("eval_batch_size") else "")
        + (f", {m['threads']} thread(s)" if m.get("threads") else "")
        + (f", {m['runtime_version']}" if m.get("runtime_version") else "")
        + f"; execution: {t.tags.get(S.TAG_EXECUTION, 'unknown')}.",
        f"Energy: {t.energy_label}" + (f" — {energy['meter']}" if energy.get("meter") and energy.get("source") != "estimated" else "")
        + (f" — {energy['meter'].removeprefix('estimated: ')}" if energy.get("meter") and energy.get("source") == "estimated" else "")
        + (f"; idle: {energy['idle_handling']}" if energy.get("idle_handling") else "") + ".",
        "",
        "| | this model | FP32 baseline | saving vs FP32 |",
        "|---|---|---|---|",
        f"| {metric_name} | {fmt(t.metric('accuracy'))} | {fmt(fp32.metric('accuracy') if fp32 else t.metric('reference_accuracy'))} "
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
        lines += [f"FP32 baseline: trial {fp32.number} ({fp32.energy_label} energy), same backend and device.", ""]
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

