"""Database URLs: every PostgreSQL spelling connects to the real local server; passwords never shown."""

import pytest
import sqlalchemy as sa

from pipeline.config import ConfigError
from pipeline.urls import mask_url, normalize_db_url, postgres_driver

PG = "127.0.0.1:5432/test"


def _server_up() -> bool:
    try:
        with sa.create_engine(normalize_db_url(f"postgresql://postgres@{PG}")).connect() as c:
            return c.exec_driver_sql("select 1").scalar() == 1
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg2"])
def test_every_postgres_spelling_connects(scheme):
    # Every machine of this project (developers' and CI's) runs PostgreSQL on 127.0.0.1:5432, and `make test`
    # installs the [cluster] extra: a missing one is a broken setup to report, not a reason to skip.
    assert postgres_driver() is not None, "no PostgreSQL driver: pip install -e '.[cluster]'"
    assert _server_up(), "no PostgreSQL on 127.0.0.1:5432 (trust auth, database test)"
    url = normalize_db_url(f"{scheme}://postgres@{PG}")
    assert url.startswith(f"postgresql+{postgres_driver()}://")
    with sa.create_engine(url).connect() as conn:
        assert conn.exec_driver_sql("select current_database()").scalar() == "test"


def test_other_urls_unchanged():
    for url in ("sqlite:///x/optuna.db", "mysql+pymysql://u:p@h/db", "http://127.0.0.1:5000", "file:///tmp/mlruns"):
        assert normalize_db_url(url) == url


def test_missing_driver_names_the_field_and_the_extra(monkeypatch):
    import pipeline.urls as urls

    monkeypatch.setattr(urls, "_importable", lambda module: False)  # as on a machine without the extra
    with pytest.raises(ConfigError) as err:
        normalize_db_url("postgresql://bob:hunter2@db:5432/optuna", field="--storage")
    msg = str(err.value)
    assert msg.startswith("--storage:") and "[cluster]" in msg and "hunter2" not in msg and "bob:***@db" in msg


@pytest.mark.parametrize("url,shown", [
    ("postgresql://bob:hunter2@db:5432/x", "postgresql://bob:***@db:5432/x"),
    ("postgresql+psycopg://bob:p%40ss@db/x", "postgresql+psycopg://bob:***@db/x"),
    ("mysql+pymysql://root:@127.0.0.1/test", "mysql+pymysql://root:***@127.0.0.1/test"),
    ("postgresql://db/x?user=bob&password=hunter2&sslmode=require", "postgresql://db/x?user=bob&password=***&sslmode=require"),
    ("sqlite:////tmp/optuna.db", "sqlite:////tmp/optuna.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    (None, None),
])
def test_mask_url(url, shown):
    assert mask_url(url) == shown


def test_same_database_is_the_same_server_database_and_schema_whatever_the_spelling(tmp_path):
    from pipeline.urls import same_database

    pg = "postgresql://postgres@127.0.0.1:5432/test"
    assert same_database(pg, "postgres://postgres@127.0.0.1/test")  # scheme alias and default port
    assert same_database(pg, "postgresql+psycopg2://postgres:pw@127.0.0.1:5432/test")
    assert not same_database(pg, "postgresql://postgres@127.0.0.1:5432/postgres")  # another database
    assert not same_database(pg, pg + "?options=-csearch_path%3Dmlflow")  # another schema
    assert not same_database(pg, "http://127.0.0.1:5000")  # a tracking server
    assert same_database(f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / '.' / 'a.db'}")
    assert not same_database(f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}")
