"""The interleaved re-measurement after a search (pipeline.search.remeasure), on real artifacts.

One real small search of the digits MLP (Optuna on SQLite, local Ray, the ONNX quantizer, ONNX
Runtime), with the re-measurement as its finisher (it runs as a Ray task while Ray is up). Nothing
is mocked: the timer in the interleaving test wraps the real one only to record which session
each timing window ran on.
"""

from __future__ import annotations

import os
import time

import numpy as np
import optuna
import pytest

from pipeline.measure import time_batches
from pipeline.search import storage as A
from pipeline.search.records import FP32_BASELINE, build_records, study_objectives
from pipeline.search.remeasure import (
    RemeasureReport,
    Variant,
    apply_remeasured,
    remeasure_artifacts,
    remeasure_study,
    round_order,
)
from pipeline.search.runner import SearchOptions, run_search
from tests.conftest import TINY_REMEASURE

TINY = TINY_REMEASURE
TRIALS = 5  # 3 uniform baselines + 2 sampled plans


def _dominates(a, b, dirs):
    ge = all((x >= y) if d == "maximize" else (x <= y) for x, y, d in zip(a, b, dirs))
    gt = any((x > y) if d == "maximize" else (x < y) for x, y, d in zip(a, b, dirs))
    return ge and gt


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    from tests.conftest import _config

    root = tmp_path_factory.mktemp("remeasure-search")
    cfg = _config("digits_mlp.yaml", root / "work", **TINY, **{"search.trials": TRIALS})
    storage = f"sqlite:///{root / 'optuna.db'}"
    reports = []
    cwd = os.getcwd()
    os.chdir(root)
    try:
        summary = run_search(cfg, SearchOptions(trials=TRIALS, study="rm", storage=storage, progress="off",
                                                parallel=2),
                             finishers=(lambda tracker, study: reports.append(remeasure_study(cfg, study)),))
    finally:
        os.chdir(cwd)
    study = optuna.load_study(study_name="rm", storage=storage)
    return cfg, study, summary, reports[0]


def _slot(infos):
    return next(o.name for o in infos if o.source == "latency")


def test_round_order_alternates_and_never_repeats_at_a_boundary():
    assert round_order(["a", "b"], 4) == [["a", "b"]] * 4
    rounds = round_order(["a", "b", "c"], 5)
    flat = [k for r in rounds for k in r]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert all(x != y for x, y in zip(flat, flat[1:]))
    assert [r[0] for r in rounds[:3]] == ["a", "b", "c"]  # no variant always goes first


def test_the_search_stores_the_report_for_the_front_and_every_baseline(searched):
    cfg, study, summary, report = searched
    assert report is not None and not report.error, report
    stored = RemeasureReport.model_validate(study.user_attrs[A.A_REMEASURED])
    assert stored.variants.keys() == report.variants.keys()
    assert stored.label == "re-measured interleaved, 3 rounds"
    baselines = {t.number for t in study.trials if t.user_attrs.get(A.T_BASELINE) and t.state.name == "COMPLETE"}
    assert baselines and baselines <= {int(k) for k in report.variants}
    records = build_records(study, study_objectives(study))
    assert {r.number for r in records if r.on_front_in_search} <= {int(k) for k in report.variants}
    assert report.backend == "ort-cpu" and report.threads >= 1
    for v in report.variants.values():
        assert not v.error
        assert len(v.round_medians) == 3 and v.runs == 3 * report.runs_per_round
        assert v.latency_ms_q25 <= v.latency_ms_p50 <= v.latency_ms_q75
        assert v.latency_ms_round_min <= v.latency_ms_round_max
    # The recorded order of timing windows alternates: each round times every variant once.
    # The runtime's one-liner (pipeline.search.peers) is timed in the same rounds as the trials.
    timed = sorted([*report.variants, *(p.key for p in report.peers if not p.error)])
    n = len(timed)
    assert len(report.order) == 3 * n and len(report.peers) == 1
    for i in range(3):
        assert sorted(report.order[i * n:(i + 1) * n]) == timed
    assert all(a != b for a, b in zip(report.order, report.order[1:]))


def test_final_front_and_knee_are_decided_on_the_remeasured_numbers(searched):
    cfg, study, summary, report = searched
    infos = study_objectives(study)
    slot = _slot(infos)
    records = build_records(study, infos)
    by_number = {t.number: t for t in study.trials}
    for r in records:
        v = report.variants.get(str(r.number))
        if v is None or not r.complete:
            assert not r.remeasured and not r.on_front  # the final front is decided among the re-measured
            continue
        # re-measured value in the objective slot; the in-search one kept, labelled, unchanged
        assert r.remeasured == "re-measured interleaved, 3 rounds"
        assert r.values[slot] == pytest.approx(v.latency_ms_p50)
        told = dict(zip([o.name for o in infos], by_number[r.number].values))
        assert r.values_in_search == pytest.approx(told)
        assert r.metrics["latency_ms_p50"] == pytest.approx(by_number[r.number].user_attrs["result"]["measurement"]["latency_ms_p50"])
        assert r.metrics["latency_ms_p50_remeasured"] == pytest.approx(v.latency_ms_p50)
        assert r.on_front_in_search is not None
    pool = [r for r in records if r.remeasured and r.feasible is not False]
    dirs = [o.direction for o in infos]
    expected = {r.number for r in pool
                if not any(_dominates([q.values[o.name] for o in infos], [r.values[o.name] for o in infos], dirs)
                           for q in pool if q is not r)}
    assert {r.number for r in records if r.on_front} == expected
    assert sum(r.knee for r in records) == 1 and next(r for r in records if r.knee).on_front
    # the runner's summary is the final front too
    assert {r.number for r in summary.front} == expected


def test_crafted_numbers_move_the_front(searched):
    """Give FP32 the best latency by far: every plan that is not smaller than FP32 leaves the front."""
    cfg, study, summary, report = searched
    infos = study_objectives(study)
    data = report.model_dump(mode="json")
    fp32 = next(t.number for t in study.trials if t.user_attrs.get(A.T_BASELINE) == FP32_BASELINE)
    for k, v in data["variants"].items():
        v["latency_ms_p50"] = 0.001 if int(k) == fp32 else 1000.0 + int(k)
    records = build_records(study, infos)  # (with the stored report) then re-applied with the crafted one
    for r in records:
        r.on_front = bool(r.on_front_in_search)
        r.values = dict(r.values_in_search or r.values)
    assert apply_remeasured(records, infos, data)
    front = {r.number for r in records if r.on_front}
    assert fp32 in front
    size = next(o.name for o in infos if o.source == "size")
    fp32_size = next(r for r in records if r.number == fp32).values[size]
    assert all(r.values[size] < fp32_size for r in records if r.on_front and r.number != fp32)


def test_a_report_older_than_the_study_is_not_applied(searched):
    cfg, study, summary, report = searched
    infos = study_objectives(study)
    data = report.model_dump(mode="json")
    data["through_trial"] = -1
    records = build_records(study, infos)
    for r in records:
        r.on_front, r.values = bool(r.on_front_in_search), dict(r.values_in_search or r.values)
    before = {r.number for r in records if r.on_front}
    assert not apply_remeasured(records, infos, data)
    assert {r.number for r in records if r.on_front} == before


def test_interleaving_of_real_sessions_is_recorded(searched):
    """The timer is the real one; wrapping it records which session each window ran on."""
    cfg, study, summary, report = searched
    results = {t.number: t.user_attrs["result"] for t in study.trials if t.user_attrs.get(A.T_BASELINE)}
    variants = [Variant(str(n), f"#{n}", r["artifact_path"]) for n, r in sorted(results.items())]
    calls = []

    gaps, last_end = [], [None]

    def timer(session, feeds, warmup, runs):
        calls.append((id(session), runs))
        if last_end[0] is not None:
            gaps.append(time.perf_counter() - last_end[0])
        out = time_batches(session, feeds, warmup, runs)
        last_end[0] = time.perf_counter()
        return out

    got = remeasure_artifacts(cfg.model_copy(update={"measure": cfg.measure.model_copy(
        update={"remeasure_rounds": 4})}), variants, threads=1, timer=timer)
    n = len(variants)
    warm, timed = calls[:n], calls[n:]
    assert all(runs == 1 for _, runs in warm) and len({s for s, _ in warm}) == n
    seq = [s for s, _ in timed]
    assert len(seq) == 4 * n and all(a != b for a, b in zip(seq, seq[1:]))
    key_of = dict(zip(seq, got.order))
    assert [key_of[s] for s in seq] == got.order and len(set(key_of.values())) == n
    assert all(np.isfinite(v.latency_ms_p50) and len(v.round_medians) == 4 for v in got.variants.values())
    # each timed window waits for the previous session's ORT threads to stop spinning (they steal the cores)
    from pipeline.measure import SETTLE_S

    assert min(gaps[n - 1:]) >= SETTLE_S


def test_switched_off(searched):
    cfg, study, summary, report = searched
    off = cfg.model_copy(update={"measure": cfg.measure.model_copy(update={"remeasure_rounds": 0})})
    assert remeasure_study(off, study) is None


def test_energy_windows_follow_each_timing_window(searched):
    """A meter's window runs right after the same variant's timing window, every round (the real
    CPU-time estimate stands in for RAPL/NVML, which this machine does not expose)."""
    from pipeline.evaluation import Evaluator
    from pipeline.measure import measure_energy
    from pipeline.search.remeasure import interleave, variant_stats

    cfg, study, summary, report = searched
    ecfg = cfg.model_copy(deep=True)
    ecfg.measure.energy.meter = "estimated"
    ev = Evaluator(ecfg)
    arts = [t.user_attrs["result"]["artifact_path"] for t in study.trials if t.user_attrs.get(A.T_BASELINE)][:2]
    sessions = {str(i): ev.backend.open(a, 1) for i, a in enumerate(arts)}
    feeds = ev.eval_set.fixed_batch(cfg.measure.batch_size)
    events = []

    def timer(session, feeds, warmup, runs):
        events.append(("time", id(session)))
        return time_batches(session, feeds, warmup, runs)

    def energy(session):
        events.append(("energy", id(session)))
        return measure_energy(ecfg, ev.backend, session, feeds).joules_per_inference

    got = interleave(sessions, feeds, rounds=2, runs_per_round=3, warmup=1, timer=timer, energy=energy)
    timed = events[2:]  # after one warm-up call per session
    assert [k for k, _ in timed] == ["time", "energy"] * 4
    assert all(timed[i][1] == timed[i + 1][1] for i in range(0, 8, 2))
    stats = variant_stats("0", "#0", got.times["0"], got.joules["0"], "metered (test)")
    assert stats.joules_min <= stats.joules_per_inference <= stats.joules_max and len(got.joules["0"]) == 2


def test_the_baselines_are_retimed_interleaved_for_the_seeds_speed_ratios(searched):
    """retime_baselines (before the speed-aware seeds are solved): every completed baseline, timed in one
    interleaving, no one-liner; switched off with the final re-measurement, and then it says why."""
    from pipeline.search.remeasure import retime_baselines

    cfg, study, summary, report = searched
    labels = {t.user_attrs[A.T_BASELINE] for t in study.get_trials() if t.user_attrs.get(A.T_BASELINE)
              and t.state is optuna.trial.TrialState.COMPLETE}
    got = retime_baselines(cfg, study)
    assert not got.error and set(got.latency_ms) == labels and len(labels) >= 2
    assert all(v > 0 for v in got.latency_ms.values())
    assert got.method.startswith(f"re-measured interleaved, {cfg.measure.remeasure_rounds} rounds")
    off = cfg.model_copy(update={"measure": cfg.measure.model_copy(update={"remeasure_rounds": 0})})
    none = retime_baselines(off, study)
    assert none.latency_ms == {} and "remeasure_rounds is 0" in none.error
