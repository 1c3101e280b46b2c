"""The body of one trial, as it runs inside a Ray task (or inline, for tests and debugging).

A worker process keeps one :class:`~pipeline.evaluation.Evaluator` per config
(keyed by the config's hash), so the FP32 reference, datasets and the
reference accuracy are loaded once per worker, not once per trial.

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


class TrialOutcome(BaseModel):
    number: int
    status: Literal["complete", "fail"]
    result: TrialResult | None = None
    reason: str = ""  # why it failed, one paragraph
    seconds: float = 0.0
    node: str = ""  # host (and Ray node) that ran it
    # Artifact files (name -> bytes) when the worker's filesystem is not the driver's.
    files: dict[str, bytes] = Field(default_factory=dict)


def config_key(config: dict[str, Any], base_dir: str, cwd: str) -> str:
    blob = json.dumps({"config": config, "base_dir": base_dir, "cwd": cwd}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _evaluator(task: TrialTask):
    from pipeline.config import parse_config
    from pipeline.evaluation import Evaluator

    key = config_key(task.config, task.base_dir, task.cwd)
    ev = _EVALUATORS.get(key)
    if ev is None:
        cfg = parse_config(task.config, source=f"config of study {task.study}", base_dir=Path(task.base_dir))
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
    """Prepare this worker for the study's trials: imports, datasets, the backend.

    Everything a first trial would pay for except the FP32 reference, which the
    driver is exporting meanwhile (workers must not race it). Returns seconds spent.
    """
    t0 = time.perf_counter()
    if cwd and Path(cwd).is_dir() and os.getcwd() != cwd:
        os.chdir(cwd)
    task = TrialTask(study="warm-up", number=-1, config=config, base_dir=base_dir, cwd=cwd, plan_yaml="",
                     out_dir="")
    ev = _evaluator(task)
    _ = ev.calibration, ev.eval_set  # data sources (and their imports)
    import exporters.onnx_quant  # noqa: F401 - the quantizer and onnxruntime.quantization
    return time.perf_counter() - t0


def run_trial(task: TrialTask | dict[str, Any]) -> dict[str, Any]:
    """Quantize and measure one candidate; never raises for a bad candidate.

    Returns ``TrialOutcome.model_dump()`` (a plain dict crosses Ray cheaply).
    """
    from pipeline.measure import TrialFailure
    from pipeline.plan import QuantPlan

    task = TrialTask.model_validate(task)
    t0 = time.perf_counter()
    node = socket.gethostname()
    if task.cwd and Path(task.cwd).is_dir() and os.getcwd() != task.cwd:
        os.chdir(task.cwd)  # relative paths in the config mean the same thing as on the driver
    try:
        ev = _evaluator(task)
        plan = QuantPlan.model_validate(yaml.safe_load(task.plan_yaml))
        out = _out_dir(task)
        result = ev.evaluate(plan, out, energy=task.energy)
        files: dict[str, bytes] = {}
        here = _node_id()
        if task.driver_node_id and here and here != task.driver_node_id:
            files = _collect_files(result)
        return TrialOutcome(number=task.number, status="complete", result=result, seconds=time.perf_counter() - t0,
                            node=node, files=files).model_dump()
    except TrialFailure as exc:
        reason = str(exc)
    except MemoryError:
        reason = "out of memory (MemoryError) while quantizing or measuring"
    except Exception as exc:  # noqa: BLE001 - an unexpected error fails this trial, not the study
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
        reason = f"unexpected error: {type(exc).__name__}: {exc}\n{tb}"
    return TrialOutcome(number=task.number, status="fail", reason=reason, seconds=time.perf_counter() - t0,
                        node=node).model_dump()
