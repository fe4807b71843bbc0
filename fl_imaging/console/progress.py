"""Progress lines in processes that start without logging set up.

Flower's ClientApp processes at the sites (deployment) run our code with no handler on the root
logger, so our INFO progress lines would vanish; Flower writes what such a process writes to
stderr to the SuperNode's log. (A simulation's Ray workers send their lines to the coordinator
instead, :mod:`.site_lines`; a deployed ServerApp streams its records, :mod:`.record_lines`.)
"""

from __future__ import annotations

import logging

__all__ = ["show_progress"]


def show_progress(logger: logging.Logger) -> None:
    """Send ``logger``'s INFO lines to stderr as ``name: message``, unless this process (its root
    logger) or ``logger`` already has a handler."""
    if logging.getLogger().handlers or logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
