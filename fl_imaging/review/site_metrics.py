"""What a site sent, per run, as a CSV its staff can open: ``sent-metrics/run-<Flower run>.csv``
in the site's state folder, beside its privacy ledger and its record.

One row per (message, metric) of every reply the site sent with metrics (training losses,
validation and test scores, case counts, epsilon under DP-SGD): the time, the round, the
message type, the metric and its value, exactly as they left the site (after its policy's
release rules). Written by the site's ClientApp from its own reply, never from what the
coordinator sends back; appends are serialised by an exclusive ``flock`` (two processes may
serve one simulated site).
"""

from __future__ import annotations

import csv
import fcntl
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = ["SENT_METRICS_DIR", "SENT_METRICS_HEADER", "append_sent_metrics", "sent_metrics_path"]

#: The folder, inside a site's state folder, of its per-run CSV files.
SENT_METRICS_DIR = "sent-metrics"

#: The columns of each file.
SENT_METRICS_HEADER = ("time", "round", "message", "metric", "value")


def sent_metrics_path(state_folder: Path, flower_run: int) -> Path:
    """The CSV of Flower run ``flower_run`` in the site's ``state_folder``."""
    return Path(state_folder) / SENT_METRICS_DIR / f"run-{flower_run}.csv"


def append_sent_metrics(
    path: Path, rnd: int, message: str, metrics: Mapping[str, float | int]
) -> Path:
    """Append one row per entry of ``metrics`` (name -> number, as sent in round ``rnd`` in a
    ``message`` reply: train, evaluate, or a query's name) to the CSV ``path``, with its
    header when the file is new. Returns ``path``. Raises ``OSError`` when it cannot be
    written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with path.with_name(path.name + ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        new = not path.exists() or path.stat().st_size == 0
        with path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(SENT_METRICS_HEADER)
            for name, value in metrics.items():
                writer.writerow((stamp, rnd, message, name, value))
    return path
