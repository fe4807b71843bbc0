"""The live view of a run on a terminal, drawn with rich from a :class:`~.run_view.RunView`.

Three parts, redrawn four times a second below the lines the run prints: the rounds as a bar
with the time elapsed and the time left (rich's estimate from the rounds' pace), the sites'
states (at most :data:`MAX_SITE_ROWS` rows, the busy and failed ones first, and a count per
state), and the last round's progress line.
"""

from __future__ import annotations

import threading

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from fl_imaging.console.events import Progress as ProgressEvent
from fl_imaging.console.run_view import (
    DONE,
    EVALUATING,
    FAILED,
    NOT_ASKED,
    TRAINING,
    WAITING,
    RunView,
)

__all__ = ["MAX_SITE_ROWS", "LiveView", "render_sites"]

#: The most sites listed one per row; the others are counted.
MAX_SITE_ROWS = 12

#: Which sites are listed first, and how each state looks.
_ORDER = [FAILED, TRAINING, EVALUATING, WAITING, DONE, NOT_ASKED]
_STYLE = {
    FAILED: "red",
    TRAINING: "cyan",
    EVALUATING: "cyan",
    DONE: "green",
    WAITING: "",
    NOT_ASKED: "dim",
}


def render_sites(view: RunView, max_rows: int = MAX_SITE_ROWS) -> RenderableType:
    """The sites of ``view``: a count per state, then at most ``max_rows`` sites with their
    state, failed and busy ones first."""
    counts = view.counts()
    summary = ", ".join(f"{counts[s]} {s}" for s in _ORDER if counts[s])
    table = Table.grid(padding=(0, 2))
    table.add_column(no_wrap=True)
    table.add_column(overflow="ellipsis", no_wrap=True)
    ranked = sorted(view.sites.items(), key=lambda item: _ORDER.index(item[1].state))
    for name, site in ranked[:max_rows]:
        table.add_row(Text(name), Text(site.describe(), style=_STYLE[site.state]))
    hidden = len(ranked) - max_rows
    parts: list[RenderableType] = [Text(f"sites: {summary or 'none heard of yet'}")]
    if view.sites:
        parts.append(table)
    if hidden > 0:
        parts.append(Text(f"... and {hidden} more", style="dim"))
    return Group(*parts)


class LiveView:
    """The live view on ``console`` (a terminal): :meth:`start`, :meth:`update` with each
    event, :meth:`stop` (the last drawing stays on the screen). Safe to use from several
    threads."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.view = RunView()
        self._lock = threading.RLock()
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rounds"),
            TimeElapsedColumn(),
            TextColumn("time left"),
            TimeRemainingColumn(),
            console=console,
            auto_refresh=False,
        )
        self._task = self._bar.add_task("starting", total=None)
        self._live = Live(console=console, get_renderable=self._render, refresh_per_second=4)
        self.running = False

    def start(self) -> None:
        """Start drawing (nothing happens when already started)."""
        with self._lock:
            if not self.running:
                self._live.start()
                self.running = True

    def stop(self) -> None:
        """Draw a last time and stop; the terminal's cursor comes back."""
        with self._lock:
            running, self.running = self.running, False
        if running:  # not under the lock: the drawing thread may be waiting for it
            self._live.stop()

    def update(self, event: ProgressEvent) -> None:
        """Take ``event`` into the view (drawn at the next refresh)."""
        with self._lock:
            self.view.apply(event)

    def _render(self) -> RenderableType:
        with self._lock:
            self._update_bar()
            parts: list[RenderableType] = [self._bar.get_renderable(), render_sites(self.view)]
            if self.view.last_line:
                line = f"last round: {self.view.last_line}"
                parts.append(Text(line, no_wrap=True, overflow="ellipsis"))
            return Group(*parts)

    def _update_bar(self) -> None:
        """The bar as the view stands: its label, rounds done (the current one in part)."""
        view = self.view
        label = "starting"
        if view.current_round:
            label = f"round {min(view.current_round, view.rounds)}/{view.rounds}"
        if view.finished:
            label = "stopped" if view.stopped else "finished"
        elif view.phase:
            label = f"{label} {view.phase}"
        self._bar.update(
            self._task, total=view.rounds or None, completed=view.completed(), description=label
        )
        if view.finished:
            self._bar.stop_task(self._task)  # no time left to tell
