"""A study's objective slots: which objective each Optuna value is, and what fills it.

The slot is usually the objective itself; the energy slot holds latency p50 when
energy is only estimated (:func:`pipeline.objectives.energy.decide_energy_mode`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

from pipeline.objectives import energy as _energy
from pipeline.objectives.base import get

if TYPE_CHECKING:
    from pipeline.results import TrialResult


class ObjectiveInfo(BaseModel):
    name: str  # as in search.objectives: accuracy | energy | latency | size | ...
    direction: Literal["maximize", "minimize"]
    source: str  # the registered objective whose value is optimised in this slot
    label: str  # axis label with unit

    @property
    def column(self) -> str:
        """Short column name: the objective, and what fills it when that differs."""
        return self.name if self.source == self.name else f"{self.name}({self.source})"

    @property
    def shown(self) -> str:
        """Name for people: the accuracy slot shows the task metric (``r2`` for ``mypkg.metrics:r2``)."""
        if self.name == "accuracy" and self.label not in ("", "accuracy"):
            return self.label.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
        return self.column

    @property
    def header(self) -> str:
        try:
            unit = get(self.source).unit
        except KeyError:
            unit = ""
        return f"{self.shown} {unit}".strip()

    def format(self, v: float) -> str:
        """The value as the front table prints it."""
        try:
            return get(self.source).format(v)
        except KeyError:
            return f"{v:.4f}"


def objective_infos(names: list[str], metric: str, higher_is_better: bool, energy_mode: str | None,
                    energy_source: str = "") -> list[ObjectiveInfo]:
    out = []
    for n in names:
        if n == "accuracy":
            out.append(ObjectiveInfo(name=n, direction="maximize" if higher_is_better else "minimize", source=n,
                                     label=f"{metric}"))
        elif n == "energy" and energy_mode == "latency":
            out.append(ObjectiveInfo(name=n, direction="minimize", source="latency", label=_energy.LATENCY_SLOT_LABEL))
        elif n == "energy":
            out.append(ObjectiveInfo(name=n, direction="minimize", source="energy",
                                     label=_energy.slot_label(energy_source)))
        else:
            o = get(n)
            out.append(ObjectiveInfo(name=n, direction=o.direction, source=n, label=o.label))
    return out


def measured(result: "TrialResult") -> dict[str, float]:
    """Every registered objective this trial measured, by name."""
    from pipeline.objectives.base import all_objectives

    out = {}
    for o in all_objectives():
        v = o.value(result)
        if v is not None:
            out[o.name] = v
    return out


def objective_values(result: "TrialResult", infos: list[ObjectiveInfo]) -> list[float]:
    """The objective vector of a finished trial, in slot order."""
    available = measured(result)
    values = []
    for o in infos:
        if o.source not in available:
            raise ValueError(f"objective {o.name!r} needs {o.source!r}, which this trial did not measure "
                             f"(measured: {sorted(available)})")
        v = float(available[o.source])
        if not math.isfinite(v):
            raise ValueError(f"objective {o.name!r} is not finite ({v})")
        values.append(v)
    return values
