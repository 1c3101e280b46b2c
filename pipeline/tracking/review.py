"""Review artifacts on a study's parent run: what a human looks at before promoting.

``write_review(client, parent_run_id, ...)`` is called by the search at the end of
a study (and can be re-run any time: it overwrites its own artifacts). It reads
the study back from MLflow, like ``promote`` does, and logs under ``review/``:

- ``precision_map.png`` / ``.svg`` / ``.csv``: layers x front trials, each cell the layer's
  format, marked where it is only emulated on the measuring backend;
- ``importance.csv`` / ``.png``: Optuna's parameter importance for the accuracy
  objective (which layers' format choices move accuracy), when a study is given;
- ``precision_energy.csv`` / ``.md``: FP32 vs each uniform format vs the best
  mixed plans on this model and hardware: accuracy, latency, J/inference, size
  and savings versus FP32, each energy figure labelled metered or estimated.

The Pareto front plot itself is written by the search (``pareto/front.*``).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.formats import ALL_FORMATS
from pipeline.search.records import FP32_BASELINE, StudyRecord, TrialRecord, accuracy_drop, pct, saving
from pipeline.search.storage import T_DUPLICATE_OF
from pipeline.tracking import schema as S
from pipeline.tracking.record import study_from_parent, trial_result

log = logging.getLogger(__name__)

REVIEW_DIR = "review"
ARTIFACT_PRECISION_MAP_PNG = f"{REVIEW_DIR}/precision_map.png"
ARTIFACT_PRECISION_MAP_SVG = f"{REVIEW_DIR}/precision_map.svg"
ARTIFACT_PRECISION_MAP_CSV = f"{REVIEW_DIR}/precision_map.csv"
ARTIFACT_IMPORTANCE_CSV = f"{REVIEW_DIR}/importance.csv"
ARTIFACT_IMPORTANCE_PNG = f"{REVIEW_DIR}/importance.png"
ARTIFACT_ENERGY_TABLE_CSV = f"{REVIEW_DIR}/precision_energy.csv"
ARTIFACT_ENERGY_TABLE_MD = f"{REVIEW_DIR}/precision_energy.md"
NOTE_MARKER = "<!-- precision-search review -->"

FORMAT_ORDER = [f.value for f in ALL_FORMATS]  # fp32, bf16, fp8, int8, int4
# Colour per format (colour-blind-safe Okabe-Ito palette), shared by PNG and HTML.
FORMAT_COLORS = {"fp32": "#999999", "bf16": "#56B4E9", "fp8": "#E69F00", "int8": "#009E73", "int4": "#CC79A7"}
MAX_MAP_TRIALS = 40  # columns in the precision map; larger fronts keep the most accurate


@dataclass
class EnergyRow:
    """One line of the precision energy table."""

    kind: str  # "fp32" | "uniform" | "mixed"
    trial: int
    plan: str
    state: str
    on_front: bool
    accuracy: float | None
    accuracy_delta: float | None  # vs FP32, metric units (sign as the metric: >0 = higher value)
    accuracy_drop: float | None  # sign-adjusted: >0 = worse than FP32
    latency_ms_p50: float | None
    latency_saving_pct: float | None
    joules_per_inference: float | None
    energy_saving_pct: float | None
    energy: str  # "metered (rapl)", "metered (nvml)", "estimated", "not measured"
    size_bytes: float | None
    size_saving_pct: float | None
    execution: str
    backend: str
    device: str

    CSV_FIELDS = ("kind", "trial", "plan", "state", "on_front", "accuracy", "accuracy_delta", "accuracy_drop",
                  "latency_ms_p50", "latency_saving_pct", "joules_per_inference", "energy_saving_pct", "energy",
                  "size_bytes", "size_saving_pct", "execution", "backend", "device")


@dataclass
class Review:
    """What ``write_review`` logged, plus notes on what it could not produce and why."""

    parent_run_id: str
    artifacts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    energy_table: list[EnergyRow] = field(default_factory=list)
    importance: dict[str, float] | None = None
    precision_map: dict[int, dict[str, tuple[str, str]]] = field(default_factory=dict)  # trial -> layer -> (fmt, execution)


# --------------------------------------------------------------------------- precision energy table
def _plan_label(t: TrialRecord, result: dict | None) -> str:
    if t.baseline:
        return t.baseline
    if result and result.get("plan_summary"):
        return str(result["plan_summary"])
    return f"trial {t.number}"


def energy_table(study: StudyRecord, results: dict[int, dict | None], *, higher_is_better: bool = True,
                 max_accuracy_drop: float | None = None, max_mixed: int = 5) -> tuple[list[EnergyRow], list[str]]:
    """Rows: the FP32 baseline, every uniform baseline, then the best mixed plans on the front.

    "Best" mixed plans: front trials that are not uniform baselines, those within
    ``max_accuracy_drop`` first, then by energy (latency where energy was not measured).
    """
    notes = []
    fp32 = study.fp32_baseline
    if fp32 is None:
        notes.append("no completed uniform-fp32 baseline in this study: savings versus FP32 are not computed")

    def row(kind: str, t: TrialRecord) -> EnergyRow:
        acc = t.metric("accuracy")
        ref_acc = fp32.metric("accuracy") if fp32 else t.metric("reference_accuracy")
        ref = (lambda k: fp32.metric(k)) if fp32 else (lambda k: None)  # noqa: E731
        return EnergyRow(
            kind=kind, trial=t.number, plan=_plan_label(t, results.get(t.number)), state=t.state, on_front=t.pareto,
            accuracy=acc, accuracy_delta=(acc - ref_acc) if acc is not None and ref_acc is not None else None,
            accuracy_drop=accuracy_drop(study, t, higher_is_better) if t.complete else None,
            latency_ms_p50=t.metric("latency_ms_p50"),
            latency_saving_pct=saving(ref("latency_ms_p50"), t.metric("latency_ms_p50")),
            joules_per_inference=t.metric("joules_per_inference"),
            energy_saving_pct=saving(ref("joules_per_inference"), t.metric("joules_per_inference")),
            energy=t.energy_label, size_bytes=t.metric("size_bytes"),
            size_saving_pct=saving(ref("size_bytes"), t.metric("size_bytes")),
            execution=t.tags.get(S.TAG_EXECUTION, ""), backend=t.tags.get(S.TAG_BACKEND, ""),
            device=t.tags.get(S.TAG_DEVICE, ""),
        )

    rows = []
    if fp32 is not None:
        rows.append(row("fp32", fp32))

    def fmt_rank(t: TrialRecord) -> int:
        name = (t.baseline or "").removeprefix("uniform-")
        return FORMAT_ORDER.index(name) if name in FORMAT_ORDER else len(FORMAT_ORDER)

    # One row per uniform baseline (the latest completed run of it, or the failed one to show it failed).
    by_name: dict[str, TrialRecord] = {}
    for t in study.uniform_baselines:
        if t.baseline == FP32_BASELINE and fp32 is not None:
            continue
        prev = by_name.get(t.baseline)
        if prev is None or (t.complete and not prev.complete):
            by_name[t.baseline] = t
    rows += [row("uniform", t) for t in sorted(by_name.values(), key=lambda t: (fmt_rank(t), t.number))]

    mixed = [t for t in study.front if not t.baseline]

    def mixed_key(t: TrialRecord):
        drop = accuracy_drop(study, t, higher_is_better)
        over = max_accuracy_drop is not None and drop is not None and drop > max_accuracy_drop
        cost = t.metric("joules_per_inference")
        if cost is None:
            cost = t.metric("latency_ms_p50")
        return (over, math.inf if cost is None else cost, t.number)

    chosen = sorted(mixed, key=mixed_key)[:max_mixed]
    rows += [row("mixed", t) for t in chosen]
    if not mixed:
        notes.append("no mixed-precision plan is on the front: a uniform format is as good on every objective")
    sources = {r.energy for r in rows if r.energy != "not measured"}
    if len(sources) > 1:
        notes.append(f"energy figures come from different sources ({', '.join(sorted(sources))}): compare with care")
    return rows, notes


def _num(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def energy_table_csv(rows: list[EnergyRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(EnergyRow.CSV_FIELDS)
    for r in rows:
        w.writerow(["" if getattr(r, f) is None else getattr(r, f) for f in EnergyRow.CSV_FIELDS])
    return buf.getvalue()


def energy_table_markdown(rows: list[EnergyRow], study: StudyRecord, metric_name: str = "accuracy",
                          notes: list[str] | None = None) -> str:
    backends = sorted({r.backend for r in rows if r.backend}) or ["?"]
    devices = sorted({r.device for r in rows if r.device}) or ["?"]
    lines = [
        f"## Precision energy table: {study.experiment_name} / study {study.study}",
        "",
        f"Measured on `{', '.join(devices)}` with `{', '.join(backends)}`, on each exported artifact. "
        "Savings are versus the FP32 baseline of the same study (positive = saves). "
        "Energy is labelled *metered* (NVML/RAPL counter) or *estimated* (no meter: a model of power, not a measurement).",
        "",
        f"| plan | trial | front | {metric_name} | Δ vs FP32 | latency p50 (ms) | saving | mJ/inference | saving | energy | size (MB) | saving | execution |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.state != "COMPLETE":
            lines.append(f"| {r.plan} | {r.trial} | | {r.state} | | | | | | | | | |")
            continue
        lines.append(
            f"| {'**' + r.plan + '**' if r.kind == 'fp32' else r.plan} | {r.trial} | {'yes' if r.on_front else 'no'} | "
            f"{_num(r.accuracy, '.4f')} | {_num(r.accuracy_delta, '+.4f')} | {_num(r.latency_ms_p50, '.4g')} | "
            f"{pct(r.latency_saving_pct)} | "
            f"{_num(None if r.joules_per_inference is None else r.joules_per_inference * 1e3, '.4g')} | "
            f"{pct(r.energy_saving_pct)} | {r.energy} | {_num(None if r.size_bytes is None else r.size_bytes / 1e6, '.4g')} | "
            f"{pct(r.size_saving_pct)} | {r.execution or 'n/a'} |"
        )
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- precision map
def precision_map(study: StudyRecord, results: dict[int, dict | None], higher_is_better: bool = True,
                  ) -> tuple[list[str], list[TrialRecord], dict[int, dict[str, tuple[str, str, str, str]]]]:
    """(layer names in model order, front trials shown, trial -> layer -> (format, execution, detail, kernel)).

    ``kernel`` is what the runtime was observed to run for the layer ("" where not observed)."""
    front = [t for t in study.front if results.get(t.number) and results[t.number].get("layers")]
    if len(front) > MAX_MAP_TRIALS:
        front = sorted(front, key=lambda t: -(t.metric("accuracy") or -math.inf) * (1 if higher_is_better else -1))
        front = front[:MAX_MAP_TRIALS]
    front = sorted(front, key=lambda t: t.number)
    layers: list[str] = []
    cells: dict[int, dict[str, tuple[str, str, str, str]]] = {}
    for t in front:
        cells[t.number] = {}
        for l in results[t.number]["layers"]:
            if l["name"] not in layers:
                layers.append(l["name"])
            cells[t.number][l["name"]] = (str(l["format"]), str(l.get("execution", "")), str(l.get("detail", "")),
                                          str(l.get("kernel") or ""))
    return layers, front, cells


def _col_label(t: TrialRecord) -> str:
    return f"#{t.number}" + (f"\n{t.baseline.removeprefix('uniform-')}" if t.baseline else "")


def plot_precision_map_png(layers, trials, cells, path: Path | list[Path], title: str) -> None:
    """Layers x front trials, coloured by format, emulated cells hatched; to PNG and/or SVG (both render in
    MLflow's artifact viewer; the kernel per cell is in precision_map.csv)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    import numpy as np

    grid = np.full((len(layers), len(trials)), np.nan)
    for j, t in enumerate(trials):
        for i, name in enumerate(layers):
            cell = cells[t.number].get(name)
            if cell and cell[0] in FORMAT_ORDER:
                grid[i, j] = FORMAT_ORDER.index(cell[0])
    cmap = ListedColormap([FORMAT_COLORS[f] for f in FORMAT_ORDER]).with_extremes(bad="white")
    w = min(2.0 + 0.55 * len(trials), 40)
    h = min(1.8 + 0.28 * len(layers), 60)
    fig, ax = plt.subplots(figsize=(w, h))
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-0.5, vmax=len(FORMAT_ORDER) - 0.5, aspect="auto",
              interpolation="nearest")
    annotate = len(layers) * len(trials) <= 600
    for j, t in enumerate(trials):
        for i, name in enumerate(layers):
            cell = cells[t.number].get(name)
            if not cell:
                continue
            if cell[1] == "emulated":  # hatch emulated cells: the format is stored, not computed
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="black",
                                           linewidth=0))
            if annotate:
                ax.text(j, i, cell[0], ha="center", va="center", fontsize=7, color="black")
    ax.set_xticks(range(len(trials)), [_col_label(t) for t in trials], fontsize=7)
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_xlabel("trials on the Pareto front")
    ax.set_title(title, fontsize=9)
    handles = [Patch(facecolor=FORMAT_COLORS[f], label=f) for f in FORMAT_ORDER]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="///", label="emulated here"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    for p in path if isinstance(path, list) else [path]:
        fig.savefig(p, dpi=120)
    plt.close(fig)


def precision_map_csv(layers, trials, cells) -> str:
    """One row per (layer, front trial): format, native/emulated, the kernel the backend ran, and why."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["layer", "trial", "baseline", "format", "execution", "kernel", "detail"])
    for name in layers:
        for t in trials:
            fmt, exe, detail, kernel = (tuple(cells[t.number].get(name, ())) + ("", "", "", ""))[:4]
            w.writerow([name, t.number, t.baseline or "", fmt, exe, kernel or "", detail or ""])
    return buf.getvalue()


# --------------------------------------------------------------------------- importance
def param_importances(study, metric_index: int) -> dict[str, float]:
    """Optuna's parameter importance for one objective of a (multi-objective) study.

    Optuna 5's default evaluator (PED-ANOVA) ranks what drives the target *low*;
    a maximised objective (accuracy) is negated so the answer is "what drives accuracy up".
    Proposals that repeated a measured plan (``duplicate_of``, told the original's values) are
    left out: counting one measurement several times would weigh its parameters more.
    """
    import optuna
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    sign = -1.0 if study.directions[metric_index] == StudyDirection.MAXIMIZE else 1.0
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    measured = [t for t in trials if t.user_attrs.get(T_DUPLICATE_OF) is None]
    if len(measured) < len(trials):
        view = optuna.create_study(directions=study.directions)  # in memory: the measured trials only
        view.add_trials(measured)
        study = view
    with warnings.catch_warnings():  # its "computes importances for low target values" notice: handled above
        warnings.filterwarnings("ignore", message=".*low `target` values.*")
        # "Some regimes for parameter X have less than 2 trials": every small study; the importance plot's
        # title says how many measured trials it rests on, so the console need not repeat it per parameter
        warnings.filterwarnings("ignore", message=".*have less than 2 trials.*")
        return optuna.importance.get_param_importances(study, target=lambda t: sign * t.values[metric_index])


def plot_importance_png(importances: dict[str, float], path: Path, title: str, metric_name: str = "accuracy") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = list(importances.items())[:40][::-1]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.3 * len(items)))
    ax.barh([k for k, _ in items], [v for _, v in items], color="#0072B2")
    ax.set_xlabel(f"importance for {metric_name} (Optuna, normalised to sum 1)")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- entry point
def write_review(client, parent_run_id: str, *, study=None, metric_name: str = "accuracy",
                 higher_is_better: bool = True, objectives: list[str] | None = None,
                 max_accuracy_drop: float | None = None, max_mixed: int = 5, set_note: bool = True) -> Review:
    """Log the review artifacts on the study's parent run; returns what was written.

    ``study`` (an ``optuna.Study``) is optional: without it the importance view is
    skipped (noted in ``Review.notes``). ``objectives`` are the study's objective
    names in order (``config.search.objectives``), used to find the accuracy
    objective; Optuna's ``study.metric_names`` is used when set.
    Never raises for a missing piece of the record: each view that cannot be
    built is skipped with a note, so a partial study still gets a review.
    """
    record = study_from_parent(client, parent_run_id)
    review = Review(parent_run_id=parent_run_id)
    results: dict[int, dict | None] = {}
    wanted = {t.number for t in record.front} | {t.number for t in record.uniform_baselines if t.complete}
    for t in record.trials:
        if t.number in wanted:
            results[t.number] = trial_result(client, t)
    missing = sorted(n for n in wanted if not results.get(n))
    if missing:
        review.notes.append(f"trials without result.json (left out of the precision map): {missing}")

    title = f"{record.experiment_name} / study {record.study}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / REVIEW_DIR
        out.mkdir()

        # 1. precision energy table
        rows, notes = energy_table(record, results, higher_is_better=higher_is_better,
                                   max_accuracy_drop=max_accuracy_drop, max_mixed=max_mixed)
        review.energy_table, review.notes = rows, review.notes + notes
        (out / "precision_energy.csv").write_text(energy_table_csv(rows))
        md = energy_table_markdown(rows, record, metric_name, notes)
        (out / "precision_energy.md").write_text(md)
        review.artifacts += [ARTIFACT_ENERGY_TABLE_CSV, ARTIFACT_ENERGY_TABLE_MD]

        # 2. precision map of the front
        layers, trials, cells = precision_map(record, results, higher_is_better)
        if trials and layers:
            plot_precision_map_png(layers, trials, cells, [out / "precision_map.png", out / "precision_map.svg"],
                                   f"Per-layer precision: {title}")
            (out / "precision_map.csv").write_text(precision_map_csv(layers, trials, cells))
            review.artifacts += [ARTIFACT_PRECISION_MAP_PNG, ARTIFACT_PRECISION_MAP_SVG, ARTIFACT_PRECISION_MAP_CSV]
            review.precision_map = {t.number: {k: v[:2] for k, v in cells[t.number].items()} for t in trials}
        else:
            review.notes.append("precision map skipped: no front trial has a result.json with layers")

        # 3. importance for the accuracy objective
        if study is None:
            review.notes.append("importance view skipped: no Optuna study given")
        else:
            names = list(getattr(study, "metric_names", None) or objectives or [])
            idx = names.index("accuracy") if "accuracy" in names else 0
            try:
                imp = param_importances(study, idx)
            except Exception as exc:  # noqa: BLE001 - too few trials, constant params, ...: note, don't fail the study
                review.notes.append(f"importance view skipped: {type(exc).__name__}: {exc}")
            else:
                if imp:
                    review.importance = dict(imp)
                    buf = io.StringIO()
                    w = csv.writer(buf)
                    w.writerow(["param", f"importance_for_{metric_name}"])
                    w.writerows([k, f"{v:.6g}"] for k, v in imp.items())
                    (out / "importance.csv").write_text(buf.getvalue())
                    n = sum(1 for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"
                            and t.user_attrs.get(T_DUPLICATE_OF) is None)
                    plot_importance_png(imp, out / "importance.png", f"What drives {metric_name} up: parameter "
                                        f"importance ({title}; from {n} measured trials)", metric_name)
                    review.artifacts += [ARTIFACT_IMPORTANCE_CSV, ARTIFACT_IMPORTANCE_PNG]
                else:
                    review.notes.append("importance view skipped: the study has no varying parameters")

        client.log_artifacts(parent_run_id, str(out), REVIEW_DIR)

    if set_note:
        # The parent run's description (shown on its page in the MLflow UI) becomes the table,
        # unless someone wrote their own description there.
        current = client.get_run(parent_run_id).data.tags.get("mlflow.note.content", "")
        if not current or current.startswith(NOTE_MARKER):
            client.set_tag(parent_run_id, "mlflow.note.content", f"{NOTE_MARKER}\n{md}")
    return review


def review_summary(review: Review) -> dict[str, Any]:
    """JSON-friendly summary (for ``--json`` outputs and logs)."""
    return {"parent_run_id": review.parent_run_id, "artifacts": review.artifacts, "notes": review.notes,
            "rows": [r.__dict__ for r in review.energy_table], "importance": review.importance}


def review_finisher(config):
    """The review as a finisher of :class:`pipeline.search.runner.StudyRunner`: written on the parent run
    when the study ends (``pipeline.cli.search`` hands it in with the tracker)."""

    def finish(tracker, study) -> None:
        write_review(tracker.client, tracker.parent_run_id, study=study, metric_name=config.metric.name,
                     higher_is_better=config.metric.higher_is_better, objectives=list(config.search.objectives),
                     max_accuracy_drop=config.search.max_accuracy_drop)

    finish.__name__ = "write_review"
    return finish
