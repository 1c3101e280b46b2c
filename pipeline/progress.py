"""Live view of a running search: trials done / running / failed, front size, hypervolume.

Mode ``auto``: on a terminal a ``rich.live.Live`` panel that redraws in place;
when the output is not a terminal (CI logs, ``| tee``) one line per finished
trial instead, so logs stay readable. ``lines`` forces the latter, ``off``
prints nothing.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text


@dataclass
class ProgressState:
    study: str
    target: int
    complete: int = 0
    failed: int = 0
    running: int = 0
    parallel: int = 1
    front_size: int = 0
    hypervolume: float | None = None
    objective_note: str = ""
    where: str = ""  # Ray cluster / resources line
    recent: deque = field(default_factory=lambda: deque(maxlen=6))  # (trial, state, text)

    @property
    def done(self) -> int:
        return self.complete + self.failed


class SearchProgress:
    def __init__(self, mode: str = "auto", console: Console | None = None):
        if mode not in ("auto", "lines", "off"):
            raise ValueError(f"progress mode must be auto, lines or off, got {mode!r}")
        self.enabled = mode != "off"
        self.console = console or Console()
        self.live_mode = mode == "auto" and self.console.is_terminal
        self._live: Live | None = None
        self._t0 = time.monotonic()
        self._state: ProgressState | None = None

    def __enter__(self) -> "SearchProgress":
        self._t0 = time.monotonic()
        if self.live_mode:
            self._live = Live(Text("starting..."), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            if self._state is not None:
                self._live.update(self._render(self._state))
            self._live.__exit__(*exc)
            self._live = None

    def update(self, state: ProgressState) -> None:
        self._state = state
        if self._live is not None:
            self._live.update(self._render(state))

    def trial_finished(self, number: int, state: str, text: str, counts=None) -> None:
        """Called once per finished trial; in log mode this prints the line.

        ``counts`` (a :class:`pipeline.search.storage.StudyCounts`) are the storage's counts after
        this trial was told: the counter never runs past its target or backwards on resume, and a
        duplicate proposal (not measured, not counted) leaves it where it was.
        """
        s = self._state
        if s is not None:
            s.recent.append((number, state, text))
            if counts is not None:
                s.complete, s.failed = counts.complete, counts.failed
        if self.enabled and not self.live_mode:
            count = f"[{s.done}/{s.target}] " if s else ""
            style = "green" if state == "COMPLETE" else "red"
            self.console.print(f"{count}trial {number} [{style}]{state}[/{style}] {escape(text)}", highlight=False,
                               soft_wrap=True)

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, soft_wrap=True)  # callers escape dynamic parts

    def _render(self, s: ProgressState):
        elapsed = time.monotonic() - self._t0
        head = Table.grid(padding=(0, 2))
        head.add_column(style="bold")
        head.add_column()
        remaining = max(s.target - s.done - s.running, 0)
        head.add_row("study", escape(s.study))
        head.add_row("trials", f"[green]{s.complete} done[/green]  [yellow]{s.running} running[/yellow]  "
                               f"[red]{s.failed} failed[/red]  {remaining} to go  (target {s.target}, "
                               f"{s.parallel} in flight max)")
        hv = "-" if s.hypervolume is None else f"{s.hypervolume:.4f}"
        head.add_row("front", f"{s.front_size} trial(s) on the Pareto front, hypervolume {hv}")
        if s.objective_note:
            head.add_row("objectives", escape(s.objective_note))
        if s.where:
            head.add_row("ray", s.where)
        head.add_row("elapsed", f"{elapsed:,.0f} s")
        recent = Table(title="latest trials", title_justify="left", show_edge=False, expand=False)
        recent.add_column("#", justify="right")
        recent.add_column("state")
        recent.add_column("result", overflow="ellipsis", no_wrap=True, max_width=110)
        for number, state, text in list(s.recent)[::-1]:
            colour = "green" if state == "COMPLETE" else "red"
            recent.add_row(str(number), f"[{colour}]{state}[/{colour}]", escape(text))
        return Group(head, recent)
