"""The MLflow tracking URI a study records in Optuna: stored without its password, still usable by readers.

A real search on the machine's PostgreSQL (127.0.0.1:5432, trust auth, so a password in the URL is accepted and
ignored): Optuna's storage and MLflow's backend store are both PostgreSQL URLs with a password. Afterwards no row
of any table of the Optuna database contains the password, ``promote``/``load``'s reader finds the recorded URI
from ``--storage`` alone and opens the MLflow store with it, and a recorded URI whose login the server refuses
fails with the fix.
"""

from __future__ import annotations

import argparse
import uuid

import pytest
import sqlalchemy as sa

from pipeline.config import ConfigError
from pipeline.search.storage import A_TRACKING_URI
from pipeline.urls import normalize_db_url, without_password

SERVER = "postgresql://postgres@127.0.0.1:5432"
PASSWORD = "pw-in-the-tracking-uri-7Q"


def _admin():
    return sa.create_engine(normalize_db_url(f"{SERVER}/postgres"), isolation_level="AUTOCOMMIT",
                            poolclass=sa.pool.NullPool)


@pytest.fixture(scope="module")
def databases():
    # Every machine of this project runs PostgreSQL on 127.0.0.1:5432 (see tests/pipeline/test_urls.py).
    prefix = f"pstest_uri_{uuid.uuid4().hex[:8]}"
    names = {"optuna": f"{prefix}_optuna", "mlflow": f"{prefix}_mlflow"}
    engine = _admin()
    with engine.connect() as conn:
        for name in names.values():
            conn.exec_driver_sql(f'create database "{name}"')
    try:
        yield {k: f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/{v}" for k, v in names.items()}
    finally:
        with engine.connect() as conn:
            for name in names.values():
                conn.exec_driver_sql(f'drop database if exists "{name}" with (force)')
        engine.dispose()


@pytest.fixture(scope="module")
def searched(databases, tmp_path_factory, monkeypatch_module):
    from pipeline.search.runner import SearchOptions, run_search
    from pipeline.tracking.record import StudyTracker
    from tests.conftest import _config

    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch_module.delenv("PRECISION_SEARCH_STORAGE", raising=False)
    cfg = _config("digits_mlp.yaml", tmp_path_factory.mktemp("uri") / "work",
                  **{"search.formats": ["fp32", "int8"], "search.int8_activations": ["dynamic"],
                     "search.calibrations": ["minmax"], "search.trials": 2})
    summary = run_search(cfg, SearchOptions(trials=2, study="uri", storage=databases["optuna"], progress="off",
                                            parallel=1),
                         recorder=StudyTracker.factory(cfg, databases["mlflow"]))
    assert summary.trials_complete == 2 and not summary.tracking_errors, summary
    return cfg


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _rows(url: str) -> list[str]:
    """Every row of every table of the database, as text."""
    engine = sa.create_engine(normalize_db_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            tables = [r[0] for r in conn.exec_driver_sql(
                "select table_name from information_schema.tables where table_schema = 'public'")]
            return [r[0] for t in tables for r in conn.exec_driver_sql(f'select t::text from "{t}" t')]
    finally:
        engine.dispose()


def test_the_study_records_the_tracking_uri_without_its_password(searched, databases):
    import optuna

    attrs = optuna.load_study(study_name="uri", storage=normalize_db_url(databases["optuna"])).user_attrs
    recorded = attrs[A_TRACKING_URI]
    assert recorded == normalize_db_url(without_password(databases["mlflow"]))
    assert recorded.split("://", 1)[1].startswith("postgres@127.0.0.1:5432/")  # the user stays, the password goes
    rows = _rows(databases["optuna"])
    assert any(recorded in r for r in rows), "the tracking URI is not in the Optuna tables: the search below is vacuous"
    leaked = [r[:200] for r in rows if PASSWORD in r]
    assert not leaked, f"the password is stored in the Optuna database: {leaked}"


def test_a_reader_finds_the_recorded_uri_from_the_storage_alone_and_opens_it(searched, databases):
    from mlflow import MlflowClient

    from pipeline.cli.common import tracking_uri

    args = argparse.Namespace(tracking_uri=None, storage=databases["optuna"])
    uri = tracking_uri(args, searched, "uri")
    assert PASSWORD not in uri and uri.endswith(databases["mlflow"].rsplit("/", 1)[1])
    experiment = MlflowClient(uri).get_experiment_by_name(searched.tracking.experiment or searched.name)
    assert experiment is not None  # the password-less URL connects (here: trust auth; elsewhere PGPASSWORD)
    runs = MlflowClient(uri).search_runs([experiment.experiment_id], "tags.`precision_search.role` = 'trial'")
    assert len(runs) == 2


def test_a_refused_login_on_the_recorded_uri_names_the_fix(searched, databases):
    import optuna

    from pipeline.cli.common import tracking_uri

    study = optuna.load_study(study_name="uri", storage=normalize_db_url(databases["optuna"]))
    good = study.user_attrs[A_TRACKING_URI]
    # As a server that wants a password sees it: it refuses the login (here, a role it does not know).
    study.set_user_attr(A_TRACKING_URI, good.replace("postgres@", f"nobody_{uuid.uuid4().hex[:6]}@"))
    try:
        with pytest.raises(ConfigError) as err:
            tracking_uri(argparse.Namespace(tracking_uri=None, storage=databases["optuna"]), searched, "uri")
        msg = str(err.value)
        assert msg.startswith("--tracking-uri:") and "refused the login" in msg
        assert "the study records the tracking URI without its password; pass --tracking-uri or set " \
               "PGPASSWORD / ~/.pgpass" in msg
        # --tracking-uri wins over the record
        given = tracking_uri(argparse.Namespace(tracking_uri=databases["mlflow"], storage=databases["optuna"]),
                             searched, "uri")
        assert given == normalize_db_url(databases["mlflow"])
    finally:
        study.set_user_attr(A_TRACKING_URI, good)


@pytest.mark.parametrize("url,stored", [
    ("postgresql://ps:hunter2@db:5432/x", "postgresql://ps@db:5432/x"),
    ("postgresql+psycopg://:hunter2@db/x", "postgresql+psycopg://db/x"),
    ("postgresql://db/x?user=ps&password=hunter2&sslmode=require", "postgresql://db/x?user=ps&sslmode=require"),
    ("postgresql://db/x?password=hunter2", "postgresql://db/x"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
])
def test_without_password(url, stored):
    assert without_password(url) == stored
