"""Database URLs as users write them: one PostgreSQL driver, credentials never shown.

Why one driver: SQLAlchemy 2.1 maps ``postgresql://`` to psycopg 3, while many guides (and MLflow's docs)
write ``postgresql+psycopg2://``. We install psycopg 3 (``pip install -e '.[cluster]'``) and accept every
spelling — ``postgres://``, ``postgresql://``, ``postgresql+psycopg://``, ``postgresql+psycopg2://`` — by
rewriting them to the driver that is importable here, so Optuna's RDB storage and MLflow's SQLAlchemy store
both connect without the user choosing a driver. Nothing else of the URL changes.

Why masking lives here: the same URL is printed by ``search``, logged as an MLflow param and shown in error
messages; each of those goes through :func:`mask_url` so a password never lands in a log or in MLflow. A URL that
is *stored* for later use (the MLflow tracking URI a study records in Optuna) goes through :func:`without_password`
instead: ``***`` would be sent as a password, while a URL without one lets libpq take it from ``PGPASSWORD`` or
``~/.pgpass`` (:func:`check_login` says so when the server refuses).
"""

from __future__ import annotations

import importlib.util
import re

from pipeline.errors import ConfigError

_PG_SCHEMES = ("postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg2")
_DRIVER_MODULE = {"psycopg": "psycopg", "psycopg2": "psycopg2"}
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@?#]*):(?P<password>[^@/?#]*)@")
_QUERY_SECRET = re.compile(r"(?i)([?&](?:password|passwd|pwd|token|secret|access_key|secret_key)=)[^&#]*")


def mask_url(url: str | None) -> str | None:
    """``url`` with any password (userinfo or ``?password=`` query) replaced by ``***``."""
    if not url:
        return url
    masked = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url)
    return _QUERY_SECRET.sub(r"\1***", masked)


def without_password(url: str | None) -> str | None:
    """``url`` with its password removed, not masked (``postgresql://ps:pw@h/db`` -> ``postgresql://ps@h/db``;
    a ``password=`` query parameter is dropped): a URL to store, which still connects where the password comes
    from elsewhere (``PGPASSWORD``, ``~/.pgpass``, ``MLFLOW_TRACKING_PASSWORD``)."""
    if not url:
        return url
    out = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}@" if m["user"] else m["scheme"], url)
    base, sep, query = out.partition("?")
    if sep:
        kept = [kv for kv in query.split("&") if kv.split("=", 1)[0].lower() not in _PASSWORD_KEYS]
        out = base + (f"?{'&'.join(kept)}" if kept else "")
    return out


_PASSWORD_KEYS = ("password", "passwd", "pwd")
_AUTH_WORDS = re.compile(r'password authentication failed|no password supplied|no pg_hba\.conf entry|'
                         r'role "[^"]*" does not exist')


def login_refused(exc: BaseException) -> bool:
    """True when a database refused the login (PostgreSQL SQLSTATE class 28: a wrong or missing password, an
    unknown role, no pg_hba.conf entry), as opposed to a server that is down or a database that does not exist.
    libpq reports a refused connection without a SQLSTATE, so its messages are matched too."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        state = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
        if isinstance(state, str) and state.startswith("28"):
            return True
        if _AUTH_WORDS.search(str(exc)):
            return True
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
    return False


def check_login(url: str, field: str, hint: str, timeout_s: int = 10) -> None:
    """Connect once to a database URL; a refused login raises :class:`ConfigError` naming ``field``, the
    server's reason and ``hint``. Other failures are left to the caller's own use of the URL."""
    import sqlalchemy as sa

    args = {"connect_timeout": timeout_s} if url.startswith("postgresql") else {}
    engine = sa.create_engine(normalize_db_url(url, field), connect_args=args, poolclass=sa.pool.NullPool)
    try:
        with engine.connect():
            pass
    except Exception as exc:  # noqa: BLE001 - only a refused login is ours to explain
        if not login_refused(exc):
            return
        reason = next((line.strip() for line in str(getattr(exc, "orig", exc)).splitlines() if line.strip()), "")
        raise ConfigError(f"{field}: {mask_url(url)} refused the login ({reason[:300]}): {hint}") from None
    finally:
        engine.dispose()


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def postgres_driver() -> str | None:
    """The PostgreSQL driver importable here: psycopg (3) first, psycopg2 as a fallback; None if neither."""
    for driver in ("psycopg", "psycopg2"):
        if _importable(_DRIVER_MODULE[driver]):
            return driver
    return None


def normalize_db_url(url: str, field: str = "storage") -> str:
    """Rewrite a PostgreSQL URL to the driver installed here; other URLs are returned unchanged.

    Raises :class:`ConfigError` naming ``field`` and the install command when no PostgreSQL driver is
    installed, instead of SQLAlchemy's ``No module named 'psycopg'`` deep inside Optuna or MLflow.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _PG_SCHEMES:
        return url
    driver = postgres_driver()
    if driver is None:
        raise ConfigError(
            f"{field}: {mask_url(url)} needs a PostgreSQL driver, and neither psycopg nor psycopg2 is installed: "
            "run `.venv/bin/pip install -e '.[cluster]'` (installs psycopg 3), or use a sqlite:/// URL"
        )
    return f"postgresql+{driver}://{rest}"


def same_database(a: str | None, b: str | None) -> bool:
    """Whether two SQLAlchemy URLs name the same database (host, port, database, and the ``options`` /
    ``search_path`` that would put them in different schemas); False for anything that is not a database URL
    (an MLflow server's http://)."""
    if not a or not b:
        return False
    try:
        from sqlalchemy.engine import make_url

        ua, ub = make_url(normalize_db_url(a, "url")), make_url(normalize_db_url(b, "url"))
    except Exception:  # noqa: BLE001 - not a database URL (http://, a typo the stores' own checks name)
        return False
    family = lambda u: u.get_backend_name()  # noqa: E731 - postgresql+psycopg and postgresql are one server
    if family(ua) != family(ub):
        return False
    if family(ua) == "sqlite":
        from pathlib import Path

        return bool(ua.database) and bool(ub.database) and Path(ua.database).resolve() == Path(ub.database).resolve()
    default_port = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}.get(family(ua))
    where = lambda u: (u.host or "localhost", u.port or default_port, u.database, dict(u.query).get("options"))  # noqa: E731
    return where(ua) == where(ub)


def check_separate_stores(storage: str | None, tracking: str | None) -> None:
    """Optuna's storage and MLflow's store cannot share one database: both keep their schema version in an
    ``alembic_version`` table there, so the second to open it fails (or half-migrates). Refused up front."""
    if same_database(storage, tracking):
        raise ConfigError(
            f"--storage and --tracking-uri name the same database ({mask_url(storage)}): Optuna and MLflow each "
            "keep an alembic_version table and cannot share one; give MLflow a database of its own "
            "(createdb mlflow; --tracking-uri .../mlflow) or a schema of its own "
            "(--tracking-uri '...?options=-csearch_path%3Dmlflow', after CREATE SCHEMA mlflow)")
