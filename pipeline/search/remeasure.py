"""Latency you can trust: after the search, time the front and the uniform baselines again, interleaved.

Why: on a shared machine one in-search timing can be off several-fold (two trials
that differed only in a classifier head measured 160.6 vs 13.7 ms), so noise,
not the plan, decides which trials reach the front. Here every candidate is
opened once in one process and timed in rounds, alternating between the
variants (A B C, B C A, ...), so slow phases of the machine hit all of them
alike; each variant gets the median over all its timed runs and the spread (IQR
of the runs, min-max of the per-round medians). On a metered backend (RAPL/NVML)
energy is measured the same way; an estimated meter (CPU time x watts) follows
latency, so its figure is scaled with the re-measured latency and labelled so.

What is re-measured (:func:`candidates`): the in-search front, every completed
uniform baseline (FP32 and each format: the simple plans the front must beat),
and the trials non-dominated on the objectives that timing noise cannot touch
(accuracy, size, ...), since noise may have pushed one of them off the front.
The final front and the knee are then decided among those on the re-measured
numbers (:func:`apply_remeasured`, called by
:func:`pipeline.search.records.build_records`); the in-search values are kept
beside them (``TrialRecord.values_in_search``).

The measurement itself (:func:`interleave`, :func:`remeasure_artifacts`) is pure:
artifacts in, per-variant statistics out. It runs where the trials ran: one Ray
task with a trial's resources when Ray is up (on the same backend; a different
backend there is an error, not a silent switch), else in this process.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel

from pipeline.pareto import dominates
from pipeline.search import storage as A
from pipeline.search.remeasured import (  # noqa: F401 - the report types, re-exported
    IN_SEARCH_LABEL,
    NOISY_SOURCES,
    RemeasureReport,
    VariantStats,
    apply_remeasured,
    method_label,
)

if TYPE_CHECKING:
    from pipeline.backends.base import Session
    from pipeline.objectives import ObjectiveInfo
    from pipeline.search.records import TrialRecord

METERED = ("rapl", "nvml")
MAX_VARIANTS = 32  # re-measured at most (baselines and the in-search front come first)
MIN_RUNS_PER_ROUND = 3


@dataclass(frozen=True)
class Variant:
    key: str  # the Optuna trial number, as a string (JSON keys)
    label: str  # "#12" or "#0 (uniform-fp32)"
    artifact: str


# -- the measurement --------------------------------------------------------------------------------
def round_order(keys: Sequence[str], rounds: int) -> list[list[str]]:
    """Round r starts r places further along (A B C, B C A, C A B, ...): no variant always runs first
    or always follows the same one, and no variant is timed twice in a row across a round boundary."""
    keys = list(keys)
    out: list[list[str]] = []
    for r in range(rounds):
        shift = r % len(keys) if keys else 0
        order = keys[shift:] + keys[:shift]
        if out and len(keys) > 1 and order[0] == out[-1][-1]:
            order = order[1:] + order[:1]
        out.append(order)
    return out


@dataclass
class Interleaved:
    times: dict[str, list[np.ndarray]] = field(default_factory=dict)  # key -> per-round run times (ms)
    joules: dict[str, list[float]] = field(default_factory=dict)  # key -> per-round J/inference (metered)
    order: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


Timer = Callable[["Session", dict, int, int], np.ndarray]  # (session, feeds, warmup, runs) -> ms per run


def interleave(sessions: dict[str, "Session"], feeds: dict[str, np.ndarray], rounds: int, runs_per_round: int,
               warmup: int, timer: Timer | None = None,
               energy: Callable[["Session"], float] | None = None) -> Interleaved:
    """Time every session ``rounds`` times, alternating between them; a pause (:func:`pipeline.measure.settle`:
    the previous session's ORT threads spin for a while after its run) and one untimed run before each window.

    ``timer`` defaults to :func:`pipeline.measure.time_batches` (host timing around a synchronised
    run, or the session's own device timer). ``energy`` (a metered backend only) returns J/inference
    for one window on a session; it runs right after that session's timing window.
    A variant that raises is dropped from later rounds with its error; the others go on.
    """
    from pipeline.measure import settle

    if timer is None:
        from pipeline.measure import time_batches as timer
    out = Interleaved()
    live = dict(sessions)
    for key, session in list(live.items()):  # warm every session once before the first round
        try:
            timer(session, feeds, warmup, 1)
        except Exception as exc:  # noqa: BLE001 - one broken artifact must not stop the others
            out.errors[key] = f"{type(exc).__name__}: {exc}"
            live.pop(key)
    for order in round_order(list(live), rounds):
        for key in order:
            if key not in live:
                continue
            try:
                out.order.append(key)
                if len(live) > 1:
                    settle()  # the previous variant's threads stop spinning first (pipeline.measure.SETTLE_S)
                out.times.setdefault(key, []).append(np.asarray(timer(live[key], feeds, 1, runs_per_round), float))
                if energy is not None:
                    out.joules.setdefault(key, []).append(float(energy(live[key])))
            except Exception as exc:  # noqa: BLE001
                out.errors[key] = f"{type(exc).__name__}: {exc}"
                live.pop(key)
    return out


def variant_stats(key: str, label: str, times: list[np.ndarray], joules: list[float] | None = None,
                  energy: str = "not measured") -> VariantStats:
    """Median and spread: the median and IQR over all timed runs, and min-max of the per-round medians."""
    if not times:
        return VariantStats(key=key, label=label, energy=energy, error="no timed round")
    pooled = np.concatenate(times)
    medians = [float(np.median(t)) for t in times]
    q25, p50, q75 = (float(v) for v in np.percentile(pooled, [25, 50, 75]))
    stats = VariantStats(key=key, label=label, latency_ms_p50=p50, latency_ms_q25=q25, latency_ms_q75=q75,
                         latency_ms_round_min=min(medians), latency_ms_round_max=max(medians),
                         round_medians=medians, runs=int(pooled.size), energy=energy)
    if joules:
        stats.joules_per_inference = float(np.median(joules))
        stats.joules_min, stats.joules_max = float(min(joules)), float(max(joules))
    return stats


def runs_per_round(config) -> int:
    """About as many timed runs per variant as one in-search measurement (``measure.runs``), spread over the rounds."""
    rounds = max(1, config.measure.remeasure_rounds)
    return max(MIN_RUNS_PER_ROUND, math.ceil(config.measure.runs / rounds))


def remeasure_artifacts(config, variants: Sequence[Variant], threads: int, energy_source: str = "",
                        evaluator=None, timer: Timer | None = None) -> RemeasureReport:
    """Open every variant's artifact on the config's backend and time them interleaved (see module doc).

    Holds the node's measurement lock for the whole interleaving: nothing else is timed meanwhile.
    """
    from pipeline.evaluation import Evaluator
    from pipeline.measure import exclusive_measurement, measure_energy

    cfg = config
    rounds = cfg.measure.remeasure_rounds
    ev = evaluator or Evaluator(cfg)
    feeds = ev.eval_set.fixed_batch(cfg.measure.batch_size)
    metered = energy_source in METERED
    report = RemeasureReport(rounds=rounds, runs_per_round=runs_per_round(cfg), warmup=cfg.measure.warmup,
                             backend=ev.backend.name, device=ev.backend.device(), threads=threads,
                             batch_size=cfg.measure.batch_size, energy_source=energy_source or "none")
    if metered:
        report.energy_note = f"energy metered by {energy_source}, one window per variant per round, interleaved"
        ecfg = cfg.model_copy(deep=True)
        ecfg.measure.energy.meter = energy_source  # the study's pinned source, or a clear failure
    elif energy_source == "estimated":
        report.energy_note = ("energy is estimated here (CPU time x watts, no RAPL/NVML meter): it follows latency, "
                              "so the in-search estimate is scaled by the re-measured / in-search latency ratio")
    sessions, errors = {}, {}
    for v in variants:
        try:
            sessions[v.key] = ev.backend.open(v.artifact, threads)
        except Exception as exc:  # noqa: BLE001 - e.g. the artifact was deleted since the trial
            errors[v.key] = f"could not open {v.artifact}: {type(exc).__name__}: {exc}"
    energy = None
    if metered:
        def energy(session):  # noqa: E306
            return measure_energy(ecfg, ev.backend, session, feeds).joules_per_inference
    t0 = time.perf_counter()
    with exclusive_measurement(ev._lock_path()) as waited:
        got = interleave(sessions, feeds, rounds, report.runs_per_round, cfg.measure.warmup, timer, energy)
    report.seconds, report.lock_wait_s, report.order = time.perf_counter() - t0, waited, got.order
    errors.update(got.errors)
    label = "metered (" + energy_source + ")" if metered else (
        "estimated, follows latency" if energy_source == "estimated" else "not measured")
    for v in variants:
        stats = variant_stats(v.key, v.label, got.times.get(v.key, []), got.joules.get(v.key), label)
        if v.key in errors:
            stats = VariantStats(key=v.key, label=v.label, energy=label, error=errors[v.key])
        report.variants[v.key] = stats
    return report


# -- the study side: what to re-measure, where, and storing it ----------------------------------------
def candidates(records: Sequence["TrialRecord"], infos: Sequence["ObjectiveInfo"],
               artifacts: dict[int, str], limit: int = MAX_VARIANTS) -> list[Variant]:
    """Uniform baselines, the in-search front, then trials non-dominated on the noise-free objectives."""
    done = [r for r in records if r.complete and r.duplicate_of is None and r.number in artifacts]
    quiet = [o for o in infos if o.source not in NOISY_SOURCES]
    feasible = [r for r in done if r.feasible is not False]
    robust = set()
    if quiet:
        pts = {r.number: [r.values[o.name] for o in quiet] for r in feasible if all(o.name in r.values for o in quiet)}
        dirs = [o.direction for o in quiet]
        robust = {n for n, p in pts.items() if not any(dominates(q, p, dirs) for m, q in pts.items() if m != n)}
    front = {r.number for r in done if (r.on_front_in_search if r.on_front_in_search is not None else r.on_front)}
    picked = sorted({r.number for r in done if r.baseline}) + sorted(front - {r.number for r in done if r.baseline})
    picked += sorted(robust - set(picked))
    by_number = {r.number: r for r in done}
    return [Variant(str(n), by_number[n].label, artifacts[n]) for n in picked[:limit]]


def remeasure_task(payload: dict[str, Any], shared: list | None = None) -> dict[str, Any]:
    """The re-measurement as one Ray task (or inline): plain data in, ``RemeasureReport`` dump out.

    ``files`` (variant key -> file name -> bytes) carries the artifacts when the task runs on
    another node than the driver; they are written to a temporary folder there first.
    ``shared`` (``[ObjectRef]`` of the search's reference bundle, :mod:`pipeline.search.payload`): the eval
    batch comes from it, as the trials' did, so this task never calls the user's data functions or reads
    the driver's files; without it (no Ray, or a study re-measured outside its search) it loads them here.
    """
    from pipeline.search.worker import evaluator_for

    if payload.get("cwd") and Path(payload["cwd"]).is_dir():
        os.chdir(payload["cwd"])
    ev = evaluator_for(payload["config"], payload["base_dir"], payload.get("cwd", ""),
                       "the study's config (re-measurement)", shared)
    cfg = ev.config
    variants = [Variant(**v) for v in payload["variants"]]
    with tempfile.TemporaryDirectory(prefix="remeasure-") as tmp:
        if payload.get("files"):
            moved = []
            for v in variants:
                folder = Path(tmp) / v.key
                folder.mkdir()
                for name, blob in payload["files"].get(v.key, {}).items():
                    (folder / name).write_bytes(blob)
                moved.append(Variant(v.key, v.label, str(folder / Path(v.artifact).name)))
            variants = moved
        # The runtime's one-liner, scored on the eval set and timed in the same interleaving: the yardstick
        # the report judges the front by (pipeline.search.peers). Not for the baselines' re-timing before
        # seeding (retime_baselines): that only orders the formats.
        from pipeline.search.peers import build_peers

        peers = build_peers(ev, Path(ev.reference.onnx_path).parent / "peers") if payload.get("peers", True) else []
        variants += [Variant(p.key, p.label, p.artifact) for p in peers if not p.error]
        report = remeasure_artifacts(cfg, variants, int(payload["threads"]), payload.get("energy_source", ""),
                                     evaluator=ev)
        for p in peers:  # their timing travels with them: report.variants holds trials only
            p.stats = report.variants.pop(p.key, None)
        report.peers = peers
    return report.model_dump(mode="json")


def _artifact_files(path: str) -> dict[str, bytes]:
    art = Path(path)
    return {p.name: p.read_bytes() for p in sorted(art.parent.glob(art.stem + "*")) if p.is_file()}


def remeasure_study(config, study, infos: Sequence["ObjectiveInfo"] | None = None) -> RemeasureReport | None:
    """Re-measure the study's candidates and store the report on the study (``remeasured``).

    Returns None when it is switched off (``measure.remeasure_rounds: 0``) or there is nothing
    to compare (fewer than two candidates). Runs as one Ray task with a trial's CPUs/GPU when Ray
    is up, so it lands on the kind of node the trials used; else in this process.
    """
    from pipeline.results import TrialResult
    from pipeline.search.records import build_records, study_objectives

    if config.measure.remeasure_rounds <= 0:
        return None
    infos = list(infos) if infos is not None else study_objectives(study, config.metric.name)
    records = build_records(study, infos)
    results: dict[int, TrialResult] = {}
    for t in study.get_trials(deepcopy=False):
        raw = t.user_attrs.get(A.T_RESULT)
        if raw:
            try:
                results[t.number] = TrialResult.model_validate(raw)
            except Exception:  # noqa: BLE001 - a record from another version: not re-measured
                pass
    artifacts = {n: r.artifact_path for n, r in results.items() if r.artifact_path and Path(r.artifact_path).is_file()}
    chosen = candidates(records, infos, artifacts)
    if len(chosen) < 2:
        return None
    measured = [results[int(v.key)].measurement for v in chosen]
    threads = Counter(m.threads for m in measured).most_common(1)[0][0]
    backends = {m.backend for m in measured}
    energy_source = study.user_attrs.get(A.A_ENERGY_SOURCE) or "none"
    payload = {"config": config.model_dump(mode="json"), "base_dir": str(config.base_dir.resolve()),
               "cwd": os.getcwd(), "variants": [v.__dict__ for v in chosen], "threads": threads,
               "energy_source": energy_source}
    try:
        raw = _run(payload, backends, config)
        report = RemeasureReport.model_validate(raw)
        if backends and report.backend not in backends:
            report.error = (f"re-measured on {report.backend}, but the trials ran on {sorted(backends)}: not "
                            f"comparable, so the in-search numbers stand (run the search where {sorted(backends)} is)")
    except Exception as exc:  # noqa: BLE001 - the search's own numbers stand
        report = RemeasureReport(rounds=config.measure.remeasure_rounds, runs_per_round=runs_per_round(config),
                                 warmup=config.measure.warmup, error=f"{type(exc).__name__}: {exc}")
    report.through_trial = max((t.number for t in study.get_trials(deepcopy=False)), default=-1)
    study.set_user_attr(A.A_REMEASURED, report.model_dump(mode="json"))
    return report


@dataclass(frozen=True)
class BaselineRetiming:
    """The uniform baselines timed again, interleaved, before the speed-aware seeds are solved:
    p50 latency (ms) per baseline label, and how (``method``), or why not (``error``: the in-search
    p50s stand)."""

    latency_ms: dict[str, float]
    method: str = ""
    error: str = ""


def retime_baselines(config, study) -> BaselineRetiming:
    """Time the finished uniform baselines' artifacts again, interleaved (:func:`remeasure_artifacts`, as
    one Ray task where the trials ran, without the one-liner), so the formats' speed ratios the seeds are
    solved with come from one interleaving, not from in-search timings taken at different moments on a
    shared machine (where one can be off several-fold and mis-order two formats). ``measure.remeasure_rounds:
    0`` switches it off with the final re-measurement."""
    from pipeline.results import TrialResult

    rounds = config.measure.remeasure_rounds
    if rounds <= 0:
        return BaselineRetiming({}, error="measure.remeasure_rounds is 0")
    variants, measured = [], []
    for t in study.get_trials(deepcopy=False):
        label, raw = t.user_attrs.get(A.T_BASELINE), t.user_attrs.get(A.T_RESULT)
        if not label or t.state.name != "COMPLETE" or not raw:
            continue
        try:
            result = TrialResult.model_validate(raw)
        except Exception:  # noqa: BLE001 - a record from another version: its in-search p50 stands
            continue
        if result.artifact_path and Path(result.artifact_path).is_file():
            variants.append(Variant(str(t.number), label, result.artifact_path))
            measured.append(result.measurement)
    if len(variants) < 2:
        return BaselineRetiming({}, error="fewer than two baseline artifacts on this machine")
    threads = Counter(m.threads for m in measured).most_common(1)[0][0]
    payload = {"config": config.model_dump(mode="json"), "base_dir": str(config.base_dir.resolve()),
               "cwd": os.getcwd(), "variants": [v.__dict__ for v in variants], "threads": threads,
               "energy_source": "", "peers": False}
    try:
        report = RemeasureReport.model_validate(_run(payload, {m.backend for m in measured}, config))
    except Exception as exc:  # noqa: BLE001 - the in-search p50s stand
        return BaselineRetiming({}, error=f"{type(exc).__name__}: {exc}")
    if report.backend not in {m.backend for m in measured}:
        return BaselineRetiming({}, error=f"re-timed on {report.backend}, not where the baselines ran")
    got = {v.label: report.variants[v.key].latency_ms_p50 for v in variants
           if v.key in report.variants and not report.variants[v.key].error and report.variants[v.key].latency_ms_p50}
    return BaselineRetiming(got, method=f"{report.label}, {report.seconds:.1f} s")


def _run(payload: dict[str, Any], backends: set[str], config=None) -> dict[str, Any]:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return remeasure_task(payload)
    if not ray.is_initialized():
        return remeasure_task(payload)
    from pipeline.backends.registry import needs_gpu
    from pipeline.search.ray_exec import shared_for

    shared = shared_for(config) if config is not None else None

    gpus = 1.0 if any(needs_gpu(b) for b in backends if b) else 0.0
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:  # it may run on another node: ship the artifacts
        payload = dict(payload, files={v["key"]: _artifact_files(v["artifact"]) for v in payload["variants"]})
    cpus = max(1.0, min(float(payload["threads"]), float(ray.cluster_resources().get("CPU", 1))))
    task = ray.remote(max_retries=0)(remeasure_task).options(num_cpus=cpus, num_gpus=gpus, name="remeasure")
    # Nested in a list, the bundle is passed as a reference (as to the trials): a worker that ran trials
    # already holds it (pipeline.search.worker.evaluator_for caches the Evaluator per config and bundle).
    return ray.get(task.remote(payload, [shared] if shared is not None else None))


# -- the final front on the re-measured numbers ---------------------------------------------------------
