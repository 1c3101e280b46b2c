"""Energy meters behind one small interface, chosen automatically and named in every result.

- :func:`select_meter` picks NVML (GPU backends), RAPL (readable CPU package
  counters) or a clearly labelled estimate (process CPU time x watts per busy
  CPU), or exactly the meter the config asks for, with a clear error when it
  cannot work.
- :func:`measure_energy` runs continuous inference in repeated windows around
  the meter and returns a :class:`pipeline.results.EnergyReport`: J/inference,
  J/1k inferences, average power, gCO2e per 1M inferences, the meter, its
  source (``nvml`` | ``rapl`` | ``estimated``) and how idle power was handled.

Nothing here imports a GPU library at import time; ``pynvml`` is imported only
when an NVML meter is created.
"""

from pipeline.energy.base import EnergyMeasurementError, EnergyMeter, MeterUnavailable
from pipeline.energy.carbon import (
    DEFAULT_GRID_INTENSITY_G_PER_KWH,
    GRID_INTENSITY_SOURCE,
    gco2e_per_1m_inferences,
    grams_co2e,
)
from pipeline.energy.estimate import DEFAULT_WATTS_PER_BUSY_CPU, CpuTimeEstimateMeter
from pipeline.energy.measure import measure_energy
from pipeline.energy.nvml import NvmlMeter, nvml_status
from pipeline.energy.rapl import RaplMeter, rapl_status
from pipeline.energy.select import select_meter

__all__ = [
    "CpuTimeEstimateMeter",
    "DEFAULT_GRID_INTENSITY_G_PER_KWH",
    "DEFAULT_WATTS_PER_BUSY_CPU",
    "EnergyMeasurementError",
    "EnergyMeter",
    "GRID_INTENSITY_SOURCE",
    "MeterUnavailable",
    "NvmlMeter",
    "RaplMeter",
    "gco2e_per_1m_inferences",
    "grams_co2e",
    "measure_energy",
    "nvml_status",
    "rapl_status",
    "select_meter",
]
