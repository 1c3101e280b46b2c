"""latency: median (p50) wall time of one batch through the artifact's runtime, after warm-up."""

from pipeline.objectives.base import Objective, register

LATENCY = register(Objective(
    name="latency", direction="minimize", unit="ms", label="latency p50 (ms)", metric="latency_ms_p50",
    read=lambda r: r.measurement.latency_ms_p50, fmt=".3f", long_unit=" ms",
))
