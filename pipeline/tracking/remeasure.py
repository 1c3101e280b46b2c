"""The interleaved re-measurement in the study's record: the finisher, the comparison, MLflow.

:func:`remeasure_finisher` runs :func:`pipeline.search.remeasure.remeasure_study` when the
search ends (before the review, so the review reads the final front), refreshes the front
on the re-measured numbers, and logs:

- on each re-measured child run: ``latency_ms_p50_remeasured``, ``latency_iqr_ms_remeasured``,
  ``latency_spread_remeasured`` (and the quartiles, round min/max, re-measured energy), the tags
  ``precision_search.latency_method`` and ``precision_search.pareto_in_search``; the run's own
  ``latency_ms_p50`` stays the in-search number;
- on the parent run: ``remeasure/front_vs_baselines.csv`` / ``.md`` (the front against FP32 and
  each uniform format, both numbers side by side), the verdict sentences as a tag, and the
  knee's and fastest plan's ratios against FP32 and the strongest simple baseline as metrics.

:func:`comparison` is what ``precision-search front`` prints too: for the knee plan and the fastest
front plan, by how much it beats FP32 and the strongest simple baseline (re-measured latency
ratio, size ratio, accuracy drop), and a plain sentence when quantization buys size but not speed.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from pipeline.search.records import FP32_BASELINE, TrialRecord
from pipeline.search.remeasured import IN_SEARCH_LABEL, RemeasureReport

log = logging.getLogger(__name__)

ARTIFACT_TABLE_CSV = "remeasure/front_vs_baselines.csv"
ARTIFACT_TABLE_MD = "remeasure/front_vs_baselines.md"
TAG_LATENCY_METHOD = "precision_search.latency_method"  # child + parent: how the final latency was measured
TAG_PARETO_IN_SEARCH = "precision_search.pareto_in_search"  # child: on the front of the in-search numbers
TAG_VERDICT = "precision_search.remeasure_verdict"  # parent: the comparison's sentences
TAG_REMEASURE_ERROR = "precision_search.remeasure_error"  # parent: why the in-search numbers stand
SIZE_GAIN = 0.95  # smaller than 95 % of FP32's size counts as "buys size"


@dataclass
class Row:
    kind: str  # fp32 | uniform | peer (the runtime's one-liner, not a trial: trial -1) | front | candidate
    trial: int
    plan: str
    on_front: bool
    on_front_in_search: bool
    knee: bool
    accuracy: float | None
    accuracy_drop: float | None
    latency_ms_in_search: float | None
    latency_ms_remeasured: float | None
    latency_ms_q25: float | None
    latency_ms_q75: float | None
    latency_ms_round_min: float | None
    latency_ms_round_max: float | None
    speedup_vs_fp32: float | None  # FP32 re-measured p50 / this p50
    size_bytes: float | None
    size_ratio_vs_fp32: float | None
    joules_in_search: float | None
    joules_remeasured: float | None
    feasible: bool | None


@dataclass
class Comparison:
    label: str
    rows: list[Row] = field(default_factory=list)
    sentences: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _row(r: TrialRecord, fp32: TrialRecord | None) -> Row:
    p50 = r.metric("latency_ms_p50_remeasured")
    kind = ("fp32" if r.baseline == FP32_BASELINE else "uniform") if r.baseline else (
        "front" if r.on_front else "candidate")
    return Row(
        kind=kind, trial=r.number, plan=r.baseline or r.plan_summary or f"trial {r.number}", on_front=r.on_front,
        on_front_in_search=bool(r.on_front_in_search), knee=r.knee, accuracy=r.metric("accuracy"),
        accuracy_drop=r.metric("accuracy_drop"), latency_ms_in_search=r.metric("latency_ms_p50"),
        latency_ms_remeasured=p50, latency_ms_q25=r.metric("latency_ms_q25_remeasured"),
        latency_ms_q75=r.metric("latency_ms_q75_remeasured"),
        latency_ms_round_min=r.metric("latency_ms_round_min_remeasured"),
        latency_ms_round_max=r.metric("latency_ms_round_max_remeasured"),
        speedup_vs_fp32=_ratio(fp32.metric("latency_ms_p50_remeasured") if fp32 else None, p50),
        size_bytes=r.metric("size_bytes"), size_ratio_vs_fp32=_ratio(r.metric("size_bytes"),
                                                                     fp32.metric("size_bytes") if fp32 else None),
        joules_in_search=r.metric("joules_per_inference"), joules_remeasured=r.metric("joules_per_inference_remeasured"),
        feasible=r.feasible,
    )


def _peer_rows(report: RemeasureReport, fp32: Row | None) -> list[Row]:
    """The runtime's one-liner(s) as rows (trial -1): scored and timed like the trials, in the same interleaving."""
    rows = []
    for p in report.peers:
        v = p.stats
        if p.error or v is None or v.latency_ms_p50 is None:
            continue
        rows.append(Row(
            kind="peer", trial=-1, plan=p.label, on_front=False, on_front_in_search=False, knee=False,
            accuracy=p.accuracy, accuracy_drop=p.accuracy_drop, latency_ms_in_search=None,
            latency_ms_remeasured=v.latency_ms_p50, latency_ms_q25=v.latency_ms_q25, latency_ms_q75=v.latency_ms_q75,
            latency_ms_round_min=v.latency_ms_round_min, latency_ms_round_max=v.latency_ms_round_max,
            speedup_vs_fp32=_ratio(fp32.latency_ms_remeasured if fp32 else None, v.latency_ms_p50),
            size_bytes=p.size_bytes, size_ratio_vs_fp32=_ratio(p.size_bytes, fp32.size_bytes if fp32 else None),
            joules_in_search=None, joules_remeasured=v.joules_per_inference, feasible=p.feasible))
    return rows


def _faster(a: Row, b: Row) -> bool:
    """``a`` is faster than ``b`` beyond the noise: its upper quartile is below ``b``'s lower one."""
    return None not in (a.latency_ms_q75, b.latency_ms_q25) and a.latency_ms_q75 < b.latency_ms_q25


def _versus(name: str, plan: Row, base: Row, what: str, higher_is_better: bool) -> str:
    speed = _ratio(base.latency_ms_remeasured, plan.latency_ms_remeasured)
    size = _ratio(plan.size_bytes, base.size_bytes)
    drop = (None if plan.accuracy is None or base.accuracy is None
            else (base.accuracy - plan.accuracy) * (1 if higher_is_better else -1))
    noise = "" if _faster(plan, base) or _faster(base, plan) else " (within the noise: the IQRs overlap)"
    which = f"{base.plan} (#{base.trial})" if base.trial >= 0 else base.plan
    return (f"{name} vs {what} {which}: {speed:.2f}x its speed "
            f"({plan.latency_ms_remeasured:.4g} vs {base.latency_ms_remeasured:.4g} ms){noise}, "
            f"{size:.2f}x its size, accuracy {'drop' if (drop or 0) >= 0 else 'gain'} "
            f"{abs(drop or 0):.4g}" if speed is not None and size is not None else
            f"{name} vs {what} {base.plan}: not comparable (missing re-measured latency or size)")


def comparison(records: Sequence[TrialRecord], report: RemeasureReport, higher_is_better: bool = True) -> Comparison:
    """The re-measured front against FP32 and each uniform format; verdicts for the knee and the fastest plan."""
    out = Comparison(label=report.label)
    if report.error:
        out.sentences.append(f"re-measurement failed ({report.error}): the front is decided on the in-search numbers")
        return out
    measured = [r for r in records if r.remeasured and r.metric("latency_ms_p50_remeasured") is not None]
    fp32 = next((r for r in measured if r.baseline == FP32_BASELINE), None)
    order = {"fp32": 0, "uniform": 1, "peer": 2, "front": 3, "candidate": 4}
    rows = [_row(r, fp32) for r in measured]
    peers = _peer_rows(report, next((x for x in rows if x.kind == "fp32"), None))
    out.rows = sorted(rows + peers, key=lambda x: (order[x.kind], x.trial))
    base = [x for x in out.rows if x.kind in ("fp32", "uniform") and x.feasible is not False]
    fp = next((x for x in out.rows if x.kind == "fp32"), None)
    front = [x for x in out.rows if x.on_front and x.latency_ms_remeasured is not None]
    changed = sorted({x.trial for x in out.rows if x.on_front != x.on_front_in_search})
    out.sentences.append(f"latency: {report.label} ({report.runs_per_round} runs per round, {report.threads} "
                         f"thread(s), {report.backend} on {report.device}); the in-search numbers are kept beside "
                         f"them as '{IN_SEARCH_LABEL}'")
    if changed:
        out.sentences.append(f"the re-measurement changed the front: trial(s) {changed} moved on or off it")
    if report.energy_note:
        out.sentences.append(report.energy_note)
    if not front:
        return out
    fastest_base = min(base, key=lambda x: x.latency_ms_remeasured) if base else None
    quantized = [x for x in front if x.kind != "fp32"]
    picks: dict[int, list[str]] = {}  # trial -> what it is (one sentence set per plan)
    for key, plan in (("knee", next((x for x in front if x.knee), None)),
                      ("fastest", min(front, key=lambda x: x.latency_ms_remeasured)),
                      ("smallest", min(quantized, key=lambda x: x.size_bytes or float("inf")) if quantized else None)):
        if plan is not None:
            picks.setdefault(plan.trial, []).append(key)
    rows = {x.trial: x for x in front}
    names = {"knee": "knee", "fastest": "fastest front plan", "smallest": "smallest quantized front plan"}
    for trial, keys in picks.items():
        plan, name = rows[trial], " / ".join(names[k] for k in keys)
        if fp is not None and plan.trial == fp.trial:
            if "fastest" in keys:
                out.sentences.append(f"FP32 (#{fp.trial}) is the fastest plan on the front "
                                     f"({fp.latency_ms_remeasured:.4g} ms re-measured): quantization buys no speed "
                                     "here" + (", only size" if quantized else ""))
            continue
        if fp is not None:
            out.sentences.append(_versus(f"{name} #{plan.trial}", plan, fp, "FP32", higher_is_better))
            for key in keys:
                out.metrics[f"{key}_speedup_vs_fp32_remeasured"] = _ratio(fp.latency_ms_remeasured,
                                                                          plan.latency_ms_remeasured) or 0.0
                out.metrics[f"{key}_size_ratio_vs_fp32"] = plan.size_ratio_vs_fp32 or 0.0
            if plan.size_bytes and fp.size_bytes and plan.size_bytes < SIZE_GAIN * fp.size_bytes \
                    and not _faster(plan, fp):
                out.sentences.append(f"{name} #{plan.trial}: quantization buys size here but not speed "
                                     f"({plan.size_ratio_vs_fp32:.2f}x FP32's size, "
                                     f"{fp.latency_ms_remeasured / plan.latency_ms_remeasured:.2f}x its speed, "
                                     "not faster beyond the noise)")
        if fastest_base is not None and fastest_base.trial != plan.trial and fastest_base is not fp:
            out.sentences.append(_versus(f"{name} #{plan.trial}", plan, fastest_base,
                                         "the fastest simple baseline within the accuracy budget,",
                                         higher_is_better))
            for key in keys:
                out.metrics[f"{key}_speedup_vs_best_baseline_remeasured"] = _ratio(
                    fastest_base.latency_ms_remeasured, plan.latency_ms_remeasured) or 0.0
        elif fastest_base is not None and fastest_base.trial == plan.trial:
            out.sentences.append(f"{name} #{plan.trial} is itself the fastest simple baseline within the accuracy "
                                 f"budget ({plan.plan}): no mixed plan beats it on re-measured latency")
        for peer in peers:
            out.sentences.append(_versus(f"{name} #{plan.trial}", plan, peer, "the runtime's one-liner",
                                         higher_is_better))
            for key in keys:
                out.metrics[f"{key}_speedup_vs_peer_remeasured"] = _ratio(peer.latency_ms_remeasured,
                                                                          plan.latency_ms_remeasured) or 0.0
                out.metrics[f"{key}_size_ratio_vs_peer"] = _ratio(plan.size_bytes, peer.size_bytes) or 0.0
    for p in report.peers:
        if p.error:
            out.sentences.append(f"{p.label}: not compared ({p.error})")
        elif p.feasible is False:
            out.sentences.append(f"{p.label}: accuracy drop {p.accuracy_drop:.4g} exceeds search.max_accuracy_drop "
                                 f"({p.max_accuracy_drop:g}): not a feasible alternative here")
    return out


def _n(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def table_csv(c: Comparison) -> str:
    buf = io.StringIO()
    names = list(Row.__dataclass_fields__)
    w = csv.DictWriter(buf, fieldnames=names)
    w.writeheader()
    for r in c.rows:
        w.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})
    return buf.getvalue()


def table_markdown(c: Comparison, title: str = "") -> str:
    lines = [f"## Front vs baselines, {c.label}" + (f": {title}" if title else ""), "",
             f"Latency p50 per batch in ms. *re-measured* = {c.label} (median of all runs; IQR; min-max of the "
             f"round medians), decides the final front and the knee. *in-search* = {IN_SEARCH_LABEL}.", "",
             "| plan | trial | kind | front (in-search) | knee | accuracy | drop | latency in-search | "
             "latency re-measured | IQR | rounds min-max | speed vs FP32 | size (MB) | size vs FP32 | "
             "J/inf in-search | J/inf re-measured |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in c.rows:
        lines.append(
            f"| {r.plan} | {r.trial if r.trial >= 0 else '-'} | {r.kind} | {'yes' if r.on_front else 'no'} "
            f"({'yes' if r.on_front_in_search else 'no'}) | {'*' if r.knee else ''} | {_n(r.accuracy, '.4f')} | "
            f"{_n(r.accuracy_drop, '+.4f')} | {_n(r.latency_ms_in_search, '.4g')} | "
            f"{_n(r.latency_ms_remeasured, '.4g')} | {_n(r.latency_ms_q25, '.4g')}-{_n(r.latency_ms_q75, '.4g')} | "
            f"{_n(r.latency_ms_round_min, '.4g')}-{_n(r.latency_ms_round_max, '.4g')} | "
            f"{_n(r.speedup_vs_fp32, '.2f')}x | {_n(None if r.size_bytes is None else r.size_bytes / 1e6, '.4g')} | "
            f"{_n(r.size_ratio_vs_fp32, '.2f')}x | {_n(r.joules_in_search, '.3e')} | {_n(r.joules_remeasured, '.3e')} |")
    return "\n".join(lines + [""] + [f"- {s}" for s in c.sentences]) + "\n"


def log_remeasured(client, parent_run_id: str, records: Sequence[TrialRecord], report: RemeasureReport,
                   higher_is_better: bool = True, title: str = "") -> Comparison:
    """Write the re-measured numbers on the child runs and the comparison on the parent run."""
    from mlflow.entities import Metric, RunTag

    c = comparison(records, report, higher_is_better)
    if report.error:
        client.set_tag(parent_run_id, TAG_REMEASURE_ERROR, report.error[:5000])
        return c
    for r in records:
        if not r.remeasured or not r.run_id:
            continue
        metrics = {k: v for k, v in r.metrics.items() if k.endswith("_remeasured")}
        client.log_batch(r.run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
                         tags=[RunTag(TAG_LATENCY_METHOD, report.label),
                               RunTag(TAG_PARETO_IN_SEARCH, "true" if r.on_front_in_search else "false")])
    client.log_text(parent_run_id, table_csv(c), ARTIFACT_TABLE_CSV)
    client.log_text(parent_run_id, table_markdown(c, title), ARTIFACT_TABLE_MD)
    client.log_batch(parent_run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in c.metrics.items()],
                     tags=[RunTag(TAG_LATENCY_METHOD, report.label), RunTag(TAG_VERDICT, "\n".join(c.sentences)[:5000])])
    return c


def remeasure_finisher(config):
    """The re-measurement as a finisher of :class:`pipeline.search.runner.StudyRunner` (before the review)."""

    def finish(tracker, study) -> None:
        from pipeline.search.records import build_records, front_summary, study_objectives
        from pipeline.search.remeasure import remeasure_study
        from pipeline.search.storage import A_HV_BOX, A_VERDICT

        report = remeasure_study(config, study)
        if report is None or not getattr(tracker, "parent_run_id", ""):
            return
        infos = study_objectives(study, config.metric.name)
        records = build_records(study, infos)
        summary = front_summary(records, infos, study.user_attrs.get(A_HV_BOX))
        tracker.update_front(records, infos, summary, int(summary["trials_complete"] + summary["trials_failed"]),
                             True)
        c = log_remeasured(tracker.client, tracker.parent_run_id, records, report,
                           bool(config.metric.higher_is_better), title=f"study {study.study_name}")
        study.set_user_attr(A_VERDICT, c.sentences)  # the search's summary prints them

    finish.__name__ = "remeasure"
    return finish
