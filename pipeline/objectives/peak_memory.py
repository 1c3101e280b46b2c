"""peak_memory: the worked example of adding an objective (one module, nothing else to edit).

What it measures, honestly: the growth of this process's peak resident set size
(Linux ``VmHWM``) while the artifact is opened and run, in bytes. The high-water
mark is reset at the start of the window (``/proc/self/clear_refs`` = 5), so an
earlier, larger peak (quantization, another trial in the same worker) does not
hide it. Memory the allocator already held from earlier work and reuses is not
counted, so it is a lower bound on the artifact's working memory in this runtime.

The measurement code records it with :func:`peak_rss_probe` around the window (see
the hook in ``pipeline/evaluation/evaluator.py``); the value travels in ``Measurement.probes``
under :data:`PROBE_KEY`. Where the probe cannot run (not Linux), the key is absent
and a study with this objective fails the trial with "did not measure".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.objectives.base import Objective, register

PROBE_KEY = "peak_rss_delta_bytes"
LABEL = "process peak RSS growth while running the artifact (bytes)"

PEAK_MEMORY = register(Objective(
    name="peak_memory", direction="minimize", unit="bytes", label=LABEL, metric=PROBE_KEY,
    read=lambda r: (getattr(r.measurement, "probes", None) or {}).get(PROBE_KEY), fmt=",.0f", long_unit=" bytes",
))


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
        return True
    except OSError:
        return False


@contextmanager
def peak_rss_probe() -> Iterator[dict[str, float]]:
    """``with peak_rss_probe() as probes: ...``; afterwards ``probes`` holds :data:`PROBE_KEY` (bytes).

    Left empty where ``/proc`` cannot be read or the high-water mark cannot be reset:
    a lifetime peak would be a different, misleading number.
    """
    probes: dict[str, float] = {}
    start = _status_kib("VmRSS") if _reset_high_water_mark() else None
    try:
        yield probes
    finally:
        peak = _status_kib("VmHWM")
        if start is not None and peak is not None:
            probes[PROBE_KEY] = float(max(0, peak - start) * 1024)
