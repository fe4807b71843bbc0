"""Stopping a run on the user's word: one Ctrl-C (or SIGTERM, SIGHUP) ends it within seconds,
cleanly, and the run's summary names the signal.

Flower's in-process simulation has no way to stop: on Ctrl-C its simulation loop unwinds in the
main thread, but the ServerApp's thread goes on waiting for replies that will never come, and the
process hangs until a second Ctrl-C (seen with Flower 1.41). So, while a run is on, ours is the
signal handler (:func:`stop_on_signal`): the first SIGINT, SIGTERM or SIGHUP sets the run's
``stop`` event, which the ServerApp's Grid checks
(:class:`~fl_imaging.flower.coordinator.polling.QuickPollGrid`), and raises
``KeyboardInterrupt`` in the main thread, so that Flower's loop stops Ray's actors at once; the
ServerApp then writes what the finished rounds produced and the engine raises
:class:`RunInterrupted`. A second signal stops everything at once (``force``, exit 130).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import NoReturn

from fl_imaging.common.process_exit import end_process

__all__ = [
    "INTERRUPTED_EXIT_CODE",
    "STOP_SIGNALS",
    "RunInterrupted",
    "exit_stopped_run",
    "signal_label",
    "stop_on_signal",
]

log = logging.getLogger("fl_imaging.engine")

#: The signals that stop a run cleanly: Ctrl-C, ``kill``/systemd/a scheduler, a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: Exit code of a run stopped by the user (128 + SIGINT), as shells report Ctrl-C.
INTERRUPTED_EXIT_CODE = 130


class RunInterrupted(Exception):
    """The user stopped the run; ``run_dir`` holds what its finished rounds produced and
    ``reason`` says after which round it stopped and how to go on."""

    def __init__(self, run_dir: Path, reason: str) -> None:
        super().__init__(reason)
        self.run_dir = run_dir
        self.reason = reason


def signal_label(signum: int) -> str:
    """How a person knows the signal ``signum`` (a number): ``Ctrl-C`` for SIGINT, else its
    name (``SIGTERM``, ``SIGHUP``)."""
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


@contextmanager
def stop_on_signal(
    stop: threading.Event,
    force: Callable[[], None],
    interrupt_main: bool = True,
    on_signal: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """While inside, SIGINT, SIGTERM and SIGHUP (:data:`STOP_SIGNALS`) stop the run: the first
    calls ``on_signal`` with the signal as a person knows it (:func:`signal_label`: the run
    notes which one stopped it), sets ``stop`` and, with ``interrupt_main``, raises
    ``KeyboardInterrupt`` in the main thread; a second calls ``force`` (stop what was started)
    and ends the process with exit code 130. The previous handlers are restored on leaving.
    Must be entered in the main thread (Python's rule for signal handlers). A signal ignored
    when entering (the process was started so: ``nohup``, a background job) stays ignored.

    Without ``interrupt_main`` the ServerApp stops at its next look at its Grid and the run ends
    once the sites' messages in flight are answered: on an existing Ray cluster, Flower's
    reaction to ``KeyboardInterrupt`` (``ray.shutdown()`` while its threads still wait on
    actors) makes Ray's core worker end the process before the results are written."""

    def handle(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            log.error("second %s: stopping at once", signal_label(signum))
            force()
            os._exit(INTERRUPTED_EXIT_CODE)
        if on_signal is not None:
            on_signal(signal_label(signum))
        stop.set()
        log.warning(
            "%s: stopping; the finished rounds' results are being written%s (again to quit at "
            "once)",
            signal_label(signum),
            "" if interrupt_main else " once the sites' messages in flight are answered",
        )
        if interrupt_main:
            raise KeyboardInterrupt

    # A process started with SIGINT ignored (a background job of a non-interactive shell) keeps
    # ignoring it, as Python's own default handler does: the terminal's Ctrl-C is meant for the
    # job in the foreground; one started with SIGHUP ignored (`nohup`) outlives its terminal.
    signals = [sig for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN]
    previous = {sig: signal.signal(sig, handle) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_stopped_run(code: int = INTERRUPTED_EXIT_CODE) -> NoReturn:
    """End the process of a stopped run with exit ``code``, as a finished run ends
    (:func:`~fl_imaging.common.process_exit.end_process`: every result file is already written
    whole).
    Python's own exit would also wait for Flower's worker threads, which can wait for ever on
    Ray actors stopped with the run (seen with 1,000 sites stopped in round 1)."""
    end_process(code)
