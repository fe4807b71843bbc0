"""Child processes that get Ctrl-C as a terminal's foreground job does."""

from __future__ import annotations

import signal

__all__ = ["sigint_as_in_a_terminal"]


def sigint_as_in_a_terminal() -> None:
    """``preexec_fn`` for a run a test stops with SIGINT: SIGINT back to its default action.

    A process started with SIGINT ignored keeps ignoring it (Python installs no handler then,
    and ``fl-imaging`` follows it), and pytest run as a background job of a non-interactive
    shell (``cmd &`` in a script) starts so: its children would inherit that, and the test's
    Ctrl-C would not reach them.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
