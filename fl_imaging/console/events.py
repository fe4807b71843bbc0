"""What the console shows a run's progress from: small events carried by log records.

The coordinator (messages sent to the sites, replies in, a round's end), each site (an epoch
done) and the run itself (started, finished) report their progress as :class:`Progress`
events. An event travels as an attribute of a :mod:`logging` record, so it reaches the console
the way log lines do: within the coordinator's process directly, from Ray's workers through
their line files (:mod:`.site_lines`), from a deployed ServerApp through Flower's log stream
(:mod:`.record_lines`). A record can be a line and an event at once (a site's epoch line, the
progress line of a round); an event with nothing to say to a reader is logged on
:data:`PROGRESS_LOGGER`, which passes it to the console only, not to ``main.log``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = [
    "EPOCH",
    "PROGRESS_LOGGER",
    "REPLY",
    "ROUND_ENDED",
    "RUN_FINISHED",
    "RUN_STARTED",
    "SENT",
    "Progress",
    "emit",
    "progress_extra",
    "progress_of",
]

#: The run starts its rounds (``rounds``, ``round``: the last round done before, ``sites``).
RUN_STARTED = "run_started"
#: A message left for node ``node`` (``phase``: its message type; ``round``: 0 outside rounds).
SENT = "sent"
#: A reply came in from ``node`` (``site`` when it named itself; ``ok``, ``detail``: why not).
REPLY = "reply"
#: A site finished epoch ``epoch`` of ``epochs`` of round ``round``.
EPOCH = "epoch"
#: Round ``round`` of ``rounds`` ended; ``detail`` is its progress line.
ROUND_ENDED = "round_ended"
#: The rounds and evaluations are over (``detail``: why they ended early, '' when they did
#: not); the run writes its files.
RUN_FINISHED = "run_finished"

#: The logger of events that are not lines for a reader; it does not pass them to the root.
PROGRESS_LOGGER = "fl_imaging.progress"

_KINDS = {RUN_STARTED, SENT, REPLY, EPOCH, ROUND_ENDED, RUN_FINISHED}


@dataclass(frozen=True)
class Progress:
    """One progress event; which fields matter depends on ``kind`` (see the constants above).

    Attributes:
        kind: one of :data:`RUN_STARTED`, :data:`SENT`, :data:`REPLY`, :data:`EPOCH`,
            :data:`ROUND_ENDED`, :data:`RUN_FINISHED`.
        round: the round (1-based; 0: none, e.g. the test round's messages).
        rounds: the run's number of rounds.
        site: the site's name ('' when not known yet).
        node: Flower's node id of the site (0 when not known).
        phase: the message type (``train``, ``evaluate``, ``query.*``).
        epoch: epochs done; ``epochs``: epochs of this round.
        ok: whether a reply is a result (False: an error reply).
        detail: a reply's error, a round's progress line, why a run stopped early.
        sites: the sites' names known when the run starts.
    """

    kind: str
    round: int = 0
    rounds: int = 0
    site: str = ""
    node: int = 0
    phase: str = ""
    epoch: int = 0
    epochs: int = 0
    ok: bool = True
    detail: str = ""
    sites: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown progress event {self.kind!r}; one of {sorted(_KINDS)}")

    def to_dict(self) -> dict[str, Any]:
        """The event as JSON-ready values (``sites`` as a list)."""
        data = asdict(self)
        data["sites"] = list(self.sites)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        """The event of :meth:`to_dict`'s ``data`` (unknown keys ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["sites"] = tuple(values.get("sites", ()))
        return cls(**values)


def progress_extra(event: Progress) -> dict[str, Progress]:
    """``extra=`` for a logging call whose record carries ``event``."""
    return {"progress": event}


def progress_of(record: logging.LogRecord) -> Progress | None:
    """The event ``record`` carries, or None."""
    event = getattr(record, "progress", None)
    return event if isinstance(event, Progress) else None


def emit(event: Progress) -> None:
    """Log ``event`` on :data:`PROGRESS_LOGGER` (the console, not ``main.log``)."""
    _progress_logger().info("%s", event.kind, extra=progress_extra(event))


def _progress_logger() -> logging.Logger:
    logger = logging.getLogger(PROGRESS_LOGGER)
    if logger.propagate:  # set once: the events stay off the root logger's handlers
        logger.propagate = False
        logger.setLevel(logging.INFO)
    return logger
