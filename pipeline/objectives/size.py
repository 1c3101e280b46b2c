"""size: bytes of the exported artifact on disk."""

from pipeline.objectives.base import Objective, register

SIZE = register(Objective(
    name="size", direction="minimize", unit="bytes", label="size (bytes)", metric="size_bytes",
    read=lambda r: float(r.measurement.size_bytes), fmt=",.0f", long_unit=" bytes",
))
