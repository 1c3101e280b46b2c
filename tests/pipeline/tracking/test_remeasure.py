"""The re-measurement in the MLflow record and in ``precision-search front`` (pipeline.tracking.remeasure).

A real small search through pipeline.tracking.search.run_search (Optuna on SQLite, local Ray, ONNX
Runtime, MLflow on SQLite) with ``measure.remeasure_rounds: 3``: the finisher re-measures the front
and the baselines, the child runs get the re-measured metrics beside their in-search ones, and the
parent run gets the "front vs baselines" table. Nothing is mocked.
"""

from __future__ import annotations

import json
import os

import optuna
import pytest
from mlflow import MlflowClient

from pipeline.search import storage as A
from pipeline.search.records import FP32_BASELINE, build_records, study_objectives
from pipeline.search.remeasure import RemeasureReport, apply_remeasured
from pipeline.tracking import remeasure as R
from pipeline.tracking import schema as S
from tests.conftest import ROOT, TINY_REMEASURE

TINY = {**TINY_REMEASURE, "search.trials": 5}


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    from tests.conftest import _config

    from pipeline.search.runner import SearchOptions
    from pipeline.tracking.search import run_search

    root = tmp_path_factory.mktemp("remeasure-mlflow")
    cfg = _config("digits_mlp.yaml", root / "work", **TINY)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    storage = f"sqlite:///{root / 'optuna.db'}"
    cwd = os.getcwd()
    os.chdir(root)
    try:
        summary = run_search(cfg, SearchOptions(trials=5, study="rm", storage=storage, tracking_uri=uri,
                                                progress="off", parallel=2))
    finally:
        os.chdir(cwd)
    study = optuna.load_study(study_name="rm", storage=storage)
    return cfg, study, summary, MlflowClient(uri)


def _children(client, summary):
    runs = client.search_runs([summary.experiment_id],
                              filter_string=f"tags.`{S.TAG_ROLE}` = '{S.ROLE_TRIAL}'", max_results=100)
    return {int(r.data.tags[S.TAG_TRIAL_NUMBER]): r for r in runs}


def test_child_runs_carry_both_numbers_and_the_final_front(searched):
    cfg, study, summary, client = searched
    report = RemeasureReport.model_validate(study.user_attrs[A.A_REMEASURED])
    assert not report.error
    records = {r.number: r for r in build_records(study, study_objectives(study))}
    children = _children(client, summary)
    for key, v in report.variants.items():
        run = children[int(key)]
        m, tags = run.data.metrics, run.data.tags
        assert m["latency_ms_p50_remeasured"] == pytest.approx(v.latency_ms_p50)
        assert m["latency_spread_remeasured"] >= 0 and m["latency_iqr_ms_remeasured"] >= 0
        # the run's own latency stays the in-search number
        in_search = study.trials[int(key)].user_attrs["result"]["measurement"]["latency_ms_p50"]
        assert m["latency_ms_p50"] == pytest.approx(in_search)
        assert tags[R.TAG_LATENCY_METHOD] == "re-measured interleaved, 3 rounds"
        assert tags[R.TAG_PARETO_IN_SEARCH] == ("true" if records[int(key)].on_front_in_search else "false")
    for n, run in children.items():  # the pareto tags are the final front's
        if records[n].complete:
            assert run.data.tags[S.TAG_PARETO] == ("true" if records[n].on_front else "false")
    assert {r.number for r in summary.front} == {n for n, r in records.items() if r.on_front}


def test_parent_run_has_the_front_vs_baselines_table(searched):
    cfg, study, summary, client = searched
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.tags[R.TAG_LATENCY_METHOD] == "re-measured interleaved, 3 rounds"
    verdict = parent.data.tags[R.TAG_VERDICT]
    assert "in-search" in verdict and "FP32" in verdict
    arts = {a.path for a in client.list_artifacts(summary.parent_run_id, "remeasure")}
    assert {R.ARTIFACT_TABLE_CSV, R.ARTIFACT_TABLE_MD} <= arts
    md = open(client.download_artifacts(summary.parent_run_id, R.ARTIFACT_TABLE_MD)).read()
    assert "re-measured interleaved, 3 rounds" in md and "latency in-search" in md
    for label in ("uniform-fp32", "uniform-int8", "uniform-int4"):
        assert f"| {label} |" in md
    assert any(k.endswith("_vs_fp32_remeasured") for k in parent.data.metrics)


def test_quantization_that_buys_size_but_not_speed_is_said_plainly(searched):
    """Crafted numbers on the real records: FP32 fastest by far, every plan smaller."""
    cfg, study, summary, client = searched
    infos = study_objectives(study)
    data = dict(study.user_attrs[A.A_REMEASURED])
    fp32 = next(t.number for t in study.trials if t.user_attrs.get(A.T_BASELINE) == FP32_BASELINE)
    data["variants"] = {k: dict(v, latency_ms_p50=(1.0 if k == str(fp32) else 5.0), latency_ms_q25=(
        0.9 if k == str(fp32) else 4.0), latency_ms_q75=(1.1 if k == str(fp32) else 6.0))
        for k, v in data["variants"].items()}
    records = build_records(study, infos)
    for r in records:
        r.on_front, r.values = bool(r.on_front_in_search), dict(r.values_in_search or r.values)
    assert apply_remeasured(records, infos, data)
    # knee computed as build_records does
    from pipeline.pareto import knee_point

    front = [r for r in records if r.on_front]
    for r in records:
        r.knee = False
    front[knee_point([[r.values[o.name] for o in infos] for r in front], [o.direction for o in infos])].knee = True
    c = R.comparison(records, RemeasureReport.model_validate(data))
    text = "\n".join(c.sentences)
    assert fp32 in {r.number for r in front}
    assert "FP32 (#%d) is the fastest plan on the front" % fp32 in text
    if any(r.on_front and r.number != fp32 for r in records):  # a smaller plan on the front: said plainly
        assert "buys size here but not speed" in text and "0.20x its speed" in text
        assert "only size" in text


def test_front_cli_shows_both_numbers(searched, capsys):
    cfg, study, summary, client = searched
    from pipeline.cli import main

    storage = study._storage  # noqa: SLF001 - the same SQLite file
    url = storage.url if hasattr(storage, "url") else None
    args = ["front", "--config", str(ROOT / "search_spaces" / "digits_mlp.yaml"), "--study", "rm",
            "--storage", url or summary.storage, "--set", "measure.remeasure_rounds=3"]
    for k, v in TINY.items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    capsys.readouterr()
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["latency_method"] == "re-measured interleaved, 3 rounds"
    assert out["remeasure"] and all(r["remeasured"] for r in out["rows"])
    assert all(r["values_in_search"] for r in out["rows"])
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "re-measured" in text and "in-search" in text


def test_front_is_judged_against_the_runtimes_one_liner(searched):
    """ORT's quantize_dynamic is built from the reference, scored on the eval set and timed in the same rounds."""
    cfg, study, summary, client = searched
    report = RemeasureReport.model_validate(study.user_attrs[A.A_REMEASURED])
    assert [p.label for p in report.peers] == ["ORT quantize_dynamic (one-liner)"]
    peer = report.peers[0]
    assert not peer.error and peer.size_bytes > 0 and 0 < peer.accuracy <= 1
    assert peer.feasible == (peer.accuracy_drop <= cfg.search.max_accuracy_drop + 1e-12)
    assert peer.key not in report.variants  # variants are trials; the peer's timing travels with it
    stats = peer.stats
    assert stats.latency_ms_p50 > 0 and len(stats.round_medians) == 3
    assert peer.key in report.order  # timed inside the interleaving, not after it
    md = open(client.download_artifacts(summary.parent_run_id, R.ARTIFACT_TABLE_MD)).read()
    assert "| ORT quantize_dynamic (one-liner) | - | peer |" in md
    verdict = client.get_run(summary.parent_run_id).data.tags[R.TAG_VERDICT]
    assert "the runtime's one-liner ORT quantize_dynamic (one-liner)" in verdict
    assert any(k.endswith("_speedup_vs_peer_remeasured") for k in client.get_run(summary.parent_run_id).data.metrics)


def test_search_summary_carries_the_verdict(searched):
    """What `make search` prints at the end: the comparison's sentences, the one-liner's included."""
    cfg, study, summary, client = searched
    assert summary.verdict == study.user_attrs[A.A_VERDICT]
    assert any("the runtime's one-liner" in s for s in summary.verdict)
    assert summary.verdict[0].startswith("latency: re-measured interleaved")
