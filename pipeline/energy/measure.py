"""Energy per inference: repeated windows of continuous inference around a meter.

Each window runs ``run_batch`` back to back until at least
``max(spec.min_seconds, meter.min_window_s)`` has passed (the window ends when
the last batch has finished: ``sync`` is called after every batch, so work a
GPU has queued but not finished never leaks out of the window). ``spec.repeats``
windows are measured and the median of each quantity is reported, which keeps
one window disturbed by a background task from moving the result.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Callable

from pipeline.config import EnergySpec
from pipeline.energy.base import EnergyMeasurementError, EnergyMeter
from pipeline.energy.carbon import gco2e_per_1m_inferences
from pipeline.results import EnergyReport

log = logging.getLogger(__name__)

# Idle power is measured once per device per process (it costs one window of sleep).
_IDLE_W: dict[tuple[str, str], float | None] = {}


def idle_power_w(meter: EnergyMeter, seconds: float | None = None) -> float | None:
    """The meter's idle power, measured on first use and cached for the process."""
    key = (meter.name, meter.description)
    if key not in _IDLE_W:
        window = seconds if seconds is not None else max(meter.min_window_s, 0.1)
        _IDLE_W[key] = meter.measure_idle_power(window)
    return _IDLE_W[key]


def _window(meter: EnergyMeter, run_batch: Callable[[], None], sync: Callable[[], None],
            target_s: float) -> tuple[float, float, int]:
    """(joules, seconds, batches) of one window."""
    sync()
    e0 = meter.read_joules()
    t0 = time.perf_counter()
    n = 0
    while True:
        run_batch()
        sync()
        n += 1
        if time.perf_counter() - t0 >= target_s:
            break
    dt = time.perf_counter() - t0
    e1 = meter.read_joules()
    return e1 - e0, dt, n


def measure_energy(
    meter: EnergyMeter,
    run_batch: Callable[[], None],
    batch_size: int,
    spec: EnergySpec,
    sync: Callable[[], None] = lambda: None,
) -> EnergyReport:
    """Median energy per inference over ``spec.repeats`` windows of continuous inference.

    ``run_batch`` runs one batch of ``batch_size`` inferences; ``sync`` blocks
    until device work has finished (``torch.cuda.synchronize``, a session's
    ``synchronize``); CPU runtimes need none.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    target = max(spec.min_seconds, meter.min_window_s)
    if target > spec.min_seconds:
        log.info("energy windows of %.2f s (measure.energy.min_seconds=%.2f is below %s's resolution)",
                 target, spec.min_seconds, meter.name)
    idle = idle_power_w(meter) if meter.source != "estimated" else None

    run_batch()  # first-call effects (lazy allocation, autotuning) stay out of the windows
    sync()

    per_inference: list[float] = []
    power: list[float] = []
    seconds: list[float] = []
    for i in range(spec.repeats):
        joules, dt, n = _window(meter, run_batch, sync, target)
        if not joules > 0:
            raise EnergyMeasurementError(
                f"{meter.name}: the energy counter did not advance over a {dt:.3f} s window "
                f"({n} batches, window {i + 1}/{spec.repeats}); not reporting a number that was not "
                f"measured. Lengthen measure.energy.min_seconds."
            )
        per_inference.append(joules / (n * batch_size))
        power.append(joules / dt)
        seconds.append(dt)

    j_per_inf = statistics.median(per_inference)
    intensity = spec.grid_intensity_g_per_kwh
    return EnergyReport(
        source=meter.source,
        meter=f"{meter.name}: {meter.description}",
        joules_per_inference=j_per_inf,
        joules_per_1k_inferences=j_per_inf * 1000.0,
        average_power_w=statistics.median(power),
        gco2e_per_1m_inferences=gco2e_per_1m_inferences(j_per_inf, intensity),
        grid_intensity_g_per_kwh=intensity,
        idle_power_w=idle,
        idle_handling=meter.idle_handling,
        window_s=statistics.median(seconds),
        repeats=spec.repeats,
    )
