"""Review artifacts on a study's parent run, from a real tiny search (shared with promotion/test_promotion)."""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

import pytest

from pipeline.tracking import schema as S
from tests.pipeline.promotion.test_promotion import Searched, tiny_search


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> Searched:
    return tiny_search(tmp_path_factory.getbasetemp() / "tiny-search")


@pytest.fixture(scope="module")
def review(searched):
    from pipeline.tracking.review import write_review

    client = searched.client()
    return write_review(client, searched.parent_run_id, study=searched.optuna_study(),
                        max_accuracy_drop=searched.config().search.max_accuracy_drop)


def _text(client, run_id: str, path: str, dst: Path) -> str:
    return Path(client.download_artifacts(run_id, path, str(dst))).read_text()


def test_review_artifacts_are_logged_on_the_parent_run(searched, review, tmp_path):
    from pipeline.tracking.review import (
        ARTIFACT_ENERGY_TABLE_CSV,
        ARTIFACT_ENERGY_TABLE_MD,
        ARTIFACT_IMPORTANCE_CSV,
        ARTIFACT_IMPORTANCE_PNG,
        ARTIFACT_PRECISION_MAP_CSV,
        ARTIFACT_PRECISION_MAP_PNG,
        ARTIFACT_PRECISION_MAP_SVG,
        REVIEW_DIR,
    )

    client = searched.client()
    logged = {f.path for f in client.list_artifacts(searched.parent_run_id, REVIEW_DIR)}
    expected = {ARTIFACT_ENERGY_TABLE_CSV, ARTIFACT_ENERGY_TABLE_MD, ARTIFACT_PRECISION_MAP_PNG,
                ARTIFACT_PRECISION_MAP_SVG, ARTIFACT_PRECISION_MAP_CSV, ARTIFACT_IMPORTANCE_CSV, ARTIFACT_IMPORTANCE_PNG}
    assert expected <= logged and set(review.artifacts) == expected, review.notes
    import matplotlib.image

    for png in (ARTIFACT_PRECISION_MAP_PNG, ARTIFACT_IMPORTANCE_PNG):
        img = matplotlib.image.imread(client.download_artifacts(searched.parent_run_id, png, str(tmp_path)))
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    svg = _text(client, searched.parent_run_id, ARTIFACT_PRECISION_MAP_SVG, tmp_path)
    assert svg.lstrip().startswith(("<?xml", "<svg")) and "fc1" in svg and len(svg) < 1_000_000  # small, names layers
    rows = list(csv.DictReader(io.StringIO(_text(client, searched.parent_run_id, ARTIFACT_PRECISION_MAP_CSV,
                                                 tmp_path))))
    assert {r["layer"] for r in rows} >= {"fc1"} and any(r["kernel"] for r in rows)  # the kernel ORT ran
    # The parent run's description in the UI is the precision energy table.
    note = client.get_run(searched.parent_run_id).data.tags["mlflow.note.content"]
    assert "Precision energy table" in note


def test_precision_energy_table_rows_and_savings_come_from_the_runs(searched, review, tmp_path):
    from pipeline.tracking.record import read_study
    from pipeline.tracking.review import ARTIFACT_ENERGY_TABLE_CSV, ARTIFACT_ENERGY_TABLE_MD

    client = searched.client()
    study = read_study(client, searched.experiment, searched.study)
    rows = list(csv.DictReader(io.StringIO(_text(client, searched.parent_run_id, ARTIFACT_ENERGY_TABLE_CSV, tmp_path))))
    fp32 = study.fp32_baseline
    assert rows[0]["kind"] == "fp32" and int(rows[0]["trial"]) == fp32.number
    uniform = {r["plan"] for r in rows if r["kind"] == "uniform"}
    assert uniform == {t.baseline for t in study.uniform_baselines} - {"uniform-fp32"}
    mixed = [int(r["trial"]) for r in rows if r["kind"] == "mixed"]
    assert set(mixed) <= {t.number for t in study.front if not t.baseline}
    assert len(mixed) == min(5, len([t for t in study.front if not t.baseline]))
    for r in rows:
        t = study.trial(int(r["trial"]))
        for metric, col in (("joules_per_inference", "energy_saving_pct"), ("latency_ms_p50", "latency_saving_pct"),
                            ("size_bytes", "size_saving_pct")):
            expect = 100 * (fp32.metric(metric) - t.metric(metric)) / fp32.metric(metric)
            assert float(r[col]) == pytest.approx(expect, rel=1e-6, abs=1e-9)
        label = "estimated" if t.energy_source == "estimated" else f"metered ({t.energy_source})"
        assert r["energy"] == label and r["backend"] == "ort-cpu"
        assert r["on_front"] == str(t.pareto)
    md = _text(client, searched.parent_run_id, ARTIFACT_ENERGY_TABLE_MD, tmp_path)
    assert md.count("\n| ") == len(rows) + 1  # header + one line per row
    assert "*metered*" in md and "*estimated*" in md  # the label legend is always stated


def test_precision_map_shows_each_front_trials_layer_formats(searched, review):
    from pipeline.tracking.record import read_study, trial_result

    client = searched.client()
    study = read_study(client, searched.experiment, searched.study)
    assert set(review.precision_map) == {t.number for t in study.front}
    for t in study.front:
        layers = trial_result(client, t)["layers"]
        assert review.precision_map[t.number] == {l["name"]: (l["format"], l["execution"]) for l in layers}


def test_importance_is_optunas_for_the_accuracy_objective(searched, review, tmp_path):
    import optuna

    study = searched.optuna_study()
    idx = study.metric_names.index("accuracy")
    assert study.directions[idx].name == "MAXIMIZE"
    # Optuna 5's default evaluator explains low target values: accuracy is negated.
    expected = optuna.importance.get_param_importances(study, target=lambda t: -t.values[idx])
    assert review.importance is not None and review.importance == pytest.approx(expected)
    assert sum(review.importance.values()) == pytest.approx(1.0)
    assert any(k.startswith("layer:") for k in review.importance)


def test_without_a_study_or_fp32_baseline_the_review_says_what_is_missing(searched):
    from pipeline.tracking.record import study_from_parent
    from pipeline.tracking.review import energy_table, write_review

    client = searched.client()
    again = write_review(client, searched.parent_run_id, set_note=False)
    assert any("importance view skipped: no Optuna study" in n for n in again.notes)
    assert "review/importance.csv" not in again.artifacts

    record = study_from_parent(client, searched.parent_run_id)
    no_fp32 = dataclasses.replace(record, trials=[t for t in record.trials if t.baseline != "uniform-fp32"])
    rows, notes = energy_table(no_fp32, {})
    assert all(r.kind != "fp32" and r.energy_saving_pct is None for r in rows)
    assert any("no completed uniform-fp32 baseline" in n for n in notes)
    # A failed uniform baseline is listed as failed, not silently dropped.
    int8 = next(t for t in record.trials if t.baseline == "uniform-int8")
    failed = int8.model_copy(update=dict(state="FAIL", metrics={}, on_front=False))
    with_fail = dataclasses.replace(record, trials=[failed if t is int8 else t for t in record.trials])
    rows, _ = energy_table(with_fail, {})
    row = next(r for r in rows if r.plan == "uniform-int8")
    assert row.state == "FAIL" and row.accuracy is None


def test_a_users_own_run_description_is_kept(searched):
    from pipeline.tracking.review import write_review

    client = searched.client()
    client.set_tag(searched.parent_run_id, "mlflow.note.content", "my notes")
    try:
        write_review(client, searched.parent_run_id)
        assert client.get_run(searched.parent_run_id).data.tags["mlflow.note.content"] == "my notes"
    finally:
        client.set_tag(searched.parent_run_id, "mlflow.note.content", "")


def test_write_review_refuses_a_run_that_is_not_a_study(searched):
    from pipeline.tracking.record import RecordError, read_study
    from pipeline.tracking.review import write_review

    client = searched.client()
    trial_run = read_study(client, searched.experiment, searched.study).trials[0].run_id
    with pytest.raises(RecordError, match=f"not a study's parent run .*{S.TAG_ROLE}"):
        write_review(client, trial_run)


def test_importance_leaves_out_repeated_proposals():
    """A duplicate proposal carries its original's values; counting it would weigh that one measurement
    several times. The importances equal those of the study without the duplicates."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    from pipeline.tracking.review import param_importances
    from pipeline.search.storage import T_DUPLICATE_OF

    dists = {"a": CategoricalDistribution(["x", "y"]), "b": CategoricalDistribution(["p", "q", "r"])}
    rng = __import__("random").Random(0)
    measured = []
    for _ in range(80):
        params = {"a": rng.choice(["x", "y"]), "b": rng.choice(["p", "q", "r"])}
        value = (1.0 if params["a"] == "x" else 0.0) + 0.1 * rng.random()
        measured.append(create_trial(params=params, distributions=dists, values=[value, 1.0]))
    first = measured[0]
    dups = [create_trial(params=first.params, distributions=dists, values=first.values,
                         user_attrs={T_DUPLICATE_OF: 0}) for _ in range(15)]

    def study(trials):
        s = optuna.create_study(directions=["maximize", "minimize"])
        s.add_trials(trials)
        return s

    clean = param_importances(study(measured), 0)
    with_dups = param_importances(study(measured + dups), 0)
    assert with_dups == clean
    assert set(clean) == {"a", "b"} and clean["a"] > clean["b"]  # the view still measures something
