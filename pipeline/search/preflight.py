"""What the search driver checks before it starts Ray: the model, the data and the batch size.

A bad input found here ends the command with one message naming the field and the
fix (:class:`pipeline.config.ConfigError`), before any worker starts and before any
trial is asked, so nothing of a study is lost or half-written. Found in a trial, the
same problem would fail every trial one by one with a worker's traceback.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ConfigError, SearchConfig

# A batch needs its inputs, the outputs and the runtime's intermediate tensors at once; intermediates are
# not known before a run, so the inputs and outputs are counted this many times over.
MEMORY_HEADROOM = 4.0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:400]


def export_reference(config: SearchConfig, work: Path) -> Any:
    """The FP32 reference (cached in the workdir), or a ConfigError naming the model field that broke it."""
    from pipeline.models import get_adapter

    spec = config.model
    try:
        return get_adapter(config).export_reference(work)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code (the factory) and the exporter raise anything
        text = str(exc)
        if spec.checkpoint and ("state_dict" in text or "size mismatch" in text or "Missing key" in text):
            raise ConfigError(
                f"model.checkpoint: {config.resolve_path(spec.checkpoint)} does not fit the model that "
                f"model.factory ({spec.factory}) builds ({_first_line(exc)}); give the checkpoint saved from this "
                "architecture (torch.save(model.state_dict(), path)), or the factory and kwargs it was saved from"
            ) from None
        keyword = re.search(r"forward\(\) (got an unexpected keyword argument '\w+'|missing \d+ required "
                            r"positional arguments?: .*)", text)
        if keyword:  # the data's dict keys are the forward() arguments: the data, not the model, is named
            raise ConfigError(
                f"data.calibration.source / data.eval.source: the model's forward() {keyword.group(1)} - the "
                "data's dict keys are passed to forward() as keyword arguments; name them like forward()'s "
                "parameters (or give one array for a one-input model)") from None
        where = f"model.factory ({spec.factory})" if spec.factory else f"model.path ({spec.path})"
        raise ConfigError(
            f"{where}: building or exporting the FP32 reference failed: {_first_line(exc)}; fix the model "
            f"source (run it alone: python -c \"from pipeline.importing import import_object; "
            f"import_object('{spec.factory or ''}')()\"), or check model.kwargs"
        ) from None


def available_memory() -> int:
    """Bytes this machine can still give (psutil, which Ray needs anyway; else /proc/meminfo)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil ships with Ray
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return 0


def batch_bytes(row_arrays: dict[str, np.ndarray], batch: int) -> int:
    """Bytes of one batch of ``batch`` rows of the given inputs (each array holds rows on axis 0)."""
    total = 0
    for a in row_arrays.values():
        per_row = int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize if a.ndim else a.dtype.itemsize
        total += per_row * batch
    return total


def check_batch_memory(config: SearchConfig, row_arrays: dict[str, np.ndarray], parallel: int = 1,
                       available: int | None = None) -> None:
    """Refuse a ``measure.batch_size`` (or ``eval_batch_size``) whose batches cannot fit in memory."""
    available = available_memory() if available is None else available
    if available <= 0:
        return
    for field, batch in (("measure.batch_size", config.measure.batch_size),
                         ("measure.eval_batch_size", config.measure.eval_batch)):
        need = int(batch_bytes(row_arrays, batch) * MEMORY_HEADROOM * max(1, parallel))
        if need > available:
            per_row = batch_bytes(row_arrays, 1)
            fit = max(1, int(available / (per_row * MEMORY_HEADROOM * max(1, parallel))))
            raise ConfigError(
                f"{field}: {batch} rows need about {need / 2**30:.1f} GiB ({per_row:,} input bytes per row x "
                f"{batch} x {MEMORY_HEADROOM:g} for outputs and intermediates x {max(1, parallel)} trial(s) in "
                f"parallel), but only {available / 2**30:.1f} GiB is available; use at most about {fit} "
                f"(e.g. --set {field}={min(fit, 1024)}) or fewer --parallel trials")


def check_inputs(config: SearchConfig, reference: Any, parallel: int = 1) -> None:
    """Data against the reference's inputs (:func:`pipeline.data_check.check_data`), the batch memory, and the
    metric on the reference's outputs (:func:`check_metric`)."""
    from pipeline.data import load_eval_set
    from pipeline.data_check import check_data

    try:
        ev = load_eval_set(config)
        if len(ev) == 0:
            raise ConfigError("data.eval.source: the eval set is empty (0 rows), so accuracy cannot be measured; "
                              "point data.eval at a non-empty set (or raise data.eval.limit)")
        check_data(config, reference.onnx_path)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a data source is user code
        raise ConfigError(f"data: loading the calibration or eval set failed: {_first_line(exc)}; check "
                          "data.calibration.source and data.eval.source") from None
    check_batch_memory(config, ev.inputs, parallel)
    check_metric(config)


def trial_reference(config: SearchConfig, raw: Any) -> Any:
    """The reference the search ships to its workers: the export after ``export.optimize``, as every Evaluator
    builds it (:func:`pipeline.evaluation.evaluator.optimized_reference`). Shipping the raw export made the
    trials quantize another graph than the one the sensitivity table, ``evaluate`` and the docs use (the same
    plan came out with another size). A backend the driver cannot resolve (a GPU one) is named as configured;
    ``auto`` there keeps the export as is (the workers' backend is unknown here)."""
    from pipeline.backends.base import BackendUnavailable
    from pipeline.backends.registry import AUTO, resolve_backend
    from pipeline.data import load_dataset
    from pipeline.evaluation.evaluator import optimized_reference

    try:
        backend = resolve_backend(config.measure.backend)[0].name
    except BackendUnavailable:
        if config.measure.backend == AUTO:
            return raw
        backend = config.measure.backend
    calibration = load_dataset(config.data.calibration, config, "data.calibration")
    return optimized_reference(config, raw, calibration, backend)


def check_metric(config: SearchConfig) -> float | None:
    """Score the FP32 reference once, here: a metric that cannot read the model's outputs or the targets
    (a wrong ``metric.output``, targets of another length, a custom metric that raises) ends the command
    with :class:`pipeline.measure.MetricError` naming the field, instead of failing every trial the same
    way. The value is cached beside the reference (keyed by metric, eval rows and backend), so the trials
    on this machine read it instead of scoring the reference again. Skipped (None) where the driver cannot
    run the configured backend (a GPU backend on a CPU-only driver): there the first trial names it."""
    from pipeline.backends.base import BackendUnavailable
    from pipeline.evaluation import Evaluator
    from pipeline.measure import MetricError

    try:
        ev = Evaluator(config)
    except BackendUnavailable:
        return None
    if ev.backend.needs_gpu:
        return None  # a CPU-only driver of a GPU cluster may not have it; the trials' workers do
    try:
        return ev.reference_accuracy
    except (MetricError, ConfigError):
        raise
    except Exception:  # noqa: BLE001 - e.g. non-finite reference outputs: the trials say it with their context
        return None

