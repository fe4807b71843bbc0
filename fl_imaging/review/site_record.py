"""A site's own record of what it was asked and what it answered: an append-only, hash-chained
JSON-lines file in its state folder (``site-record.jsonl``), kept across runs.

One record per message the site answered or refused: the Flower run, the run's key, the round,
the message type, a summary of the request (the settings that decide what leaves the site), the
SHA-256 of the reply's content (:func:`fl_imaging.flower.protocol.content_sha256`, the same digest
the
coordinator's audit log keeps of every reply it received) or the refusal, and the site's
epsilon after the round under DP-SGD. ``fl-imaging-audit site RUN_DIR --record FILE`` checks a
coordinator's audit log against it (:mod:`fl_imaging.review.site_record_check`).

The chain is the audit log's (:class:`fl_imaging.review.audit.AuditLog`: each record holds the hash
of
the one before), so a record removed or edited afterwards breaks it; appends are serialised by
an exclusive ``flock`` (two processes may serve one simulated site).
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fl_imaging.review.audit import AuditLog

__all__ = ["RECORD_FILE", "SiteRecord", "SiteRecordError"]

RECORD_FILE = "site-record.jsonl"


class SiteRecordError(RuntimeError):
    """The site's record cannot be read or appended to; names the file and what to do."""


class SiteRecord:
    """The record file ``path`` of site ``site`` (see the module)."""

    def __init__(self, path: Path, site: str) -> None:
        self.path = Path(path)
        self.site = site

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.with_name(self.path.name + ".lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def append(self, **fields: Any) -> dict[str, Any]:
        """Append one record of ``fields`` (JSON values) to the chain; returns it. Raises
        :class:`SiteRecordError` when the file's last record does not read back or the file
        cannot be written: a site does not answer what it cannot record."""
        try:
            with self._locked():
                return AuditLog.reopen(self.path).append("site_message", site=self.site, **fields)
        except (OSError, ValueError) as err:
            raise SiteRecordError(
                f"[site {self.site}] cannot append to its record {self.path}: {err}; the site "
                "answers no request it cannot record (restore the file, or move it away to "
                "start a new chain)"
            ) from None

    def records(self) -> list[dict[str, Any]]:
        """Every record in the file (none when it does not exist). Raises
        :class:`SiteRecordError` naming the line that is not JSON."""
        if not self.path.exists():
            return []
        found = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            try:
                found.append(json.loads(line))
            except ValueError:
                raise SiteRecordError(f"{self.path}: line {number} is not a JSON record") from None
        return found

    def rounds_trained(self, flower_run: int) -> int:
        """Training rounds this site answered (not refused) in Flower run ``flower_run``."""
        return sum(
            1
            for r in self.records()
            if r.get("flower_run") == flower_run
            and r.get("type") == "train"
            and r.get("reply_sha256")
        )


def request_summary(config: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-safe part of a request's config worth recording: numbers, strings and booleans
    (bytes, such as keys and ciphertexts, and lists are left out)."""
    return {
        str(k): v
        for k, v in config.items()
        if isinstance(v, (bool, int, float, str)) and k != "run"
    }
