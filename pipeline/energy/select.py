"""Choose the energy meter for a backend, and say why.

``auto``: NVML when the backend runs on an NVIDIA GPU and NVML works; else RAPL
when readable; else the CPU-time estimate. An explicit choice that cannot work
raises :class:`MeterUnavailable` with the reason and the fix: a user who asked
for metered energy never silently gets an estimate.

When a GPU backend ends up with a CPU-side meter (RAPL or the estimate), the
meter's description says so in its first words ("host CPU only; GPU energy not
included"): such a number covers the host, not the accelerator.
"""

from __future__ import annotations

import logging

from pipeline.config import EnergySpec
from pipeline.energy.base import EnergyMeter, MeterUnavailable
from pipeline.energy.estimate import CpuTimeEstimateMeter
from pipeline.energy.nvml import NvmlMeter
from pipeline.energy.rapl import DEFAULT_POWERCAP, RaplMeter

log = logging.getLogger(__name__)


def _gpu_index(backend) -> int:
    return int(getattr(backend, "device_id", 0) or 0)


def _host_only(meter: EnergyMeter, why: str) -> EnergyMeter:
    meter.description = f"host CPU only; GPU energy not included ({why}); {meter.description}"
    return meter


def select_meter(spec: EnergySpec, backend, powercap_root=DEFAULT_POWERCAP) -> EnergyMeter:
    """The meter ``spec.meter`` asks for, for work running on ``backend``."""
    choice = spec.meter
    needs_gpu = bool(getattr(backend, "needs_gpu", False))
    name = getattr(backend, "name", type(backend).__name__)

    if choice == "nvml":
        if not needs_gpu:
            log.warning("energy meter nvml requested for CPU backend %s: it meters the GPU, not the CPU", name)
        try:
            return NvmlMeter(_gpu_index(backend))
        except MeterUnavailable as exc:
            raise MeterUnavailable(
                f"measure.energy.meter is 'nvml' but {exc} "
                "(or set measure.energy.meter: auto to fall back to RAPL or an estimate)"
            ) from None
    if choice == "rapl":
        try:
            meter = RaplMeter(powercap_root)
        except MeterUnavailable as exc:
            raise MeterUnavailable(
                f"measure.energy.meter is 'rapl' but {exc} "
                "(or set measure.energy.meter: auto to fall back to an estimate)"
            ) from None
        return _host_only(meter, "meter 'rapl' requested") if needs_gpu else meter
    if choice == "estimated":
        meter = CpuTimeEstimateMeter(spec.watts_per_cpu)
        return _host_only(meter, "meter 'estimated' requested") if needs_gpu else meter
    if choice != "auto":
        raise ValueError(f"measure.energy.meter must be auto, nvml, rapl or estimated; got {choice!r}")

    nvml_reason = ""
    if needs_gpu:
        try:
            meter = NvmlMeter(_gpu_index(backend))
            log.info("energy meter for %s: %s", name, meter.description)
            return meter
        except MeterUnavailable as exc:
            nvml_reason = str(exc)
            log.warning("energy: NVML unavailable for GPU backend %s (%s); falling back to a CPU-side meter",
                        name, nvml_reason)
    try:
        meter: EnergyMeter = RaplMeter(powercap_root)
    except MeterUnavailable as exc:
        meter = CpuTimeEstimateMeter(spec.watts_per_cpu, note=f"auto: {exc}")
    if needs_gpu:
        meter = _host_only(meter, f"NVML unavailable: {nvml_reason}")
    log.info("energy meter for %s: %s", name, meter.description)
    return meter
