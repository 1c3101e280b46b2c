"""The body of one trial, as it runs inside a Ray task (or inline, for tests and debugging).

A worker process keeps one :class:`~pipeline.evaluation.Evaluator` per config
and shared bundle, so the FP32 reference, datasets and the reference accuracy
are set up once per worker, not once per trial. Under the search driver the
reference and the datasets come from the driver through Ray's object store
(:mod:`pipeline.search.payload`): a worker never re-exports the reference, calls
the user's data functions or reads the driver's files. Called without a bundle
(tests, debugging) the worker builds them itself.

Each outcome says where it ran: the Ray node id, the hostname and Ray's attempt
number (> 0 when Ray re-ran the task after a worker or node died).

Nothing here raises for a bad candidate: quantizer errors, NaN outputs, out of
memory and unexpected exceptions all come back as a failed
:class:`TrialOutcome` with the reason, so the driver records the failure and
the study goes on. (A worker killed outright, e.g. by the OOM killer, surfaces
in the driver as a Ray error and is recorded the same way.)
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field

from pipeline.results import TrialResult

# Optuna user attributes of a trial's placement (MLflow tags: pipeline.tracking.schema.TAG_NODE_ID, ...).
A_NODE_ID = "node_id"
A_HOSTNAME = "hostname"
A_ATTEMPT = "ray_attempt"

_EVALUATORS: dict[str, Any] = {}  # config hash -> Evaluator, per worker process


class TrialTask(BaseModel):
    """What the driver sends to a worker: plain data, so any Ray node can run it."""

    study: str
    number: int
    config: dict[str, Any]  # SearchConfig.model_dump(mode="json"), measure.threads set per task
    base_dir: str  # the config file's folder (relative paths fall back to it)
    cwd: str  # the driver's working folder (relative paths are relative to it)
    plan_yaml: str
    out_dir: str  # absolute, on the driver's filesystem
    energy: bool = True
    driver_node_id: str | None = None  # Ray node of the driver; artifacts are shipped back when it differs
    screen: bool = False  # a proposal: may be pruned early on the eval screen (search.screen)


class TrialOutcome(BaseModel):
    number: int
    status: Literal["complete", "fail", "pruned"]
    result: TrialResult | None = None
    reason: str = ""  # why it failed, one paragraph
    seconds: float = 0.0
    node: str = ""  # hostname of the machine that ran it
    node_id: str = ""  # Ray node id ("" outside Ray)
    attempt: int = 0  # Ray's attempt number: > 0 when the task was re-run after a worker/node died
    fatal: bool = False  # the failure is the study's, not the plan's (measure.ReferenceFailure)
    # Artifact files (name -> bytes) when the worker's filesystem is not the driver's.
    files: dict[str, bytes] = Field(default_factory=dict)

    def placement(self) -> dict[str, str]:
        """Where it ran, as Optuna user attribute names (A_NODE_ID, A_HOSTNAME, A_ATTEMPT) -> value."""
        if not (self.node_id or self.node):
            return {}  # never reached a worker (Ray gave up on it)
        return {A_NODE_ID: self.node_id, A_HOSTNAME: self.node, A_ATTEMPT: str(self.attempt)}


def config_key(config: dict[str, Any], base_dir: str, cwd: str) -> str:
    blob = json.dumps({"config": config, "base_dir": base_dir, "cwd": cwd}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _evaluator(task: TrialTask, shared: list | None = None):
    return evaluator_for(task.config, task.base_dir, task.cwd, f"config of study {task.study}", shared)


def evaluator_for(config: dict[str, Any], base_dir: str, cwd: str, source: str, shared: list | None = None):
    """This worker's Evaluator for ``config`` (trials and the re-measurement share it); with ``shared``
    (``[ObjectRef]`` of a :class:`pipeline.search.payload.SharedReference`) its reference and datasets are
    the driver's, and its work folder is the config's where this node can create it, else node-local."""
    from pipeline.config import parse_config
    from pipeline.evaluation import Evaluator

    key = config_key(config, base_dir, cwd) + (f"-{shared[0].hex()}" if shared else "")
    ev = _EVALUATORS.get(key)
    if ev is None:
        # The driver already validated the config and imported its functions; a worker whose node lacks a
        # module fails the trial when it is used, with the import error as the reason.
        cfg = parse_config(config, source=source, base_dir=Path(base_dir), check_imports=not shared)
        if shared:
            import ray

            from pipeline.search.payload import materialize, node_workdir

            ev = Evaluator(cfg, workdir=node_workdir(cfg.work_path))
            bundle = ray.get(shared[0])
            # cached_property slots: set once, the Evaluator never builds them itself.
            ev.reference = materialize(bundle, ev.workdir)
            ev.calibration = bundle.calibration
            ev.eval_set = bundle.eval_set
        else:
            ev = Evaluator(cfg)
        _EVALUATORS[key] = ev
    return ev


def _node_id() -> str | None:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray there is no node id
        pass
    return None


def _attempt() -> int:
    """Ray's attempt number of the running task (0 first, 1.. after retries); 0 outside Ray.

    Ray 2.60 has no public accessor; the core worker's is used where present."""
    try:
        import ray

        if ray.is_initialized():
            return int(ray._private.worker.global_worker.core_worker.get_current_task_attempt_number())
    except Exception:  # noqa: BLE001 - an older/newer Ray without it: recorded as 0
        pass
    return 0


def _out_dir(task: TrialTask) -> Path:
    out = Path(task.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        return out
    except OSError:  # another node's path we cannot create: work locally, ship files back
        return Path(tempfile.mkdtemp(prefix=f"trial-{task.number}-"))


def _collect_files(result: TrialResult) -> dict[str, bytes]:
    """The candidate artifact (and its external data / engine) as bytes, for a remote driver."""
    files: dict[str, bytes] = {}
    art = Path(result.artifact_path)
    for p in sorted(art.parent.glob(art.stem + "*")):
        if p.is_file():
            files[p.name] = p.read_bytes()
    if result.engine_path and Path(result.engine_path).is_file():
        files[Path(result.engine_path).name] = Path(result.engine_path).read_bytes()
    return files


def warm_worker(config: dict[str, Any], base_dir: str, cwd: str) -> float:
    """Prepare this worker for the study's trials: the runtimes, the quantizer and the config's modules.

    Not the reference or the datasets: the driver builds those once and ships them
    (:mod:`pipeline.search.payload`). Returns seconds spent.
    """
    import importlib

    t0 = time.perf_counter()
    if cwd and Path(cwd).is_dir() and os.getcwd() != cwd:
        os.chdir(cwd)
    import exporters.onnx_quant  # noqa: F401 - the quantizer and onnxruntime.quantization
    import onnxruntime  # noqa: F401

    data = config.get("data") or {}
    for spec in ((config.get("model") or {}).get("factory"), (data.get("calibration") or {}).get("source"),
                 (data.get("eval") or {}).get("source")):
        if spec and ":" in spec:  # shipped user code: a problem shows here first
            importlib.import_module(spec.partition(":")[0])
    return time.perf_counter() - t0


def run_trial(task: TrialTask | dict[str, Any], shared: list | None = None) -> dict[str, Any]:
    """Quantize and measure one candidate; never raises for a bad candidate.

    ``shared``: ``[ObjectRef]`` of the driver's reference bundle (None: build it here).
    Returns ``TrialOutcome.model_dump()`` (a plain dict crosses Ray cheaply).
    """
    from pipeline.measure import ReferenceFailure, TrialFailure, TrialPruned
    from pipeline.plan import QuantPlan

    task = TrialTask.model_validate(task)
    t0 = time.perf_counter()
    node, node_id, attempt = socket.gethostname(), _node_id() or "", _attempt()
    if task.cwd and Path(task.cwd).is_dir() and os.getcwd() != task.cwd:
        os.chdir(task.cwd)  # relative paths in the config mean the same thing as on the driver
    try:
        ev = _evaluator(task, shared)
        plan = QuantPlan.model_validate(yaml.safe_load(task.plan_yaml))
        out = _out_dir(task)
        result = ev.evaluate(plan, out, energy=task.energy, screen=task.screen)
        files: dict[str, bytes] = {}
        if task.driver_node_id and node_id and node_id != task.driver_node_id:
            files = _collect_files(result)
        return TrialOutcome(number=task.number, status="complete", result=result, seconds=time.perf_counter() - t0,
                            node=node, node_id=node_id, attempt=attempt, files=files).model_dump()
    except TrialPruned as exc:
        return TrialOutcome(number=task.number, status="pruned", reason=str(exc), seconds=time.perf_counter() - t0,
                            node=node, node_id=node_id, attempt=attempt).model_dump()
    except TrialFailure as exc:
        reason = str(exc)
    except ReferenceFailure as exc:  # every trial would fail alike: the driver stops asking for more
        return TrialOutcome(number=task.number, status="fail", reason=str(exc), seconds=time.perf_counter() - t0,
                            node=node, node_id=node_id, attempt=attempt, fatal=True).model_dump()
    except MemoryError:
        reason = "out of memory (MemoryError) while quantizing or measuring"
    except Exception as exc:  # noqa: BLE001 - an unexpected error fails this trial, not the study
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
        reason = f"unexpected error: {type(exc).__name__}: {exc}\n{tb}"
    return TrialOutcome(number=task.number, status="fail", reason=reason, seconds=time.perf_counter() - t0,
                        node=node, node_id=node_id, attempt=attempt).model_dump()
