"""The MLflow record of a study, written and read in one place: one parent run, one child run per trial.

Writer: :class:`StudyTracker`, the search's recorder (an observer the runner is
handed, see :mod:`pipeline.search.observers`). Reader: :func:`read_study`,
:func:`study_from_parent`, :func:`trial_result`, :func:`find_logged_model`, used by
the review and ``promote``; both sides build the same
:class:`pipeline.search.records.TrialRecord`.

Only the search driver writes here (workers never talk to MLflow), so a SQLite
tracking store has a single writer and a cluster needs no credentials on the
workers. Tag and artifact names come from :mod:`pipeline.tracking.schema`,
which ``promote`` and ``front`` read back.

Layout (experiment ``tracking.experiment``, default the config's name)::

    <study> (parent, role=study)        params: search settings, objectives, which energy objective
      |                                 metrics: front_size, hypervolume, trials_complete, trials_failed
      |                                 artifacts: config.yaml, pareto/front.csv, front.png, front.svg
      +-- uniform-fp32-000 (child)      tags: study, role=trial, trial_number, state, pareto, baseline,
      +-- trial-007 (child) ...               method, backend, device, energy_source, execution, ...
                                        params: method, knobs, plan summary, layer.<name> = format
                                        metrics: TrialResult.flat_metrics(), trial_seconds
                                        artifacts: plan.yaml, result.json, layers.csv (per layer: format,
                                                   native/emulated, observed kernel), candidate (ONNX flavor model)

Default store: ``sqlite:///<workdir>/mlflow.db`` with artifacts in
``<workdir>/mlartifacts`` (MLflow 3 refuses the plain file store); the
``MLFLOW_TRACKING_URI`` environment variable overrides it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.search.records import StudyRecord, TrialRecord
from pipeline.tracking import schema as S
from pipeline.tracking.experiments import ensure_experiment, log_file_model
from pipeline.tracking.layers_table import execution_tag, layers_csv
from pipeline.tracking.plots import front_csv, plot_front
from pipeline.urls import mask_url, normalize_db_url

if TYPE_CHECKING:
    from pipeline.config import SearchConfig
    from pipeline.objectives import ObjectiveInfo
    from pipeline.results import TrialResult

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
MAX_PARAM = 6000  # MLflow param value limit
MAX_TAG = 5000

_QUIET = ("mlflow", "alembic", "urllib3")
_SILENT = ("urllib3.connectionpool",)  # "Retrying ..." while a server is down: the spool says it once


def quiet_mlflow() -> None:
    """MLflow/alembic INFO lines would break the live progress view."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # "View run ... at: http://..." on stdout whenever a run ends against a tracking server: noise in
    # --no-progress logs and in the live view (the summary prints the one link that matters).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in _SILENT:
        logging.getLogger(name).setLevel(logging.ERROR)


_SET_BY_US: set[str] = set()  # mlflow.set_tracking_uri() also writes MLFLOW_TRACKING_URI; that is not the user's


def user_tracking_uri() -> str | None:
    """MLFLOW_TRACKING_URI as the user set it (not as an earlier study in this process left it)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return env if env and env not in _SET_BY_US else None


def default_tracking_uri(workdir: str | Path, create: bool = True) -> str:
    """$MLFLOW_TRACKING_URI, else ``<workdir>/mlflow.db``; ``create=False`` (read commands) makes no folder."""
    env = user_tracking_uri()
    if env:
        return env
    path = Path(workdir).resolve()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / DEFAULT_DB}"


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def _mlflow_ui_command(uri: str) -> str:
    """``mlflow ui`` by the venv's path: a fresh shell does not have the venv's ``mlflow`` on its PATH."""
    import shlex
    import sys

    exe = Path(sys.executable).with_name("mlflow")
    return shlex.join([str(exe) if exe.is_file() else "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1"])


class StudyTracker:
    """Writes one study's runs. Create it in the driver; it is not meant for workers."""

    def __init__(self, experiment: str, study: str, workdir: str | Path, config_hash: str,
                 tracking_uri: str | None = None):
        import mlflow
        from mlflow import MlflowClient

        from pipeline.config import ConfigError
        from pipeline.search.spool import is_unreachable
        from pipeline.search.storage import check_workdir, init_lock_path, sqlite_path, store_init_lock
        from pipeline.urls import normalize_db_url

        quiet_mlflow()
        self.study = study
        self.workdir = Path(workdir)
        self.config_hash = config_hash
        self.uri = normalize_db_url(tracking_uri or default_tracking_uri(workdir), "--tracking-uri")
        db = sqlite_path(self.uri)
        if db is not None:
            if db.is_dir():
                raise ConfigError(f"--tracking-uri: {db} is a folder, not an MLflow SQLite file; name a file, "
                                  f"e.g. sqlite:///{db / DEFAULT_DB}")
            check_workdir(db.parent, "--tracking-uri")
        if self.uri.startswith(("http://", "https://")):
            # A server that is down must not stall the study for minutes per call (MLflow's default is 7
            # retries with exponential backoff): fail fast, spool, and backfill when it is back.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        _SET_BY_US.add(self.uri)
        mlflow.set_tracking_uri(self.uri)
        self.experiment_name = experiment
        # First use by several drivers at once: MLflow's SQLAlchemy store runs alembic migrations when it
        # opens a new database, and two drivers creating the same experiment race; one at a time.
        try:
            with store_init_lock(init_lock_path(self.uri, self.workdir)):
                self.client = MlflowClient(self.uri)
                self.experiment_id = self._experiment(experiment)
                # mlflow.onnx.log_model files a LoggedModel under the *active* experiment, even with run_id=...
                mlflow.set_experiment(experiment_id=self.experiment_id)
                self.parent_run_id = self._parent()
        except Exception as exc:  # noqa: BLE001 - turned into one message naming the URI
            if is_unreachable(exc):
                raise ConfigError(f"--tracking-uri: the MLflow server {self.uri} does not answer ({_first_line(exc)});"
                                  " start it, or unset MLFLOW_TRACKING_URI / --tracking-uri to log to "
                                  "sqlite:///<workdir>/mlflow.db") from None
            if "alembic" in str(exc).lower() or "Can't locate revision" in str(exc) or \
                    type(exc).__name__ in ("DatabaseError", "OperationalError"):
                raise ConfigError(f"--tracking-uri: {self.uri} cannot be opened as an MLflow store "
                                  f"({_first_line(exc)}); point it at an MLflow database or server, or move the "
                                  "file aside to start a new one") from None
            raise
        self._pareto_state: dict[str, tuple[bool, bool]] = {}  # run id -> (on the front, the knee)
        self._last_plot = time.monotonic()  # the first plots after plot_every_s (and at the end)

    # -- experiment and parent run -----------------------------------------------
    def _experiment(self, name: str) -> str:
        # MLflow 3's UI opens an experiment without this tag on the GenAI traces overview; a study is classic
        # model development, so the runs table must be the first view.
        kind = {S.EXPERIMENT_KIND_TAG: S.EXPERIMENT_KIND}
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            return ensure_experiment(self.client, self.uri, name, self.workdir, tags=kind)
        if exp.lifecycle_stage == "deleted":
            self.client.restore_experiment(exp.experiment_id)
        if exp.tags.get(S.EXPERIMENT_KIND_TAG) is None:
            self.client.set_experiment_tag(exp.experiment_id, S.EXPERIMENT_KIND_TAG, S.EXPERIMENT_KIND)
        return exp.experiment_id

    def _parent(self) -> str:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{S.TAG_STUDY}` = '{_quote(self.study)}' and tags.`{S.TAG_ROLE}` = '{S.ROLE_STUDY}'",
            max_results=1,
        )
        if runs:
            run_id = runs[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(
            self.experiment_id, run_name=self.study,
            tags={S.TAG_STUDY: self.study, S.TAG_ROLE: S.ROLE_STUDY, S.TAG_CONFIG_HASH: self.config_hash},
        )
        return run.info.run_id

    def log_study(self, params: dict[str, Any], config_yaml: str | None = None,
                  tags: dict[str, str] | None = None) -> None:
        """Search settings (params are immutable in MLflow: only new keys are written on resume)."""
        from mlflow.entities import Param, RunTag

        have = self.client.get_run(self.parent_run_id).data.params
        new = [Param(k, str(v)[:MAX_PARAM]) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.parent_run_id, params=new[i : i + 100])
        if tags:
            self.client.log_batch(self.parent_run_id, tags=[RunTag(k, str(v)[:MAX_TAG]) for k, v in tags.items()])
        if config_yaml:
            self.client.log_text(self.parent_run_id, config_yaml, S.ARTIFACT_CONFIG)

    def set_study_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.parent_run_id, tags=[RunTag(k, str(v)[:MAX_TAG]) for k, v in tags.items()])

    @classmethod
    def factory(cls, config: "SearchConfig", tracking_uri: str | None = None):
        """A recorder factory for :class:`pipeline.search.runner.StudyRunner`: (study, config hash) -> tracker."""
        experiment = config.tracking.experiment or config.name
        return lambda study, config_hash: cls(experiment, study, config.work_root, config_hash, tracking_uri)

    # -- what the runner reports about the study (parent-run tags) ----------------------
    _ENERGY_TAGS = {"source": S.TAG_ENERGY_SOURCE, "meter": S.TAG_ENERGY_METER, "pinned": S.TAG_ENERGY_METER_PINNED,
                    "pin_note": S.TAG_ENERGY_PIN_NOTE, "objective": S.TAG_ENERGY_OBJECTIVE,
                    "note": S.TAG_ENERGY_NOTE}

    def log_resources(self, parallel: int, cpus: float, gpus: float, where: str, pinned_meter: str | None) -> None:
        """Tags, not params: a resumed study may run with another --parallel."""
        self.set_study_tags({S.TAG_PARALLEL: str(parallel), S.TAG_CPUS_PER_TRIAL: f"{cpus:g}",
                             S.TAG_GPUS_PER_TRIAL: f"{gpus:g}", S.TAG_RAY: where,
                             **({S.TAG_ENERGY_METER_PINNED: pinned_meter} if pinned_meter else {})})

    def log_energy(self, **fields: str) -> None:
        """The study's energy source, pinned meter and what fills the energy slot, as decided."""
        self.set_study_tags({self._ENERGY_TAGS[k]: v for k, v in fields.items()})

    def log_stopped_early(self, reason: str) -> None:
        self.set_study_tags({S.TAG_STOPPED_EARLY: reason})

    def log_seeding(self, line: str) -> None:
        self.set_study_tags({S.TAG_SEEDING: line})

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_run_id, status=status)

    # -- child runs --------------------------------------------------------------------
    def start_trial(self, number: int, label: str | None, plan_yaml: str, plan_summary: str,
                    layer_formats: dict[str, str], knobs: dict[str, Any], retry_of: int | None = None) -> str:
        """Create the child run when the trial is dispatched (so running trials show in the UI)."""
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        tags = {
            MLFLOW_PARENT_RUN_ID: self.parent_run_id,
            S.TAG_STUDY: self.study,
            S.TAG_ROLE: S.ROLE_TRIAL,
            S.TAG_TRIAL_NUMBER: str(number),
            S.TAG_STATE: "RUNNING",
            S.TAG_PARETO: "false",
            S.TAG_METHOD: str(knobs.get("method", "ptq")),
            S.TAG_CONFIG_HASH: self.config_hash,
        }
        if label:
            tags[S.TAG_BASELINE] = label
        if retry_of is not None:
            tags[S.TAG_RETRY_OF] = str(retry_of)
        run = self.client.create_run(self.experiment_id, run_name=f"{label or 'trial'}-{number:03d}", tags=tags)
        run_id = run.info.run_id
        params = {**{k: v for k, v in knobs.items()}, S.PARAM_PLAN: plan_summary}
        params.update({f"{S.PARAM_LAYER_PREFIX}{n}": f for n, f in layer_formats.items()})
        plist = [Param(S.param_key(k), str(v)[:MAX_PARAM]) for k, v in params.items()]
        for i in range(0, len(plist), 100):
            self.client.log_batch(run_id, params=plist[i : i + 100])
        self.client.log_text(run_id, plan_yaml, S.ARTIFACT_PLAN)
        return run_id

    def finish_trial(self, run_id: str, result: "TrialResult", objective_values: dict[str, float],
                     feasible: bool | None, seconds: float, placement: dict[str, str] | None = None) -> None:
        """The trial's artifacts, then its metrics and tags (``placement``: where it ran) in one batch.

        Why metrics last: ``mlflow.onnx.log_model`` links the run's metrics to the logged model by reading
        every metric's history back (one request per metric); logged after it, with the model's id, they
        are linked in the same single request. The driver records every trial, so its requests per trial
        bound a cluster's trials/min (docs/cluster.md)."""
        import mlflow.onnx
        import onnx
        from mlflow.entities import Metric, RunTag

        m = result.measurement
        metrics = {**result.flat_metrics(), S.METRIC_TRIAL_SECONDS: seconds}
        metrics.update({f"{S.METRIC_OBJECTIVE_PREFIX}{k}": v for k, v in objective_values.items()})
        self.client.log_text(run_id, result.model_dump_json(indent=2), S.ARTIFACT_RESULT)
        self.client.log_text(run_id, layers_csv(result), S.ARTIFACT_LAYERS)
        tags = {
            **self._placement_tags(placement),
            S.TAG_BACKEND: m.backend,
            S.TAG_DEVICE: m.device,
            S.TAG_ENERGY_SOURCE: m.energy.source if m.energy else "none",
            S.TAG_EXECUTION: execution_tag(result),
            S.TAG_METHOD: result.method,
        }
        if feasible is not None:
            tags[S.TAG_FEASIBLE] = "true" if feasible else "false"
        model_id = None
        art = Path(result.artifact_path)
        if art.is_file() and art.suffix != ".onnx":  # e.g. the TFLite backend's candidate.tflite
            model_id = log_file_model(self.client, run_id, art, result.plan_summary)
            tags[S.TAG_MODEL_URI] = f"models:/{model_id}"
        elif art.is_file():
            on_disk = sum(p.stat().st_size for p in art.parent.glob(art.stem + "*") if p.is_file())
            big = on_disk > 1_500_000_000  # protobuf cannot hold > 2 GB: keep tensors as external data
            info = mlflow.onnx.log_model(
                onnx.load(str(art)), name=S.ARTIFACT_MODEL, run_id=run_id, save_as_external_data=big,
                pip_requirements=_runtime_requirements(),
                metadata={S.VTAG_PLAN: result.plan_summary[:2000]},
            )
            tags[S.TAG_MODEL_URI] = info.model_uri
            model_id = info.model_id
        else:  # re-logged on resume after the trial folder was removed
            tags[S.TAG_MODEL_MISSING] = f"artifact {art} no longer exists"
        if result.engine_path and Path(result.engine_path).exists():
            self.client.log_artifact(run_id, result.engine_path, S.ARTIFACT_ENGINE)
        tags[S.TAG_STATE] = "COMPLETE"  # last: a COMPLETE tag means every artifact above is there
        now = int(time.time() * 1000)
        if result.qat_curve:  # the loss curve as a stepped metric: MLflow charts it per trial
            curve = [Metric(S.METRIC_QAT_LOSS, float(v), now, i) for i, v in enumerate(result.qat_curve)]
            for i in range(0, len(curve), 1000):  # MLflow takes at most 1,000 metrics per batch
                self.client.log_batch(run_id, metrics=curve[i:i + 1000])
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0, model_id=model_id)
                                               for k, v in metrics.items()],
                              tags=[RunTag(k, str(v)[:MAX_TAG]) for k, v in tags.items()])
        self.client.set_terminated(run_id, status="FINISHED")

    def fail_trial(self, run_id: str, reason: str, seconds: float | None = None,
                   placement: dict[str, str] | None = None) -> None:
        from mlflow.entities import Metric, RunTag

        self.client.log_text(run_id, reason, S.ARTIFACT_FAIL_REASON)
        metrics = [] if seconds is None else [Metric(S.METRIC_TRIAL_SECONDS, float(seconds), int(time.time() * 1000), 0)]
        tags = {**self._placement_tags(placement), S.TAG_STATE: "FAIL", S.TAG_FAIL_REASON: reason}
        self.client.log_batch(run_id, metrics=metrics, tags=[RunTag(k, str(v)[:MAX_TAG]) for k, v in tags.items()])
        self.client.set_terminated(run_id, status="FAILED")

    _PLACEMENT_TAGS = {"node_id": S.TAG_NODE_ID, "hostname": S.TAG_HOSTNAME, "ray_attempt": S.TAG_RAY_ATTEMPT}

    def _placement_tags(self, placement: dict[str, str] | None) -> dict[str, str]:
        """Where the trial ran (``TrialOutcome.placement()``: node id, hostname, Ray attempt) as run tags."""
        return {self._PLACEMENT_TAGS.get(k, f"precision_search.{k}"): str(v) for k, v in (placement or {}).items()}

    def mark_duplicates(self, run_id: str, numbers: Sequence[int]) -> None:
        """Tag a measured trial's run with the later trials that proposed the same plan (not measured again)."""
        self.client.set_tag(run_id, S.TAG_DUPLICATES, ",".join(str(n) for n in numbers)[:MAX_TAG])

    def run_status(self, run_id: str) -> tuple[str, str] | None:
        """(MLflow status, state tag) of a child run, or None if it does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None
        return run.info.status, run.data.tags.get(S.TAG_STATE, "")

    def ping(self) -> None:
        """Raise if the tracking store does not answer (a cheap call, used to notice a server is back)."""
        if self.uri.startswith(("http://", "https://")):
            import urllib.request

            with urllib.request.urlopen(f"{self.uri.rstrip('/')}/health", timeout=3) as r:
                r.read()
        self.client.get_experiment(self.experiment_id)

    def trial_run_states(self) -> dict[int, list[tuple[str, str, str]]]:
        """trial number -> [(run id, MLflow status, state tag)] of this study's child runs, closed ones first."""
        out: dict[int, list[tuple[str, str, str]]] = {}
        runs = _search_all_runs(
            self.client, [self.experiment_id],
            f"tags.`{S.TAG_STUDY}` = '{_quote(self.study)}' and tags.`{S.TAG_ROLE}` = '{S.ROLE_TRIAL}'",
            order_by=["attributes.start_time ASC"])
        for r in runs:
            try:
                number = int(r.data.tags[S.TAG_TRIAL_NUMBER])
            except (KeyError, ValueError):
                continue
            out.setdefault(number, []).append((r.info.run_id, r.info.status, r.data.tags.get(S.TAG_STATE, "")))
        for v in out.values():
            v.sort(key=lambda x: not (x[1] in ("FINISHED", "FAILED") and x[2] in ("COMPLETE", "FAIL")))
        return out

    def trial_runs(self) -> dict[int, list[str]]:
        """trial number -> child run ids of this study (normally one)."""
        out: dict[int, list[str]] = {}
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{S.TAG_STUDY}` = '{_quote(self.study)}' and tags.`{S.TAG_ROLE}` = '{S.ROLE_TRIAL}'",
            max_results=50000,
        )
        for r in runs:
            out.setdefault(int(r.data.tags[S.TAG_TRIAL_NUMBER]), []).append(r.info.run_id)
        return out

    # -- the front ----------------------------------------------------------------------
    def update_front(self, records: Sequence["TrialRecord"], objectives: Sequence["ObjectiveInfo"],
                     summary: dict[str, float], step: int, plots: bool = True) -> None:
        """Refresh pareto tags on children, the front table and (if ``plots``) the plots."""
        from mlflow.entities import Metric, RunTag

        for r in records:
            if r.state != "COMPLETE" or not r.run_id:
                continue
            state = (r.on_front, r.knee)  # the knee too: `promote --policy knee` takes the one the search chose
            if self._pareto_state.get(r.run_id) != state:
                self.client.log_batch(r.run_id, tags=[RunTag(S.TAG_PARETO, "true" if r.on_front else "false"),
                                                      RunTag(S.TAG_KNEE, "true" if r.knee else "false")])
                self._pareto_state[r.run_id] = state
        now = int(time.time() * 1000)
        self.client.log_batch(self.parent_run_id,
                              metrics=[Metric(k, float(v), now, step) for k, v in summary.items()])
        self.client.log_text(self.parent_run_id, front_csv(records, objectives), S.ARTIFACT_FRONT_TABLE)
        if plots:
            with tempfile.TemporaryDirectory() as tmp:
                files = [Path(tmp) / Path(a).name for a in (S.ARTIFACT_FRONT_PLOT_PNG, S.ARTIFACT_FRONT_PLOT_SVG)]
                plot_front(records, objectives, files, title=f"study {self.study}")
                folder = str(Path(S.ARTIFACT_FRONT_PLOT_PNG).parent)
                for f in files:
                    self.client.log_artifact(self.parent_run_id, str(f), folder)
            self._last_plot = time.monotonic()

    def seconds_since_plot(self) -> float:
        return time.monotonic() - self._last_plot

    def ui_hint(self) -> str:
        if self.uri.startswith("sqlite:///"):
            port = os.environ.get("MLFLOW_PORT", "5000")
            where = (f"make ui, then open {S.review_url(f'http://127.0.0.1:{port}', self.experiment_id)}   "
                     f"(or: {_mlflow_ui_command(self.uri)})")
        else:
            shown = mask_url(self.uri)
            where = f"review: {S.review_url(shown, self.experiment_id)}" if shown.startswith("http") else \
                f"tracking store {shown}"
        return (f"MLflow: experiment {self.experiment_name!r} (id {self.experiment_id}), "
                f"parent run {self.parent_run_id} ({self.study}); {where}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _runtime_requirements() -> list[str]:
    """Pinned runtime of the logged ONNX model: what it was measured with."""
    reqs = []
    for mod, dist in (("onnx", "onnx"), ("onnxruntime", "onnxruntime")):
        try:
            reqs.append(f"{dist}=={__import__(mod).__version__}")
        except ImportError:
            pass
    return reqs


# -- reading a study back (review, promote) -------------------------------------------------------
class RecordError(ValueError):
    """The MLflow record does not hold what was asked for; the message says why and what to do."""


def _search_all_runs(client, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None):
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _tag_filter(key: str, value: str) -> str:
    return f"tags.`{key}` = '{value}'"


def read_study(client, experiment: str, study: str | None = None) -> StudyRecord:
    """The study's record in ``experiment``: the named study, or the latest one when ``study`` is None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise RecordError(
            f"no MLflow experiment {experiment!r} at {mask_url(client.tracking_uri)}: run `precision-search search` first, "
            "or point MLFLOW_TRACKING_URI / --tracking-uri at the server the search logged to"
        )
    filt = _tag_filter(S.TAG_ROLE, S.ROLE_STUDY)
    if study:
        filt += " and " + _tag_filter(S.TAG_STUDY, _quote(study))
    parents = client.search_runs([exp.experiment_id], filter_string=filt, max_results=1,
                                 order_by=["attributes.start_time DESC"])
    if not parents:
        what = f"study {study!r}" if study else "any study"
        raise RecordError(f"experiment {experiment!r} has no parent run for {what} "
                          f"(tag {S.TAG_ROLE}={S.ROLE_STUDY}); check --study")
    return _study_record(client, exp, parents[0])


def study_from_parent(client, parent_run_id: str) -> StudyRecord:
    """The study whose parent run is ``parent_run_id`` (what the search holds at the end)."""
    parent = client.get_run(parent_run_id)
    if parent.data.tags.get(S.TAG_ROLE) != S.ROLE_STUDY:
        raise RecordError(f"run {parent_run_id} is not a study's parent run (tag {S.TAG_ROLE}={S.ROLE_STUDY} missing)")
    return _study_record(client, client.get_experiment(parent.info.experiment_id), parent)


def _study_record(client, exp, parent) -> StudyRecord:
    children = _search_all_runs(
        client, [exp.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and " + _tag_filter(S.TAG_ROLE, S.ROLE_TRIAL),
        order_by=["attributes.start_time DESC"],
    )
    trials = []
    for run in children:
        tags = run.data.tags
        try:
            number = int(tags[S.TAG_TRIAL_NUMBER])
        except (KeyError, ValueError):
            log.warning("run %s has no valid %s tag; ignored", run.info.run_id, S.TAG_TRIAL_NUMBER)
            continue
        feasible = tags.get(S.TAG_FEASIBLE)
        trials.append(TrialRecord(
            run_id=run.info.run_id, number=number, state=tags.get(S.TAG_STATE, run.info.status),
            on_front=tags.get(S.TAG_PARETO, "false").lower() == "true", baseline=tags.get(S.TAG_BASELINE) or None,
            metrics=dict(run.data.metrics), tags=dict(tags), fail_reason=tags.get(S.TAG_FAIL_REASON) or "",
            energy_source=tags.get(S.TAG_ENERGY_SOURCE), feasible=None if feasible is None else feasible == "true",
            retry_of=int(tags[S.TAG_RETRY_OF]) if tags.get(S.TAG_RETRY_OF, "").isdigit() else None,
        ))
    # Keep the latest run per trial number (children are newest first), then order by number.
    seen: dict[int, TrialRecord] = {}
    for t in trials:
        seen.setdefault(t.number, t)
    return StudyRecord(experiment_id=exp.experiment_id, experiment_name=exp.name,
                       study=parent.data.tags.get(S.TAG_STUDY, ""), parent_run_id=parent.info.run_id,
                       parent_tags=dict(parent.data.tags), parent_params=dict(parent.data.params),
                       trials=sorted(seen.values(), key=lambda t: t.number))


def run_artifact_text(client, run_id: str, path: str) -> str | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception:  # noqa: BLE001 - absent artifact: MlflowException or OSError by store
            return None
        return Path(local).read_text()


def trial_result(client, t: TrialRecord) -> dict[str, Any] | None:
    """The trial's ``result.json`` (a ``TrialResult`` as JSON), or None when it was not logged."""
    text = run_artifact_text(client, t.run_id, S.ARTIFACT_RESULT)
    return json.loads(text) if text else None


def run_has_artifact_dir(client, run_id: str, path: str) -> bool:
    try:
        return bool(client.list_artifacts(run_id, path))
    except Exception:  # noqa: BLE001
        return False


MODEL_FILE_SUFFIXES = (".tflite",)  # logged models that are one file of another runtime (experiments.log_file_model)


def find_logged_model(client, study: StudyRecord, t: TrialRecord):
    """The trial's ONNX logged model (``mlflow.onnx.log_model(name="candidate")``), checked to hold its files."""
    from mlflow.exceptions import MlflowException

    if t.tags.get(S.TAG_MODEL_MISSING):
        raise RecordError(f"trial {t.number} has no logged model: {t.tags[S.TAG_MODEL_MISSING]}")
    model = None
    uri = t.tags.get(S.TAG_MODEL_URI, "")
    if uri.startswith("models:/m-"):
        try:
            model = client.get_logged_model(uri[len("models:/"):])
        except MlflowException:
            model = None
    if model is None:
        models = client.search_logged_models(
            experiment_ids=[study.experiment_id],
            filter_string=f"source_run_id = '{t.run_id}' AND name = '{S.ARTIFACT_MODEL}'",
        )
        if not models:
            raise RecordError(f"trial {t.number} has no logged model {S.ARTIFACT_MODEL!r} (run {t.run_id}); "
                              "its artifact was never uploaded, so there is nothing to register")
        model = max(models, key=lambda m: m.creation_timestamp or 0)
    files = {f.path for f in client.list_logged_model_artifacts(model.model_id)}
    onnx_model = "MLmodel" in files and any(p.endswith(".onnx") for p in files)
    if not onnx_model and not any(p.endswith(MODEL_FILE_SUFFIXES) for p in files):
        raise RecordError(f"trial {t.number}: logged model {model.model_id} is incomplete (files: {sorted(files)}); "
                          "the upload was interrupted; rerun the trial")
    return model
