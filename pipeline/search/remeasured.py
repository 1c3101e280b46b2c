"""The re-measurement's report, as stored on the study, and how it decides the final front.

Split from :mod:`pipeline.search.remeasure` (which measures) so that
:func:`pipeline.search.records.build_records` can apply a stored report without importing the
measurement, which itself reads the records: one direction of imports, no circle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from pipeline.pareto import dominates

if TYPE_CHECKING:
    from pipeline.objectives import ObjectiveInfo
    from pipeline.search.records import TrialRecord

NOISY_SOURCES = ("latency", "energy", "carbon")  # objective sources a timing window decides (re-measured)


def method_label(rounds: int) -> str:
    return f"re-measured interleaved, {rounds} rounds"


IN_SEARCH_LABEL = "in-search (one timing per trial, during the search)"


class VariantStats(BaseModel):
    """One variant's re-measured numbers (milliseconds per batch; joules per inference)."""

    key: str
    label: str
    latency_ms_p50: float | None = None  # median over every timed run of every round
    latency_ms_q25: float | None = None
    latency_ms_q75: float | None = None
    latency_ms_round_min: float | None = None  # smallest / largest per-round median
    latency_ms_round_max: float | None = None
    round_medians: list[float] = []
    runs: int = 0
    joules_per_inference: float | None = None  # metered: median over rounds; estimated: scaled with latency
    joules_min: float | None = None
    joules_max: float | None = None
    energy: str = ""  # "metered (rapl)" | "estimated, follows latency" | "not measured"
    error: str = ""  # why this variant could not be re-measured (it keeps its in-search numbers)

    @property
    def iqr_ms(self) -> float | None:
        if self.latency_ms_q25 is None or self.latency_ms_q75 is None:
            return None
        return self.latency_ms_q75 - self.latency_ms_q25

    def metrics(self) -> dict[str, float]:
        """MLflow / record metric names: ``*_remeasured`` beside the in-search ``latency_ms_p50``."""
        out = {}
        if self.latency_ms_p50 is not None:
            out.update(latency_ms_p50_remeasured=self.latency_ms_p50, latency_iqr_ms_remeasured=self.iqr_ms or 0.0,
                       latency_ms_q25_remeasured=self.latency_ms_q25, latency_ms_q75_remeasured=self.latency_ms_q75,
                       latency_ms_round_min_remeasured=self.latency_ms_round_min,
                       latency_ms_round_max_remeasured=self.latency_ms_round_max,
                       # relative spread: (max - min of the round medians) / median
                       latency_spread_remeasured=(self.latency_ms_round_max - self.latency_ms_round_min)
                       / self.latency_ms_p50 if self.latency_ms_p50 else 0.0)
        if self.joules_per_inference is not None:
            out["joules_per_inference_remeasured"] = self.joules_per_inference
        return {k: float(v) for k, v in out.items() if v is not None}


PEER_PREFIX = "peer:"  # a peer's key in the interleaving (``RemeasureReport.order``); trial keys are numbers


class PeerResult(BaseModel):
    """The runtime's one-liner (``pipeline.search.peers``): one peer artifact's accuracy and size, measured like a trial's."""

    label: str
    artifact: str = ""
    accuracy: float | None = None  # the task metric through the backend, on the study's eval set
    reference_accuracy: float | None = None
    accuracy_drop: float | None = None  # sign-adjusted like a trial's: > 0 means worse than FP32
    size_bytes: int | None = None
    max_accuracy_drop: float | None = None  # the study's budget
    feasible: bool | None = None  # accuracy_drop <= max_accuracy_drop
    stats: VariantStats | None = None  # its timing in the re-measurement's interleaving
    error: str = ""

    @property
    def key(self) -> str:
        return PEER_PREFIX + self.label


class RemeasureReport(BaseModel):
    """What the re-measurement found: stored on the study (``remeasured`` user attribute)."""

    rounds: int
    runs_per_round: int
    warmup: int
    backend: str = ""
    device: str = ""
    threads: int = 0
    batch_size: int = 0
    energy_source: str = ""  # the study's: rapl | nvml | estimated | none
    energy_note: str = ""
    order: list[str] = []  # variant keys in the order their timing windows ran (the interleaving, recorded)
    variants: dict[str, VariantStats] = {}
    # The runtime's one-liner(s) (Backend.peer_artifacts), scored on the eval set and timed in the same
    # interleaving (PeerResult.stats; ``variants`` holds trials only); never on the front: the yardstick.
    peers: list[PeerResult] = []
    through_trial: int = -1  # the highest trial number the study held: later trials void this report
    seconds: float = 0.0
    lock_wait_s: float = 0.0
    error: str = ""  # the whole re-measurement failed (the in-search numbers stand)

    @property
    def label(self) -> str:
        return method_label(self.rounds)


def apply_remeasured(records: list["TrialRecord"], infos: Sequence["ObjectiveInfo"], data: dict[str, Any]) -> bool:
    """Put the re-measured latency/energy in the records' objective values and decide the front on them.

    The in-search values move to ``values_in_search`` (and ``on_front_in_search``); the
    re-measured statistics join ``metrics`` as ``*_remeasured``. The final front is the set of
    feasible re-measured trials that no other re-measured trial dominates. Returns False (and
    changes nothing) when the report failed or is older than the study's latest trial.
    """
    try:
        report = RemeasureReport.model_validate(data)
    except Exception:  # noqa: BLE001 - a report from another version: the in-search front stands
        return False
    if report.error or any(r.number > report.through_trial for r in records):
        return False
    label = report.label
    pool = []
    for r in records:
        r.on_front_in_search = r.on_front
        v = report.variants.get(str(r.number))
        if v is None or not r.complete or r.duplicate_of is not None:
            continue
        if v.latency_ms_p50 is not None:
            ratio = v.latency_ms_p50 / r.metrics["latency_ms_p50"] if r.metrics.get("latency_ms_p50") else None
            r.values_in_search = dict(r.values)
            for o in infos:
                if o.name not in r.values:
                    continue
                if o.source == "latency":
                    r.values[o.name] = v.latency_ms_p50
                elif o.source in ("energy", "carbon") and v.joules_per_inference is not None \
                        and r.metrics.get("joules_per_inference"):
                    r.values[o.name] *= v.joules_per_inference / r.metrics["joules_per_inference"]
                elif o.source in ("energy", "carbon") and report.energy_source == "estimated" and ratio:
                    r.values[o.name] *= ratio  # the estimate is CPU time x watts: it follows latency
            r.metrics.update(v.metrics())
            r.remeasured = label
        if r.feasible is not False:
            pool.append(r)
    dirs = [o.direction for o in infos]
    pts = {r.number: [r.values[o.name] for o in infos] for r in pool}
    for r in records:
        r.on_front = r.number in pts and not any(dominates(q, pts[r.number], dirs)
                                                 for m, q in pts.items() if m != r.number)
    return True
