"""Progress lines in processes that start without logging set up.

Ray's workers (simulation) and Flower's ServerApp and ClientApp processes (deployment) run our
code with no handler on the root logger, so our INFO progress lines would vanish; Flower streams
what such a process writes to stderr to ``flwr run --stream`` and to the SuperNode's log.
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
