"""The search driver: an Optuna multi-objective study asked and told here, trials run as Ray tasks.

The driver is the only process that talks to Optuna and to the recorder (MLflow).
It asks Optuna for candidates (ask/tell), runs each as a Ray task
(:mod:`pipeline.search.ray_exec`, :func:`pipeline.search.worker.run_trial`), keeps
``parallel`` trials in flight, and tells Optuna the measured objectives, with the
accuracy-drop limit as an Optuna *constraint* (``trial.set_constraint``, <= 0
feasible), never as a penalty on the objectives.

Resume (:class:`pipeline.search.storage.Resume`): running the same command again
continues the study. Duplicates (:class:`pipeline.search.plans.Duplicates`): a
plan already measured is told its original's values, not measured again.

Objectives (:mod:`pipeline.objectives`): ``search.objectives`` (default accuracy,
energy, size). The energy slot holds joules per inference when a meter measured
it, else latency p50 (:func:`pipeline.objectives.energy.decide_energy_mode`),
decided from the first finished trial and fixed for the study.

One energy source per study: the first finished trial's source (or an explicit
``measure.energy.meter``) is pinned, every later trial runs with that meter
explicitly (a worker without it fails the trial with the meter's reason), and a
trial that still arrives metered otherwise is FAILED, naming both sources.

Recording goes through a :class:`pipeline.search.observers.Recorder` handed in by
the caller (``pipeline.cli.search`` gives the MLflow tracker and the review).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline.config import ConfigError, SearchConfig
from pipeline.objectives import (
    METERS,
    ObjectiveInfo,
    decide_energy_mode,
    energy_source_mismatch,
    objective_infos,
    objective_values,
)
from pipeline.results import TrialResult
from pipeline.search import ray_exec
from pipeline.search.budget import TimeBudget
from pipeline.search.observers import Finisher, NullRecorder, RecorderFactory
from pipeline.search.plans import Duplicates, knobs
from pipeline.search.records import T_PLAN_BRIEF, TrialRecord, build_records, front_summary, hypervolume_box
from pipeline.search.storage import (
    A_CONFIG_HASH, A_ENERGY_METER, A_ENERGY_MODE, A_ENERGY_NOTE, A_ENERGY_PIN, A_ENERGY_SOURCE, A_HV_BOX,
    A_MAX_DROP, A_OBJECTIVES, A_PARENT_RUN, A_REFERENCE_ACCURACY, A_REMEASURED, A_TRACKING_URI, A_VERDICT, CONSTRAINT,
    T_BASELINE, T_FAIL_REASON, T_PLAN_KEY, T_PLAN_SUMMARY, T_RESULT, T_RETRY_OF, T_RUN_ID, T_SECONDS, T_SEED,
    Resume, StudyLock, check_optuna_storage, check_workdir, config_hash, default_storage, existing_study_attrs,
    init_lock_path, make_sampler, measured_count, refuse_changed_config, set_metric_names, store_init_lock,
    study_counts, validate_study_name,
)
from pipeline.search.retries import Retries
from pipeline.search.seed_queue import SeedQueue
from pipeline.search.spool import Spool, Tracking
from pipeline.search.worker import TrialTask
from pipeline.urls import mask_url, normalize_db_url, without_password

log = logging.getLogger(__name__)

from pipeline.search.options import (  # noqa: F401 - re-exported: callers import them from the runner
    MAX_CONSECUTIVE_DUPLICATES,
    SearchOptions,
    SearchSummary,
)


@dataclass
class _InFlight:
    trial: Any  # optuna.trial.Trial
    run_id: str | None
    t0: float
    label: str | None
    out_dir: Path


class StudyRunner(Resume, SeedQueue, Duplicates, Retries, Tracking, TimeBudget):
    """One invocation of ``search``: sets up the study, the recorder and Ray, then runs the loop."""

    def __init__(self, config: SearchConfig, opts: SearchOptions, recorder: RecorderFactory | None = None,
                 finishers: tuple[Finisher, ...] = ()):
        self.config = config
        self.opts = opts
        self.recorder_factory = recorder or NullRecorder
        self.finishers = tuple(finishers)
        self.study_name = validate_study_name(opts.study or config.name)
        self.work = check_workdir(config.work_path.resolve())
        self.study_dir = self.work / "studies" / self.study_name
        self.target = opts.trials or config.search.trials
        self.max_drop = config.search.max_accuracy_drop
        self.tracking_errors: list[str] = []
        self.orphans = 0
        self.run_ids: dict[int, str] = {}  # trial number -> MLflow child run
        self.pinned_meter: str | None = None  # measure.energy.meter every dispatched trial runs with
        self._plan_key_cache: dict[int, str] = {}  # trial number -> plan_key
        self._briefs: dict[int, str] = {}  # trial number -> the plan as its progress line shows it
        self.duplicates: dict[int, list[int]] = {}  # measured trial -> later proposals of the same plan
        self.consecutive_duplicates = 0
        self.stopped_early = ""
        self._ray_started = False  # Ray was started early, for the sensitivity table (see _table_units)
        self.spool = Spool(self.study_dir)
        # Before Ray starts: a storage that is not an Optuna database, or has no driver here, ends now.
        self.storage = check_optuna_storage(opts.storage or default_storage(config))

    # -- setup ---------------------------------------------------------------------------------
    def _setup(self) -> None:
        import optuna
        import yaml

        from pipeline.backends import quant_target_for
        from pipeline.search.preflight import check_inputs, export_reference, trial_reference
        from search_spaces.space import SearchSpace

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        cfg = self.config
        self.reference = export_reference(cfg, self.work)  # cached; workers reuse the file
        check_inputs(cfg, self.reference, self.opts.parallel or 1)  # data and batch memory, before Ray
        self.reference = trial_reference(cfg, self.reference)  # export.optimize applied: what every trial starts from
        self.layer_names = self.reference.layer_table.names
        self.hash, self.storage_shown = config_hash(cfg), mask_url(self.storage)  # never the password, anywhere
        refuse_changed_config(existing_study_attrs(self.storage, self.study_name, init_lock_path(self.storage, self.work)),
                              self.study_name, self.storage_shown, self.hash)  # before the table is measured
        # Sensitivity (issue 15): formats the backend only emulates are left out where a native one is as
        # small; when the search is seeded (search.sensitivity.seed: auto decides by the table's cost, see
        # seed_decision) the per-layer table also prunes hopeless formats, seeds the study with solver plans
        # and screens proposals (measured once, cached per model + data + formats).
        from pipeline.sensitivity import seeding_for, space_inputs

        self.seeding = seeding_for(cfg, layer_table=self.reference.layer_table, trials=self.target,
                                   time_budget_s=self.opts.time_budget_s, say=self._say,
                                   progress=self._table_progress, units_runner_for=self._table_units)
        self.space = SearchSpace.build(cfg.search, self.layer_names, target=quant_target_for(cfg.measure.backend),
                                       **space_inputs(cfg, self.reference.layer_table, self.seeding))
        names = list(cfg.search.objectives)
        self.infos = objective_infos(names, cfg.metric.name, bool(cfg.metric.higher_is_better), None)
        # Optuna creates its tables on first use; drivers started together on a fresh workdir take turns.
        with store_init_lock(init_lock_path(self.storage, self.work)):
            self.study = optuna.create_study(
                study_name=self.study_name, storage=self.storage, sampler=make_sampler(cfg),
                directions=[o.direction for o in self.infos], load_if_exists=True,
            )
        held = len(self.study.get_trials(deepcopy=False))
        if held:
            self.study.sampler = make_sampler(cfg, offset=held)
        attrs = self.study.user_attrs
        refuse_changed_config(attrs, self.study_name, self.storage_shown, self.hash)  # a driver that raced us
        if A_CONFIG_HASH not in attrs:
            for k, v in {A_CONFIG_HASH: self.hash, A_OBJECTIVES: names, A_MAX_DROP: self.max_drop,
                         "metric": cfg.metric.name, "config_name": cfg.name}.items():
                self.study.set_user_attr(k, v)
            set_metric_names(self.study, names)
        self._refresh_infos()
        self.tracker = self.recorder_factory(self.study_name, self.hash)
        if held == 0:
            self._refuse_lost_study()
        self.study.set_user_attr(A_PARENT_RUN, self.tracker.parent_run_id)
        # Stored without its password (never masked: ``***`` would be sent as one); readers take it from
        # PGPASSWORD / ~/.pgpass or --tracking-uri (pipeline.cli.common.tracking_uri).
        self.study.set_user_attr(A_TRACKING_URI, without_password(self.tracker.uri))
        s = cfg.search
        self.tracker.log_study(
            params={
                "sampler": s.sampler, "seed": s.seed, "objectives": ",".join(names),
                "directions": ",".join(o.direction for o in self.infos), "max_accuracy_drop": self.max_drop,
                "formats": ",".join(f.value for f in s.formats), "methods": ",".join(s.methods),
                "space": self.space.describe(), "layers": len(self.layer_names),
                "params_quantizable": self.reference.layer_table.total_params(),
                "params_left_fp32": self.reference.layer_table.unquantized_params(), "optuna_storage": self.storage_shown,
                "metric": cfg.metric.name, "backend": cfg.measure.backend, "batch_size": cfg.measure.batch_size,
                "reference_onnx": self.reference.onnx_path, "baselines": s.baselines, "eval_batch_size": cfg.measure.eval_batch,
            },
            config_yaml=yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False),
        )
        box = attrs.get(A_HV_BOX)
        if box:  # a re-created MLflow record gets the study's fixed box again
            self._track(self.tracker.log_study, {"hypervolume_reference": box["reference"],
                                                 "hypervolume_ideal": box["ideal"]})

    def _refuse_lost_study(self) -> None:
        """An Optuna study with no trials whose MLflow record already holds trial runs: the Optuna database
        was lost or replaced. Going on would log new trials under the old numbers; refuse, naming both."""
        from pipeline.urls import mask_url

        runs = self._track(self.tracker.trial_run_states) or {}
        if runs:
            raise ConfigError(
                f"--storage: study {self.study_name!r} in {mask_url(self.storage)} holds no trials, but its MLflow record "
                f"({self.tracker.uri}, parent run {self.tracker.parent_run_id}) holds {len(runs)} trial run(s): the "
                f"Optuna database was deleted, emptied or replaced. Point --storage at the original database, or "
                f"start a new study with --study NEW_NAME")

    def _refresh_infos(self) -> None:
        attrs = self.study.user_attrs
        self.energy_mode = attrs.get(A_ENERGY_MODE)
        self.energy_note = attrs.get(A_ENERGY_NOTE, "")
        self.infos = objective_infos(list(self.config.search.objectives), self.config.metric.name,
                                     bool(self.config.metric.higher_is_better), self.energy_mode,
                                     attrs.get(A_ENERGY_SOURCE, ""))
        pin = attrs.get(A_ENERGY_PIN) or {}
        source = attrs.get(A_ENERGY_SOURCE)
        explicit = self.config.measure.energy.meter
        if pin.get("meter") in METERS:
            self.pinned_meter = pin["meter"]
        elif source in METERS:  # a study from before pinning: pin to what it measured
            self.pinned_meter = source
        elif explicit in METERS:  # the user's choice pins the study from its first trial
            self.pinned_meter = explicit
        else:
            self.pinned_meter = None

    def _decide_energy(self, result: TrialResult, number: int) -> None:
        """Fix the study's energy source (and, with an energy objective, what fills that slot).

        The first finished trial decides. From then on every dispatched trial runs
        with ``measure.energy.meter`` pinned to that source (:meth:`_task_config`): a
        worker without it fails the trial with the meter's reason instead of quietly
        measuring another kind of joule. Trials already in flight are checked on
        arrival (:func:`energy_source_mismatch`).
        """
        e = result.measurement.energy
        attrs = self.study.user_attrs
        fields: dict[str, str] = {}
        if e is not None and attrs.get(A_ENERGY_SOURCE) in (None, "none"):
            self.study.set_user_attr(A_ENERGY_SOURCE, e.source)
            self.study.set_user_attr(A_ENERGY_METER, e.meter)
            fields.update(source=e.source, meter=e.meter)
        if e is not None and e.source in METERS and not attrs.get(A_ENERGY_PIN):
            explicit = self.config.measure.energy.meter
            by = ("measure.energy.meter in the config" if explicit == e.source
                  else f"trial {number}, the first to finish (measure.energy.meter: {explicit})")
            self.study.set_user_attr(A_ENERGY_PIN, {"meter": e.source, "by": by})
            fields.update(pinned=e.source, pin_note=(
                f"every later trial runs with measure.energy.meter={e.source} (pinned by {by}); "
                f"a worker without {e.source} fails its trial instead of switching source"))
        if self.energy_mode is None and "energy" in self.config.search.objectives:
            mode, note = decide_energy_mode(result, list(self.config.search.objectives))
            self.study.set_user_attr(A_ENERGY_MODE, mode)
            self.study.set_user_attr(A_ENERGY_NOTE, note)
            if e is None and A_ENERGY_SOURCE not in attrs:
                self.study.set_user_attr(A_ENERGY_SOURCE, "none")
                self.study.set_user_attr(A_ENERGY_METER, "")
                fields.update(source="none", meter="")
            names = ["latency_ms_p50" if (n == "energy" and mode == "latency") else n
                     for n in self.config.search.objectives]
            set_metric_names(self.study, names)
            fields.update(objective=mode, note=note)
        self._refresh_infos()
        if fields:
            self._track(self.tracker.log_energy, **fields)

    # -- the loop ------------------------------------------------------------------------------
    def _finished(self) -> int:
        return measured_count(self.study)

    def _task_config(self, res: ray_exec.Resources) -> dict[str, Any]:
        cfg = self.config.model_dump(mode="json")
        cfg["measure"]["threads"] = int(res.cpus)  # ORT threads = CPUs the task holds
        cfg["workdir"] = str(self.config.work_root)  # anchored here: a worker has no config file to anchor to
        pinned = getattr(self, "pinned_meter", None)
        if pinned:  # the study's energy source: an explicit meter fails loudly where it is missing
            cfg["measure"]["energy"]["meter"] = pinned
        return cfg

    def _dispatch(self, dispatcher: ray_exec.Dispatcher, res: ray_exec.Resources) -> bool:
        """Ask for a trial and send it to Ray; True when it was told at once instead (failed plan, pruned,
        duplicate): only then can the study's finished count have changed."""
        from optuna.trial import TrialState

        trial = self.study.ask()
        label = trial.user_attrs.get(T_BASELINE)
        retry_of = trial.user_attrs.get(T_RETRY_OF)
        try:
            plan = self.space.suggest(trial)
        except Exception as exc:  # noqa: BLE001 - a bad enqueued param set fails one trial
            reason = f"could not build a plan from the parameters: {type(exc).__name__}: {exc}"
            trial.set_user_attr(T_FAIL_REASON, reason)
            self.study.tell(trial, state=TrialState.FAIL)
            run_id = self._start_run(trial.number, trial.params, label, retry_of)
            if run_id:
                self._track(self.tracker.fail_trial, run_id, reason)
            self.progress.trial_finished(trial.number, "FAIL", reason, counts=study_counts(self.study))
            return True
        resolved = plan.resolve(self.layer_names)  # once per proposal: summary, key, tags and brief read it
        summary, key = resolved.summary(), resolved.key()
        self._briefs[trial.number] = brief = resolved.brief()
        proposed = label is None and retry_of is None and trial.user_attrs.get(T_SEED) is None
        skip = self.seeding.skip_reason(plan) if proposed else None
        if skip:  # the sensitivity table says it cannot meet the accuracy budget: no trial spent on it
            trial.set_user_attr(T_PLAN_SUMMARY, summary)
            trial.set_user_attr(T_FAIL_REASON, skip)
            self.study.tell(trial, state=TrialState.PRUNED)
            self.progress.trial_finished(trial.number, "PRUNED", skip, counts=study_counts(self.study))
            self.consecutive_duplicates += 1  # a sampler stuck on hopeless plans stops like one stuck on repeats
            return True
        if label is None and retry_of is None:  # baselines and orphan retries are always measured
            original = self._measured_plans().get(key)
            if original is not None:
                self._tell_duplicate(trial, original, summary)
                self.consecutive_duplicates += 1
                return True
        self.consecutive_duplicates = 0
        trial.set_user_attr(T_PLAN_SUMMARY, summary)
        trial.set_user_attr(T_PLAN_KEY, key)
        trial.set_user_attr(T_PLAN_BRIEF, brief)
        self._plan_key_cache[trial.number] = key
        run_id = self._track(self.tracker.start_trial, trial.number, label, plan.to_yaml(), summary,
                             resolved.tags(), {**knobs(plan, trial.params), T_PLAN_BRIEF: brief}, retry_of)
        if run_id:
            trial.set_user_attr(T_RUN_ID, run_id)
            self.run_ids[trial.number] = run_id
        out_dir = self.study_dir / "trials" / f"{trial.number:04d}"
        task = TrialTask(study=self.study_name, number=trial.number, config=self._task_config(res),
                         base_dir=str(self.config.base_dir.resolve()),
                         cwd=os.getcwd(), plan_yaml=plan.to_yaml(), out_dir=str(out_dir), energy=self.opts.energy,
                         driver_node_id=self.driver_node, screen=proposed)
        ref = dispatcher.submit(task, f"{self.study_name}-trial-{trial.number}")
        self.in_flight[ref] = _InFlight(trial, run_id, time.monotonic(), label, out_dir)
        return False

    def _handle(self, ref, dispatcher: ray_exec.Dispatcher) -> None:
        from optuna.trial import TrialState

        fl = self.in_flight.pop(ref)
        outcome = dispatcher.collect(ref, fl.trial.number, fl.t0)
        fl.run_id = fl.run_id or self._late_run(fl)
        placed = ray_exec.record_placement(fl.trial, outcome)  # node id, hostname, Ray attempt (+ MLflow tags below)
        values = None
        if outcome.status == "complete" and outcome.result is not None:
            result = outcome.result
            if outcome.files:  # ran on another node: keep the artifact next to the driver's record
                fl.out_dir.mkdir(parents=True, exist_ok=True)
                for name, blob in outcome.files.items():
                    (fl.out_dir / name).write_bytes(blob)
                result.artifact_path = str(fl.out_dir / Path(result.artifact_path).name)
            self._decide_energy(result, fl.trial.number)
            try:
                mismatch = energy_source_mismatch(self.study.user_attrs.get(A_ENERGY_SOURCE), result)
                if mismatch:
                    raise ValueError(mismatch)
                values = objective_values(result, self.infos)
            except ValueError as exc:
                outcome.status, outcome.reason = "fail", str(exc)
        elif outcome.status == "fail" and self.pinned_meter and "MeterUnavailable" in outcome.reason:
            pin = self.study.user_attrs.get(A_ENERGY_PIN) or {}
            outcome.reason += (f"\n(this study's energy meter is pinned to {self.pinned_meter}"
                               + (f" by {pin['by']}" if pin.get("by") else "")
                               + " so that all its trials are metered alike; run the search where "
                               f"{self.pinned_meter} is available, or start a new study with --study NEW)")
        if values is not None:
            feasible = None
            drop = outcome.result.measurement.accuracy_drop
            if self.max_drop is not None and drop is not None:
                excess = float(drop) - float(self.max_drop)
                fl.trial.set_constraint(CONSTRAINT, excess)
                feasible = excess <= 0
            if outcome.result.measurement.reference_accuracy is not None \
                    and A_REFERENCE_ACCURACY not in self.study.user_attrs:
                self.study.set_user_attr(A_REFERENCE_ACCURACY, outcome.result.measurement.reference_accuracy)
            fl.trial.set_user_attr(T_RESULT, outcome.result.model_dump(mode="json"))
            fl.trial.set_user_attr(T_SECONDS, outcome.seconds)
            self.study.tell(fl.trial, values)
            if fl.run_id:
                self._track(self.tracker.finish_trial, fl.run_id, outcome.result,
                            dict(zip([o.name for o in self.infos], values)), feasible, outcome.seconds, placed)
            text = "  ".join(f"{o.shown}={v:.4g}" for o, v in zip(self.infos, values))
            flag = "" if feasible is not False else "  [infeasible: accuracy drop]"
            self.progress.trial_finished(fl.trial.number, "COMPLETE",
                                         f"{fl.label or ''} {text}{flag}  | "
                                         f"{self._briefs.pop(fl.trial.number, fl.trial.user_attrs.get(T_PLAN_SUMMARY, ''))}"
                                         .strip(),
                                         counts=study_counts(self.study))
        elif outcome.status == "pruned":  # its drop on the eval screen rules it out (search.screen)
            fl.trial.set_user_attr(T_FAIL_REASON, outcome.reason)
            fl.trial.set_user_attr(T_SECONDS, outcome.seconds)
            self.study.tell(fl.trial, state=TrialState.PRUNED)
            if fl.run_id:
                self._track(self.tracker.fail_trial, fl.run_id, outcome.reason, outcome.seconds, placed)
            self.progress.trial_finished(fl.trial.number, "PRUNED", outcome.reason, counts=study_counts(self.study))
        else:
            retried = self._retry_system_failure(fl, outcome.reason)
            if retried:  # first line: what the progress line and the MLflow tag show
                first, _, rest = outcome.reason.partition("\n")
                outcome.reason = f"{first} ({retried})" + (f"\n{rest}" if rest else "")
            fl.trial.set_user_attr(T_FAIL_REASON, outcome.reason)
            fl.trial.set_user_attr(T_SECONDS, outcome.seconds)
            self.study.tell(fl.trial, state=TrialState.FAIL)
            if fl.run_id:
                self._track(self.tracker.fail_trial, fl.run_id, outcome.reason, outcome.seconds, placed)
            self.progress.trial_finished(fl.trial.number, "FAIL", f"{fl.label or ''} {outcome.reason.splitlines()[0]}".strip(),
                                         counts=study_counts(self.study))
            if outcome.fatal and not self.stopped_early:  # the reference itself failed: so would every trial
                self._stop_early(f"{outcome.reason.splitlines()[0]}; every trial would fail the same way: fix it "
                                 "and run the search again")

    def _refresh_front(self, force_plots: bool = False) -> dict[str, float]:
        records = build_records(self.study, self.infos)
        for r in records:
            r.run_id = self.run_ids.get(r.number) or r.run_id  # the run in the current store
        attrs = self.study.user_attrs
        box = attrs.get(A_HV_BOX)
        if box is None:
            box = hypervolume_box(records, self.infos, attrs.get(A_REFERENCE_ACCURACY), self.max_drop,
                                  self.config.search.baselines)
            if box is not None:
                self.study.set_user_attr(A_HV_BOX, box)
                self._track(self.tracker.log_study, {"hypervolume_reference": box["reference"],
                                                     "hypervolume_ideal": box["ideal"]})
        summary = front_summary(records, self.infos, box)
        if force_plots or time.monotonic() - getattr(self, "_front_at", -1e9) >= self.opts.front_every_s:
            plots = force_plots or self.tracker.seconds_since_plot() >= self.opts.plot_every_s
            self._track(self.tracker.update_front, records, self.infos, summary, int(summary["trials_complete"]
                        + summary["trials_failed"]), plots)
            self._front_at = time.monotonic()
        self.records = records
        return summary

    def _state(self, summary: dict[str, float], res: ray_exec.Resources):
        from pipeline.progress import ProgressState

        st = self._pstate or ProgressState(study=self.study_name, target=self.target)
        st.complete = int(summary.get("trials_complete", 0))
        st.failed = int(summary.get("trials_failed", 0))
        st.running = len(self.in_flight)
        st.parallel = self.parallel
        st.front_size = int(summary.get("front_size", 0))
        st.hypervolume = summary.get("hypervolume")
        st.objective_note = ", ".join(f"{o.direction[:3]} {o.label}" for o in self.infos)
        st.where = res.where
        self._pstate = st
        return st

    def run(self) -> SearchSummary:
        from rich.markup import escape

        from pipeline.progress import SearchProgress

        t_start = time.monotonic()
        with StudyLock(self.study_dir / "driver.lock"):
            self.progress = SearchProgress(mode=self.opts.progress)
            self._pstate = None
            self.in_flight: dict[Any, _InFlight] = {}
            status = "FAILED"
            started = False
            try:
                # Model, data, batch memory, Optuna and MLflow first: a bad input ends here, before Ray.
                self._setup()
                started = ray_exec.ray_init(self.opts.ray_address, self.opts.verbose, self.config) or self._ray_started
                res = self._res = ray_exec.cluster_resources(self.config, self.opts.parallel)
                self.parallel = max(1, self.opts.parallel or res.capacity)
                # Without --parallel, one trial per node also waits in Ray's queue (ray_exec.Resources.queued).
                self.in_flight_limit = self.parallel + (0 if self.opts.parallel else res.queued)
                self.driver_node = ray_exec.driver_node()
                # Workers import the runtimes and load the datasets while this process reconciles the
                # study and asks for the first trials. Their results are not needed: a problem there
                # shows up again, with its reason, in the first trials.
                _warm = ray_exec.warm(self.parallel, res, self._task_config(res),
                                      str(self.config.base_dir.resolve()), os.getcwd())
                self._recover()
                self._enqueue_baselines()
                dispatcher = ray_exec.Dispatcher(res, ray_exec.share(self.config, self.reference))
                if self.seeding.summary():
                    self._track(self.tracker.log_seeding, self.seeding.summary())
                # tags, not params: a resumed study may run with another --parallel
                self._track(self.tracker.log_resources, self.parallel, res.cpus, res.gpus, res.where,
                            self.pinned_meter)
                self.progress.message(escape(
                    f"study {self.study_name}: {self.space.describe()}; target {self.target} trials, "
                    f"{self._finished()} already finished; {res.where}; optuna {self.storage_shown}"))
                if self.orphans:
                    self.progress.message(f"resumed: {self.orphans} orphaned trial(s) marked failed and re-queued")
                with self.progress:
                    summary = self._refresh_front()
                    self.progress.update(self._state(summary, res))
                    self._budget_t0 = time.monotonic()  # the budget counts the search, not the one-off setup
                    finished = self._finished()  # read again only when a trial was told (one query each)
                    while True:
                        while (not self.stopped_early and len(self.in_flight) < self.in_flight_limit
                               and finished + len(self.in_flight) < self.target):
                            if self._budget_spent():
                                break
                            told = self._dispatch(dispatcher, res)
                            if self.consecutive_duplicates >= self.opts.max_consecutive_duplicates:
                                self._stop_early(
                                    f"the sampler proposed {self.consecutive_duplicates} plans in a row that this "
                                    f"study had already measured (the space looks exhausted or the sampler has "
                                    f"converged); the study holds {self._finished()} measured trial(s) of the "
                                    f"{self.target} asked for")
                                break
                            if told:
                                finished = self._finished()
                        if not self.in_flight:
                            break
                        if self.spool.down:
                            self._probe_tracking()
                        ready = dispatcher.wait(list(self.in_flight), timeout=0.5)
                        for ref in ready:
                            self._handle(ref, dispatcher)
                            self._maybe_enqueue_seeds()
                        if ready:
                            summary = self._refresh_front()
                            finished = self._finished()
                        self.progress.update(self._state(summary, res))
                    if self.spool.down:  # one last look before the end: backfill now if it is back
                        self.spool._last_probe = 0.0
                        self._probe_tracking()
                    summary = self._refresh_front(force_plots=True)
                    self.progress.update(self._state(summary, res))
                    if self.spool.down:
                        self.tracking_errors.append(
                            f"MLflow {self.tracker.uri} was still unreachable at the end: {self.spool.pending()} "
                            f"event(s) are spooled in {self.spool.path}; run the same command again once it "
                            "answers, and the study's MLflow record is backfilled from Optuna")
                    for finish in self.finishers:
                        self._track(finish, self.tracker, self.study)
                    if A_REMEASURED in self.study.user_attrs:  # the final front, on the re-measured numbers
                        summary = self._refresh_front()
                status = "FINISHED"
            except KeyboardInterrupt:
                status = "KILLED"
                self._abandon("interrupted (Ctrl-C / SIGTERM): candidate re-queued for the next run")
                raise
            finally:
                if hasattr(self, "tracker"):
                    self._track(self.tracker.end, status)
                if started or self._ray_started:
                    ray_exec.shutdown()
        return self._summary(summary, res, time.monotonic() - t_start)

    def _say(self, text: str) -> None:
        from rich.markup import escape

        self.progress.message(escape(text))

    def _table_units(self, sub_config, sub_evaluator):
        """The sensitivity table's candidates on the search's Ray workers (:func:`table_tasks.ray_units_for`)."""
        from pipeline.search.table_tasks import ray_units_for

        units, started = ray_units_for(self.config, self.opts, sub_config, sub_evaluator.reference, self._say)
        self._ray_started |= started
        return units

    def _table_progress(self, done: int, total: int, text: str) -> None:
        """One line per tenth of the sensitivity table (it is measured before the live panel starts)."""
        if done == total or done % max(1, total // 10) == 0:
            self._say(f"sensitivity {done}/{total}: {text}")

    def _summary(self, summary: dict[str, float], res: ray_exec.Resources, wall: float) -> SearchSummary:
        front = [r for r in self.records if r.on_front]
        first = self.infos[0]
        front.sort(key=lambda r: r.values[first.name], reverse=first.direction == "maximize")
        counts = study_counts(self.study)
        return SearchSummary(
            study=self.study_name, storage=self.storage_shown,
            trials_complete=int(summary["trials_complete"]), trials_failed=int(summary["trials_failed"]),
            front=front, objectives=self.infos, energy_note=self.energy_note or "",
            hypervolume=summary.get("hypervolume"), hypervolume_in_search=summary.get("hypervolume_in_search"),
            tracking_uri=mask_url(self.tracker.uri) or "",
            experiment=self.tracker.experiment_name, experiment_id=self.tracker.experiment_id,
            parent_run_id=self.tracker.parent_run_id, ui_hint=self.tracker.ui_hint(), wall_seconds=wall,
            parallel=self.parallel, cpus_per_trial=res.cpus, gpus_per_trial=res.gpus,
            orphans_recovered=self.orphans, tracking_errors=self.tracking_errors,
            trials_duplicate=int(summary.get("trials_duplicate", 0)), energy_meter_pinned=self.pinned_meter or "",
            stopped_early=self.stopped_early, seeding=self.seeding.summary(), trials_orphaned=counts.orphaned, trials_retried=counts.retried,
            mlflow_spooled=self.spool.pending() if self.spool.down else 0,
            verdict=list(self.study.user_attrs.get(A_VERDICT) or []) if A_REMEASURED in self.study.user_attrs else [],
        )


def run_search(config: SearchConfig, opts: SearchOptions | None = None, recorder: RecorderFactory | None = None,
               finishers: tuple[Finisher, ...] = ()) -> SearchSummary:
    """Run (or resume) a study until it holds ``opts.trials`` finished trials."""
    opts = opts or SearchOptions()
    previous = None
    if hasattr(signal, "SIGTERM"):
        try:
            previous = signal.signal(signal.SIGTERM, _sigterm)
        except ValueError:  # not the main thread
            previous = None
    try:
        return StudyRunner(config, opts, recorder, finishers).run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _sigterm(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt
