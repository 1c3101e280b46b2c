"""The search driver: an Optuna multi-objective study, trials as Ray tasks, MLflow records.

The driver is the only process that talks to Optuna and MLflow. It asks Optuna
for candidates (ask/tell), runs each as a Ray task (:func:`pipeline.trial.run_trial`),
keeps ``parallel`` trials in flight, and tells Optuna the measured objectives,
with the accuracy-drop limit as an Optuna *constraint* (``trial.set_constraint``,
<= 0 feasible), never as a penalty on the objectives.

Resume: the study lives in Optuna's storage (SQLite by default), so running the
same command again continues it. Trials a dead driver left RUNNING are marked
FAIL (``orphaned``) and their parameters are enqueued again, and MLflow is
reconciled with Optuna (a trial finished in Optuna whose run was not closed is
logged again from what Optuna stored). Finished trials are never re-run.

Objectives: ``search.objectives`` (default accuracy, energy, size). "energy" is
joules per inference when a meter measured it (NVML, RAPL); when energy is only
estimated the study optimises latency p50 in that slot instead (an estimate is
a function of time anyway) and says so in the study and the parent run. The
choice is made from the first finished trial and fixed for the study.

One energy source per study: the first finished trial's source (or an explicit
``measure.energy.meter``) is pinned, every later trial runs with that meter
explicitly (a worker without it fails the trial with the meter's reason), and a
trial that still arrives metered otherwise is FAILED, naming both sources.

Duplicate proposals: a sampled plan equal to a COMPLETE trial's plan
(:func:`plan_key`) is not measured again; Optuna is told the original's values
(see :meth:`StudyRunner._tell_duplicate` for how it is recorded), it does not
count toward ``--trials``, and after ``max_consecutive_duplicates`` such
proposals in a row the search stops asking and says why.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from pipeline import tracking_schema as S
from pipeline.config import ConfigError, SearchConfig
from pipeline.pareto import knee_point, normalized_hypervolume
from pipeline.results import TrialResult

log = logging.getLogger(__name__)

GPU_BACKENDS = {"ort-cuda", "ort-trt", "tensorrt"}
CONSTRAINT = "accuracy_drop"  # constraint name in Optuna: drop - max_accuracy_drop <= 0

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
T_BASELINE = "baseline"
T_RUN_ID = "mlflow_run_id"
T_RESULT = "result"
T_FAIL_REASON = "fail_reason"
T_ORPHANED = "orphaned"
T_RETRY_OF = "retry_of"
T_PLAN_SUMMARY = "plan_summary"
T_SECONDS = "seconds"
T_PLAN_KEY = "plan_key"  # hash of the canonical plan (see plan_key)
T_DUPLICATE_OF = "duplicate_of"  # a proposal equal to this COMPLETE trial's plan: not measured again

METERS = ("nvml", "rapl", "estimated")  # energy sources a study can pin measure.energy.meter to
MAX_CONSECUTIVE_DUPLICATES = 25  # proposals in a row that were all measured already: the sampler has converged

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# -- objectives ---------------------------------------------------------------------------------
class ObjectiveInfo(BaseModel):
    name: str  # as in search.objectives: accuracy | energy | latency | size
    direction: Literal["maximize", "minimize"]
    source: str  # key of TrialResult.objectives() optimised in this slot
    label: str  # axis label with unit

    @property
    def column(self) -> str:
        """Short column name: the objective, and what fills it when that differs."""
        return self.name if self.source == self.name else f"{self.name}({self.source})"

    @property
    def shown(self) -> str:
        """Name for people: the accuracy slot shows the task metric (``r2`` for ``mypkg.metrics:r2``)."""
        if self.name == "accuracy" and self.label not in ("", "accuracy"):
            return self.label.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
        return self.column

    @property
    def header(self) -> str:
        unit = {"latency": "ms", "size": "bytes", "energy": "J/inf"}.get(self.source, "")
        return f"{self.shown} {unit}".strip()


_LABELS = {
    "latency": "latency p50 (ms)",
    "size": "size (bytes)",
    "energy": "energy (J/inference)",
}


def objective_infos(names: list[str], metric: str, higher_is_better: bool, energy_mode: str | None,
                    energy_source: str = "") -> list[ObjectiveInfo]:
    out = []
    for n in names:
        if n == "accuracy":
            out.append(ObjectiveInfo(name=n, direction="maximize" if higher_is_better else "minimize", source=n,
                                     label=f"{metric}"))
        elif n == "energy" and energy_mode == "latency":
            out.append(ObjectiveInfo(name=n, direction="minimize", source="latency",
                                     label="latency p50 (ms), in the energy slot: energy is only estimated here"))
        elif n == "energy":
            src = f", {energy_source}" if energy_source else ""
            out.append(ObjectiveInfo(name=n, direction="minimize", source="energy", label=f"energy (J/inference{src})"))
        else:
            out.append(ObjectiveInfo(name=n, direction="minimize", source=n, label=_LABELS[n]))
    return out


def decide_energy_mode(result: TrialResult, names: list[str]) -> tuple[str, str]:
    """("energy" | "latency", why) for the energy slot, from a finished trial."""
    e = result.measurement.energy
    if e is not None and e.source != "estimated":
        return "energy", f"joules per inference, metered by {e.source} ({e.meter})"
    what = "no energy measurement" if e is None else "energy is only estimated here (no RAPL/NVML meter)"
    if "latency" in names:
        return "energy", f"{what}; latency is already an objective, so the energy slot holds the estimate"
    return "latency", f"{what}: latency p50 on {result.measurement.backend} is optimised in the energy slot"


def objective_values(result: TrialResult, infos: list[ObjectiveInfo]) -> list[float]:
    """The objective vector of a finished trial (from ``TrialResult.objectives()``)."""
    available = result.objectives()
    values = []
    for o in infos:
        if o.source not in available:
            raise ValueError(f"objective {o.name!r} needs {o.source!r}, which this trial did not measure "
                             f"(measured: {sorted(available)})")
        v = float(available[o.source])
        if not math.isfinite(v):
            raise ValueError(f"objective {o.name!r} is not finite ({v})")
        values.append(v)
    return values


def energy_source_mismatch(study_source: str | None, result: TrialResult) -> str | None:
    """Why ``result`` cannot join a study whose energy source is ``study_source`` (None if it can).

    Every source counts, the estimate included: an estimated study that took a
    RAPL- or NVML-metered trial would rank joules of different kinds against
    each other (metered numbers include idle power, the estimate does not).
    """
    if study_source in (None, "", "none"):
        return None
    e = result.measurement.energy
    if e is None:
        return None  # energy not measured in this run; an energy objective then fails on its own
    if e.source == study_source:
        return None
    return (f"energy source {e.source} ({e.meter}) differs from the study's pinned energy source {study_source}: "
            f"joules from {e.source} and {study_source} are not comparable, so this trial is not used "
            f"(run it where {study_source} is available, or start a new study with --study NEW)")


def plan_key(plan, layer_names: list[str]) -> str:
    """Identity of what a plan measures: its resolved per-layer choices, method, calibration and QAT settings.

    Knobs that do not change the artifact are left out (int8 activation mode on a
    non-INT8 layer, INT4 block size on a non-INT4 layer, calibration when nothing is
    calibrated), so two parameter sets building the same candidate get the same key.
    """
    from pipeline.formats import Format, Int8Activations

    resolved = plan.resolve(layer_names)
    layers: dict[str, dict[str, Any]] = {}
    calibrated = False
    for name, c in resolved.items():
        entry: dict[str, Any] = {"format": c.format.value}
        if c.format is Format.INT8:
            entry["int8_activations"] = c.int8_activations.value
            calibrated |= c.int8_activations is Int8Activations.STATIC
        if c.format is Format.INT4:
            entry["int4_block_size"] = int(c.int4_block_size)
        calibrated |= c.format is Format.FP8
        layers[name] = entry
    data = {"method": plan.method, "layers": layers,
            "calibration": plan.calibration.value if calibrated else None,
            "qat": plan.qat.model_dump(mode="json") if plan.qat is not None else None}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


# -- records: what the front, the plots and the CLI show -------------------------------------
class TrialRecord(BaseModel):
    number: int
    state: str  # COMPLETE | FAIL | RUNNING | WAITING
    baseline: str | None = None
    values: dict[str, float] = {}
    metrics: dict[str, float] = {}
    feasible: bool | None = None
    on_front: bool = False
    knee: bool = False
    run_id: str | None = None
    plan_summary: str = ""
    fail_reason: str = ""
    orphaned: bool = False
    retry_of: int | None = None
    duplicate_of: int | None = None  # a proposal of an already measured plan: told that trial's values
    energy_source: str | None = None  # nvml | rapl | estimated, from the trial's result
    params: dict[str, Any] = {}


def study_objectives(study, metric: str | None = None) -> list[ObjectiveInfo]:
    attrs = study.user_attrs
    names = attrs.get(A_OBJECTIVES) or [f"objective_{i}" for i in range(len(study.directions))]
    dirs = [d.name.lower() for d in study.directions]
    acc_dir = dirs[names.index("accuracy")] if "accuracy" in names else "maximize"
    infos = objective_infos(names, metric or attrs.get("metric", "accuracy"), acc_dir == "maximize",
                            attrs.get(A_ENERGY_MODE), attrs.get(A_ENERGY_SOURCE, ""))
    return infos


def build_records(study, infos: list[ObjectiveInfo]) -> list[TrialRecord]:
    """Every trial of the study, with Pareto membership (feasible, non-dominated) and the knee."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    front_numbers = {t.number for t in study.best_trials}
    records = []
    for t in trials:
        ua = t.user_attrs
        result = ua.get(T_RESULT)
        metrics = {}
        energy_source = None
        if result:
            try:
                parsed = TrialResult.model_validate(result)
                metrics = parsed.flat_metrics()
                energy_source = parsed.measurement.energy.source if parsed.measurement.energy else None
            except Exception:  # noqa: BLE001 - a record from another version still shows its values
                metrics = {}
        duplicate_of = ua.get(T_DUPLICATE_OF)
        feasible = None
        if t.state == TrialState.COMPLETE and t.constraints:
            feasible = all(v <= 0 for v in t.constraints.values())
        records.append(TrialRecord(
            number=t.number, state=t.state.name, baseline=ua.get(T_BASELINE),
            values=dict(zip([o.name for o in infos], t.values)) if t.values else {},
            metrics=metrics, feasible=feasible,
            # a duplicate repeats its original's point: the front lists the measured trial once
            on_front=t.number in front_numbers and duplicate_of is None,
            run_id=ua.get(T_RUN_ID), plan_summary=ua.get(T_PLAN_SUMMARY, ""),
            fail_reason=ua.get(T_FAIL_REASON, ""), orphaned=bool(ua.get(T_ORPHANED)),
            retry_of=ua.get(T_RETRY_OF), duplicate_of=duplicate_of, energy_source=energy_source,
            params=dict(t.params),
        ))
    front = [r for r in records if r.on_front]
    if front:
        pts = [[r.values[o.name] for o in infos] for r in front]
        front[knee_point(pts, [o.direction for o in infos])].knee = True
    return records


def hypervolume_box(records: list[TrialRecord], infos: list[ObjectiveInfo], reference_accuracy: float | None,
                    max_drop: float | None, baselines: bool = True) -> dict[str, list[float]] | None:
    """The fixed box hypervolume is measured in, or None while it cannot be fixed yet.

    Ideal point: the FP32 reference's accuracy at zero cost. Reference point: the
    accuracy-drop limit, and for each cost the worst value among the uniform
    baselines (so the box is "what one format everywhere spans"). It is fixed once
    every baseline has finished (without baselines: the first five completed
    trials) and stored with the study, so the hypervolume only ever grows as the
    search finds better trade-offs, and a resumed study keeps the same box.
    """
    done = [r for r in records if r.state == "COMPLETE" and r.duplicate_of is None]
    if baselines:
        base = [r for r in records if r.baseline and not r.orphaned]
        if not base or any(r.state in ("RUNNING", "WAITING") for r in base):
            return None
        box_trials = [r for r in base if r.state == "COMPLETE"]
    else:
        box_trials = sorted(done, key=lambda r: r.number)[:5]
        if len(box_trials) < 5:
            return None
    if not box_trials:
        return None
    ref_point, ideal = [], []
    for o in infos:
        vals = [r.values[o.name] for r in box_trials]
        if o.name == "accuracy":
            best = max(vals) if o.direction == "maximize" else min(vals)
            ref_acc = reference_accuracy if reference_accuracy is not None else best
            sign = 1.0 if o.direction == "maximize" else -1.0
            floor = ref_acc - sign * max_drop if max_drop else (min(vals) if sign > 0 else max(vals))
            ideal.append(float(ref_acc))
            ref_point.append(float(floor))
        else:
            ideal.append(0.0)
            ref_point.append(float(max(vals)))
    return {"reference": ref_point, "ideal": ideal}


def front_summary(records: list[TrialRecord], infos: list[ObjectiveInfo],
                  box: dict[str, list[float]] | None) -> dict[str, float]:
    """front_size, trial counts and (once the box is fixed) the normalised hypervolume of the feasible trials."""
    done = [r for r in records if r.state == "COMPLETE" and r.duplicate_of is None]
    out = {
        "front_size": float(sum(r.on_front for r in records)),
        "trials_complete": float(len(done)),
        "trials_failed": float(sum(r.state == "FAIL" and not r.orphaned for r in records)),
        "trials_duplicate": float(sum(r.duplicate_of is not None for r in records)),
    }
    feasible = [r for r in done if r.feasible is not False]
    if box is None or not feasible:
        return out
    pts = [[r.values[o.name] for o in infos] for r in feasible]
    out["hypervolume"] = normalized_hypervolume(pts, [o.direction for o in infos], box["reference"], box["ideal"])
    return out


# -- settings and results of a search ------------------------------------------------------
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
    plot_every_s: float = 15.0  # front plots refresh at most this often (and at the end)
    energy: bool = True
    # Stop asking after this many proposals in a row were plans the study already measured.
    max_consecutive_duplicates: int = MAX_CONSECUTIVE_DUPLICATES


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
    stopped_early: str = ""  # why the search ended before --trials (the sampler kept proposing duplicates)


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
    data = config.model_dump(mode="json", exclude={"search": {"trials"}, "tracking": True, "workdir": True})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _set_metric_names(study, names: list[str]) -> None:
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


class _StudyLock:
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


@dataclass
class _InFlight:
    trial: Any  # optuna.trial.Trial
    run_id: str | None
    t0: float
    label: str | None
    out_dir: Path


@dataclass
class _Resources:
    cpus: float
    gpus: float
    capacity: int
    where: str


def _ray_init(opts: SearchOptions) -> bool:
    """Connect to RAY_ADDRESS or start a quiet local Ray; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = opts.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address:
        import exporters
        import pipeline
        import search_spaces

        # Ship this checkout's code so workers run what the driver runs (dependencies must be installed there).
        # Folders, not module objects: an editable install can give packages a multi-entry __path__.
        code = [next(str(Path(p).resolve()) for p in m.__path__ if Path(p).is_dir())
                for m in (pipeline, exporters, search_spaces)]
        ray.init(address=address, log_to_driver=opts.verbose, logging_level=logging.WARNING,
                 runtime_env={"py_modules": code})
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=opts.verbose,
                 logging_level=logging.WARNING)
    return True


def _resources(config: SearchConfig, parallel: int | None) -> _Resources:
    import ray

    return plan_resources(config, parallel, ray.cluster_resources(), ray.nodes())


def plan_resources(config: SearchConfig, parallel: int | None, total: dict[str, float],
                   nodes: list[dict[str, Any]]) -> _Resources:
    """CPUs/GPUs per trial and how many trials the cluster holds at once.

    GPU backends (or ``auto`` on a cluster with GPUs): one GPU per trial. CPU
    backends: ``measure.threads`` CPUs per trial (= ORT threads); ``threads: 0``
    means all cores of a node, so each trial is timed alone on its node, unless
    ``--parallel`` asks for more trials at once, which splits the cores.
    """
    gpus = int(total.get("GPU", 0))
    alive = [n for n in nodes if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    node_cpus = min(int(n["Resources"]["CPU"]) for n in alive) if alive else 1
    backend = config.measure.backend
    if backend in GPU_BACKENDS or (backend == "auto" and gpus > 0):
        if gpus == 0:
            raise ConfigError(f"measure.backend: {backend} needs a GPU, but the Ray cluster has none "
                              "(set RAY_ADDRESS to a GPU cluster, or use backend: ort-cpu)")
        cpus = float(config.measure.threads or 1)
        return _Resources(cpus, 1.0, gpus, f"{len(alive)} node(s), {gpus} GPU(s): 1 GPU per trial")
    if config.measure.threads:
        cpus = min(config.measure.threads, node_cpus)
    elif parallel:
        cpus = max(1, min(node_cpus, int(total.get("CPU", 1)) // parallel))
    else:
        cpus = node_cpus  # threads: 0 means "all cores": one trial per node, measured alone
    capacity = max(1, sum(int(n["Resources"]["CPU"]) // cpus for n in alive))
    return _Resources(float(cpus), 0.0, capacity,
                      f"{len(alive)} node(s), {int(total.get('CPU', 0))} CPU(s): {cpus} CPU(s)/ORT thread(s) per trial")


class StudyRunner:
    """One invocation of ``search``: sets up study, tracking and Ray, then runs the loop."""

    def __init__(self, config: SearchConfig, opts: SearchOptions):
        self.config = config
        self.opts = opts
        self.study_name = validate_study_name(opts.study or config.name)
        self.work = config.work_path.resolve()
        self.study_dir = self.work / "studies" / self.study_name
        self.target = opts.trials or config.search.trials
        self.max_drop = config.search.max_accuracy_drop
        self.tracking_errors: list[str] = []
        self.orphans = 0
        self.run_ids: dict[int, str] = {}  # trial number -> MLflow child run
        self.pinned_meter: str | None = None  # measure.energy.meter every dispatched trial runs with
        self._plan_key_cache: dict[int, str] = {}  # trial number -> plan_key
        self.duplicates: dict[int, list[int]] = {}  # measured trial -> later proposals of the same plan
        self.consecutive_duplicates = 0
        self.stopped_early = ""

    # -- setup ---------------------------------------------------------------------------------
    def _setup(self) -> None:
        import optuna

        from pipeline.backends import quant_target_for
        from pipeline.models import get_adapter
        from pipeline.tracking import StudyTracker
        from search_spaces.space import SearchSpace

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        cfg = self.config
        self.reference = get_adapter(cfg).export_reference(self.work)  # cached; workers reuse the file
        self.layer_names = self.reference.layer_table.names
        self.space = SearchSpace.build(cfg.search, self.layer_names, target=quant_target_for(cfg.measure.backend))
        self.hash = config_hash(cfg)
        self.storage = self.opts.storage or default_storage(cfg)
        names = list(cfg.search.objectives)
        self.infos = objective_infos(names, cfg.metric.name, bool(cfg.metric.higher_is_better), None)
        self.study = optuna.create_study(
            study_name=self.study_name, storage=self.storage, sampler=make_sampler(cfg),
            directions=[o.direction for o in self.infos], load_if_exists=True,
        )
        held = len(self.study.get_trials(deepcopy=False))
        if held:
            self.study.sampler = make_sampler(cfg, offset=held)
        attrs = self.study.user_attrs
        if A_CONFIG_HASH in attrs and attrs[A_CONFIG_HASH] != self.hash:
            raise ConfigError(
                f"--study: study {self.study_name!r} in {self.storage} was created from a different config "
                f"(model, data, metric, measure or search settings changed); its trials are not comparable. "
                f"Use --study NEW_NAME (trial count, tracking and workdir may change freely)"
            )
        if A_CONFIG_HASH not in attrs:
            for k, v in {A_CONFIG_HASH: self.hash, A_OBJECTIVES: names, A_MAX_DROP: self.max_drop,
                         "metric": cfg.metric.name, "config_name": cfg.name}.items():
                self.study.set_user_attr(k, v)
            _set_metric_names(self.study, names)
        self._refresh_infos()
        experiment = cfg.tracking.experiment or cfg.name
        self.tracker = StudyTracker(experiment, self.study_name, cfg.workdir, self.hash, self.opts.tracking_uri)
        self.study.set_user_attr(A_PARENT_RUN, self.tracker.parent_run_id)
        self.study.set_user_attr(A_TRACKING_URI, self.tracker.uri)
        import yaml

        s = cfg.search
        self.tracker.log_study(
            params={
                "sampler": s.sampler, "seed": s.seed, "objectives": ",".join(names),
                "directions": ",".join(o.direction for o in self.infos), "max_accuracy_drop": self.max_drop,
                "formats": ",".join(f.value for f in s.formats), "methods": ",".join(s.methods),
                "space": self.space.describe(), "layers": len(self.layer_names),
                "params_quantizable": self.reference.layer_table.total_params(),
                "params_left_fp32": self.reference.layer_table.unquantized_params(), "optuna_storage": self.storage,
                "metric": cfg.metric.name, "backend": cfg.measure.backend, "batch_size": cfg.measure.batch_size,
                "reference_onnx": self.reference.onnx_path, "baselines": s.baselines,
            },
            config_yaml=yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False),
        )

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
        tags: dict[str, str] = {}
        if e is not None and attrs.get(A_ENERGY_SOURCE) in (None, "none"):
            self.study.set_user_attr(A_ENERGY_SOURCE, e.source)
            self.study.set_user_attr(A_ENERGY_METER, e.meter)
            tags.update({S.TAG_ENERGY_SOURCE: e.source, S.TAG_ENERGY_METER: e.meter})
        if e is not None and e.source in METERS and not attrs.get(A_ENERGY_PIN):
            explicit = self.config.measure.energy.meter
            by = ("measure.energy.meter in the config" if explicit == e.source
                  else f"trial {number}, the first to finish (measure.energy.meter: {explicit})")
            self.study.set_user_attr(A_ENERGY_PIN, {"meter": e.source, "by": by})
            tags.update({S.TAG_ENERGY_METER_PINNED: e.source,
                         S.TAG_ENERGY_PIN_NOTE: (
                             f"every later trial runs with measure.energy.meter={e.source} (pinned by {by}); "
                             f"a worker without {e.source} fails its trial instead of switching source")})
        if self.energy_mode is None and "energy" in self.config.search.objectives:
            mode, note = decide_energy_mode(result, list(self.config.search.objectives))
            self.study.set_user_attr(A_ENERGY_MODE, mode)
            self.study.set_user_attr(A_ENERGY_NOTE, note)
            if e is None and A_ENERGY_SOURCE not in attrs:
                self.study.set_user_attr(A_ENERGY_SOURCE, "none")
                self.study.set_user_attr(A_ENERGY_METER, "")
                tags.update({S.TAG_ENERGY_SOURCE: "none", S.TAG_ENERGY_METER: ""})
            names = ["latency_ms_p50" if (n == "energy" and mode == "latency") else n
                     for n in self.config.search.objectives]
            _set_metric_names(self.study, names)
            tags.update({S.TAG_ENERGY_OBJECTIVE: mode, S.TAG_ENERGY_NOTE: note})
        self._refresh_infos()
        if tags:
            self._track(self.tracker.set_study_tags, tags)

    def _track(self, fn, *args, **kwargs):
        """MLflow writes never stop the study; failures are reported and reconciled on the next run."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            msg = f"MLflow {getattr(fn, '__name__', 'call')} failed: {type(exc).__name__}: {exc}"
            log.warning(msg)
            self.tracking_errors.append(msg)
            return None

    # -- resume --------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Orphaned RUNNING trials -> FAIL + retry; finished trials whose MLflow run is not closed -> log again."""
        import optuna
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

    # -- the loop ------------------------------------------------------------------------------
    def _finished(self) -> int:
        from optuna.trial import TrialState

        return sum(1 for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
                   if not t.user_attrs.get(T_ORPHANED) and t.user_attrs.get(T_DUPLICATE_OF) is None)

    def _measured_plans(self) -> dict[str, Any]:
        """plan key -> the first COMPLETE, measured trial with that plan (cached by trial number)."""
        from optuna.trial import TrialState

        cache = self._plan_key_cache
        out: dict[str, Any] = {}
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get(T_DUPLICATE_OF) is not None:
                continue
            key = cache.get(t.number)
            if key is None:
                key = t.user_attrs.get(T_PLAN_KEY)
                if key is None:  # a trial from before plan keys were stored
                    try:
                        key = plan_key(self.space.plan_from_params(t.params), self.layer_names)
                    except (KeyError, ValueError):
                        key = ""
                cache[t.number] = key
            if key and key not in out:
                out[key] = t
        return out

    def _tell_duplicate(self, trial, original, summary: str) -> None:
        """Record a proposal of an already measured plan without measuring it again.

        Optuna is told the original's objective values and constraint, so the
        sampler learns that this region is known (and, under a fixed seed, moves
        on) and the trial's ``duplicate_of`` attribute says where the numbers come
        from. No MLflow child run is created: a run without a model would sit on
        the front next to its original with identical metrics (a second point that
        cannot be promoted), and a run pointing at the original's model would make
        one artifact look like two candidates. Instead the original's run gets a
        ``precision_search.duplicates`` tag listing the trials that re-proposed it,
        the parent run counts them (``trials_duplicate``), and the progress log
        prints one line per duplicate. Duplicates do not count toward ``--trials``
        (which counts measured trials) and never join the front themselves.
        """
        for name, value in (original.constraints or {}).items():
            trial.set_constraint(name, value)
        trial.set_user_attr(T_DUPLICATE_OF, original.number)
        trial.set_user_attr(T_PLAN_SUMMARY, summary)
        self.study.tell(trial, list(original.values))
        self.duplicates.setdefault(original.number, []).append(trial.number)
        run_id = original.user_attrs.get(T_RUN_ID) or self.run_ids.get(original.number)
        if run_id:
            self._track(self.tracker.mark_duplicates, run_id, self.duplicates[original.number])
        self.progress.trial_finished(trial.number, "COMPLETE",
                                     f"duplicate of trial {original.number} (plan already measured; "
                                     f"its values reused, not measured again)")

    def _start_run(self, number: int, params: dict, label: str | None, retry_of: int | None) -> str | None:
        try:
            plan = self.space.plan_from_params(params)
        except (KeyError, ValueError):
            from search_spaces.space import LAYER_PREFIX

            return self._track(self.tracker.start_trial, number, label, "", "(incomplete parameters)",
                               {k[len(LAYER_PREFIX):]: v for k, v in params.items() if k.startswith(LAYER_PREFIX)},
                               {k: v for k, v in params.items() if not k.startswith(LAYER_PREFIX)}, retry_of)
        return self._track(self.tracker.start_trial, number, label, plan.to_yaml(), plan.summary(self.layer_names),
                           self._layer_tags(plan), self._knobs(plan, params), retry_of)

    def _layer_tags(self, plan) -> dict[str, str]:
        """layer -> "int8(dyn)", "int4(b32)", ... (the notation of QuantPlan.summary)."""
        from pipeline.formats import Format, Int8Activations

        out = {}
        for name, c in plan.resolve(self.layer_names).items():
            tag = c.format.value
            if c.format is Format.INT8 and c.int8_activations is Int8Activations.DYNAMIC:
                tag += "(dyn)"
            if c.format is Format.INT4:
                tag += f"(b{c.int4_block_size})"
            out[name] = tag
        return out

    @staticmethod
    def _knobs(plan, params: dict) -> dict[str, Any]:
        from search_spaces.space import LAYER_PREFIX

        knobs: dict[str, Any] = {"method": plan.method}
        knobs.update({k: v for k, v in params.items() if not k.startswith(LAYER_PREFIX)})
        return knobs

    def _task_config(self, res: _Resources) -> dict[str, Any]:
        cfg = self.config.model_dump(mode="json")
        cfg["measure"]["threads"] = int(res.cpus)  # ORT threads = CPUs the task holds
        pinned = getattr(self, "pinned_meter", None)
        if pinned:  # the study's energy source: an explicit meter fails loudly where it is missing
            cfg["measure"]["energy"]["meter"] = pinned
        return cfg

    def _dispatch(self, remote, res: _Resources) -> None:
        from optuna.trial import TrialState

        from pipeline.trial import TrialTask

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
            self.progress.trial_finished(trial.number, "FAIL", reason)
            return
        summary = plan.summary(self.layer_names)
        key = plan_key(plan, self.layer_names)
        if label is None and retry_of is None:  # baselines and orphan retries are always measured
            original = self._measured_plans().get(key)
            if original is not None:
                self._tell_duplicate(trial, original, summary)
                self.consecutive_duplicates += 1
                return
        self.consecutive_duplicates = 0
        trial.set_user_attr(T_PLAN_SUMMARY, summary)
        trial.set_user_attr(T_PLAN_KEY, key)
        self._plan_key_cache[trial.number] = key
        run_id = self._track(self.tracker.start_trial, trial.number, label, plan.to_yaml(), summary,
                             self._layer_tags(plan), self._knobs(plan, trial.params), retry_of)
        if run_id:
            trial.set_user_attr(T_RUN_ID, run_id)
            self.run_ids[trial.number] = run_id
        out_dir = self.study_dir / "trials" / f"{trial.number:04d}"
        task = TrialTask(study=self.study_name, number=trial.number, config=self._task_config(res),
                         base_dir=str(self.config.base_dir.resolve()),
                         cwd=os.getcwd(), plan_yaml=plan.to_yaml(), out_dir=str(out_dir), energy=self.opts.energy,
                         driver_node_id=self.driver_node)
        ref = remote.options(num_cpus=res.cpus, num_gpus=res.gpus, name=f"{self.study_name}-trial-{trial.number}") \
            .remote(task.model_dump())
        self.in_flight[ref] = _InFlight(trial, run_id, time.monotonic(), label, out_dir)

    def _handle(self, ref) -> None:
        import ray
        from optuna.trial import TrialState

        from pipeline.trial import TrialOutcome

        fl = self.in_flight.pop(ref)
        try:
            outcome = TrialOutcome.model_validate(ray.get(ref))
        except ray.exceptions.RayError as exc:  # worker died (OOM killer, segfault) or the task was cancelled
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            outcome = TrialOutcome(number=fl.trial.number, status="fail",
                                   reason=f"the Ray task failed: {type(exc).__name__}: {first}",
                                   seconds=time.monotonic() - fl.t0)
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
                            dict(zip([o.name for o in self.infos], values)), feasible, outcome.seconds)
            text = "  ".join(f"{o.shown}={v:.4g}" for o, v in zip(self.infos, values))
            flag = "" if feasible is not False else "  [infeasible: accuracy drop]"
            self.progress.trial_finished(fl.trial.number, "COMPLETE",
                                         f"{fl.label or ''} {text}{flag}  | {fl.trial.user_attrs.get(T_PLAN_SUMMARY, '')}".strip())
        else:
            fl.trial.set_user_attr(T_FAIL_REASON, outcome.reason)
            fl.trial.set_user_attr(T_SECONDS, outcome.seconds)
            self.study.tell(fl.trial, state=TrialState.FAIL)
            if fl.run_id:
                self._track(self.tracker.fail_trial, fl.run_id, outcome.reason, outcome.seconds)
            self.progress.trial_finished(fl.trial.number, "FAIL", f"{fl.label or ''} {outcome.reason.splitlines()[0]}".strip())

    def _refresh_front(self, force_plots: bool = False) -> dict[str, float]:
        records = build_records(self.study, self.infos)
        for r in records:
            r.run_id = r.run_id or self.run_ids.get(r.number)
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
        plots = force_plots or self.tracker.seconds_since_plot() >= self.opts.plot_every_s
        self._track(self.tracker.update_front, records, self.infos, summary, int(summary["trials_complete"]
                    + summary["trials_failed"]), plots)
        self.records = records
        return summary

    def _state(self, summary: dict[str, float], res: _Resources):
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
        import ray

        from rich.markup import escape

        from pipeline.progress import SearchProgress
        from pipeline.trial import run_trial

        from pipeline.trial import warm_worker

        t_start = time.monotonic()
        with _StudyLock(self.study_dir / "driver.lock"):
            self.progress = SearchProgress(mode=self.opts.progress)
            self._pstate = None
            self.in_flight: dict[Any, _InFlight] = {}
            status = "FAILED"
            started = _ray_init(self.opts)
            try:
                res = _resources(self.config, self.opts.parallel)
                self.parallel = max(1, self.opts.parallel or res.capacity)
                self.driver_node = ray.get_runtime_context().get_node_id()
                # Workers import the runtimes and load the datasets while this process exports the
                # reference and opens Optuna and MLflow (cold workers take seconds). Their results are
                # not needed: a problem there shows up again, with its reason, in the first trials.
                _warm = [ray.remote(max_retries=0)(warm_worker).options(num_cpus=res.cpus, num_gpus=res.gpus)
                        .remote(self._task_config(res), str(self.config.base_dir.resolve()), os.getcwd())
                        for _ in range(self.parallel)]
                self._setup()
                self._recover()
                self._enqueue_baselines()
                remote = ray.remote(max_retries=0)(run_trial)
                # tags, not params: a resumed study may run with another --parallel
                self._track(self.tracker.set_study_tags, {
                    S.TAG_PARALLEL: str(self.parallel), S.TAG_CPUS_PER_TRIAL: f"{res.cpus:g}",
                    S.TAG_GPUS_PER_TRIAL: f"{res.gpus:g}", S.TAG_RAY: res.where,
                    **({S.TAG_ENERGY_METER_PINNED: self.pinned_meter} if self.pinned_meter else {})})
                self.progress.message(escape(
                    f"study {self.study_name}: {self.space.describe()}; target {self.target} trials, "
                    f"{self._finished()} already finished; {res.where}; optuna {self.storage}"))
                if self.orphans:
                    self.progress.message(f"resumed: {self.orphans} orphaned trial(s) marked failed and re-queued")
                with self.progress:
                    summary = self._refresh_front()
                    self.progress.update(self._state(summary, res))
                    while True:
                        finished = self._finished()
                        while (not self.stopped_early and len(self.in_flight) < self.parallel
                               and finished + len(self.in_flight) < self.target):
                            self._dispatch(remote, res)
                            if self.consecutive_duplicates >= self.opts.max_consecutive_duplicates:
                                self.stopped_early = (
                                    f"stopped asking for new trials: the sampler proposed "
                                    f"{self.consecutive_duplicates} plans in a row that this study had already "
                                    f"measured (the space looks exhausted or the sampler has converged); the study "
                                    f"holds {self._finished()} measured trial(s) of the {self.target} asked for")
                                self.progress.message(self.stopped_early)
                                self._track(self.tracker.set_study_tags,
                                            {S.TAG_STOPPED_EARLY: self.stopped_early})
                                break
                            finished = self._finished()
                        if not self.in_flight:
                            break
                        ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=0.5)
                        for ref in ready:
                            self._handle(ref)
                        if ready:
                            summary = self._refresh_front()
                        self.progress.update(self._state(summary, res))
                    summary = self._refresh_front(force_plots=True)
                    self.progress.update(self._state(summary, res))
                    self._track(self._write_review)
                status = "FINISHED"
            except KeyboardInterrupt:
                status = "KILLED"
                self._abandon("interrupted (Ctrl-C / SIGTERM): candidate re-queued for the next run")
                raise
            finally:
                if hasattr(self, "tracker"):
                    self._track(self.tracker.end, status)
                if started:
                    ray.shutdown()
        return self._summary(summary, res, time.monotonic() - t_start)

    def _write_review(self) -> None:
        """Review artifacts on the parent run (precision map, importance, precision-energy table)."""
        from pipeline.report import write_review

        cfg = self.config
        write_review(self.tracker.client, self.tracker.parent_run_id, study=self.study,
                     metric_name=cfg.metric.name, higher_is_better=cfg.metric.higher_is_better,
                     objectives=list(cfg.search.objectives), max_accuracy_drop=cfg.search.max_accuracy_drop)

    def _abandon(self, reason: str) -> None:
        import ray

        for ref, fl in list(self.in_flight.items()):
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001
                pass
            self._orphan(fl.trial._trial_id, fl.trial.number, dict(fl.trial.params), dict(fl.trial.user_attrs),
                         reason, [fl.run_id] if fl.run_id else [])
        self.in_flight.clear()

    def _summary(self, summary: dict[str, float], res: _Resources, wall: float) -> SearchSummary:
        front = [r for r in self.records if r.on_front]
        first = self.infos[0]
        front.sort(key=lambda r: r.values[first.name], reverse=first.direction == "maximize")
        return SearchSummary(
            study=self.study_name, storage=self.storage,
            trials_complete=int(summary["trials_complete"]), trials_failed=int(summary["trials_failed"]),
            front=front, objectives=self.infos, energy_note=self.energy_note or "",
            hypervolume=summary.get("hypervolume"), tracking_uri=self.tracker.uri,
            experiment=self.tracker.experiment_name, experiment_id=self.tracker.experiment_id,
            parent_run_id=self.tracker.parent_run_id, ui_hint=self.tracker.ui_hint(), wall_seconds=wall,
            parallel=self.parallel, cpus_per_trial=res.cpus, gpus_per_trial=res.gpus,
            orphans_recovered=self.orphans, tracking_errors=self.tracking_errors,
            trials_duplicate=int(summary.get("trials_duplicate", 0)), energy_meter_pinned=self.pinned_meter or "",
            stopped_early=self.stopped_early,
        )


def run_search(config: SearchConfig, opts: SearchOptions | None = None) -> SearchSummary:
    """Run (or resume) a study until it holds ``opts.trials`` finished trials."""
    opts = opts or SearchOptions()
    previous = None
    if hasattr(signal, "SIGTERM"):
        try:
            previous = signal.signal(signal.SIGTERM, _sigterm)
        except ValueError:  # not the main thread
            previous = None
    try:
        return StudyRunner(config, opts).run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _sigterm(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt
