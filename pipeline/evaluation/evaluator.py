"""Evaluate one candidate plan end to end: resolve once -> QAT if asked -> backend.build -> measure.

:class:`Evaluator` holds what is shared by all candidates of one config (the
FP32 reference export, datasets, backend, the reference's own accuracy on that
backend) so a Ray worker or the CLI builds them once. The plan is resolved once per
evaluation (:class:`~pipeline.plan.ResolvedPlan`) and that object is what QAT and the
backend's build receive; the backend plugin owns how its artifact is built (ONNX quantizer
or TFLite converter), its FP32 reference artifact and, for non-ONNX artifacts, the size
accounting, so nothing here depends on which backend runs.
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
from pipeline.backends.base import BuildInputs
from pipeline.config import SearchConfig
from pipeline.data import CALIBRATION_BATCH, Dataset, calibration_batches, load_dataset, load_eval_set
from pipeline.data_check import onnx_input_specs
from pipeline.measure import (
    ReferenceFailure,
    TrialFailure,
    TrialPruned,
    effective_bits_per_weight,
    exclusive_measurement,
    measure_lock_path,
    measure_energy,
    run_dataset,
    settle,
    task_metric,
    time_batches,
    weight_bytes,
)
from pipeline.metrics import accuracy_drop
from pipeline.models import ReferenceModel, get_adapter
from pipeline.objectives.peak_memory import peak_rss_probe
from pipeline.errors import ConfigError
from pipeline.plan import QuantPlan, ResolvedPlan, resolved
from pipeline.results import LayerReport, Measurement, TrialResult

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class _Measured:
    measurement: Measurement
    engine_path: str | None  # the TensorRT engine the session built (None for other backends)
    lock_wait_s: float  # time spent waiting for the node's measurement lock


def optimized_reference(config: SearchConfig, raw: ReferenceModel, calibration: Dataset, backend: str) -> ReferenceModel:
    """The export after ``export.optimize`` for ``backend`` (cached beside it): the one graph every candidate is
    built from and the FP32 accuracy is measured on - here, in the sensitivity table and in every Ray trial
    (the search ships this one to its workers: :func:`pipeline.search.preflight.trial_reference`)."""
    from exporters.optimize import optimize_reference

    path, table = optimize_reference(raw.onnx_path, raw.layer_table, raw.content_hash, config.export.optimize,
                                     backend, calibration_batches(calibration, raw.input_names)[:1])
    return raw.model_copy(update={"onnx_path": path, "layer_table": table})


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
        """The graph candidates start from and the FP32 accuracy is measured on (export.optimize)."""
        return optimized_reference(self.config, self.adapter.export_reference(self.workdir), self.calibration,
                                   self.backend.name)

    @cached_property
    def calibration(self) -> Dataset:
        return load_dataset(self.config.data.calibration, self.config, "data.calibration")

    @cached_property
    def eval_set(self) -> Dataset:
        return load_eval_set(self.config)

    @cached_property
    def reference_weight_bytes(self) -> int:
        return weight_bytes(self.reference.onnx_path)

    def build_inputs(self, source: ReferenceModel | None = None, model=None) -> BuildInputs:
        return BuildInputs(reference=self.reference, calibration_feeds=self.calibration_feeds(), source=source,
                           adapter=self.adapter, model=model)

    @cached_property
    def reference_artifact(self) -> str:
        """The FP32 artifact this backend runs (reference.onnx, or e.g. a float .tflite for TFLite)."""
        return self.backend.reference_artifact(self.build_inputs())

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
        artifact = str(self.reference_artifact)
        specs = onnx_input_specs(artifact) if artifact.endswith(".onnx") else None
        value = task_metric(self.config, run_dataset(session, self.eval_set, self.config.measure.eval_batch,
                                                     input_specs=specs), self.eval_set.targets)
        cache.write_text(json.dumps({"value": value}))
        return value

    def scored_reference(self) -> float:
        """:attr:`reference_accuracy`, or :class:`pipeline.measure.ReferenceFailure` naming the data or metric
        problem: the study's failure (every trial would fail alike), not one plan's."""
        try:
            return self.reference_accuracy
        except ConfigError as exc:
            raise ReferenceFailure(f"the FP32 reference could not be scored: {exc}") from exc

    @cached_property
    def screen(self):
        """The eval screen proposals are pruned on, or None (``search.screen``; :mod:`pipeline.evaluation.screen`)."""
        from pipeline.evaluation.screen import build_screen

        spec, cfg = self.config.search.screen, self.config
        if spec.fraction <= 0 or cfg.search.max_accuracy_drop is None or len(self.eval_set) < spec.min_rows:
            return None
        return build_screen(self.eval_set, cfg.measure.eval_batch, cfg.metric.pairs, spec.fraction)

    @cached_property
    def reference_screen_accuracy(self) -> float:
        """The FP32 reference's metric on the screen's rows (what a screened drop is measured against)."""
        session = self.backend.open(self.reference_artifact, self.config.measure.threads)
        first = run_dataset(session, self.eval_set.take(self.screen.first), self.config.measure.eval_batch)
        return task_metric(self.config, self.screen.outputs_for_metric(first), self.screen.targets)

    def _screened_outputs(self, session) -> dict[str, np.ndarray]:
        """All eval outputs, the screen's batches first; raises :class:`TrialPruned` when they rule the plan out."""
        cfg, sc = self.config, self.screen
        ref = self.reference_screen_accuracy
        first = run_dataset(session, self.eval_set.take(sc.first), cfg.measure.eval_batch)
        value = task_metric(cfg, sc.outputs_for_metric(first), sc.targets)
        drop = accuracy_drop(ref, value, cfg.metric.higher_is_better)
        limit = cfg.search.screen.margin * cfg.search.max_accuracy_drop
        if drop > limit:
            raise TrialPruned(f"pruned early: {cfg.metric.name} drop {drop:.4f} on {sc.label} exceeds "
                              f"{cfg.search.screen.margin:g} x search.max_accuracy_drop {cfg.search.max_accuracy_drop} "
                              "(not timed or metered; search.screen)")
        return sc.merge(first, run_dataset(session, self.eval_set.take(sc.rest), cfg.measure.eval_batch))

    def calibration_feeds(self, batch_size: int = CALIBRATION_BATCH) -> list[dict[str, np.ndarray]]:
        """Equal-sized batches, capped (shared with QAT so both calibrate on the same rows)."""
        return calibration_batches(self.calibration, self.reference.input_names, batch_size)

    # -- one candidate -----------------------------------------------------
    def quantize(self, plan: QuantPlan | ResolvedPlan, out_dir: Path, progress=None) -> tuple[str, list[LayerReport], dict, list[float] | None]:
        """Build the candidate artifact; returns (path, layer reports, extra info, QAT loss curve).

        QAT (when the plan asks) runs here, before the build, on the same resolved plan; the
        backend says what the build takes from it (``builds_from``): the fine-tuned model's ONNX
        export, or the fine-tuned framework model itself.
        """
        plan = resolved(plan, self.reference.layer_table.names)
        source, model, curve, extra = None, None, None, {}
        if plan.method == "qat":
            if self.backend.builds_from == "framework":
                from pipeline.qat.keras_train import keras_qat

                model, curve = keras_qat(self.config, self.adapter, plan, self.reference, out_dir, progress=progress)
            else:
                from pipeline.qat import run_qat

                outcome = run_qat(self.config, self.adapter, plan, self.reference, out_dir, progress=progress)
                source, curve = outcome.reference, outcome.loss_curve
                extra.update(
                    qat_steps=outcome.steps, qat_seconds=outcome.seconds,
                    qat_learning_rate=outcome.budget.get("learning_rate"), qat_batch_size=outcome.budget.get("batch_size"),
                    qat_seed=outcome.budget.get("seed"), qat_loss=outcome.loss, qat_autocast=outcome.autocast,
                    qat_recalibrations=outcome.recalibrations,
                )
        built = self.backend.build(self.build_inputs(source, model), plan, out_dir, progress=progress)
        extra.update(built.extra)
        return built.path, built.layers, extra, curve

    def _bits_per_weight(self, artifact: str | Path) -> float:
        table = self.reference.layer_table
        bits = self.backend.bits_per_weight(artifact, self.reference_artifact, table.total_params())
        if bits is not None:
            return bits
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

    def _measure(self, artifact: str | Path, energy: bool = True, screen: bool = False) -> "_Measured":
        """:meth:`measure`, plus what the trial records beside it; ``screen``: may end in :class:`TrialPruned`."""
        cfg = self.config
        ref = self.scored_reference()
        # The peak-memory objective's probe: the process's peak RSS growth while the artifact is opened and
        # run on the eval set (pipeline.objectives.peak_memory says what it counts and what it cannot).
        with peak_rss_probe() as probes:
            session = self.backend.open(artifact, cfg.measure.threads)
            outputs = (self._screened_outputs(session) if screen and self.screen is not None
                       else run_dataset(session, self.eval_set, cfg.measure.eval_batch))
        value = task_metric(cfg, outputs, self.eval_set.targets)
        feeds = self.eval_set.fixed_batch(cfg.measure.batch_size)
        # Timing and energy windows of trials sharing a node (or a GPU) never overlap; the
        # accuracy run above may.
        with exclusive_measurement(self._lock_path()) as waited_s:
            settle()  # the last lock holder's ORT threads stop spinning first (pipeline.measure.SETTLE_S)
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
            probes=probes,
        )
        return _Measured(measurement, str(engine_path) if engine_path else None, waited_s)

    def evaluate(self, plan: QuantPlan | ResolvedPlan, out_dir: str | Path, energy: bool = True, progress=None,
                 screen: bool = False) -> TrialResult:
        """Build and measure one candidate. ``screen``: a proposal that may be pruned early (``search.screen``)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        # Resolved once, here: a plan naming unknown layers is a user error, raised as is.
        choices = resolved(plan, self.reference.layer_table.names)
        self.scored_reference()  # before the candidate is built: a reference that cannot be scored fails first
        try:
            artifact, layers, extra, curve = self.quantize(choices, out_dir, progress=progress)
        except TrialFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - any quantizer failure fails this trial only
            from exporters.errors import UnsupportedPlan

            if isinstance(exc, UnsupportedPlan):
                raise TrialFailure(f"{self.backend.name} cannot build this plan: {exc}") from exc
            raise TrialFailure(f"quantization failed: {type(exc).__name__}: {exc}") from exc
        try:
            measured = self._measure(artifact, energy=energy, screen=screen)
            measurement, engine_path = measured.measurement, measured.engine_path
        except (TrialFailure, ReferenceFailure):
            raise
        except Exception as exc:  # noqa: BLE001
            raise TrialFailure(f"measurement failed on {self.backend.name}: {type(exc).__name__}: {exc}") from exc
        extra["backend_note"] = self.backend_note
        extra["measure_lock_wait_s"] = round(measured.lock_wait_s, 3)  # > 0: trials queued for the timer
        if engine_path and Path(engine_path).is_file():
            # What a TensorRT deployment ships is the engine; size_bytes stays the ONNX artifact's so
            # sizes compare across backends.
            extra["engine_size_bytes"] = Path(engine_path).stat().st_size
        (out_dir / "plan.yaml").write_text(choices.plan.to_yaml())
        return TrialResult(
            plan_yaml=choices.plan.to_yaml(),
            plan_summary=choices.summary(),
            method=choices.method,
            layers=layers,
            measurement=measurement,
            artifact_path=str(artifact),
            engine_path=engine_path,
            qat_curve=curve,
            extra=extra,
        )

