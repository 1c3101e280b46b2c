"""Energy -> carbon, from a grid intensity in gCO2e per kWh.

The default intensity is the world-average carbon intensity of electricity
generation in 2024, **473 gCO2e/kWh** (lifecycle emissions), from Ember,
*Global Electricity Review 2025*. It is a location-agnostic default; set
``measure.energy.grid_intensity_g_per_kwh`` to your grid's value (national
averages: Ember's data explorer; hourly values: Electricity Maps) for a number
that means something for your deployment.
"""

from __future__ import annotations

JOULES_PER_KWH = 3.6e6

DEFAULT_GRID_INTENSITY_G_PER_KWH = 473.0
GRID_INTENSITY_SOURCE = (
    "world average 2024, 473 gCO2e/kWh (Ember, Global Electricity Review 2025, lifecycle emissions)"
)


def _check_intensity(g_per_kwh: float) -> None:
    if not g_per_kwh >= 0:  # also rejects NaN
        raise ValueError(
            f"grid intensity must be >= 0 gCO2e/kWh, got {g_per_kwh!r} "
            "(set measure.energy.grid_intensity_g_per_kwh)"
        )


def grams_co2e(joules: float, g_per_kwh: float = DEFAULT_GRID_INTENSITY_G_PER_KWH) -> float:
    """Grams of CO2e emitted producing ``joules`` of electricity at ``g_per_kwh``."""
    _check_intensity(g_per_kwh)
    if joules < 0:
        raise ValueError(f"energy must be >= 0 J, got {joules!r}")
    return joules / JOULES_PER_KWH * g_per_kwh


def gco2e_per_1m_inferences(joules_per_inference: float,
                            g_per_kwh: float = DEFAULT_GRID_INTENSITY_G_PER_KWH) -> float:
    """gCO2e for one million inferences at ``joules_per_inference`` each."""
    return grams_co2e(joules_per_inference * 1e6, g_per_kwh)
