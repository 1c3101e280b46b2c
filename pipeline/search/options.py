"""What a search is asked to do (:class:`SearchOptions`) and what it answers (:class:`SearchSummary`).

Apart from :mod:`pipeline.search.runner` (the loop) so that callers - the CLI, the Python API, tests -
name the request and the answer without the machinery.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from pipeline.objectives import ObjectiveInfo
from pipeline.search.records import TrialRecord

MAX_CONSECUTIVE_DUPLICATES = 25  # proposals in a row that were all measured already: the sampler has converged


@dataclass
class SearchOptions:
    trials: int | None = None  # total finished trials wanted in the study (default: search.trials)
    study: str | None = None  # default: the config's name
    parallel: int | None = None  # trials in flight (default: what the Ray cluster holds)
    storage: str | None = None  # Optuna storage URL (default: sqlite:///<workdir>/<name>/optuna.db)
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI or sqlite:///<workdir>/mlflow.db
    ray_address: str | None = None  # default: RAY_ADDRESS, else a local Ray started here
    progress: str = "auto"  # auto (live panel on a terminal, else lines) | lines | off
    verbose: bool = False
    # The driver records every trial, so what it does per trial bounds a cluster's trials/min: the MLflow
    # front (pareto tags, table, metrics) refreshes at most every front_every_s and its plots (matplotlib,
    # ~1-2 CPU-s each) every plot_every_s; both are refreshed at the end. Each trial's own run is complete
    # as soon as it finishes.
    plot_every_s: float = 60.0
    front_every_s: float = 5.0
    energy: bool = True
    # Stop asking after this many proposals in a row were plans the study already measured.
    max_consecutive_duplicates: int = MAX_CONSECUTIVE_DUPLICATES
    # Stop proposing once this many seconds have passed since the first proposal; trials in flight
    # then finish, and the study ends with the front of what it measured (None: no time limit).
    time_budget_s: float | None = None


class SearchSummary(BaseModel):
    study: str
    storage: str
    trials_complete: int
    trials_failed: int
    front: list[TrialRecord]
    objectives: list[ObjectiveInfo]
    energy_note: str
    hypervolume: float | None
    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    ui_hint: str
    wall_seconds: float
    parallel: int
    cpus_per_trial: float
    gpus_per_trial: float
    orphans_recovered: int
    tracking_errors: list[str] = []
    trials_duplicate: int = 0  # proposals of already measured plans (told their original's values, not counted)
    energy_meter_pinned: str = ""  # nvml | rapl | estimated once the study pinned measure.energy.meter
    stopped_early: str = ""  # why the search ended before --trials (duplicates only, or the time budget spent)
    trials_orphaned: int = 0  # FAIL in the storage because a driver stopped while they ran (their plans retried)
    trials_retried: int = 0  # FAIL because their worker died (killed, OOM, node lost); their plans retried
    # The re-measured front against FP32, the uniform baselines and the runtime's one-liner, in sentences
    # (pipeline.tracking.remeasure.comparison; empty when nothing was re-measured).
    verdict: list[str] = []
    # After the re-measurement, ``hypervolume`` is taken on its numbers (in a box re-fixed from the re-measured
    # baselines); this is the in-search one beside it. None when nothing was re-measured.
    hypervolume_in_search: float | None = None
    # How sensitivity took part: "seeded: ..." or why the search ran unseeded (search.sensitivity.seed).
    seeding: str = ""
    mlflow_spooled: int = 0  # tracking events still spooled (MLflow unreachable at the end); 0 when in step
