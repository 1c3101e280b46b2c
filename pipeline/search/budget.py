"""The time budget of a search (``--time-budget 20m``): written like people write durations.

The runner stops proposing once the budget is spent, counted from its first proposal (the
one-off setup before it, Ray start and the reference export, is not counted, but a sensitivity
table that ``search.sensitivity.seed: auto`` measured under the budget is); trials in flight
then finish and the study ends with the front of everything it measured.
"""

from __future__ import annotations

import re
import time

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """"20m", "90s", "1h", "1h30m", "1.5h" or plain seconds ("600") -> seconds (> 0)."""
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        seconds = float(s)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd])", s)
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smhd])", "", s).strip():
            raise ValueError(f"{text!r} is not a duration: use e.g. 20m, 90s, 1h or 1h30m")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"{text!r}: the time budget must be more than zero")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 60 == 0:
        h, m = divmod(int(seconds) // 60, 60)
        return f"{h}h{m:02d}m" if m else f"{h}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds) // 60}m"
    return f"{seconds:g}s"


class TimeBudget:
    """The runner's ``--time-budget`` check and its other reasons to stop proposing (a mixin of
    :class:`pipeline.search.runner.StudyRunner`)."""

    def _stop_early(self, why: str, prefix: str = "stopped asking for new trials: ") -> None:
        """Stop proposing, saying why once: progress, MLflow, the summary."""
        self.stopped_early = prefix + why
        self.progress.message(self.stopped_early)
        self._track(self.tracker.log_stopped_early, self.stopped_early)

    def _budget_spent(self) -> bool:
        """True once ``--time-budget`` has run out (and says so once: progress, MLflow, the summary).

        The budget counts the search from its first proposal, plus the sensitivity table when ``seed: auto``
        measured it under this budget (:attr:`Seeding.charged_s`)."""
        budget = self.opts.time_budget_s
        if budget is None or time.monotonic() - self._budget_t0 + self.seeding.charged_s < budget:
            return False
        self._stop_early(f"the time budget of {format_duration(budget)} is spent; {len(self.in_flight)} trial(s) "
                         f"in flight are finished, and the study holds {self._finished()} measured trial(s) of the "
                         f"{self.target} asked for (run the command again to continue it)",
                         prefix="stopped proposing trials: ")
        return True
