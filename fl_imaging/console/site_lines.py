"""The log lines of simulated sites, from Ray's workers to the run's log and console.

A simulation's ClientApps run in Ray's worker processes. Ray's own way to show what they log
(``log_to_driver``) prints their output on the coordinator's terminal, each line prefixed with
the actor and coloured, bypassing Python's logging, so none of it reached ``main.log``; at the
end of a run its last lines can be lost with Ray's log monitor. Here instead every worker writes
its log records, one JSON line each (:mod:`.record_lines`), into a file of its own in a folder of
the run (:func:`send_site_lines`), and the coordinator reads the folder while the run goes
(:func:`site_lines_into_log`) and once more after Ray has stopped, and logs each record again in
its own process: into ``main.log`` and to the console, which shows the sites' progress from
them. The folder is removed afterwards: its lines are in the run's log.

A worker that cannot write there (a node of a Ray cluster that does not see the run folder)
writes its lines to stderr, as without this module; Ray shows them on the coordinator's
terminal.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from fl_imaging.console.progress import show_progress
from fl_imaging.console.record_lines import record_from_line, record_line, relog

__all__ = ["SITE_LINES_DIR", "SiteLineTail", "send_site_lines", "site_lines_into_log"]

#: The folder of the run where the workers write their lines while it runs.
SITE_LINES_DIR = "site-lines"

#: Seconds between two reads of the folder.
POLL_S = 0.2

log = logging.getLogger("fl_imaging.engine")


class _SiteLineHandler(logging.Handler):
    """Appends each record as a JSON line to ``stream`` (one file per worker process)."""

    def __init__(self, folder: Path, stream: TextIO) -> None:
        super().__init__(logging.INFO)
        self.folder = folder
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(record_line(record) + "\n")
            self.stream.flush()
        except Exception:  # noqa: BLE001  (logging's own convention: report, never raise)
            self.handleError(record)


def send_site_lines(folder: Path | None, logger: logging.Logger) -> None:
    """In a Ray worker: send every record of this process at INFO and above (ours, Flower's,
    Python's warnings) to a file of its own in ``folder``, once per process; ``logger`` and
    Flower's logger log at INFO, and Flower's own console handler stops writing to stderr.
    Without ``folder``, or where it is not there (another machine), ``logger``'s lines go to
    stderr (:func:`~fl_imaging.console.progress.show_progress`)."""
    root = logging.getLogger()
    current = [h for h in root.handlers if isinstance(h, _SiteLineHandler)]
    if folder is not None and any(h.folder == folder for h in current):
        return
    for handler in current:  # another run's folder (a worker reused): not any more
        root.removeHandler(handler)
        handler.stream.close()
    if folder is None or not folder.is_dir():
        show_progress(logger)
        return
    name = f"{socket.gethostname()}-{os.getpid()}.jsonl"
    try:
        stream = (folder / name).open("a", encoding="utf-8")
    except OSError:
        show_progress(logger)
        return
    root.addHandler(_SiteLineHandler(folder, stream))
    logging.captureWarnings(True)
    for named in (logger, logging.getLogger("fl_imaging"), logging.getLogger("flwr")):
        named.setLevel(logging.INFO)
    flwr = logging.getLogger("flwr")
    for handler in list(flwr.handlers):
        if type(handler).__name__ == "ConsoleHandler":  # Flower's own, to stderr
            flwr.removeHandler(handler)


class SiteLineTail:
    """Reads the workers' files in ``folder`` and logs each complete line again here."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, bytes] = {}
        self._lock = threading.Lock()

    def read(self) -> int:
        """Log the records written since the last call, in the order they were made, each
        marked ``site_worker`` (a line still being written waits for the next call); returns
        how many were logged."""
        with self._lock:
            records = []
            for path in sorted(self.folder.glob("*.jsonl")):
                for line in self._new_lines(path):
                    record = record_from_line(line)
                    if record is not None:
                        record.site_worker = True
                        records.append(record)
            for record in sorted(records, key=lambda r: r.created):
                relog(record)
            return len(records)

    def _new_lines(self, path: Path) -> list[str]:
        try:
            with path.open("rb") as stream:
                stream.seek(self._offsets.get(path, 0))
                chunk = stream.read()
        except OSError:
            return []
        self._offsets[path] = self._offsets.get(path, 0) + len(chunk)
        data = self._partial.pop(path, b"") + chunk
        *lines, rest = data.split(b"\n")
        if rest:
            self._partial[path] = rest
        return [line.decode("utf-8", errors="replace") for line in lines if line.strip()]


@contextmanager
def site_lines_into_log(run_dir: Path) -> Iterator[Path]:
    """While inside, the workers' line files in ``run_dir/site-lines`` (the folder given, for
    :func:`send_site_lines`) are read every :data:`POLL_S` seconds and their records logged
    here; on leaving (after Ray has stopped: nothing writes any more) the rest is read and
    the folder removed."""
    folder = run_dir / SITE_LINES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tail = SiteLineTail(folder)
    done = threading.Event()

    def follow() -> None:
        while not done.wait(POLL_S):
            try:
                tail.read()
            except Exception:  # noqa: BLE001  (a line the handlers refused: read on)
                log.debug("could not log a site's line", exc_info=True)

    thread = threading.Thread(target=follow, name="fl-imaging-site-lines", daemon=True)
    thread.start()
    try:
        yield folder
    finally:
        done.set()
        thread.join(timeout=5)
        tail.read()
        shutil.rmtree(folder, ignore_errors=True)
