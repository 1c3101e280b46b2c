"""What MLflow could not take while it was unreachable, kept on disk until it can.

Logging to a tracking server is synchronous; a server that is down would stall
every trial for the client's retries. Instead, the first call that finds it
unreachable opens the circuit: later tracking calls are not attempted, each is
appended to a JSONL spool under the study folder (``mlflow-spool.jsonl``), and
the driver probes the server every few seconds. When it answers, the spool is
*backfilled*: since Optuna's storage holds every trial, the backfill is the
reconciliation of :class:`pipeline.search.storage.Resume` (each finished trial
matched to its run by id or tags, missing ones logged once), after which the
spool is cleared. A driver that ends while the server is still down leaves the
spool behind; the next run of the same study reconciles and clears it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

SPOOL_FILE = "mlflow-spool.jsonl"


class Spool:
    """The tracking events not yet in MLflow, and whether MLflow is believed to be down."""

    def __init__(self, folder: Path, probe_every_s: float = 5.0):
        self.path = folder / SPOOL_FILE
        self.probe_every_s = probe_every_s
        self.down = False
        self.outages = 0  # times MLflow went away during this session
        self._last_probe = 0.0

    def open_circuit(self) -> None:
        if not self.down:
            self.outages += 1
        self.down = True
        self._last_probe = time.monotonic()

    def add(self, event: str, error: str = "") -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"time": time.time(), "event": event, "error": error[:300]}) + "\n")

    def pending(self) -> int:
        """Spooled events waiting for a backfill (0 when there is no spool)."""
        if not self.path.exists():
            return 0
        with open(self.path) as fh:
            return sum(1 for line in fh if line.strip())

    def probe_due(self) -> bool:
        if not self.down or time.monotonic() - self._last_probe < self.probe_every_s:
            return False
        self._last_probe = time.monotonic()
        return True

    def clear(self) -> None:
        self.down = False
        self.path.unlink(missing_ok=True)
