"""One home per objective: accuracy, latency, size, energy, carbon, peak_memory (see base.py)."""

from pipeline.objectives import accuracy, latency, size, energy, carbon, peak_memory  # noqa: F401, I001 - registration order
from pipeline.objectives.base import Objective, all_objectives, get, names, register
from pipeline.objectives.energy import METERS, decide_energy_mode, energy_label, energy_source_mismatch
from pipeline.objectives.slots import ObjectiveInfo, measured, objective_infos, objective_values

__all__ = ["METERS", "Objective", "ObjectiveInfo", "all_objectives", "decide_energy_mode", "energy_label",
           "energy_source_mismatch", "get", "measured", "names", "objective_infos", "objective_values", "register"]
