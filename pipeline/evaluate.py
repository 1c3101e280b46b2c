"""Evaluate one candidate plan end to end: quantize (PTQ or QAT) -> artifact -> measure.

:class:`Evaluator` holds what is shared by all candidates of one config (the
FP32 reference export, datasets, backend, the reference's own accuracy on that
backend) so a Ray worker or the CLI builds them once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline.backends import resolve_backend
from pipeline.config import SearchConfig
from pipeline.data import CALIBRATION_BATCH, Dataset, calibration_batches, load_dataset, load_eval_set
from pipeline.measure import (
    TrialFailure,
    effective_bits_per_weight,
    exclusive_measurement,
    measure_lock_path,
    measure_energy,
    run_dataset,
    task_metric,
    time_batches,
    weight_bytes,
)
from pipeline.metrics import accuracy_drop
from pipeline.models import ReferenceModel, get_adapter
from pipeline.plan import QuantPlan
from pipeline.results import LayerReport, Measurement, TrialResult

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class _Measured:
    measurement: Measurement
    engine_path: str | None  # the TensorRT engine the session built (None for other backends)
    lock_wait_s: float  # time spent waiting for the node's measurement lock


class Evaluator:
    def __init__(self, config: SearchConfig, workdir: str | Path | None = None):
        self.config = config
        self.workdir = Path(workdir) if workdir else config.work_path
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.adapter = get_adapter(config)
        self.backend, self.backend_note = resolve_backend(config.measure.backend)

    # -- shared state, built lazily once -----------------------------------
    @cached_property
    def reference(self) -> ReferenceModel:
        return self.adapter.export_reference(self.workdir)

    @cached_property
    def calibration(self) -> Dataset:
        return load_dataset(self.config.data.calibration, self.config, "data.calibration")

    @cached_property
    def eval_set(self) -> Dataset:
        return load_eval_set(self.config)

    @cached_property
    def reference_weight_bytes(self) -> int:
        return weight_bytes(self.reference.onnx_path)

    @property
    def is_tflite(self) -> bool:
        """TFLite cannot read ONNX: its artifacts are converted from the Keras model instead."""
        return self.backend.name == "tflite"

    @cached_property
    def reference_artifact(self) -> str:
        """The FP32 artifact this backend runs: reference.onnx, or a float .tflite for TFLite."""
        if self.is_tflite:
            from exporters import tflite

            return tflite.reference_artifact(self.adapter, self.reference, self.calibration_feeds())
        return self.reference.onnx_path

    @cached_property
    def reference_accuracy(self) -> float:
        """The FP32 reference's metric on this backend, cached on disk per (reference, backend)."""
        # Keyed by the metric spec and the eval rows themselves: a different eval set, limit
        # or metric output must not reuse another set's reference value.
        h = hashlib.sha256(self.config.metric.model_dump_json().encode())
        h.update(f"{self.eval_set.fingerprint()} eval-batch {self.config.measure.eval_batch}".encode())
        cache = Path(self.reference.onnx_path).with_name(f"accuracy-{self.backend.name}-{h.hexdigest()[:16]}.json")
        if cache.exists():
            return float(json.loads(cache.read_text())["value"])
        session = self.backend.open(self.reference_artifact, self.config.measure.threads)
        from pipeline.data_check import onnx_input_specs

        specs = None if self.is_tflite else onnx_input_specs(self.reference_artifact)
        value = task_metric(self.config, run_dataset(session, self.eval_set, self.config.measure.eval_batch,
                                                     input_specs=specs), self.eval_set.targets)
        cache.write_text(json.dumps({"value": value}))
        return value

    def calibration_feeds(self, batch_size: int = CALIBRATION_BATCH) -> list[dict[str, np.ndarray]]:
        """Equal-sized batches, capped (shared with QAT so both calibrate on the same rows)."""
        return calibration_batches(self.calibration, self.reference.input_names, batch_size)

    # -- one candidate -----------------------------------------------------
    def quantize(self, plan: QuantPlan, out_dir: Path, progress=None) -> tuple[str, list[LayerReport], dict, list[float] | None]:
        """Build the candidate artifact; returns (path, layer reports, extra info, QAT loss curve)."""
        from exporters.onnx_quant import quantize_model

        table = self.reference.layer_table
        choices = plan.resolve(table.names)
        if self.is_tflite:
            return self._quantize_tflite(plan, out_dir, progress)
        source = self.reference
        curve = None
        extra: dict = {}
        if plan.method == "qat":
            from pipeline.qat import run_qat

            outcome = run_qat(self.config, self.adapter, plan, self.reference, out_dir, progress=progress)
            source, curve = outcome.reference, outcome.loss_curve
            extra.update(
                qat_steps=outcome.steps, qat_seconds=outcome.seconds,
                qat_learning_rate=outcome.budget.get("learning_rate"), qat_batch_size=outcome.budget.get("batch_size"),
                qat_seed=outcome.budget.get("seed"), qat_loss=outcome.loss, qat_autocast=outcome.autocast,
                qat_recalibrations=outcome.recalibrations,
            )
        out_path = out_dir / "candidate.onnx"
        quantized = quantize_model(
            source.onnx_path, source.layer_table, choices, self.calibration_feeds(), plan.calibration, out_path,
            workdir=out_dir, target=self.backend.quant_target,
            uint8_activations=self.backend.uint8_activations,
        )
        extra["calibration_used"] = quantized.calibration_used
        observed = self._observe(quantized.path, source.layer_table, {lq.name: lq.format for lq in quantized.layers},
                                 extra)
        reports = []
        for lq in quantized.layers:
            layer = table[lq.name]
            expected = self.backend.execution(lq.format, lq.realisation)
            execution, kernel, detail = expected, None, lq.detail
            if lq.name in observed:
                kernel, execution = observed[lq.name]
                if execution != expected:  # what ORT runs wins; reviewers see what the table said
                    detail += (f"; runs as {kernel} ({execution}), the static table expected {expected} "
                               f"for {lq.realisation} on {self.backend.name}")
            reports.append(LayerReport(name=lq.name, onnx_op=layer.onnx_op, format=lq.format,
                                       execution=execution, kernel=kernel, params=layer.params, detail=detail))
        return quantized.path, reports, extra, curve

    def _observe(self, artifact: str, layer_table, formats: dict, extra: dict) -> dict:
        """The backend's observed kernel per layer (one extra session build, timed in ``extra``), or
        {} where the backend cannot observe them: the static table then stands, and ``extra`` says so."""
        import time

        start = time.perf_counter()
        try:
            observed = self.backend.observed_kernels(artifact, layer_table, formats)
        except Exception as exc:  # noqa: BLE001 - the measured session will raise it properly if real
            log.warning("could not observe %s's kernels for %s: %s", self.backend.name, artifact, exc)
            extra["execution_source"] = f"static table (observing kernels failed: {type(exc).__name__}: {exc})"
            return {}
        if observed is None:
            extra["execution_source"] = "static table (this backend's kernels are not observed)"
            return {}
        extra["kernel_observation_s"] = round(time.perf_counter() - start, 4)
        missing = [n for n in formats if n not in observed]
        extra["execution_source"] = (f"observed: {self.backend.name} optimized graph"
                                     + (f"; static table for {', '.join(missing)} (not located)" if missing else ""))
        return observed

    def _quantize_tflite(self, plan: QuantPlan, out_dir: Path, progress=None):
        """TFLite route: the Keras model (QAT-tuned if asked) converted by TFLite's own converter."""
        from exporters import tflite

        model, curve, extra = None, None, {}
        if plan.method == "qat":
            from pipeline.qat.keras_train import keras_qat

            model, curve = keras_qat(self.config, self.adapter, plan, self.reference, out_dir, progress=progress)
            extra["qat_note"] = "QAT trains ORT's symmetric grid; TFLite int8 uses asymmetric activations (close, not exact)"
        art = tflite.candidate(self.adapter, self.reference, plan, self.calibration_feeds(),
                               out_dir / "candidate.tflite", model=model)
        table = self.reference.layer_table
        reports = [LayerReport(name=l.name, onnx_op=l.op, format=l.format,
                               execution=self.backend.execution(l.format, l.realisation),
                               params=table[l.name].params, detail=l.detail) for l in art.layers]
        extra["calibration_used"] = art.calibration_used
        if art.notes:
            extra["tflite_notes"] = art.notes
        return art.path, reports, extra, curve

    def _bits_per_weight(self, artifact: str | Path) -> float:
        table = self.reference.layer_table
        if self.is_tflite:
            from exporters import tflite

            return tflite.effective_bits_per_weight(artifact, self.reference_artifact, table.total_params())
        return effective_bits_per_weight(artifact, self.reference.onnx_path, table.total_params(),
                                         self.reference_weight_bytes, sum(4 * l.params for l in table))

    def _lock_path(self) -> Path:
        """One measurement lock per machine for CPU backends; per physical GPU for GPU backends (a Ray
        task sees its GPU as device 0 through CUDA_VISIBLE_DEVICES, so that variable names the GPU)."""
        base = measure_lock_path()
        if not getattr(self.backend, "needs_gpu", False):
            return base
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").replace(",", "_") or "all"
        return base.with_name(f"{base.stem}-gpu{visible}-{getattr(self.backend, 'device_id', 0)}{base.suffix}")

    def measure(self, artifact: str | Path, energy: bool = True) -> Measurement:
        """Accuracy, latency, size and energy of one artifact on this backend."""
        return self._measure(artifact, energy).measurement

    def _measure(self, artifact: str | Path, energy: bool = True) -> "_Measured":
        """:meth:`measure`, plus what the trial records beside it."""
        cfg = self.config
        ref = self.reference_accuracy  # first: a data or metric problem fails here, named, on the reference
        session = self.backend.open(artifact, cfg.measure.threads)
        outputs = run_dataset(session, self.eval_set, cfg.measure.eval_batch)
        value = task_metric(cfg, outputs, self.eval_set.targets)
        feeds = self.eval_set.fixed_batch(cfg.measure.batch_size)
        # Timing and energy windows of trials sharing a node (or a GPU) never overlap; the
        # accuracy run above may.
        with exclusive_measurement(self._lock_path()) as waited_s:
            times = time_batches(session, feeds, cfg.measure.warmup, cfg.measure.runs)
            energy_report = measure_energy(cfg, self.backend, session, feeds) if energy else None
        p50 = float(np.percentile(times, 50))
        engine_path = getattr(session, "engine_path", None)  # TensorRT builds lazily on the first run
        measurement = Measurement(
            backend=self.backend.name,
            device=self.backend.device(),
            metric=cfg.metric.name,
            accuracy=value,
            reference_accuracy=ref,
            accuracy_drop=accuracy_drop(ref, value, cfg.metric.higher_is_better),
            batch_size=cfg.measure.batch_size,
            eval_batch_size=cfg.measure.eval_batch,
            latency_ms_p50=p50,
            latency_ms_p95=float(np.percentile(times, 95)),
            throughput_per_s=cfg.measure.batch_size / (p50 / 1e3),
            size_bytes=os.path.getsize(artifact),
            effective_bits_per_weight=self._bits_per_weight(artifact),
            energy=energy_report,
            threads=cfg.measure.threads or os.cpu_count(),
            runtime_version=self.backend.runtime_version(),
        )
        return _Measured(measurement, str(engine_path) if engine_path else None, waited_s)

    def evaluate(self, plan: QuantPlan, out_dir: str | Path, energy: bool = True, progress=None) -> TrialResult:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        plan.resolve(self.reference.layer_table.names)  # a plan naming unknown layers is a user error, raised as is
        try:
            artifact, layers, extra, curve = self.quantize(plan, out_dir, progress=progress)
        except TrialFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - any quantizer failure fails this trial only
            from exporters.errors import UnsupportedPlan

            if isinstance(exc, UnsupportedPlan):
                raise TrialFailure(f"{self.backend.name} cannot build this plan: {exc}") from exc
            raise TrialFailure(f"quantization failed: {type(exc).__name__}: {exc}") from exc
        try:
            measured = self._measure(artifact, energy=energy)
            measurement, engine_path = measured.measurement, measured.engine_path
        except TrialFailure:
            raise
        except Exception as exc:  # noqa: BLE001
            raise TrialFailure(f"measurement failed on {self.backend.name}: {type(exc).__name__}: {exc}") from exc
        extra["backend_note"] = self.backend_note
        extra["measure_lock_wait_s"] = round(measured.lock_wait_s, 3)  # > 0: trials queued for the timer
        if engine_path and Path(engine_path).is_file():
            # What a TensorRT deployment ships is the engine; size_bytes stays the ONNX artifact's so
            # sizes compare across backends.
            extra["engine_size_bytes"] = Path(engine_path).stat().st_size
        (out_dir / "plan.yaml").write_text(plan.to_yaml())
        return TrialResult(
            plan_yaml=plan.to_yaml(),
            plan_summary=plan.summary(self.reference.layer_table.names),
            method=plan.method,
            layers=layers,
            measurement=measurement,
            artifact_path=str(artifact),
            engine_path=engine_path,
            qat_curve=curve,
            extra=extra,
        )

