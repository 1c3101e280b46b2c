"""Per-layer sensitivity and what the search does with it (issue 15).

``build_sensitivity`` measures, per layer x format, the metric drop with only that layer quantized,
on the artifact (cached); ``seed_plans`` / ``prune_formats`` / ``predicted_drop`` turn it into seeds,
per-layer format sets and a skip rule; ``emulated_formats`` says which formats a backend only
emulates; ``seeding_for`` / ``sensitivity_seeds`` / ``space_inputs`` are what the runner calls.
"""

from pipeline.sensitivity.emulation import emulated_formats
from pipeline.sensitivity.measure import build_sensitivity
from pipeline.sensitivity.seeding import Seeding, seeding_for, sensitivity_seeds, space_inputs
from pipeline.sensitivity.solver import greedy_sequence, predicted_drop, prune_formats, seed_plans
from pipeline.sensitivity.table import SensitivityTable

__all__ = ["build_sensitivity", "emulated_formats", "greedy_sequence", "predicted_drop", "prune_formats",
           "seed_plans", "Seeding", "seeding_for", "sensitivity_seeds", "space_inputs", "SensitivityTable"]
