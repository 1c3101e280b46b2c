"""The sensitivity table: per layer x format, the metric change with only that layer quantized.

A plain, JSON-serialisable record (it is cached on disk and logged to MLflow) with the two
questions the solver and the search ask of it: ``drop(layer, fmt)`` and ``predicted_drop(plan)``.

Every number says where it came from: ``source`` is ``artifact`` (the single-layer candidate was
quantized and run through the backend's runtime, like any trial) and ``eval_label`` says which
eval rows it was measured on (a subset, for speed, is labelled as such).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field

from pipeline.formats import Format
from pipeline.plan import QuantPlan


class Cell(BaseModel):
    """One layer quantized to one format, every other layer FP32."""

    layer: str
    format: Format
    accuracy: float | None = None  # the metric on the eval subset (None: the candidate failed)
    drop: float | None = None  # reference - accuracy, sign-adjusted (> 0 is worse)
    execution: str | None = None  # native | emulated, as the backend reported the layer
    error: str | None = None  # why the candidate failed (it cannot be built on this backend, ...)
    seconds: float = 0.0  # quantize + measure wall time of this cell
    # Measured with its whole group in the format (``search.group_layers``: the choice the search makes):
    # ``group_drop`` is that candidate's drop and ``drop`` this layer's even share of it, so sums over a
    # group (the solver, the skip screen) give back the measured group drop.
    group: str | None = None
    group_drop: float | None = None

    @property
    def decisive_drop(self) -> float | None:
        """The drop a format is pruned on: the whole group's when the cell was measured as one."""
        return self.group_drop if self.group is not None else self.drop


class LayerCost(BaseModel):
    """What a layer weighs: its share of the model's size and (estimated) latency."""

    layer: str
    kind: str
    onnx_op: str
    params: int
    macs: int | None = None
    size_share: float  # params x 32 bits over all quantizable layers' (FP32 weight bits)
    latency_share: float  # see SensitivityTable.latency_source


class ProxyCheck(BaseModel):
    """The cheap proxy against the artifact on the layers measured both ways."""

    proxy: str  # what the proxy computes, in words
    layers: list[str]  # layers compared
    spearman: float | None  # rank correlation of proxy score vs artifact drop over those cells
    cells: int
    scores: dict[str, dict[str, float]] = Field(default_factory=dict)  # layer -> format -> proxy score


class SensitivityTable(BaseModel):
    model: str
    backend: str
    device: str
    metric: str
    higher_is_better: bool
    reference_accuracy: float  # FP32 reference on the same eval rows and backend
    eval_rows: int
    eval_label: str  # e.g. "eval subset: first 512 of 1,500 rows"
    formats: list[Format]
    plan_defaults: str  # the knobs of the single-layer candidates (int8 activations, calibration, int4 block)
    source: Literal["artifact", "proxy"] = "artifact"
    grouping: str = "layer"  # layer | role | block: what one candidate quantized (see Cell.group)
    latency_source: str = "estimate: the layer's share of multiply-accumulates (params where MACs are unknown)"
    cells: list[Cell]
    costs: list[LayerCost]
    proxy: ProxyCheck | None = None
    cache_key: str = ""
    seconds: float = 0.0  # wall time to build the table (0 when read from the cache)
    from_cache: bool = False

    # -- queries ---------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return [c.layer for c in self.costs]

    def cell(self, layer: str, fmt: Format | str) -> Cell | None:
        fmt = Format(fmt)
        for c in self.cells:
            if c.layer == layer and c.format is fmt:
                return c
        return None

    def drop(self, layer: str, fmt: Format | str) -> float:
        """Measured single-layer drop; 0 for FP32, +inf where not measured or the candidate failed."""
        fmt = Format(fmt)
        if fmt is Format.FP32:
            return 0.0
        c = self.cell(layer, fmt)
        if c is None or c.drop is None or not math.isfinite(c.drop):
            return math.inf
        return c.drop

    def predicted_drop(self, plan: QuantPlan) -> float:
        """Additive estimate of the plan's drop: the sum of its layers' single-layer drops.

        Negative single-layer drops (noise on the subset, or a lucky rounding) count as 0 so that
        one noisy layer cannot pay for another's real loss. Interactions between layers are not
        modelled: this is a screen for plans that cannot meet a budget, not a measurement.
        """
        choices = plan.resolve(self.layers)
        return float(sum(max(self.drop(n, c.format), 0.0) for n, c in choices.items()))

    def ranking(self, fmt: Format | str) -> list[tuple[str, float]]:
        """Layers from most to least sensitive to ``fmt``."""
        rows = [(n, self.drop(n, fmt)) for n in self.layers]
        return sorted(rows, key=lambda r: -r[1])

    def cost(self, layer: str) -> LayerCost:
        for c in self.costs:
            if c.layer == layer:
                return c
        raise KeyError(layer)
