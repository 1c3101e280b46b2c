"""Where the read commands (``front``, ``promote``, ``load``) find a study's stores, creating nothing.

Why: opening a SQLite URL creates the file (Optuna and MLflow then add empty tables), so a read command run
with the wrong config, from the wrong folder or before any search used to leave an empty ``optuna.db`` /
``mlflow.db`` behind and report "no study" as if the search had never happened. Here a default SQLite store
that does not exist is refused before anything opens it, with the absolute path, the config and workdir it
came from, and the ways to point elsewhere. Writers (``search``) keep :func:`pipeline.search.storage.
default_storage` and :func:`pipeline.tracking.record.default_tracking_uri`, which create the workdir.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError
from pipeline.hints import command

if TYPE_CHECKING:
    from pipeline.config import SearchConfig

OPTUNA_DB = "optuna.db"  # the file pipeline.search.storage.default_storage names


def read_storage(cfg: "SearchConfig", storage: str | None, config_arg: str | None) -> str:
    """The Optuna storage a read command opens: ``--storage``, $PRECISION_SEARCH_STORAGE, else the config's
    ``<work_root>/<name>/optuna.db``, which must exist."""
    url = storage or os.environ.get("PRECISION_SEARCH_STORAGE")
    if url:
        return must_exist(url, "--storage", "Optuna study database", cfg, config_arg,
                          origin="given by --storage or $PRECISION_SEARCH_STORAGE")
    return must_exist(f"sqlite:///{cfg.work_path / OPTUNA_DB}", "--storage", "Optuna study database", cfg, config_arg)


def must_exist(url: str, flag: str, what: str, cfg: "SearchConfig | None", config_arg: str | None,
               origin: str | None = None) -> str:
    """``url`` unchanged when it is not a SQLite file or the file exists; else a ConfigError saying where it
    looked, why there (the flag, or the config's workdir), and how to point elsewhere."""
    from pipeline.search.storage import sqlite_path

    path = sqlite_path(url)
    if path is None or path.exists():
        return url
    path = path.resolve()
    if not origin:
        origin = (f"the default for {cfg.work_where}, i.e. under {cfg.work_root}" if cfg is not None
                  else f"the default without --config, under the project of the current folder {Path.cwd()}")
    run_first = command("search", "--config", config_arg or "CONFIG.yaml")
    raise ConfigError(
        f"{flag}: no {what} at {path} ({origin}); nothing was created. Point {flag} at the store the search "
        f"wrote (or --config at the config it ran with, or --set workdir=FOLDER), or run the search first: "
        f"{run_first}   (make search CONFIG={config_arg or 'CONFIG.yaml'})")
