"""How fast each format runs here, from the uniform baselines the search measured first.

The sensitivity table knows what each layer costs in accuracy; it cannot know what each format costs
in time on this backend (on ORT CPU, dynamic INT8 halves an encoder's latency while INT4
``MatMulNBits`` runs at about FP32 speed; on a GPU with TensorRT the order differs again). The
uniform baselines answer it by measurement: ``uniform-<fmt>`` latency / ``uniform-fp32`` latency is
the format's **speed ratio** here. A plan's latency is then predicted as

    latency(plan) / latency(FP32) = sum over layers of  latency_share(layer) x ratio(format of layer)

with each layer's latency share from the table (its share of multiply-accumulates: an estimate,
labelled so). The model is linear, so the solver can bound it exactly, and it is only a guide for
which plans to measure first: every seed it picks is measured on the artifact like any trial.
The baselines' artifacts are timed once more, interleaved, before the ratios are taken
(:func:`pipeline.search.remeasure.retime_baselines`): their in-search timings ran at different
moments of a shared machine. Why not time each layer x format? That is a second table of single-layer timings, each too small
to resolve on a shared CPU (a single timing can be off by 10x here); whole-model ratios are the
numbers the search measures anyway.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.formats import Format, Int8Activations


@dataclass(frozen=True)
class BaselineTiming:
    """One finished uniform baseline: its label (``uniform-int8-dynamic``), format and INT8 mode, its p50
    latency (ms), and whether it missed the accuracy budget."""

    label: str
    format: Format
    latency_ms: float
    over_budget: bool = False
    int8_activations: Int8Activations | None = None

    @classmethod
    def from_label(cls, label: str, latency_ms: float, over_budget: bool, int8_modes) -> BaselineTiming | None:
        """From a baseline's label (``uniform-<fmt>``, ``uniform-int8-<mode>``; plain ``uniform-int8`` is the
        first of ``search.int8_activations``); None for a label that names no format."""
        fmt, _, mode = label.removeprefix("uniform-").partition("-")
        if fmt not in Format._value2member_map_:
            return None
        act = Int8Activations(mode or int8_modes[0]) if fmt == Format.INT8.value else None
        return cls(label, Format(fmt), latency_ms, over_budget, act)


@dataclass(frozen=True)
class FormatSpeed:
    """Measured latency of each uniform format relative to uniform FP32, on the backend the search runs."""

    ratios: dict[Format, float]
    int8_activations: Int8Activations | None = None  # the INT8 mode the ratio (and the seeds) use
    source: str = ""  # how the latencies were taken, e.g. "baselines re-timed interleaved, 7 rounds"

    def ratio(self, fmt: Format) -> float | None:
        return 1.0 if fmt is Format.FP32 else self.ratios.get(Format(fmt))

    def describe(self) -> str:
        parts = ", ".join(f"{f.value} {r:.2f}x" for f, r in self.ratios.items())
        mode = f" (int8 {self.int8_activations.value})" if self.int8_activations else ""
        source = f"; {self.source}" if self.source else ""
        return f"uniform latency / FP32 here: {parts}{mode}{source}"


def fastest_int8_mode(timings: Iterable[BaselineTiming]) -> Int8Activations | None:
    """The INT8 activation mode of the fastest uniform INT8 baseline, those within the accuracy budget first
    (None when no INT8 baseline was timed)."""
    int8 = [t for t in timings if t.format is Format.INT8 and t.int8_activations is not None]
    if not int8:
        return None
    return min(int8, key=lambda t: (t.over_budget, t.latency_ms)).int8_activations


def format_speed(timings: Iterable[BaselineTiming], source: str = "") -> FormatSpeed | None:
    """Speed ratios from the finished uniform baselines; None without a timed FP32 baseline (nothing to
    divide by). INT8 takes the mode :func:`fastest_int8_mode` picks; a format whose baseline failed has
    no ratio (the speed-aware solves leave it out: it cannot be judged)."""
    timings = [t for t in timings if t.latency_ms and t.latency_ms > 0]
    fp32 = next((t for t in timings if t.format is Format.FP32), None)
    if fp32 is None:
        return None
    mode = fastest_int8_mode(timings)
    ratios: dict[Format, float] = {}
    for t in timings:
        if t.format is Format.FP32 or (t.format is Format.INT8 and mode is not None and t.int8_activations != mode):
            continue
        ratios[t.format] = t.latency_ms / fp32.latency_ms
    return FormatSpeed(ratios=ratios, int8_activations=mode, source=source)
