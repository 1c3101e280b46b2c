"""The study's own record in Optuna's storage: its URL, attribute names, identity, lock, and opening it.

Resume lives here too (:class:`Resume`): a study is continued by running the same
command again; trials a dead driver left RUNNING are marked FAIL (``orphaned``)
and their parameters enqueued again, and MLflow is reconciled with Optuna (a
trial finished in Optuna whose run was not closed is logged again from what
Optuna stored). Finished trials are never re-run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError, SearchConfig

# Optuna study/trial user attributes (the study's own record; MLflow mirrors it).
A_CONFIG_HASH = "config_hash"
A_OBJECTIVES = "objectives"
A_ENERGY_MODE = "energy_objective"  # "energy" | "latency" once decided
A_ENERGY_NOTE = "energy_note"
A_REFERENCE_ACCURACY = "reference_accuracy"
A_MAX_DROP = "max_accuracy_drop"
A_HV_BOX = "hypervolume_box"  # {"reference": [...], "ideal": [...]}, fixed once the baselines are in
A_PARENT_RUN = "mlflow_parent_run_id"
A_TRACKING_URI = "mlflow_tracking_uri"
A_ENERGY_SOURCE = "energy_source"  # nvml | rapl | estimated | none: the source every trial must share
A_ENERGY_METER = "energy_meter"  # the first trial's meter description
A_ENERGY_PIN = "energy_meter_pinned"  # {"meter": nvml|rapl|estimated, "by": why}, once pinned
A_REMEASURED = "remeasured"  # pipeline.search.remeasure.RemeasureReport (dumped), set once the search ends
T_BASELINE = "baseline"
T_RUN_ID = "mlflow_run_id"
T_RESULT = "result"
T_FAIL_REASON = "fail_reason"
T_ORPHANED = "orphaned"
T_RETRY_OF = "retry_of"
T_PLAN_SUMMARY = "plan_summary"
T_SECONDS = "seconds"
T_PLAN_KEY = "plan_key"  # hash of the canonical plan (see pipeline.search.plans.plan_key)
T_DUPLICATE_OF = "duplicate_of"  # a proposal equal to this COMPLETE trial's plan: not measured again
CONSTRAINT = "accuracy_drop"  # constraint name in Optuna: drop - max_accuracy_drop <= 0

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def validate_study_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f"--study: {name!r} is not a valid study name; use letters, digits, '_', '-' or '.'")
    return name


def default_storage(config: SearchConfig) -> str:
    env = os.environ.get("PRECISION_SEARCH_STORAGE")
    if env:
        return env
    path = config.work_path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'optuna.db'}"


def config_hash(config: SearchConfig) -> str:
    """Identity of what a study measures: the config minus trial count, tracking and workdir."""
    # measure.remeasure_rounds only changes the check after the search, not what a trial measures.
    data = config.model_dump(mode="json", exclude={"search": {"trials"}, "tracking": True, "workdir": True,
                                                   "measure": {"remeasure_rounds"}})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def set_metric_names(study, names: list[str]) -> None:
    """Names in Optuna's dashboard/dataframes (experimental in Optuna 5, hence the filter)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(names)


def make_sampler(config: SearchConfig, offset: int = 0):
    """The configured sampler, seeded with ``search.seed + offset``.

    ``offset`` is the number of trials the study already holds: a fresh study
    is reproducible from the seed, and a resumed one does not replay the random
    draws of its first session (which would re-measure the same candidates).
    """
    import optuna

    spec = config.search
    seed = spec.seed + offset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if spec.sampler == "tpe":
            # group=True: the space is conditional (knobs exist only when a format uses them).
            # constant_liar: parallel trials in flight are not proposed twice.
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)
        if spec.sampler == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(8, min(50, spec.trials // 4)))
        return optuna.samplers.RandomSampler(seed=seed)


def open_study(config: SearchConfig, study_name: str | None = None, storage: str | None = None):
    """An existing study (for ``front`` and ``promote``); a clear error if there is none."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = validate_study_name(study_name or config.name)
    url = storage or default_storage(config)
    try:
        return optuna.load_study(study_name=name, storage=url)
    except KeyError:
        raise ConfigError(f"--study: no study {name!r} in {url}; run `precision-search search --config ... "
                          f"--study {name}` first") from None


@dataclass(frozen=True)
class StudyCounts:
    """The study's trials by kind, counted in the storage (the one truth, whatever this session saw)."""

    complete: int = 0  # measured and COMPLETE
    failed: int = 0  # FAIL, not orphaned
    orphaned: int = 0  # FAIL because a driver stopped while they ran (their plans were retried)
    duplicates: int = 0  # proposals of a measured plan, told its values
    running: int = 0  # RUNNING (in flight, or orphaned until the next run sweeps them)
    waiting: int = 0  # WAITING: enqueued (baselines, retries) and not asked for yet

    @property
    def measured(self) -> int:
        """What counts toward ``--trials``: finished, not orphaned, not duplicates."""
        return self.complete + self.failed


def study_counts(study) -> StudyCounts:
    from optuna.trial import TrialState

    complete = failed = orphaned = duplicates = running = waiting = 0
    for t in study.get_trials(deepcopy=False):
        ua = t.user_attrs
        if t.state == TrialState.COMPLETE:
            if ua.get(T_DUPLICATE_OF) is not None:
                duplicates += 1
            else:
                complete += 1
        elif t.state == TrialState.FAIL:
            if ua.get(T_ORPHANED):
                orphaned += 1
            elif ua.get(T_DUPLICATE_OF) is None:
                failed += 1
        elif t.state == TrialState.RUNNING:
            running += 1
        elif t.state == TrialState.WAITING:
            waiting += 1
    return StudyCounts(complete, failed, orphaned, duplicates, running, waiting)


def measured_count(study) -> int:
    """Finished trials that count toward ``--trials``: not orphaned, not duplicates (read from the storage)."""
    return study_counts(study).measured


class StudyLock:
    """One driver per study on this machine (an orphan sweep would kill a live driver's trials)."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.seek(0)
            other = self._fh.read().strip()
            self._fh.close()
            raise ConfigError(f"--study: another search is already running this study (pid {other or '?'}); "
                              "wait for it or use --study NEW_NAME") from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(str(os.getpid()))
        self._fh.flush()
        return self

    def __exit__(self, *exc):
        if self._fh:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()


class Resume:
    """Orphans and reconciliation, mixed into :class:`pipeline.search.runner.StudyRunner` (uses its study,
    space, tracker and run ids)."""

    def _recover(self) -> None:
        """Orphaned RUNNING trials -> FAIL + retry; finished trials whose MLflow run is not closed -> log again."""
        from optuna.trial import TrialState

        runs_by_number = self._track(self.tracker.trial_runs) or {}
        for number, ids in runs_by_number.items():
            self.run_ids[number] = ids[0]
        for t in self.study.get_trials(deepcopy=False):
            if t.state == TrialState.RUNNING:
                reason = ("orphaned: the search driver stopped while this trial ran (killed or interrupted); "
                          "its candidate is retried as a new trial")
                self._orphan(t._trial_id, t.number, dict(t.params), dict(t.user_attrs), reason,
                             runs_by_number.get(t.number, []))
            elif t.state in (TrialState.COMPLETE, TrialState.FAIL):
                self._reconcile(t, runs_by_number.get(t.number, []))

    def _orphan(self, trial_id: int, number: int, params: dict, user_attrs: dict, reason: str,
                run_ids: list[str]) -> None:
        """Mark a trial whose driver went away FAIL (orphaned) and enqueue its parameters again."""
        import optuna
        from optuna.trial import TrialState

        trial = optuna.trial.Trial(self.study, trial_id)  # a handle on a stored RUNNING trial
        trial.set_user_attr(T_ORPHANED, True)
        trial.set_user_attr(T_FAIL_REASON, reason)
        self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        attrs = {T_RETRY_OF: number}
        label = user_attrs.get(T_BASELINE)
        if label:
            attrs[T_BASELINE] = label
            params = params or self.space.uniform_baselines().get(label, {})
        if params:  # a trial stopped before it had parameters measured nothing: nothing to retry
            self.study.enqueue_trial(params, user_attrs=attrs)
        self.orphans += 1
        ids = set(run_ids) | ({user_attrs[T_RUN_ID]} if user_attrs.get(T_RUN_ID) else set())
        for run_id in ids:
            self.run_ids.setdefault(number, run_id)
            st = self._track(self.tracker.run_status, run_id)
            if st is not None and (st[0] != "FAILED" or st[1] != "FAIL"):
                self._track(self.tracker.fail_trial, run_id, reason)

    def _reconcile(self, t, run_ids: list[str]) -> None:
        from pipeline.results import TrialResult

        if t.user_attrs.get(T_DUPLICATE_OF) is not None:  # never had a run of its own (see _tell_duplicate)
            self.duplicates.setdefault(t.user_attrs[T_DUPLICATE_OF], []).append(t.number)
            return
        run_id = t.user_attrs.get(T_RUN_ID)
        if run_id is None and run_ids:
            run_id = run_ids[0]
        st = self._track(self.tracker.run_status, run_id) if run_id else None
        if st is not None and st[0] in ("FINISHED", "FAILED") and st[1] in ("COMPLETE", "FAIL"):
            return
        if t.user_attrs.get(T_ORPHANED):
            if run_id and st is not None:
                self._track(self.tracker.fail_trial, run_id, t.user_attrs.get(T_FAIL_REASON, "orphaned"))
            return
        if st is None:  # killed before the run was created: create it now
            run_id = self._start_run(t.number, t.params, t.user_attrs.get(T_BASELINE), t.user_attrs.get(T_RETRY_OF))
            if run_id is None:
                return
        self.run_ids[t.number] = run_id  # finished Optuna trials take no new attrs; keep the id here
        if t.state.name == "COMPLETE" and t.user_attrs.get(T_RESULT):
            result = TrialResult.model_validate(t.user_attrs[T_RESULT])
            values = dict(zip([o.name for o in self.infos], t.values))
            feasible = all(v <= 0 for v in t.constraints.values()) if t.constraints else None
            self._track(self.tracker.finish_trial, run_id, result, values, feasible,
                        t.user_attrs.get(T_SECONDS, 0.0))
        else:
            self._track(self.tracker.fail_trial, run_id, t.user_attrs.get(T_FAIL_REASON, "failed (no reason stored)"))

    def _enqueue_baselines(self) -> None:
        if not self.config.search.baselines:
            return
        have = {t.user_attrs.get(T_BASELINE) for t in self.study.get_trials(deepcopy=False)}
        for label, params in self.space.uniform_baselines().items():
            if label not in have:
                self.study.enqueue_trial(params, user_attrs={T_BASELINE: label})

    def _abandon(self, reason: str) -> None:
        """Ctrl-C / SIGTERM: cancel what is in flight and orphan it, so the next run retries it."""
        from pipeline.search import ray_exec

        for ref, fl in list(self.in_flight.items()):
            ray_exec.cancel(ref)
            self._orphan(fl.trial._trial_id, fl.trial.number, dict(fl.trial.params), dict(fl.trial.user_attrs),
                         reason, [fl.run_id] if fl.run_id else [])
        self.in_flight.clear()
