"""What a measured candidate reports. These models cross process boundaries
(Ray tasks, MLflow, JSON output), hence pydantic rather than loose dicts.

Honesty rule: every number carries where it came from. ``Measurement`` names the
backend and device; every layer says whether its format ran ``native`` or
``emulated`` there; energy says whether it was metered (and by what) or estimated.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from pipeline.formats import Format

Execution = Literal["native", "emulated"]
EnergySource = Literal["nvml", "rapl", "estimated"]


class LayerReport(BaseModel):
    name: str
    onnx_op: str
    format: Format
    execution: Execution  # observed from the runtime where the backend can (see ``kernel``), else its static table
    params: int
    detail: str = ""  # e.g. "int8 dynamic", "int4 block 32 MatMulNBits", "bf16 via Cast round-trip"
    # The kernel the runtime actually runs for this layer, where the backend can observe it (ORT
    # CPU's optimized graph), e.g. "QGemm" or "FusedGemm(fp32 on dequantized int8/uint8)"; None
    # when not observed (GPU backends, TFLite, results written before this field existed).
    kernel: str | None = None


class EnergyReport(BaseModel):
    source: EnergySource  # metered by NVML / RAPL, or estimated
    meter: str  # human description, e.g. "RAPL package-0", "estimate: 2 cores x 15 W TDP"
    joules_per_inference: float
    joules_per_1k_inferences: float
    average_power_w: float
    gco2e_per_1m_inferences: float
    grid_intensity_g_per_kwh: float
    idle_power_w: float | None = None  # subtracted idle baseline, where measured
    idle_handling: str = ""  # how idle power was treated, stated explicitly
    window_s: float = 0.0  # length of each measurement window
    repeats: int = 0


class Measurement(BaseModel):
    backend: str  # ort-cpu | ort-cuda | ort-trt | tensorrt | tflite
    device: str  # e.g. "AMD EPYC 9xx4 (2 threads)" or "NVIDIA H200"
    metric: str
    accuracy: float  # value of the task metric on the artifact's outputs
    reference_accuracy: float | None = None  # FP32 reference, same backend
    accuracy_drop: float | None = None  # reference - accuracy (sign-adjusted: >0 means worse)
    batch_size: int  # the timing (deployment) batch: latency, throughput and energy (measure.batch_size)
    # The batch the eval set was scored in (measure.eval_batch_size, default the timing batch). Dynamic
    # INT8 takes activation ranges per batch, so accuracy depends on it. None: recorded before it existed.
    eval_batch_size: int | None = None
    latency_ms_p50: float
    latency_ms_p95: float
    throughput_per_s: float  # samples per second at batch_size
    size_bytes: int
    effective_bits_per_weight: float
    energy: EnergyReport | None = None
    threads: int | None = None
    runtime_version: str = ""
    # Extra numbers measured around the run by an objective's probe (pipeline.objectives), e.g.
    # {"peak_rss_delta_bytes": ...}; logged to MLflow under the same names.
    probes: dict[str, float] = Field(default_factory=dict)

    def batch_note(self) -> str:
        """Both batch sizes in words, for tables and logs: ``timing batch 8, eval batch 8``."""
        ev = "eval batch ?" if self.eval_batch_size is None else f"eval batch {self.eval_batch_size}"
        return f"timing batch {self.batch_size}, {ev}"


class TrialResult(BaseModel):
    """Everything known about one evaluated candidate."""

    plan_yaml: str  # the QuantPlan as YAML (source of truth; see plan.QuantPlan)
    plan_summary: str
    method: Literal["ptq", "qat"]
    layers: list[LayerReport]
    measurement: Measurement
    artifact_path: str  # the candidate .onnx that was measured
    engine_path: str | None = None  # TensorRT engine, where built
    qat_curve: list[float] | None = None  # loss per step, QAT only
    extra: dict[str, Any] = Field(default_factory=dict)

    def objectives(self) -> dict[str, float]:
        m = self.measurement
        out = {
            "accuracy": m.accuracy,
            "latency": m.latency_ms_p50,
            "size": float(m.size_bytes),
        }
        if m.energy is not None:
            out["energy"] = m.energy.joules_per_inference
        return out

    def flat_metrics(self) -> dict[str, float]:
        """Numbers for MLflow: names stable across trials."""
        m = self.measurement
        d: dict[str, float] = {
            "accuracy": m.accuracy,
            "latency_ms_p50": m.latency_ms_p50,
            "latency_ms_p95": m.latency_ms_p95,
            "throughput_per_s": m.throughput_per_s,
            "size_bytes": float(m.size_bytes),
            "effective_bits_per_weight": m.effective_bits_per_weight,
        }
        if m.reference_accuracy is not None:
            d["reference_accuracy"] = m.reference_accuracy
        if m.accuracy_drop is not None:
            d["accuracy_drop"] = m.accuracy_drop
        if m.energy is not None:
            e = m.energy
            d.update(
                joules_per_inference=e.joules_per_inference,
                joules_per_1k_inferences=e.joules_per_1k_inferences,
                average_power_w=e.average_power_w,
                gco2e_per_1m_inferences=e.gco2e_per_1m_inferences,
            )
        d.update({k: float(v) for k, v in m.probes.items()})
        return d
