"""The study's own record in Optuna's storage: its URL, attribute names, identity, lock, and opening it.

Resume lives here too (:class:`Resume`): a study is continued by running the same
command again; trials a dead driver left RUNNING are marked FAIL (``orphaned``)
and their parameters enqueued again, and MLflow is reconciled with Optuna (a
trial finished in Optuna whose run was not closed is logged again from what
Optuna stored). Finished trials are never re-run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import sqlite3
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError, SearchConfig
from pipeline.urls import mask_url, normalize_db_url

# Optuna study/trial user attributes (the study's own record; MLflow mirrors it).
A_CONFIG_HASH = "config_hash"
A_OBJECTIVES = "objectives"
A_ENERGY_MODE = "energy_objective"  # "energy" | "latency" once decided
A_ENERGY_NOTE = "energy_note"
A_REFERENCE_ACCURACY = "reference_accuracy"
A_MAX_DROP = "max_accuracy_drop"
A_HV_BOX = "hypervolume_box"  # {"reference": [...], "ideal": [...]}, fixed once the baselines are in
A_PARENT_RUN = "mlflow_parent_run_id"
A_TRACKING_URI = "mlflow_tracking_uri"  # without its password (pipeline.urls.without_password)
A_ENERGY_SOURCE = "energy_source"  # nvml | rapl | estimated | none: the source every trial must share
A_ENERGY_METER = "energy_meter"  # the first trial's meter description
A_ENERGY_PIN = "energy_meter_pinned"  # {"meter": nvml|rapl|estimated, "by": why}, once pinned
A_BASELINE_RETIMING = "baseline_retiming"  # {"latency_ms": {label: p50}, "method", "error"}: the seeds' speed ratios
A_VERDICT = "remeasure_verdict"  # the comparison's sentences (front vs FP32, baselines, the one-liner), once made
A_REMEASURED = "remeasured"  # pipeline.search.remeasure.RemeasureReport (dumped), set once the search ends
T_BASELINE = "baseline"
T_SEED = "sensitivity_seed"  # a plan the sensitivity solver enqueued ("sensitivity-<i>"); measured like a proposal
T_RUN_ID = "mlflow_run_id"
T_RESULT = "result"
T_FAIL_REASON = "fail_reason"
T_ORPHANED = "orphaned"
T_RETRY_OF = "retry_of"
T_PLAN_SUMMARY = "plan_summary"
T_SECONDS = "seconds"
T_PLAN_KEY = "plan_key"  # hash of the canonical plan (see pipeline.search.plans.plan_key)
A_RUN_IDS = "mlflow_run_ids"  # {trial number: run id} where the current MLflow store differs from T_RUN_ID
T_SYSTEM_RETRIED = "system_retried"  # FAIL because its worker died (killed, OOM); its plan was enqueued again
T_RETRIES = "system_retries"  # on a re-enqueued trial: how many times its plan's worker died before
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


def sqlite_path(url: str) -> Path | None:
    """The file behind a ``sqlite:///`` URL (None for other URLs and in-memory databases)."""
    if not url.startswith("sqlite:///"):
        return None
    rest = url[len("sqlite:///"):].split("?", 1)[0]
    return Path(rest) if rest and rest != ":memory:" else None


def check_workdir(path: Path, field: str = "workdir") -> Path:
    """The work folder must be a folder (or creatable): a file there fails with its name and the fix."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{field}: {p} is a file, not a folder; point {field} at a folder "
                                  f"(e.g. --set workdir=work) or move the file away")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ConfigError(f"{field}: {p} is not writable; choose a folder you can write to")
            break
    return path


_OUT = ("move it aside to start over (mv {f} {f}.broken; the MLflow record of the old study stays, so give "
        "the new one another --study name), restore it from a backup, or point --storage at the right database")


def check_optuna_storage(url: str, field: str = "--storage") -> str:
    """The storage URL, with its driver checked and an existing SQLite file checked to be an Optuna database.

    A 0-byte, truncated or foreign file would otherwise silently become a new, empty study (whose trials
    then land under the old study's MLflow parent run) or fail deep inside Optuna's migrations.
    """
    from pipeline.urls import normalize_db_url

    url = normalize_db_url(url, field)
    check_db_driver(url, field)
    path = sqlite_path(url)
    if path is None:
        return url
    if path.is_dir():
        raise ConfigError(f"{field}: {path} is a folder, not a SQLite database file; name a file, "
                          f"e.g. sqlite:///{path / 'optuna.db'}")
    check_workdir(path.parent, field)
    if not path.exists():
        return url
    way_out = _OUT.format(f=path)
    if path.stat().st_size == 0:
        raise ConfigError(f"{field}: the Optuna database {path} is empty (0 bytes): its study is gone, and "
                          f"using it would start a new study under the old one's name. To continue, {way_out}")
    with open(path, "rb") as fh:
        header = fh.read(16)
    if header != b"SQLite format 3\x00":
        raise ConfigError(f"{field}: {path} is not a SQLite database (corrupt or another kind of file). {way_out}")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            ok = con.execute("PRAGMA quick_check").fetchone()[0]
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"{field}: the Optuna database {path} cannot be read ({exc}). {way_out}") from None
    if ok != "ok":
        raise ConfigError(f"{field}: the Optuna database {path} is corrupt (sqlite quick_check: {ok}). {way_out}")
    if tables and "studies" not in tables:
        what = " (it looks like an MLflow store)" if "experiments" in tables else ""
        raise ConfigError(f"{field}: {path} is a SQLite database but not an Optuna one{what}; point --storage at "
                          f"the study's optuna.db, or at a new file")
    return url


def check_db_driver(url: str, field: str = "--storage") -> None:
    """A SQLAlchemy URL that parses, names a known database and whose Python driver is installed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    from pipeline.urls import mask_url

    shown = mask_url(url)
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except ArgumentError:
        raise ConfigError(f"{field}: {shown!r} is not a database URL; use e.g. sqlite:///work/optuna.db or "
                          "postgresql://user@host/db") from None
    except NoSuchModuleError:
        raise ConfigError(f"{field}: {shown}: SQLAlchemy knows no database {url.partition(':')[0]!r}; use "
                          "sqlite:///..., postgresql://... or mysql://...") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise ConfigError(f"{field}: {shown} needs the Python driver {exc.name or parsed.drivername!r}, which is "
                          f"not installed here; install it (pip install {exc.name or parsed.drivername}) or use a "
                          "sqlite:/// URL") from None


def init_lock_path(url: str, workdir: Path) -> Path:
    """The lock a store is first created under: next to a SQLite file, else in the work folder."""
    path = sqlite_path(url)
    if path is not None:
        return path.with_name(path.name + ".init.lock")
    return workdir / ".store-init.lock"


def refuse_changed_config(attrs: dict, study_name: str, storage_shown: str, digest: str) -> None:
    """A study created from another config (its stored ``config_hash``) is not continued: its trials are not
    comparable with the new config's."""
    if A_CONFIG_HASH in attrs and attrs[A_CONFIG_HASH] != digest:
        raise ConfigError(
            f"--study: study {study_name!r} in {storage_shown} was created from a different config "
            f"(model, data, metric, measure or search settings changed); its trials are not comparable. "
            f"Use --study NEW_NAME (trial count, tracking and workdir may change freely)")


def existing_study_attrs(storage: str, study_name: str, lock: Path) -> dict:
    """The user attributes of the study if it exists ({} if not), read before any costly setup (the sensitivity
    table), so a refused config costs nothing."""
    import optuna

    with store_init_lock(lock):  # the first touch of a fresh store creates its tables
        try:
            return dict(optuna.load_study(study_name=study_name, storage=storage).user_attrs)
        except KeyError:
            return {}


@contextlib.contextmanager
def store_init_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock while a store is opened (and, on first use, created and migrated).

    Several drivers started at once on a fresh workdir would otherwise race in
    MLflow's alembic migrations and Optuna's table creation on the same SQLite
    file; under the lock the first creates it and the others find it ready.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
    url = normalize_db_url(storage or default_storage(config), "--storage")  # any postgresql spelling works
    try:
        return optuna.load_study(study_name=name, storage=url)
    except KeyError:
        raise ConfigError(f"--study: no study {name!r} in {mask_url(url)}; run `precision-search search --config ... "
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
    retried: int = 0  # FAIL because the worker died (killed, OOM); their plans were enqueued again

    @property
    def measured(self) -> int:
        """What counts toward ``--trials``: finished, not orphaned, not duplicates."""
        return self.complete + self.failed


def study_counts(study) -> StudyCounts:
    from optuna.trial import TrialState

    complete = failed = orphaned = duplicates = running = waiting = retried = 0
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
            elif ua.get(T_SYSTEM_RETRIED):
                retried += 1
            elif ua.get(T_DUPLICATE_OF) is None:
                failed += 1
        elif t.state == TrialState.RUNNING:
            running += 1
        elif t.state == TrialState.WAITING:
            waiting += 1
    return StudyCounts(complete, failed, orphaned, duplicates, running, waiting, retried)


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
    space, tracker and run ids).

    Optuna's storage is the one truth for trials. MLflow is a mirror: on every start
    (and when a lost tracking server comes back) each finished trial is matched to
    its run *in the current store* - the run id Optuna recorded if that store holds
    it, else a run found by the study and trial-number tags - and only a trial with
    no run there is logged again, from what Optuna stored. So a deleted
    ``mlflow.db``, a changed ``MLFLOW_TRACKING_URI`` or a spell without a server is
    repaired once, and never duplicated.
    """

    def _recover(self) -> None:
        """Orphaned RUNNING trials -> FAIL + retry; then reconcile MLflow with Optuna."""
        from optuna.trial import TrialState

        for t in self.study.get_trials(deepcopy=False):
            if t.state == TrialState.RUNNING:
                reason = ("orphaned: the search driver stopped while this trial ran (killed or interrupted); "
                          "its candidate is retried as a new trial")
                self._orphan(t._trial_id, t.number, dict(t.params), dict(t.user_attrs), reason, [])
        if self._reconcile_all() and getattr(self, "spool", None) is not None:
            self.spool.clear()  # whatever an earlier session spooled is in MLflow now

    def _reconcile_all(self) -> bool:
        """Match every finished trial to a run in the current MLflow store, logging the missing ones once.

        Returns False when MLflow could not be read (nothing was written: the spool keeps the debt).
        """
        runs = self._track(self.tracker.trial_run_states)
        if runs is None:
            return False
        for t in self.study.get_trials(deepcopy=False):
            if t.state.name == "PRUNED" and not t.user_attrs.get(T_RUN_ID) and not runs.get(t.number):
                continue  # skipped at proposal time by the sensitivity screen: never had a run, and gets none now
            if t.state.is_finished():
                self._reconcile(t, runs.get(t.number, []))
        for original, numbers in self.duplicates.items():
            if original in self.run_ids:
                self._track(self.tracker.mark_duplicates, self.run_ids[original], numbers)
        self._save_run_ids()
        return not getattr(self, "spool", None) or not self.spool.down

    def _save_run_ids(self) -> None:
        """Record where each trial's run is in the current store, where that differs from its own attribute
        (a finished Optuna trial takes no new attributes), so ``front``, the plots and ``promote`` follow it."""
        own = {t.number: t.user_attrs.get(T_RUN_ID) for t in self.study.get_trials(deepcopy=False)}
        repaired = {str(n): rid for n, rid in sorted(self.run_ids.items()) if rid and own.get(n) != rid}
        if repaired != (self.study.user_attrs.get(A_RUN_IDS) or {}):
            self.study.set_user_attr(A_RUN_IDS, repaired)

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
        for run_id in run_ids:  # runs this session started; runs of earlier sessions are reconciled after
            self.run_ids.setdefault(number, run_id)
            st = self._track(self.tracker.run_status, run_id)
            if st is not None and (st[0] != "FAILED" or st[1] != "FAIL"):
                self._track(self.tracker.fail_trial, run_id, reason)

    def _reconcile(self, t, runs: list[tuple[str, str, str]]) -> None:
        """One finished trial: find its run in the current store (never a second one), close or create it.

        ``runs`` are the store's child runs with this trial number, (run id, status, state tag),
        closed ones first.
        """
        from pipeline.results import TrialResult
        from pipeline.search.worker import A_ATTEMPT, A_HOSTNAME, A_NODE_ID

        if t.user_attrs.get(T_DUPLICATE_OF) is not None:  # never had a run of its own (see _tell_duplicate)
            if t.number not in self.duplicates.get(t.user_attrs[T_DUPLICATE_OF], []):
                self.duplicates.setdefault(t.user_attrs[T_DUPLICATE_OF], []).append(t.number)
            return
        recorded = t.user_attrs.get(T_RUN_ID)
        match = next((r for r in runs if r[0] == recorded), None) or (runs[0] if runs else None)
        if match is not None:
            run_id, status, state = match
            self.run_ids[t.number] = run_id
            if status in ("FINISHED", "FAILED") and state in ("COMPLETE", "FAIL"):
                return
        else:  # not in this store (never created, or the store was lost or changed): log it once, now
            run_id = self._start_run(t.number, t.params, t.user_attrs.get(T_BASELINE), t.user_attrs.get(T_RETRY_OF))
            if run_id is None:
                return
            self.run_ids[t.number] = run_id
        placement = {k: t.user_attrs[k] for k in (A_NODE_ID, A_HOSTNAME, A_ATTEMPT) if k in t.user_attrs}
        if t.state.name == "COMPLETE" and t.user_attrs.get(T_RESULT):
            result = TrialResult.model_validate(t.user_attrs[T_RESULT])
            values = dict(zip([o.name for o in self.infos], t.values))
            feasible = all(v <= 0 for v in t.constraints.values()) if t.constraints else None
            self._track(self.tracker.finish_trial, run_id, result, values, feasible,
                        t.user_attrs.get(T_SECONDS, 0.0), placement)
        else:
            self._track(self.tracker.fail_trial, run_id, t.user_attrs.get(T_FAIL_REASON, "failed (no reason stored)"),
                        None, placement)

    def _abandon(self, reason: str) -> None:
        """Ctrl-C / SIGTERM: cancel what is in flight and orphan it, so the next run retries it."""
        from pipeline.search import ray_exec

        for ref, fl in list(self.in_flight.items()):
            ray_exec.cancel(ref)
            self._orphan(fl.trial._trial_id, fl.trial.number, dict(fl.trial.params), dict(fl.trial.user_attrs),
                         reason, [fl.run_id] if fl.run_id else [])
        self.in_flight.clear()
