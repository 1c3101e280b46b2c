"""What the runner tells whoever records a study, and a recorder that records nothing.

The runner never imports MLflow or the review: :class:`pipeline.tracking.record.StudyTracker`
implements :class:`Recorder` and ``pipeline.cli.search`` hands it in (with the
review as a finisher), so the import order stays search <- tracking <- cli.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pipeline.objectives import ObjectiveInfo
    from pipeline.results import TrialResult
    from pipeline.search.records import TrialRecord


class Recorder(Protocol):
    uri: str
    experiment_name: str
    experiment_id: str
    parent_run_id: str

    def log_study(self, params: dict[str, Any], config_yaml: str | None = None) -> None: ...
    def log_resources(self, parallel: int, cpus: float, gpus: float, where: str, pinned_meter: str | None) -> None: ...
    def log_energy(self, **fields: str) -> None: ...
    def log_stopped_early(self, reason: str) -> None: ...
    def log_seeding(self, line: str) -> None: ...
    def start_trial(self, number: int, label: str | None, plan_yaml: str, plan_summary: str,
                    layer_formats: dict[str, str], knobs: dict[str, Any], retry_of: int | None = None) -> str: ...
    # placement: where the trial ran (TrialOutcome.placement()), recorded with its outcome
    def finish_trial(self, run_id: str, result: "TrialResult", objective_values: dict[str, float],
                     feasible: bool | None, seconds: float, placement: dict[str, str] | None = None) -> None: ...
    def fail_trial(self, run_id: str, reason: str, seconds: float | None = None,
                   placement: dict[str, str] | None = None) -> None: ...
    def mark_duplicates(self, run_id: str, numbers: Sequence[int]) -> None: ...
    def run_status(self, run_id: str) -> tuple[str, str] | None: ...
    def trial_runs(self) -> dict[int, list[str]]: ...
    def trial_run_states(self) -> dict[int, list[tuple[str, str, str]]]: ...
    def ping(self) -> None: ...
    def update_front(self, records: Sequence["TrialRecord"], objectives: Sequence["ObjectiveInfo"],
                     summary: dict[str, float], step: int, plots: bool = True) -> None: ...
    def seconds_since_plot(self) -> float: ...
    def ui_hint(self) -> str: ...
    def end(self, status: str = "FINISHED") -> None: ...


# (study name, config hash) -> Recorder, built once the study's identity is known.
RecorderFactory = Callable[[str, str], Recorder]
# Called at the end of a study with the recorder and the Optuna study (e.g. the review).
Finisher = Callable[[Recorder, Any], None]


class NullRecorder:
    """Records nothing: a search run as a library call without MLflow."""

    uri = ""
    experiment_name = ""
    experiment_id = ""
    parent_run_id = ""

    def __init__(self, study: str = "", config_hash: str = ""):
        self.study = study

    def start_trial(self, *args, **kwargs) -> None:
        return None

    def run_status(self, run_id: str) -> None:
        return None

    def trial_runs(self) -> dict[int, list[str]]:
        return {}

    def trial_run_states(self) -> dict[int, list[tuple[str, str, str]]]:
        return {}

    def seconds_since_plot(self) -> float:
        return 0.0

    def ui_hint(self) -> str:
        return "MLflow: not recorded (no recorder given)"

    def __getattr__(self, name: str):  # every other event is dropped
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None
