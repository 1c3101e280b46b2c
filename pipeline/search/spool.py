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
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

SPOOL_FILE = "mlflow-spool.jsonl"

_UNREACHABLE = ("Max retries exceeded", "Connection refused", "Failed to establish a new connection",
                "Connection aborted", "Read timed out", "RemoteDisconnected", "Name or service not known",
                "Temporary failure in name resolution", "503 Server Error", "502 Server Error")


def is_unreachable(exc: BaseException) -> bool:
    """True when ``exc`` says the tracking server could not be reached (not that it refused the request)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in (
                "ConnectionError", "MaxRetryError", "NewConnectionError", "ConnectTimeout", "ReadTimeout"):
            return True
        if any(m in str(exc) for m in _UNREACHABLE):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


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


class Tracking:
    """Mixed into :class:`pipeline.search.runner.StudyRunner`: every recorder call goes through
    :meth:`_track`, which spools instead of stalling while MLflow is unreachable."""

    def _track(self, fn, *args, **kwargs):
        """Recorder writes never stop the study; failures are reported and reconciled on the next run.

        An unreachable tracking server opens the spool's circuit (:mod:`pipeline.search.spool`): calls
        are spooled, not attempted, until :meth:`_probe_tracking` finds it back and backfills.
        """
        name = getattr(fn, "__name__", "call")
        if self.spool.down:
            self.spool.add(name)
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            if is_unreachable(exc):
                self.spool.open_circuit()
                self.spool.add(name, str(exc))
                if hasattr(self, "progress"):
                    self.progress.message(
                        f"MLflow {getattr(self.tracker, 'uri', '')} is unreachable: trials go on; tracking is "
                        f"spooled to {self.spool.path} and backfilled when it answers again")
                return None
            msg = f"MLflow {name} failed: {type(exc).__name__}: {exc}"
            log.warning(msg)
            self.tracking_errors.append(msg)
            return None

    def _probe_tracking(self) -> None:
        """While MLflow is down: every few seconds, see whether it is back; if so, backfill from Optuna."""
        if not self.spool.probe_due():
            return
        try:
            self.tracker.ping()
        except Exception:  # noqa: BLE001 - still down
            return
        self.spool.down = False
        pending = self.spool.pending()
        if self._reconcile_all():
            self._track(self.tracker.log_resources, self.parallel, self._res.cpus, self._res.gpus, self._res.where,
                        self.pinned_meter)
            self._refresh_front(force_plots=True)
            if not self.spool.down:
                self.spool.clear()
                self.progress.message(f"MLflow is back: {pending} spooled event(s) backfilled from the Optuna study")

    def _late_run(self, fl) -> str | None:
        """The run of a trial dispatched while MLflow was down, found by its tags or created now (before the
        trial is told, so its own ``mlflow_run_id`` attribute holds it); None while MLflow is still down."""
        from pipeline.search.observers import NullRecorder
        from pipeline.search.storage import T_RETRY_OF, T_RUN_ID

        if self.spool.down or isinstance(self.tracker, NullRecorder):
            return None
        runs = self._track(self.tracker.trial_run_states)
        if runs is None:
            return None
        n = fl.trial.number
        found = runs.get(n)
        run_id = found[0][0] if found else self._start_run(n, dict(fl.trial.params), fl.label,
                                                             fl.trial.user_attrs.get(T_RETRY_OF))
        if run_id:
            fl.trial.set_user_attr(T_RUN_ID, run_id)
            self.run_ids[n] = run_id
        return run_id
