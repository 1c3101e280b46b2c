"""carbon: grams CO2e per million inferences, from the energy figure and the configured grid intensity.

It inherits energy's source (metered or estimated), so it follows energy's one-source rule.
"""

from pipeline.objectives.base import Objective, register

CARBON = register(Objective(
    name="carbon", direction="minimize", unit="gCO2e/1M", label="carbon (gCO2e per 1M inferences)",
    metric="gco2e_per_1m_inferences",
    read=lambda r: r.measurement.energy.gco2e_per_1m_inferences if r.measurement.energy else None,
    fmt=".4g", long_unit=" gCO2e/1M inferences", one_source=True,
))
