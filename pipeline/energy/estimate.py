"""Estimated CPU energy when no meter is readable: busy CPU time x watts per busy CPU.

    energy (J) = CPU-seconds used by this process (user + system, all threads)
                 x watts per busy logical CPU

CPU time comes from ``time.process_time()`` (CLOCK_PROCESS_CPUTIME_ID on Linux),
which counts every thread of the process, so ONNX Runtime's intra-op threads
are included. Spin-waiting worker threads count as busy, as they do on a power
meter.

Watts per busy logical CPU: ``measure.energy.watts_per_cpu`` when set, else
:data:`DEFAULT_WATTS_PER_BUSY_CPU` = 3.5 W, the Cloud Carbon Footprint
methodology's AWS average *maximum* watts per vCPU (at 100 % utilisation;
Appendix I, "Energy Coefficients"). Per logical CPU rather than per package
TDP because the package TDP is meaningless on a VM that owns 2 of 192 threads.

Idle handling: busy time only. Idle cores, idle time and the rest of the
machine contribute nothing; the per-CPU figure is the full-load figure, so the
static power of a busy CPU is attributed to the work in proportion to its busy
time. That approximates what a package meter would attribute to a process that
keeps its CPUs busy, and it is tagged ``estimated`` everywhere: it is never
mixed with metered numbers.

Why not CodeCarbon (3.3.2) or Zeus (0.16.0)? Both are well kept, and both were
checked. CodeCarbon pulls 17 dependencies (pandas, requests, authlib, typer,
questionary, prometheus_client, ...), its default tracker looks up the country
over the network (only ``OfflineEmissionsTracker`` does not), it samples power
every 15 s by default (windows here are ~1 s), and without RAPL it estimates
from *machine-wide* CPU load x a TDP looked up by CPU model name (this machine
reports only "AMD EPYC", which matches no row). Zeus measures (NVML, RAPL, AMD)
but does not estimate, and pulls pandas, scikit-learn, httpx, tyro and amdsmi.
Where a real meter exists we read the same counters they do (NVML's total
energy, RAPL's ``energy_uj``) in a few lines; where none exists, a per-process
estimate with its assumptions in plain sight is what the search needs.
"""

from __future__ import annotations

import time
from typing import Callable

from pipeline.energy.base import EnergyMeter

DEFAULT_WATTS_PER_BUSY_CPU = 3.5
WATTS_SOURCE = "Cloud Carbon Footprint methodology, AWS average max watts per vCPU at 100% CPU"

ESTIMATE_IDLE_HANDLING = (
    "estimate: busy CPU time of this process x watts per busy CPU; idle cores and idle time "
    "excluded, no idle baseline (none can be observed)"
)


class CpuTimeEstimateMeter(EnergyMeter):
    """Energy estimated from this process's CPU time (see module docstring)."""

    source = "estimated"
    idle_handling = ESTIMATE_IDLE_HANDLING
    min_window_s = 0.0

    def __init__(
        self,
        watts_per_busy_cpu: float | None = None,
        cpu_seconds: Callable[[], float] = time.process_time,
        note: str = "",
    ):
        if watts_per_busy_cpu is not None and not watts_per_busy_cpu > 0:
            raise ValueError(
                f"watts per busy CPU must be > 0, got {watts_per_busy_cpu!r} (measure.energy.watts_per_cpu)"
            )
        self.watts_per_busy_cpu = float(watts_per_busy_cpu or DEFAULT_WATTS_PER_BUSY_CPU)
        self._cpu_seconds = cpu_seconds
        origin = (
            "measure.energy.watts_per_cpu"
            if watts_per_busy_cpu is not None
            else f"default: {WATTS_SOURCE}"
        )
        self.name = "estimated"
        self.description = (
            f"estimate: process CPU time x {self.watts_per_busy_cpu:g} W per busy CPU ({origin})"
        )
        if note:
            self.description = f"{note}; {self.description}"

    def read_joules(self) -> float:
        return self._cpu_seconds() * self.watts_per_busy_cpu

    def measure_idle_power(self, seconds: float) -> float | None:
        return None
