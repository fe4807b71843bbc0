"""What ``fl-imaging`` shows on its terminal while it runs, and in what form.

One console for every source of lines: the run's own (``fl_imaging.*``), the sites' (from Ray's
workers, :mod:`.site_lines`, or a deployed ServerApp's stream), Flower's and Ray's. What it
shows:

- on a terminal (stdout and stderr both, ``NO_COLOR`` unset, ``TERM`` not ``dumb``): the run's
  lines, and below them the live view of :mod:`.live_view` while the rounds run;
- otherwise plain lines, with no colour or other escape code;
- the run's own lines at INFO and above (warnings as ``warning: ...``, errors as
  ``error: ...``, on stderr when plain); a site's lines only from WARNING (every one is in
  ``main.log``); Flower's, Ray's and other libraries' only from ERROR, or from INFO with
  ``engine.verbose=true``. Each round's progress line is in the live view, or a line when plain.

Flower's and Ray's own handlers in this process (coloured, to stderr) are set aside while the
console is attached, so that their records reach the run's handlers (``main.log``) instead.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from rich.console import Console
from rich.text import Text

from fl_imaging.console.events import (
    EPOCH,
    PROGRESS_LOGGER,
    ROUND_ENDED,
    RUN_FINISHED,
    RUN_STARTED,
    Progress,
    progress_of,
)
from fl_imaging.console.live_view import LiveView

__all__ = [
    "OriginTag",
    "RunConsole",
    "live_output",
    "run_console",
    "shows_line",
]

#: The loggers whose lines are the run's own.
OWN = "fl_imaging"

_LEVEL_WORD = {logging.WARNING: "warning", logging.ERROR: "error", logging.CRITICAL: "error"}
_LEVEL_STYLE = {logging.WARNING: "yellow", logging.ERROR: "red", logging.CRITICAL: "red"}


def live_output(
    stdout: object = None, stderr: object = None, environ: Mapping[str, str] | None = None
) -> bool:
    """Whether the live view may be drawn: ``stdout`` and ``stderr`` (default: this process's)
    are terminals, ``NO_COLOR`` is unset or empty and ``TERM`` is not ``dumb``."""
    environ = os.environ if environ is None else environ
    streams = (stdout or sys.stdout, stderr or sys.stderr)
    ttys = all(callable(getattr(s, "isatty", None)) and s.isatty() for s in streams)  # type: ignore[attr-defined]
    return ttys and not environ.get("NO_COLOR") and environ.get("TERM", "") != "dumb"


def shows_line(record: logging.LogRecord, *, live: bool, verbose: bool = False) -> bool:
    """Whether the console shows ``record`` as a line (rules in the module docstring)."""
    event = progress_of(record)
    if record.name == PROGRESS_LOGGER or (event is not None and event.kind == EPOCH):
        return False
    if event is not None and event.kind == ROUND_ENDED and live:
        return False  # the live view shows it
    own = record.name == OWN or record.name.startswith(OWN + ".")
    if getattr(record, "site_worker", False):
        return (own and record.levelno >= logging.WARNING) or record.levelno >= logging.ERROR
    if own:
        return record.levelno >= logging.INFO
    return record.levelno >= (logging.INFO if verbose else logging.ERROR)


def line_of(record: logging.LogRecord) -> str:
    """The text of ``record`` on the console: its message (any traceback below it), after
    ``warning: `` or ``error: ``."""
    message = record.getMessage()
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        message = f"{message}\n{record.exc_text}"
    word = _LEVEL_WORD.get(record.levelno)
    return f"{word}: {message}" if word else message


class RunConsole(logging.Handler):
    """The console's handler: lines as :func:`shows_line` says, and with ``live`` the live
    view, started by the run's :data:`~.events.RUN_STARTED` event and stopped by its
    :data:`~.events.RUN_FINISHED` (or :meth:`stop_view`)."""

    def __init__(self, *, live: bool, verbose: bool = False) -> None:
        super().__init__(logging.INFO)
        self.live = live
        self.verbose = verbose
        self.console = Console(highlight=False, markup=False, emoji=False) if live else None
        self.view: LiveView | None = None

    def emit(self, record: logging.LogRecord) -> None:
        """Show ``record`` (as a line, or in the live view)."""
        try:
            event = progress_of(record)
            if event is not None and self.console is not None:
                self._update_view(event)
            if shows_line(record, live=self.live, verbose=self.verbose):
                self._print(record)
        except Exception:  # noqa: BLE001  (logging's convention: report, never raise)
            self.handleError(record)

    def _update_view(self, event: Progress) -> None:
        assert self.console is not None
        if event.kind == RUN_STARTED:
            self.stop_view()
            self.view = LiveView(self.console)
        if self.view is not None:
            self.view.update(event)
            if event.kind == RUN_STARTED:
                self.view.start()
            elif event.kind == RUN_FINISHED:
                self.stop_view()

    def _print(self, record: logging.LogRecord) -> None:
        text = line_of(record)
        if self.console is not None:
            style = _LEVEL_STYLE.get(record.levelno, "")
            self.console.print(Text(text, style=style), soft_wrap=True)
            return
        stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
        stream.write(text + "\n")
        stream.flush()

    def stop_view(self) -> None:
        """Stop the live view, its last drawing left on the screen (nothing without one)."""
        if self.view is not None:
            self.view.stop()

    def close(self) -> None:
        """Stop the live view and close the handler."""
        self.stop_view()
        super().close()


class OriginTag(logging.Filter):
    """For ``main.log``'s format: ``origin_tag`` is ``[pid N on HOST]`` for a record that came
    from another process (a site's Ray worker, a deployed ServerApp), else empty. Blank lines
    (Flower logs a few) are left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Set ``origin_tag``; False for a record whose message is blank."""
        origin = getattr(record, "origin", "")
        record.origin_tag = f"[{origin}]" if origin else ""
        return bool(record.getMessage().strip())


@contextmanager
def run_console(verbose: bool = False) -> Iterator[RunConsole]:
    """While inside, this process's log records are shown by a :class:`RunConsole` (live on a
    terminal, :func:`live_output`), Flower's and Ray's own terminal handlers set aside
    (their records go to the root logger's handlers: ``main.log``) and Flower's logger at
    INFO. On leaving, the live view stops and everything is as before."""
    console = RunConsole(live=live_output(), verbose=verbose)
    root = logging.getLogger()
    progress = logging.getLogger(PROGRESS_LOGGER)
    progress.propagate, progress_level = False, progress.level
    progress.setLevel(logging.INFO)
    flwr, ray = logging.getLogger("flwr"), logging.getLogger("ray")
    saved = {
        "flwr": (flwr.handlers[:], flwr.propagate, flwr.level),
        "ray": (ray.handlers[:], ray.propagate, ray.level),
    }
    for logger in (flwr, ray):
        for handler in logger.handlers[:]:
            if _writes_to_terminal(handler):
                logger.removeHandler(handler)
        logger.propagate = True
    flwr.setLevel(logging.INFO)
    root.addHandler(console)
    progress.addHandler(console)
    try:
        yield console
    finally:
        console.stop_view()
        root.removeHandler(console)
        progress.removeHandler(console)
        progress.setLevel(progress_level)
        for logger, (handlers, propagate, level) in zip((flwr, ray), saved.values(), strict=True):
            logger.handlers[:] = handlers
            logger.propagate = propagate
            logger.setLevel(level)
        console.close()


def _writes_to_terminal(handler: logging.Handler) -> bool:
    """Whether ``handler`` writes to stdout or stderr (Flower's and Ray's console handlers)."""
    stream = getattr(handler, "stream", None)
    return isinstance(handler, logging.StreamHandler) and stream in (
        sys.stdout,
        sys.stderr,
        sys.__stdout__,
        sys.__stderr__,
    )
