"""What an objective is, and the registry every other part of the search asks.

An :class:`Objective` declares, once: its name (as written in
``search.objectives``), its direction, its unit and axis label, the MLflow
child-run metric that holds its raw value (what ``promote`` reads back), how its
value is read from a :class:`~pipeline.results.TrialResult`, and how a value is
printed in the front table. Config validation, Optuna's directions, MLflow metric
names, promotion policies (``min-<objective>``) and the front columns all read
this registry, so adding an objective is one module that calls :func:`register`
(see :mod:`pipeline.objectives.peak_memory`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from pipeline.results import TrialResult

Direction = Literal["maximize", "minimize"]


@dataclass(frozen=True)
class Objective:
    name: str  # as in search.objectives
    direction: Direction  # default direction (accuracy's follows the task metric, see slots)
    unit: str  # short unit for column headers: "ms", "bytes", "J/inf"
    label: str  # axis label with unit
    metric: str  # key of TrialResult.flat_metrics() / the MLflow child-run metric holding the value
    read: Callable[["TrialResult"], float | None]  # the value on a finished trial; None = not measured
    fmt: str = ".4f"  # format spec for the front table
    long_unit: str = ""  # unit in sentences ("lowest energy (0.002 J/inference)")
    one_source: bool = False  # values from different energy sources must not be ranked together

    def value(self, result: "TrialResult") -> float | None:
        v = self.read(result)
        return None if v is None else float(v)

    def format(self, v: float) -> str:
        return format(v, self.fmt)


_REGISTRY: dict[str, Objective] = {}


def register(obj: Objective) -> Objective:
    if obj.name in _REGISTRY and _REGISTRY[obj.name] != obj:
        raise ValueError(f"objective {obj.name!r} is registered twice")
    _REGISTRY[obj.name] = obj
    return obj


# The built-in objectives register when the package is imported (pipeline/objectives/__init__.py
# imports each module), which Python does before any of its modules is used.


def get(name: str) -> Objective:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown objective {name!r}; known: {names()}") from None


def names() -> list[str]:
    return list(_REGISTRY)


def all_objectives() -> list[Objective]:
    return list(_REGISTRY.values())
