"""Measure a candidate artifact through its runtime: accuracy, latency, size, energy.

Accuracy is computed from the artifact's own outputs on the eval set (never
from the framework model). Latency is the median/p95 of many timed runs of one
fixed batch after warm-up; throughput is batch_size / median latency.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from pipeline.backends.base import Backend, Session
from pipeline.config import ConfigError, SearchConfig
from pipeline.data import Dataset, describe_value
from pipeline.metrics import compute_metric, metric_options
from pipeline.results import EnergyReport


class TrialFailure(RuntimeError):
    """A candidate that cannot be measured (NaN outputs, runtime error): the trial fails, the study goes on."""


class TrialPruned(TrialFailure):
    """Stopped on purpose: its drop on the eval screen already rules it out (Optuna state PRUNED, not FAIL)."""


def run_dataset(session: Session, dataset: Dataset, batch_size: int, field: str = "data.eval",
                input_specs: dict | None = None) -> dict[str, np.ndarray]:
    """All outputs for all rows, concatenated, keyed by output name.

    ``batch_size`` is the eval batch (``measure.eval_batch``): dynamic INT8 scales
    activations per batch, so the scores depend on it. Bad data fails here with one
    error naming ``field``: no rows, a model input the source does not return, or -
    with ``input_specs`` (:func:`pipeline.data_check.onnx_input_specs`) - a first
    batch whose shapes/dtypes the model cannot take.
    """
    if len(dataset) == 0:
        raise ConfigError(f"{field}.source: the set has no rows; the metric needs at least one example")
    missing = [n for n in session.input_names if n not in dataset.inputs]
    if missing:
        raise ConfigError(f"{field}.source: the model needs input(s) {missing} but the source returned "
                          f"{sorted(dataset.inputs)}; name the arrays like the model's inputs")
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in session.output_names}
    for i, feeds in enumerate(dataset.batches(batch_size)):
        feeds = {k: v for k, v in feeds.items() if k in session.input_names}
        if i == 0 and input_specs:
            from pipeline.data_check import check_feeds

            problems = check_feeds(feeds, input_specs)
            if problems:
                raise ConfigError(f"{field}.source: the arrays do not fit the model's inputs:\n  - "
                                  + "\n  - ".join(problems))
        try:
            outs = session.run(feeds)
        except Exception as exc:
            if i:
                raise
            desc = ", ".join(f"{k} {v.shape} {v.dtype}" for k, v in feeds.items())
            raise RuntimeError(f"the first batch of {field} ({desc}) failed: {type(exc).__name__}: {exc}") from exc
        for name, out in zip(session.output_names, outs):
            chunks[name].append(np.asarray(out))
    return {k: np.concatenate(v, axis=0) for k, v in chunks.items()}


class MetricError(ConfigError):
    """The metric raised or returned something other than one number: a config (or metric code) problem."""


class ReferenceFailure(ConfigError):
    """The FP32 reference itself cannot be scored (its data or metric fails): every trial would fail alike, so
    the search stops asking for more (:class:`pipeline.search.runner.StudyRunner`) instead of failing them one
    by one. The driver scores the reference before Ray starts where it can (``preflight.check_metric``); this
    is the worker's side, for a backend the driver cannot run."""


def task_metric(config: SearchConfig, outputs: dict[str, np.ndarray], targets: Any) -> float:
    """The configured metric over all eval outputs and the targets.

    Non-finite outputs or a non-finite value fail the trial (a broken candidate);
    a metric that raises or returns a non-number is a :class:`MetricError` naming
    ``metric.name`` with what it was given (it fails on the FP32 reference too).
    """
    bad = [k for k, v in outputs.items() if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v))]
    if bad:
        raise TrialFailure(f"non-finite values (NaN/Inf) in model output(s) {bad}")
    spec = config.metric
    try:
        value = compute_metric(spec.name, spec.output, outputs, targets, **metric_options(spec))
    except Exception as exc:  # noqa: BLE001 - any metric failure is reported with its inputs
        given = ", ".join(f"{k} {v.shape} {v.dtype}" for k, v in outputs.items())
        raise MetricError(
            f"metric.name: {spec.name} raised {type(exc).__name__}: {exc}\n  it got outputs {{{given}}} and "
            f"targets {describe_value(targets)}; fix metric.output / metric.pairs / data.targets"
            + ("" if ":" not in spec.name else f" or the function {spec.name}")
        ) from exc
    if not np.isfinite(value):
        raise TrialFailure(f"metric {spec.name} is not finite ({value})")
    return value


def time_batches(session: Session, feeds: dict[str, np.ndarray], warmup: int, runs: int) -> np.ndarray:
    """Per-run latency in milliseconds.

    Sessions that can time device execution themselves (TensorRT: CUDA events,
    ``time_ms``) do so; others are timed on the host around a synchronised run.
    """
    feeds = {k: v for k, v in feeds.items() if k in session.input_names}
    if hasattr(session, "time_ms"):
        return np.asarray(session.time_ms(feeds, runs=runs, warmup=warmup), dtype=float)
    for _ in range(warmup):
        session.run(feeds)
    session.synchronize()
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        session.run(feeds)
        session.synchronize()
        times[i] = (time.perf_counter() - t0) * 1e3
    return times


SETTLE_S = 0.05
"""Seconds to wait before timing a session right after another session of the same process ran.

ONNX Runtime's intra-op threads spin-wait for more work after a run (``session.intra_op.allow_spinning``,
on by default, as users deploy it), and while they spin they compete for the cores with the next session
timed. Measured on this 2-core machine, three sessions of a small conv net interleaved with 4-run windows:
the sessions that followed a larger one timed 1.5-1.7x their latency with no pause (0.35 vs 0.22 ms, 0.48
vs 0.28 ms), a 5 ms pause did not help, 20 ms helped one of them and 50 ms both; turning spinning off
instead also removes the spill-over, but it is not how the artifact is deployed and it slowed the small
sessions by up to 25%. So interleaved timings (:func:`settle` before each window) keep ORT's default and
wait for the other pools to park."""


def settle() -> None:
    """Let the intra-op threads of a session that just ran stop spinning before another one is timed
    (:data:`SETTLE_S`)."""
    time.sleep(SETTLE_S)


MEASURE_LOCK_ENV = "PRECISION_SEARCH_MEASURE_LOCK"
DEFAULT_MEASURE_LOCK = "precision-search-measure.lock"  # in the system temp folder: one per machine


def measure_lock_path(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$PRECISION_SEARCH_MEASURE_LOCK``, else ``<system temp>/precision-search-measure.lock``."""
    chosen = path or os.environ.get(MEASURE_LOCK_ENV) or Path(tempfile.gettempdir()) / DEFAULT_MEASURE_LOCK
    return Path(chosen)


@contextmanager
def exclusive_measurement(path: str | os.PathLike | None = None) -> Iterator[float]:
    """Hold this machine's measurement lock: one candidate timed (and metered) at a time per node.

    With ``--parallel`` > 1 several trials share a node; quantizing and accuracy
    runs may overlap, but two latency or energy windows must not, or each run
    times the other's load (and RAPL/NVML, which meter the whole package/GPU,
    charge one trial for both). ``fcntl.flock`` on one file per machine is held
    by the process, released by the kernel if the process dies (no stale lock
    after a killed worker), and works across the Ray worker processes of a node.
    Every process on the machine must agree on the file: set
    ``PRECISION_SEARCH_MEASURE_LOCK`` to a node-local path to choose another
    (the temp folder must not be shared between machines, e.g. over NFS).

    Yields the seconds spent waiting for the lock (worth recording: a long wait
    means trials queue on timing).
    """
    lock = measure_lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            os.fchmod(fd, 0o666)  # other users' searches on this machine must be able to take it too
        except OSError:
            pass
        t0 = time.perf_counter()
        fcntl.flock(fd, fcntl.LOCK_EX)
        waited = time.perf_counter() - t0
        try:
            yield waited
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def measure_energy(config: SearchConfig, backend: Backend, session: Session, feeds: dict[str, np.ndarray]) -> EnergyReport | None:
    """Energy per inference through the meter chosen for this backend (pipeline.energy)."""
    try:
        from pipeline.energy import measure_energy as _measure, select_meter
    except ImportError:
        return None
    feeds = {k: v for k, v in feeds.items() if k in session.input_names}
    meter = select_meter(config.measure.energy, backend)
    return _measure(meter, lambda: session.run(feeds), config.measure.batch_size, config.measure.energy,
                    sync=session.synchronize)


def weight_bytes(onnx_path: str | Path) -> int:
    """Bytes of all initializers in the file (weights, scales, zero points, biases)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        if init.raw_data:
            total += len(init.raw_data)
        else:
            from onnx import numpy_helper

            total += numpy_helper.to_array(init).nbytes
    return total


def effective_bits_per_weight(candidate: str | Path, reference: str | Path, quantizable_params: int,
                              reference_weight_bytes: int | None = None, layer_weight_bytes: int | None = None) -> float:
    """Storage bits per quantizable weight, scales and zero points included.

    Computed from the files: (candidate initializer bytes - reference bytes that
    are not layer weights, e.g. biases and norms) * 8 / quantizable params. An
    all-FP32 candidate gives 32.0; INT4 with block 32 and fp32 scales ~5.
    """
    ref_total = reference_weight_bytes if reference_weight_bytes is not None else weight_bytes(reference)
    layer_bytes = layer_weight_bytes if layer_weight_bytes is not None else 4 * quantizable_params
    other = ref_total - layer_bytes
    return max(weight_bytes(candidate) - other, 0) * 8.0 / max(quantizable_params, 1)
