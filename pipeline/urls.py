"""Database URLs as users write them: one PostgreSQL driver, credentials never shown.

Why one driver: SQLAlchemy 2.1 maps ``postgresql://`` to psycopg 3, while many guides (and MLflow's docs)
write ``postgresql+psycopg2://``. We install psycopg 3 (``pip install -e '.[cluster]'``) and accept every
spelling — ``postgres://``, ``postgresql://``, ``postgresql+psycopg://``, ``postgresql+psycopg2://`` — by
rewriting them to the driver that is importable here, so Optuna's RDB storage and MLflow's SQLAlchemy store
both connect without the user choosing a driver. Nothing else of the URL changes.

Why masking lives here: the same URL is printed by ``search``, logged as an MLflow param and shown in error
messages; each of those goes through :func:`mask_url` so a password never lands in a log or in MLflow.
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
