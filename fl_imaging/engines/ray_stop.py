"""Stopping Flower's Ray backend in an order that Ray survives, when the user stops a run.

On Ctrl-C, Flower 1.41's simulation loop unwinds and its ``RayBackend.terminate`` calls
``ray.shutdown()`` at once, while Flower's worker threads still wait on the actors of the sites
in training. When one of those threads touches Ray after the shutdown, Ray's core worker ends the
whole process with exit code 1 ("The core worker has already been shutdown"), at times before
the command has said how to go on (seen in a CI run on a 2-core machine: 24 sites stopped in
round 1 ended with exit code 1 instead of 130). Flower offers no hook for this, so this module
is our own: while a stopping run unwinds, the backend's ``terminate`` first stops the busy actors
(``ray.kill``: the results their threads wait for fail at once), waits until no Flower worker
thread is left, and only then lets Flower shut Ray down. A run that ends normally, or a stop on
an existing Ray cluster (which lets the messages in flight finish), finds no busy actor and keeps
Flower's own order.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

__all__ = ["busy_actors_stopped_first"]

log = logging.getLogger("fl_imaging.engine")

#: The longest a stopping run waits for Flower's worker threads to let go of Ray, in seconds.
WORKERS_WAIT_S = 20.0


class _DropWhile(logging.Filter):
    """Drops Flower's records while ``active`` is set: the errors of actors stopped on purpose."""

    def __init__(self, active: threading.Event) -> None:
        super().__init__()
        self.active = active

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.active.is_set()


@contextmanager
def busy_actors_stopped_first(stop: threading.Event) -> Iterator[None]:
    """While inside, Flower's ``RayBackend.terminate`` of a run whose ``stop`` is set first stops
    the actors still training a site, waits (at most :data:`WORKERS_WAIT_S` seconds) until
    Flower's worker threads have ended, then shuts Ray down as Flower does. Flower's own errors
    about the actors stopped on purpose are not logged. Flower's method is restored on leaving."""
    from fl_imaging.flower.internals import RayBackend

    flower_terminate = RayBackend.terminate
    stopping = threading.Event()
    quiet = _DropWhile(stopping)
    flwr_logger = logging.getLogger("flwr")

    def terminate(backend: RayBackend) -> None:
        if stop.is_set() and backend.pool is not None:
            stopping.set()
            try:
                _stop_busy_actors(backend.pool)
            finally:
                stopping.clear()
        flower_terminate(backend)

    RayBackend.terminate = terminate  # type: ignore[method-assign]
    flwr_logger.addFilter(quiet)
    try:
        yield
    finally:
        RayBackend.terminate = flower_terminate  # type: ignore[method-assign]
        flwr_logger.removeFilter(quiet)


def _stop_busy_actors(pool: Any) -> None:
    """Kill the actors of ``pool`` (Flower's ``BasicActorPool``) that run a site's message, then
    wait until no Flower worker thread is left (they end once their message has failed)."""
    import ray

    busy = list(getattr(pool, "_future_to_actor", {}).values())
    for actor in busy:
        with suppress(Exception):  # already gone
            ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + WORKERS_WAIT_S
    while (left := _flower_worker_threads()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if busy:
        log.info("stopped %d site(s) in the middle of their round", len(busy))
    if left:
        log.warning(
            "%d of Flower's worker threads still wait on Ray after %.0f s; stopping Ray anyway",
            left,
            WORKERS_WAIT_S,
        )


def _flower_worker_threads() -> int:
    """How many threads run Flower's simulation worker loop (``vce_api.worker``) now."""
    count = 0
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue
        while frame is not None:
            code = frame.f_code
            if code.co_name == "worker" and code.co_filename.endswith("vce_api.py"):
                count += 1
                break
            frame = frame.f_back
    return count
