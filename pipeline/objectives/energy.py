"""energy: joules per inference, metered (NVML, RAPL) or estimated, and the rules that come with it.

Owned here, once:

- the energy slot rule (:func:`decide_energy_mode`): when energy is only estimated
  (an estimate is a function of time anyway) the study optimises latency p50 in the
  energy slot, unless latency is already an objective;
- the one label for where an energy figure came from (:func:`energy_label`), used by
  the review table and the model card alike;
- one energy source per study (:func:`energy_source_mismatch`): joules from
  different meters are different quantities and are never ranked together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.objectives.base import Objective, register

if TYPE_CHECKING:
    from pipeline.results import TrialResult

METERS = ("nvml", "rapl", "estimated")  # energy sources a study can pin measure.energy.meter to

ENERGY = register(Objective(
    name="energy", direction="minimize", unit="J/inf", label="energy (J/inference)", metric="joules_per_inference",
    read=lambda r: r.measurement.energy.joules_per_inference if r.measurement.energy else None,
    fmt=".3e", long_unit=" J/inference", one_source=True,
))

LATENCY_SLOT_LABEL = "latency p50 (ms), in the energy slot: energy is only estimated here"


def energy_label(source: str | None, joules: float | None) -> str:
    """Where an energy figure came from: "metered (rapl)", "metered (nvml)", "estimated" or "not measured"."""
    if joules is None or not source or source == "none":
        return "not measured"
    return "estimated" if source == "estimated" else f"metered ({source})"


def slot_label(energy_source: str = "") -> str:
    """Axis label of the energy slot when it holds joules."""
    src = f", {energy_source}" if energy_source else ""
    return f"energy (J/inference{src})"


def decide_energy_mode(result: "TrialResult", names: list[str]) -> tuple[str, str]:
    """("energy" | "latency", why) for the energy slot, from a finished trial."""
    e = result.measurement.energy
    if e is not None and e.source != "estimated":
        return "energy", f"joules per inference, metered by {e.source} ({e.meter})"
    what = "no energy measurement" if e is None else "energy is only estimated here (no RAPL/NVML meter)"
    if "latency" in names:
        return "energy", f"{what}; latency is already an objective, so the energy slot holds the estimate"
    return "latency", f"{what}: latency p50 on {result.measurement.backend} is optimised in the energy slot"


def energy_source_mismatch(study_source: str | None, result: "TrialResult") -> str | None:
    """Why ``result`` cannot join a study whose energy source is ``study_source`` (None if it can).

    Every source counts, the estimate included: an estimated study that took a
    RAPL- or NVML-metered trial would rank joules of different kinds against
    each other (metered numbers include idle power, the estimate does not).
    """
    if study_source in (None, "", "none"):
        return None
    e = result.measurement.energy
    if e is None:
        return None  # energy not measured in this run; an energy objective then fails on its own
    if e.source == study_source:
        return None
    return (f"energy source {e.source} ({e.meter}) differs from the study's pinned energy source {study_source}: "
            f"joules from {e.source} and {study_source} are not comparable, so this trial is not used "
            f"(run it where {study_source} is available, or start a new study with --study NEW)")
