"""The output of ``flwr run --stream`` (a deployment), line by line, into this process's log.

It holds the ``flwr`` command's own lines, Flower's log of the ServerApp on the SuperLink's
host (coloured, with the strategy's box-drawn summary) and our ServerApp's records, written as
marked record lines (:func:`~fl_imaging.console.record_lines.stream_records`). Ours are logged
again as the records they were (their progress events drive the console's live view); every
other line goes, without its colour codes, to :data:`FLOWER_OUTPUT_LOGGER` at the level Flower
gave it (INFO without one): ``main.log`` has it, the console shows only Flower's errors.
"""

from __future__ import annotations

import logging
import re

from rich.text import Text

from fl_imaging.console.record_lines import MARKER, record_from_line, relog

__all__ = ["FLOWER_OUTPUT_LOGGER", "log_flower_output", "readable_line"]

#: The logger of the lines of ``flwr run`` that are not our records.
FLOWER_OUTPUT_LOGGER = "flwr.run_output"

_LEVEL = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s?(.*)$")


def log_flower_output(line: str) -> None:
    """Log one line of ``flwr run --stream`` here (see the module docstring); blank lines are
    dropped."""
    if line.lstrip().startswith(MARKER.strip()):
        record = record_from_line(line)
        if record is not None:
            relog(record)
            return
    text = Text.from_ansi(line.rstrip("\n")).plain.rstrip()
    if not text.strip():
        return
    level = logging.INFO
    if (match := _LEVEL.match(text)) is not None:
        level = logging.getLevelName(match.group(1))
        text = match.group(2).strip()
    logger = logging.getLogger(FLOWER_OUTPUT_LOGGER)
    logger.handle(logger.makeRecord(logger.name, level, "(flwr run)", 0, "%s", (text,), None))


def readable_line(line: str) -> str:
    """``line`` of ``flwr run --stream`` for a person: a record line as its message, any other
    line without its colour codes (no newline at the end)."""
    if line.lstrip().startswith(MARKER.strip()):
        record = record_from_line(line)
        if record is not None:
            return record.getMessage()
    return Text.from_ansi(line.rstrip("\n")).plain.rstrip()
