"""The MLflow store lost or moved, and the Optuna database lost, emptied or corrupt.

Optuna is the one truth for a study's trials: a resumed search re-logs what the current MLflow store is
missing once (children = trials), tags the front again, repairs the run ids that ``front`` and ``promote``
follow, and never duplicates. A lost Optuna database is refused instead of becoming a new study under the
old MLflow record.
"""

from __future__ import annotations

import shutil
from collections import Counter

import pytest

from tests.faults.helpers import assert_clear_error, cli, optuna_study, search_args, study_runs


def _measured(study):
    """Finished trials that have an MLflow run of their own (duplicates never do)."""
    return {t.number for t in study.get_trials(deepcopy=False)
            if t.state.is_finished() and t.user_attrs.get("duplicate_of") is None}


def _assert_mirrors(uri: str, storage: str) -> None:
    from pipeline.search.records import build_records, study_objectives

    study = optuna_study(storage)
    runs = study_runs(uri)
    numbers = Counter(n for n, _ in runs)
    assert all(c == 1 for c in numbers.values()), f"duplicated child runs: {numbers}"
    assert set(numbers) == _measured(study)
    records = build_records(study, study_objectives(study))
    front = {r.number for r in records if r.on_front}
    tagged = {n for n, r in runs if r.tags.get("pareto") == "true"}
    assert front and tagged == front
    by_number = {n: r.run_id for n, r in runs}
    for r in records:  # the run ids front/promote follow point into this store
        if r.number in by_number:
            assert r.run_id == by_number[r.number], r.number


def test_mlflow_store_lost_then_moved_is_reconciled_once(tmp_path):
    work = tmp_path / "work"
    uri = f"sqlite:///{work / 'mlflow.db'}"
    storage = f"sqlite:///{work / 'digits-mlp' / 'optuna.db'}"
    first = cli(search_args(work, "--parallel", "2"), tmp_path)
    assert first.rc == 0, first.text[-4000:]
    _assert_mirrors(uri, storage)

    (work / "mlflow.db").unlink()  # the MLflow store is lost
    resumed = cli(search_args(work, "--parallel", "2", "--trials", "4"), tmp_path)
    assert resumed.rc == 0, resumed.text[-4000:]
    assert "Traceback" not in resumed.text and "failed: MlflowException" not in resumed.text, resumed.text[-4000:]
    _assert_mirrors(uri, storage)

    moved = f"sqlite:///{tmp_path / 'moved' / 'mlflow.db'}"  # MLFLOW_TRACKING_URI changed between runs
    again = cli(search_args(work, "--parallel", "2", "--trials", "4", "--tracking-uri", moved), tmp_path)
    assert again.rc == 0, again.text[-4000:]
    _assert_mirrors(moved, storage)

    before = len(study_runs(uri))  # back to the first store: nothing is logged twice
    back = cli(search_args(work, "--parallel", "2", "--trials", "4"), tmp_path)
    assert back.rc == 0, back.text[-4000:]
    assert len(study_runs(uri)) == before
    _assert_mirrors(uri, storage)

    promoted = cli(["promote", "--config", search_args(work)[2], *search_args(work)[3:-1], "--policy", "knee",
                    "--tracking-uri", uri, "--name", "digits-reconciled"], tmp_path)
    assert promoted.rc == 0, promoted.text[-4000:]

    # The Optuna database lost while MLflow holds the study: refused, naming both, no new study.
    db = work / "digits-mlp" / "optuna.db"
    shutil.move(db, tmp_path / "optuna.db.bak")
    lost = cli(search_args(work, "--parallel", "2"), tmp_path)
    assert_clear_error(lost, "--storage", str(db), "--study NEW_NAME")
    assert len(study_runs(uri)) == before


@pytest.mark.parametrize("content,needle", [
    (b"", "is empty (0 bytes)"),
    (b"this is not a database at all" * 10, "is not a SQLite database"),
    (b"SQLite format 3\x00" + b"\x00" * 80, "cannot be read"),
])
def test_empty_or_corrupt_optuna_db_is_refused(tmp_path, content, needle):
    work = tmp_path / "work"
    db = work / "digits-mlp" / "optuna.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(content)
    done = cli(search_args(work), tmp_path, timeout=120)
    assert_clear_error(done, "--storage", str(db), needle, f"mv {db} {db}.broken")
    assert db.read_bytes() == content  # left as it was
    assert not (work / "mlflow.db").exists()  # refused before anything was logged
