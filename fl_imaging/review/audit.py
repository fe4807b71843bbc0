"""The audit log of a run, ``audit.jsonl``: one JSON record per event, each chained to the one
before by its SHA-256, so that a third party can recompute the chain.

Format (ours; the standard library's ``json`` and ``hashlib``, no crypto of our own): one record
per line, ``{"seq": n, "time": ISO-8601 UTC, "event": ..., ...fields, "prev": ..., "hash": ...}``,
written as canonical JSON (keys sorted, no spaces, ASCII; NaN written as null). ``hash`` is the
SHA-256 (hex) of the record's canonical JSON without ``hash``; ``prev`` is the ``hash`` of the
record before it (:data:`GENESIS` for the first record of a fresh run; for a resumed run, the
hash of the resumed run's last record, which the first record, ``resume``, names).

Events: ``resume`` (the run folder resumed and its last record's hash), ``run_start`` (config
hash, code version, sites, settings), ``round`` (sites asked and answering, each update's verdict,
failures, privacy spent, the new global model's hash), ``test_round``, ``run_end`` (why the run
stopped; SHA-256 of ``model.pt``, ``metrics.csv``, ``config.yaml`` and the MONAI bundle's
files). Each record is appended with one ``write`` and ``fsync``: a crash leaves at most a
cut-off last line, which :func:`verify_run` names as such.

Tamper-evident, not tamper-proof: a changed, removed or inserted record, or a replaced result
file, no longer matches the chain; but whoever can rewrite the whole file can rebuild a
consistent chain. The last record's hash, kept somewhere the coordinator cannot rewrite (an
MLflow server's run tags, an e-mail to the ethics board, a signature), closes that gap:
``verify_run(..., expect_last=HASH)``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fl_imaging.review.bundle_export import BUNDLE_FILES

__all__ = [
    "AUDIT_FILE",
    "GENESIS",
    "HASHED_FILES",
    "AuditFileMissing",
    "AuditLog",
    "Verification",
    "arrays_sha256",
    "code_version",
    "file_sha256",
    "json_safe",
    "last_record",
    "record_hash",
    "verify_chain",
    "verify_run",
]

AUDIT_FILE = "audit.jsonl"
#: ``prev`` of the first record of a fresh run.
GENESIS = "0" * 64
#: The result files whose SHA-256 the ``run_end`` record holds (when they exist).
HASHED_FILES = (
    "model.pt",
    "metrics.csv",
    "config.yaml",
    "cross_site.csv",
    "contributions.csv",
    *BUNDLE_FILES,
)


class AuditFileMissing(FileNotFoundError):
    """The run folder or its ``audit.jsonl`` does not exist; the message names it."""


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None, NumPy scalars as Python numbers, tuples as
    lists and mapping keys as strings, recursively: what canonical JSON can hold."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _canonical(record: Mapping[str, Any]) -> bytes:
    return json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``record``'s canonical JSON without its ``hash`` field."""
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) of a model's arrays, independent of how they are stored: per name in
    sorted order, the name, dtype, shape and the C-ordered bytes. Takes NumPy arrays by name."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        header = f"{name}\0{array.dtype.str}\0{list(array.shape)}\0"
        digest.update(header.encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of the bytes of the file at ``path``. Raises ``OSError``."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def code_version() -> dict[str, Any]:
    """The running code: ``package`` (fl-imaging's version) and, in a git checkout, ``commit``
    (full hash) and ``dirty`` (uncommitted changes to tracked files); None where unknown."""
    from fl_imaging import __version__

    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=here, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "package": __version__,
        "commit": commit,
        "dirty": None if status is None else bool(status),
    }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


class AuditLog:
    """Appends chained records to an ``audit.jsonl`` (see the module).

    :meth:`create` starts a new file; each :meth:`append` writes one line with a single
    ``write`` and ``fsync`` and returns the record. ``last_hash`` is the chain's head.
    """

    def __init__(self, path: Path, prev: str = GENESIS) -> None:
        self.path = path
        self.last_hash = prev
        self.seq = 0

    @classmethod
    def reopen(cls, path: Path) -> AuditLog:
        """The log at ``path`` to append to, going on from its last record (a new chain when
        the file does not exist). Raises ``ValueError`` naming the file when its last line is
        not a whole record (cut off or edited), ``OSError`` when it cannot be read."""
        log = cls(path)
        if not path.exists():
            return log
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 65536))
            tail = handle.read()
        if not tail:
            return log
        lines = tail.split(b"\n")
        if lines[-1]:
            raise ValueError(f"{path}: its last line is cut off (a crash while writing it)")
        try:
            last = json.loads(lines[-2])
            if record_hash(last) != last["hash"]:
                raise ValueError("its content does not match its hash")
            log.seq, log.last_hash = int(last["seq"]) + 1, str(last["hash"])
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise ValueError(f"{path}: its last record does not read back ({err})") from None
        return log

    @classmethod
    def create(cls, path: Path, prev: str = GENESIS) -> AuditLog:
        """Start an empty log at ``path`` (replacing one of an earlier run in the same folder)
        whose first record will point to ``prev``. Raises ``OSError``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        os.close(fd)
        return cls(path, prev)

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append the record of ``event`` with ``fields`` (made JSON-safe) and return it.
        Raises ``OSError`` when it cannot be written (the chain is unchanged then)."""
        record: dict[str, Any] = {"seq": self.seq, "time": _now(), "event": event}
        record.update(json_safe(fields))
        record["prev"] = self.last_hash
        record["hash"] = record_hash(record)
        line = _canonical(record) + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"{self.path}: wrote {written} of {len(line)} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)
        self.seq += 1
        self.last_hash = record["hash"]
        return record


@dataclass
class Verification:
    """The outcome of :func:`verify_run`: ``ok``, the ``problem`` that broke it (naming the
    first record or file that does not match; empty when ok), ``notes`` (what was checked, for
    the report) and the ``records`` read (up to the problem)."""

    ok: bool
    problem: str = ""
    notes: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    #: The problem is only a cut-off last line (a crash while writing it).
    truncated: bool = False

    @property
    def last_hash(self) -> str:
        """The hash of the last good record (:data:`GENESIS` when none)."""
        return self.records[-1]["hash"] if self.records else GENESIS


def _name(record: Mapping[str, Any] | None, line: int) -> str:
    seq = record.get("seq") if isinstance(record, Mapping) else None
    return f"record seq {seq} (line {line})" if isinstance(seq, int) else f"line {line}"


def _read_chain(path: Path, result: Verification) -> None:
    """Check every line of ``path``: JSON, fields, its own hash, its link, its number."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete = lines[:-1]  # the text after the last newline is a cut-off record, if any
    tail = lines[-1]
    prev_name = "the start of the log"
    for number, raw in enumerate(complete, start=1):
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            seq = re.search(rb'"seq":(\d+)', raw)
            name = f"record seq {int(seq.group(1))} (line {number})" if seq else f"line {number}"
            result.problem = f"{name}: not a JSON record (the line was damaged or edited)"
            return
        expected = len(result.records)
        if not isinstance(record, dict) or not {"seq", "event", "prev", "hash"} <= set(record):
            result.problem = f"line {number}: not an audit record (no seq, event, prev or hash)"
            return
        name = _name(record, number)
        if record_hash(record) != record["hash"]:
            result.problem = (
                f"{name}: its content does not match its hash (the record was changed after "
                "it was written)"
            )
            return
        prev = result.records[-1]["hash"] if result.records else _first_prev(record)
        if record["prev"] != prev:
            missing = isinstance(record["seq"], int) and record["seq"] > expected
            result.problem = f"{name}: its prev does not match the hash of {prev_name}" + (
                f" (seq {expected} is missing: a record was removed)"
                if missing
                else " (a record before it was removed, inserted or rewritten)"
            )
            return
        if record["seq"] != expected:
            result.problem = f"{name}: expected seq {expected} here (records out of order)"
            return
        result.records.append(record)
        prev_name = f"record seq {expected} (line {number})"
    if tail:
        result.truncated = True
        result.problem = (
            f"line {len(complete) + 1}: truncated record, the file ends in the middle of it "
            f"({len(tail)} bytes without an end of line): the run was stopped while writing it"
        )


def verify_chain(path: Path) -> Verification:
    """Recompute the chain of any log :class:`AuditLog` wrote (a run's ``audit.jsonl``, a
    site's record): every record's hash, its link and its number. Returns the
    :class:`Verification` (``ok`` when the whole chain holds). Raises :class:`AuditFileMissing`
    when ``path`` is not a file."""
    path = Path(path)
    if not path.is_file():
        raise AuditFileMissing(f"{path}: no such file")
    result = Verification(ok=False)
    _read_chain(path, result)
    result.ok = not result.problem
    return result


def _first_prev(record: Mapping[str, Any]) -> str:
    """What the first record's ``prev`` must be: :data:`GENESIS`, or for ``resume`` the
    resumed run's last hash it names."""
    if record.get("event") == "resume" and isinstance(record.get("resumed_last_hash"), str):
        return str(record["resumed_last_hash"])
    return GENESIS


def last_record(run_dir: Path) -> dict[str, Any] | None:
    """The last record of ``run_dir``'s audit log whose chain holds up to it (a cut-off last
    line is passed over), or None when the folder has no log or no good record."""
    path = Path(run_dir) / AUDIT_FILE
    if not path.is_file():
        return None
    result = Verification(ok=False)
    _read_chain(path, result)
    return result.records[-1] if result.records else None


def _check_files(run_dir: Path, result: Verification) -> None:
    """The ``run_end`` record against the files and the last round's model."""
    records = result.records
    end = records[-1]
    line = len(records)
    if end.get("event") != "run_end":
        result.problem = (
            f"{_name(end, line)} is the last record, and it is not run_end: the run did not "
            "finish (stopped by a crash or kill -9), or its last records were removed"
        )
        return
    for name, expected in sorted((end.get("files") or {}).items()):
        path = run_dir / name
        if not path.is_file():
            result.problem = f"{name} is missing (its sha256 is in {_name(end, line)})"
            return
        actual = file_sha256(path)
        if actual != expected:
            result.problem = (
                f"{name}: sha256 {actual} does not match {_name(end, line)}, which holds "
                f"{expected}: the file was replaced or changed after the run"
            )
            return
        result.notes.append(f"{name}: sha256 {actual[:16]}... matches {_name(end, line)}")
    models = [r["model_sha256"] for r in records if r.get("event") in ("run_start", "round")]
    final = end.get("model_sha256")
    if final and models and final != models[-1]:
        result.problem = (
            f"{_name(end, line)}: the saved model's arrays (sha256 {final}) are not the global "
            f"model of the last round ({models[-1]})"
        )
        return
    if final:
        result.notes.append("the saved model is the global model after the last recorded round")


def _check_resumed(run_dir: Path, result: Verification) -> None:
    first = result.records[0]
    if first.get("event") != "resume":
        return
    folder = Path(str(first.get("resumed_run_dir", "")))
    if not folder.is_absolute():
        folder = run_dir / folder
    expected = first.get("resumed_last_hash")
    if expected is None:
        result.notes.append(f"resumed {folder}, which had no audit log")
        return
    if not (folder / AUDIT_FILE).is_file():
        result.notes.append(f"resumed {folder}: its audit log is not here, not checked")
        return
    earlier = Verification(ok=False)
    _read_chain(folder / AUDIT_FILE, earlier)  # its chain; it may have ended without run_end
    if earlier.last_hash != expected or (earlier.problem and not earlier.truncated):
        why = earlier.problem or f"its last record's hash is {earlier.last_hash}"
        result.problem = (
            f"{_name(first, 1)}: the run it resumes, {folder}, does not end with the hash "
            f"recorded here ({expected}): {why}"
        )
        return
    result.notes.append(f"resumed {folder}: its chain holds and ends with the hash linked here")


def verify_run(
    run_dir: Path, expect_last: str | None = None, check_resumed: bool = True
) -> Verification:
    """Recompute the chain of ``run_dir/audit.jsonl`` and check the files its ``run_end``
    record names (``model.pt``, ``metrics.csv``, ``config.yaml``) against their SHA-256, the
    saved model against the last round's, a resumed run's link to the run it resumed (when that
    folder is here, with ``check_resumed``) and, with ``expect_last``, the last record's hash
    against a copy kept elsewhere. Returns a :class:`Verification` whose ``problem`` names the
    first record (by seq and line) or file that does not match. Raises
    :class:`AuditFileMissing` when the folder or its log does not exist."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AuditFileMissing(f"{run_dir}: no such run folder")
    path = run_dir / AUDIT_FILE
    if not path.is_file():
        raise AuditFileMissing(
            f"{path}: no audit log in this folder (a run folder holds one; a benchmark's "
            "baseline cells, which federate nothing, and runs made before the audit log have none)"
        )
    result = Verification(ok=False)
    _read_chain(path, result)
    if not result.problem and not result.records:
        result.problem = f"{path} holds no record"
    if result.problem:
        return result
    result.notes.insert(
        0,
        f"chain of {len(result.records)} records holds (seq 0-{len(result.records) - 1}), "
        f"last hash {result.last_hash}",
    )
    if expect_last is not None and expect_last != result.last_hash:
        last = result.records[-1]
        result.problem = (
            f"{_name(last, len(result.records))} is the last record, with hash "
            f"{result.last_hash}, not the expected {expect_last}: records were removed at the "
            "end or the log was rewritten"
        )
        return result
    _check_files(run_dir, result)
    if not result.problem and check_resumed:
        _check_resumed(run_dir, result)
    result.ok = not result.problem
    return result
