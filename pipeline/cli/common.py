"""Helpers shared by subcommands."""

from __future__ import annotations

import argparse

from rich.console import Console

console = Console(stderr=False)


def add_config_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
    """``--config`` and ``--set KEY=VALUE`` overrides: every subcommand reads the config the same way."""
    p.add_argument("--config", "-c", required=required, help="search_spaces/<preset>.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set measure.backend=ort-cpu (repeatable; VALUE is YAML)")


def parse_overrides(items: list[str]) -> dict:
    """``["measure.runs=10", "search.formats=[int8, int4]"]`` -> ``{"measure.runs": 10, ...}`` (values are YAML)."""
    import yaml

    from pipeline.config import ConfigError

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set: expected KEY=VALUE (e.g. measure.runs=10), got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def load(args):
    from pipeline.config import load_config

    return load_config(args.config, overrides=parse_overrides(getattr(args, "set", [])))


STORAGE_HELP = ("Optuna storage URL, any SQLAlchemy URL; postgresql://, postgresql+psycopg:// and "
                "postgresql+psycopg2:// all work (default: $PRECISION_SEARCH_STORAGE or sqlite:///<workdir>/<name>/optuna.db; "
                "a relative workdir is under the config's project root)")
TRACKING_HELP = ("MLflow tracking URI: http://host:5000 for a server, or a database URL (default: "
                 "$MLFLOW_TRACKING_URI, else the one the study recorded in --storage, else sqlite:///<workdir>/mlflow.db)")


def add_store_args(p: argparse.ArgumentParser) -> None:
    """``--storage`` and ``--tracking-uri``, spelled and defaulted alike in every subcommand."""
    p.add_argument("--storage", default=None, help=STORAGE_HELP)
    p.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)


def tracking_uri(args, cfg=None, study: str | None = None) -> str:
    """Where the MLflow record is, for the read commands: ``--tracking-uri``; else $MLFLOW_TRACKING_URI; else
    the URI the study recorded in its Optuna storage (``--storage``/$PRECISION_SEARCH_STORAGE, else the workdir's
    ``optuna.db`` where it exists: a search given ``--tracking-uri`` is found again without it; a cluster's record
    is found from the study alone; it is recorded without a password, which
    PGPASSWORD / ~/.pgpass then supply); else ``sqlite:///<work_root>/mlflow.db``. Database URLs go to the installed
    driver. A SQLite file that does not exist is refused with where it looked (:mod:`pipeline.cli.stores`),
    never created."""
    import os
    from pathlib import Path

    from pipeline.cli.stores import must_exist
    from pipeline.search.storage import A_TRACKING_URI
    from pipeline.tracking.record import default_tracking_uri, user_tracking_uri
    from pipeline.urls import normalize_db_url

    config_arg = getattr(args, "config", None)
    uri = getattr(args, "tracking_uri", None) or user_tracking_uri()
    origin = "given by --tracking-uri or $MLFLOW_TRACKING_URI" if uri else None
    storage = getattr(args, "storage", None) or os.environ.get("PRECISION_SEARCH_STORAGE")
    if not uri and not storage and cfg is not None and (cfg.work_path.resolve() / "optuna.db").is_file():
        storage = f"sqlite:///{cfg.work_path.resolve() / 'optuna.db'}"  # the default study store, where it exists
    if not uri and storage and cfg is not None:
        import optuna

        from pipeline.search.storage import validate_study_name

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        name = validate_study_name(study or cfg.name)
        storage = must_exist(normalize_db_url(storage, "--storage"), "--storage", "Optuna study database", cfg,
                             config_arg, origin="given by --storage or $PRECISION_SEARCH_STORAGE")
        try:
            uri = optuna.load_study(study_name=name, storage=storage).user_attrs.get(A_TRACKING_URI)
            origin = f"recorded by study {name!r} in --storage" if uri else None
        except KeyError:  # no such study there: fall back to the default record
            uri = None
        if uri and "://" in uri and not uri.startswith(("http://", "https://", "sqlite:", "file:")):
            from pipeline.urls import check_login

            # Recorded without its password (pipeline.urls.without_password): libpq takes it from the environment.
            check_login(uri, "--tracking-uri", "the study records the tracking URI without its password; pass "
                                               "--tracking-uri or set PGPASSWORD / ~/.pgpass")
    if not uri:
        from pipeline.config import project_root

        work = cfg.work_root if cfg is not None else project_root(Path.cwd()) / ".precision-search"
        uri = default_tracking_uri(work, create=False)
    uri = normalize_db_url(uri, "--tracking-uri")
    return must_exist(uri, "--tracking-uri", "MLflow tracking database", cfg, config_arg, origin=origin)


def same_study_args(args) -> list[str]:
    """The arguments a follow-up command (``front``, ``promote``) needs to find the same study: the ``--set``
    overrides (a ``workdir`` among them moves every store) and ``--storage`` (without its password: the
    command reads it from PGPASSWORD / ~/.pgpass, as the search did). ``promote`` finds MLflow from the study."""
    from pipeline.urls import without_password

    out = [a for item in getattr(args, "set", None) or [] for a in ("--set", item)]
    if getattr(args, "storage", None):
        out += ["--storage", without_password(args.storage)]
    return out
