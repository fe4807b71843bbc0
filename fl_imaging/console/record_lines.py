"""Log records written as one line of JSON in one process and logged again in another.

A Ray worker's records (:mod:`.site_lines`) and a deployed ServerApp's (Flower streams what it
writes to ``flwr run --stream``) reach the researcher's process as text; written with
:func:`record_line` and read with :func:`record_from_line`, each comes back as the record it
was: logger, level, time, message (traceback included), the process it came from, and its
:class:`~fl_imaging.console.events.Progress` event. :func:`relog` hands it to the logger it was
logged on here, so it reaches the same handlers as a record of this process (``main.log``, the
console).
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from typing import Any

from fl_imaging.console.events import PROGRESS_LOGGER, Progress, progress_extra, progress_of

__all__ = [
    "MARKER",
    "RecordLineFormatter",
    "record_from_line",
    "record_line",
    "relog",
    "stream_records",
]

#: The start of a record line inside a stream that holds other text (Flower's log stream).
MARKER = "fl-imaging-record "

_HOST = socket.gethostname()


def record_line(record: logging.LogRecord) -> str:
    """``record`` as one line of JSON (no newline): its logger, level, time, message with any
    traceback, process id and host, and its progress event."""
    message = record.getMessage()
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        message = f"{message}\n{record.exc_text}"
    data: dict[str, Any] = {
        "name": record.name,
        "levelno": record.levelno,
        "created": record.created,
        "msg": message,
        "process": record.process,
        "host": _HOST,
    }
    if (event := progress_of(record)) is not None:
        data["progress"] = event.to_dict()
    return json.dumps(data, ensure_ascii=False)


def record_from_line(line: str) -> logging.LogRecord | None:
    """The record of a :func:`record_line` (a leading :data:`MARKER` allowed), with
    ``origin`` naming the process it came from (``pid N on HOST``); None when ``line`` is not
    one."""
    text = line.strip()
    text = text.removeprefix(MARKER.strip()).strip()
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
        level = int(data["levelno"])
        created = float(data["created"])
        values: dict[str, Any] = {
            "name": str(data["name"]),
            "levelno": level,
            "levelname": logging.getLevelName(level),
            "msg": str(data["msg"]),
            "args": None,
            "created": created,
            "msecs": (created - int(created)) * 1000,
            "process": int(data.get("process") or 0),
            "origin": f"pid {data.get('process')} on {data.get('host')}",
        }
        if isinstance(data.get("progress"), dict):
            values.update(progress_extra(Progress.from_dict(data["progress"])))
    except (ValueError, KeyError, TypeError):
        return None
    return logging.makeLogRecord(values)


def relog(record: logging.LogRecord) -> None:
    """Hand ``record`` to the logger it names, as if it had been logged here (its level is
    not checked again: it passed its own process's)."""
    logging.getLogger(record.name).handle(record)


class RecordLineFormatter(logging.Formatter):
    """Formats each record as :data:`MARKER` + :func:`record_line`, so that a stream that also
    holds other text keeps it recognisable."""

    def format(self, record: logging.LogRecord) -> str:
        """The record's marked line."""
        return MARKER + record_line(record)


def stream_records(logger: logging.Logger) -> None:
    """In a deployed ServerApp: write ``logger``'s records at INFO and above, and the progress
    events, to stderr as marked record lines (Flower streams them to ``flwr run --stream``,
    where the researcher's console reads them back: :func:`record_from_line`). Once per
    process."""
    progress = logging.getLogger(PROGRESS_LOGGER)
    progress.propagate = False
    for target in (logger, progress):
        if any(isinstance(h.formatter, RecordLineFormatter) for h in target.handlers):
            continue
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(RecordLineFormatter())
        target.addHandler(handler)
        target.setLevel(logging.INFO)
