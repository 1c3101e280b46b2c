"""The shared ONNX build: quantize the source for the backend's graph target, observe the kernels the
runtime really runs (where the backend can), and report each layer as native or emulated."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from exporters.onnx_quant import quantize_model
from pipeline.backends.artifact import BuildInputs, BuiltArtifact
from pipeline.results import LayerReport

if TYPE_CHECKING:
    from pipeline.backends.base import Backend
    from pipeline.plan import ResolvedPlan

log = logging.getLogger(__name__)


def build_onnx(backend: "Backend", inputs: BuildInputs, plan: "ResolvedPlan", out_dir: Path) -> BuiltArtifact:
    table = inputs.reference.layer_table
    source = inputs.source or inputs.reference
    extra: dict = {}
    quantized = quantize_model(
        source.onnx_path, source.layer_table, plan, inputs.calibration_feeds, plan.calibration,
        Path(out_dir) / "candidate.onnx", workdir=out_dir, target=backend.quant_target,
        uint8_activations=backend.uint8_activations,
    )
    extra["calibration_used"] = quantized.calibration_used
    observed = observe(backend, quantized.path, source.layer_table, {lq.name: lq.format for lq in quantized.layers},
                       extra)
    reports = []
    for lq in quantized.layers:
        layer = table[lq.name]
        expected = backend.execution(lq.format, lq.realisation)
        execution, kernel, detail = expected, None, lq.detail
        if lq.name in observed:
            kernel, execution = observed[lq.name]
            if execution != expected:  # what ORT runs wins; reviewers see what the table said
                detail += (f"; runs as {kernel} ({execution}), the static table expected {expected} "
                           f"for {lq.realisation} on {backend.name}")
        reports.append(LayerReport(name=lq.name, onnx_op=layer.onnx_op, format=lq.format,
                                   execution=execution, kernel=kernel, params=layer.params, detail=detail))
    return BuiltArtifact(quantized.path, reports, extra)


def observe(backend: "Backend", artifact: str, layer_table, formats: dict, extra: dict) -> dict:
    """The backend's observed kernel per layer (one extra session build, timed in ``extra``), or
    {} where the backend cannot observe them: the static table then stands, and ``extra`` says so."""
    start = time.perf_counter()
    try:
        observed = backend.observed_kernels(artifact, layer_table, formats)
    except Exception as exc:  # noqa: BLE001 - the measured session will raise it properly if real
        log.warning("could not observe %s's kernels for %s: %s", backend.name, artifact, exc)
        extra["execution_source"] = f"static table (observing kernels failed: {type(exc).__name__}: {exc})"
        return {}
    if observed is None:
        extra["execution_source"] = "static table (this backend's kernels are not observed)"
        return {}
    extra["kernel_observation_s"] = round(time.perf_counter() - start, 4)
    missing = [n for n in formats if n not in observed]
    extra["execution_source"] = (f"observed: {backend.name} optimized graph"
                                 + (f"; static table for {', '.join(missing)} (not located)" if missing else ""))
    return observed
