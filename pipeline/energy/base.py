"""The energy-meter interface every source (NVML, RAPL, estimate) implements.

A meter is a cumulative counter: :meth:`EnergyMeter.read_joules` returns the
energy (J) accumulated since some arbitrary origin, and a measurement is the
difference of two reads around a window of work. Counters are read, never
sampled-and-integrated, so a window's energy does not depend on a polling rate.

Idle power policy (the same for every metered source, stated in every report):
metered numbers are the *total* energy the device drew during the window, idle
and static power included, because that is what serving the model costs on a
machine dedicated to it. The device's idle power is measured once per process
before the first window and reported next to the result (``idle_power_w``) but
never subtracted, so anyone who wants dynamic energy can compute it and nobody
gets a silently rebased number. The estimate has no idle baseline by
construction (see :mod:`pipeline.energy.estimate`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

from pipeline.results import EnergySource

METERED_IDLE_HANDLING = (
    "total energy over the window, idle/static power included; idle power measured once "
    "before the first window and reported (idle_power_w), not subtracted"
)


class MeterUnavailable(RuntimeError):
    """The requested meter cannot work here; the message says why and what to do."""


class EnergyMeasurementError(RuntimeError):
    """A measurement window produced no usable number (e.g. the counter did not advance)."""


class EnergyMeter(ABC):
    """A cumulative energy counter.

    ``name`` is short and stable (``nvml:0``, ``rapl``, ``estimated``);
    ``description`` is what a report prints (device, counter, assumptions).
    """

    name: str
    source: EnergySource
    description: str
    idle_handling: str = METERED_IDLE_HANDLING
    # Shortest window that gives a meaningful reading (counter update period,
    # resolution). measure_energy never uses a shorter window than this.
    min_window_s: float = 0.0

    @abstractmethod
    def read_joules(self) -> float:
        """Energy accumulated since an arbitrary origin, in joules (monotonic)."""

    def measure_idle_power(self, seconds: float) -> float | None:
        """Average power (W) while this process sleeps for ``seconds``; None when
        the source cannot observe idle power (the estimate)."""
        e0 = self.read_joules()
        t0 = time.perf_counter()
        time.sleep(seconds)
        e1 = self.read_joules()
        dt = time.perf_counter() - t0
        return (e1 - e0) / dt if dt > 0 else None

    def close(self) -> None:
        """Release the underlying handle (NVML); safe to call more than once."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} ({self.source}): {self.description}>"
