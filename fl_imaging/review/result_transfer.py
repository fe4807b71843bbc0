"""A run's result files sent from a deployed ServerApp to the researcher as lines of its log.

Flower 1.41's open-source SuperLink has no artifact store (``flwr pull`` asks for an artifact
provider it does not ship), but it keeps everything a ServerApp writes to stdout and stderr in
its state and hands it to ``flwr run --stream`` and ``flwr log RUN_ID --show`` over the
authenticated Control API. So at the end of a run the ServerApp writes each result file
(:data:`RESULT_FILES`) as marked chunk lines, base64, :data:`CHUNK_BYTES` of the file per line,
each naming the file, its size and SHA-256, then one manifest line listing every file sent and
every file withheld (over :data:`MAX_FILE_BYTES`: named with its size, never sent cut short).
:class:`ResultReceiver` reads such a stream, writes each file once all its chunks arrived and
its SHA-256 matches, and refuses by name a missing chunk, a file whose bytes do not match and a
stream that ended before its manifest.

Line format (ours): ``fl-imaging-result {"kind": "chunk", "file": NAME, "size": BYTES,
"sha256": HEX, "part": I, "parts": N, "data": BASE64}`` and ``fl-imaging-result {"kind":
"manifest", "files": [{"file", "size", "sha256", "parts"}], "withheld": [{"file", "size",
"reason"}]}``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_imaging.common.atomic import write_atomically
from fl_imaging.review.bundle_export import BUNDLE_FILES

__all__ = [
    "CHUNK_BYTES",
    "MAX_FILE_BYTES",
    "RESULT_FILES",
    "RESULT_MARKER",
    "ResultReceiver",
    "ResultTransferError",
    "result_lines",
    "send_results",
]

#: The start of a result line inside the ServerApp's log stream.
RESULT_MARKER = "fl-imaging-result "

#: The run folder's files that travel (those present): not the checkpoints, not main.log.
RESULT_FILES = (
    "config.yaml",
    "partition.csv",
    "metrics.csv",
    "summary.txt",
    "curves.png",
    "cross_site.csv",
    "cross_site.png",
    "contributions.csv",
    "audit.jsonl",
    "report.html",
    "model.pt",
    *BUNDLE_FILES,
)

#: Bytes of a file per line (64 KiB of base64 text).
CHUNK_BYTES = 48 * 1024

#: The largest file sent: the SuperLink keeps the whole log in its database and returns it in
#: one response to ``flwr log --show``, so a larger file is named in the manifest instead.
MAX_FILE_BYTES = 64 * 1024 * 1024


class ResultTransferError(RuntimeError):
    """The result files did not all arrive intact; the message names each file and chunk."""


def _line(data: dict[str, Any]) -> str:
    return RESULT_MARKER + json.dumps(data, separators=(",", ":"))


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size // 1024} KiB"


def result_lines(run_dir: Path, max_file_bytes: int = MAX_FILE_BYTES) -> Iterator[str]:
    """The result lines (no newline) of ``run_dir``'s :data:`RESULT_FILES` that exist: every
    chunk of every file up to ``max_file_bytes``, then the manifest (see the module)."""
    sent: list[dict[str, Any]] = []
    withheld: list[dict[str, Any]] = []
    for name in RESULT_FILES:
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        size = path.stat().st_size
        if size > max_file_bytes:
            withheld.append(
                {
                    "file": name,
                    "size": size,
                    "reason": f"{name} is {_mib(size)}, over the {_mib(max_file_bytes)} that "
                    f"the log stream carries per file: copy it from the coordinator's run "
                    f"folder ({path})",
                }
            )
            continue
        content = path.read_bytes()
        digest = hashlib.sha256(content).hexdigest()
        parts = max(1, -(-len(content) // CHUNK_BYTES))
        head = {"kind": "chunk", "file": name, "size": len(content), "sha256": digest}
        for part in range(parts):
            piece = content[part * CHUNK_BYTES : (part + 1) * CHUNK_BYTES]
            data = base64.b64encode(piece).decode("ascii")
            yield _line({**head, "part": part, "parts": parts, "data": data})
        sent.append({"file": name, "size": len(content), "sha256": digest, "parts": parts})
    yield _line({"kind": "manifest", "files": sent, "withheld": withheld})


def send_results(
    run_dir: Path,
    write: Callable[[str], object] | None = None,
    max_file_bytes: int = MAX_FILE_BYTES,
    rate: float | None = None,
) -> tuple[int, int, list[str]]:
    """Write :func:`result_lines` of ``run_dir`` with ``write`` (default: stderr, which Flower
    keeps as the ServerApp's log), one call per line with its newline, at most ``rate`` bytes
    of text per second (None: at once). Returns the number of files sent, the bytes of text
    written, and the reasons of the files withheld."""
    write = write or sys.stderr.write
    files, written, withheld = 0, 0, []
    start = time.monotonic()
    for line in result_lines(run_dir, max_file_bytes):
        write(line + "\n")
        written += len(line) + 1
        if rate and (ahead := written / rate - (time.monotonic() - start)) > 0:
            time.sleep(ahead)
        data = json.loads(line[len(RESULT_MARKER) :])
        if data["kind"] == "manifest":
            files = len(data["files"])
            withheld = [w["reason"] for w in data["withheld"]]
    if hasattr(sys.stderr, "flush"):
        sys.stderr.flush()
    return files, written, withheld


@dataclass
class _Incoming:
    """One file's chunks as they arrive."""

    size: int
    sha256: str
    parts: int
    chunks: dict[int, bytes] = field(default_factory=dict)


@dataclass
class ResultReceiver:
    """Reads a ServerApp's log line by line (:meth:`feed`) and writes the result files it
    carries into ``out_dir``, each once complete and checked (an identical file already there,
    as on one machine, is left as it is). :meth:`finish` says what arrived or raises."""

    out_dir: Path
    written: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    withheld: list[str] = field(default_factory=list)
    manifest: list[dict[str, Any]] | None = None
    _incoming: dict[str, _Incoming] = field(default_factory=dict)
    _digests: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True once the manifest arrived and every file it lists was written."""
        if self.manifest is None:
            return False
        return all(entry["file"] in self.written for entry in self.manifest)

    def feed(self, line: str) -> bool:
        """Take one line of the log; returns True when it was a result line (consumed here,
        not for the log), False for any other line."""
        text = line.strip()
        if not text.startswith(RESULT_MARKER.strip()):
            return False
        try:
            data = json.loads(text[len(RESULT_MARKER.strip()) :])
            if data["kind"] == "manifest":
                self.manifest = [dict(entry) for entry in data["files"]]
                self.withheld = [str(w["reason"]) for w in data["withheld"]]
            else:
                self._chunk(data)
        except (ValueError, KeyError, TypeError):
            self.problems.append(f"a result line that does not read back: {text[:80]}...")
        return True

    def feed_all(self, lines: Iterable[str]) -> None:
        """:meth:`feed` every line of ``lines`` (other lines are skipped)."""
        for line in lines:
            self.feed(line)

    def _chunk(self, data: dict[str, Any]) -> None:
        name = str(data["file"])
        if name not in RESULT_FILES:  # never another file, never a path outside out_dir
            self.problems.append(f"{name[:80]}: not a result file; not written")
            return
        if name in self.written:
            return  # a second copy of the log (the stream, then `flwr log --show`)
        incoming = self._incoming.setdefault(
            name, _Incoming(int(data["size"]), str(data["sha256"]), int(data["parts"]))
        )
        incoming.chunks[int(data["part"])] = base64.b64decode(data["data"], validate=True)
        if len(incoming.chunks) == incoming.parts:
            self._write(name, incoming)

    def _write(self, name: str, incoming: _Incoming) -> None:
        content = b"".join(incoming.chunks[i] for i in range(incoming.parts))
        digest = hashlib.sha256(content).hexdigest()
        if digest != incoming.sha256 or len(content) != incoming.size:
            self.problems.append(
                f"{name}: the {incoming.parts} chunk(s) received hold {len(content)} bytes with "
                f"SHA-256 {digest[:12]}..., the coordinator sent {incoming.size} bytes with "
                f"SHA-256 {incoming.sha256[:12]}... (corrupted on the way)"
            )
            del self._incoming[name]
            return
        path = Path(self.out_dir) / name
        if not (path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == digest):
            write_atomically(path, lambda handle: handle.write(content))
        self.written.append(name)
        self._digests[name] = digest
        del self._incoming[name]

    def finish(self) -> list[str]:
        """The names of the files written (in the manifest's order). Raises
        :class:`ResultTransferError` naming every file that did not arrive intact: a chunk
        missing, bytes that do not match their SHA-256 or the manifest, or no manifest at all
        (the log ended before the coordinator sent it)."""
        problems = list(self.problems)
        for name, incoming in self._incoming.items():
            missing = sorted(set(range(incoming.parts)) - set(incoming.chunks))
            listed = ", ".join(str(i + 1) for i in missing[:10])
            problems.append(
                f"{name}: chunk(s) {listed}{'...' if len(missing) > 10 else ''} of "
                f"{incoming.parts} missing"
            )
        if self.manifest is None:
            problems.append(
                "the log ended before the coordinator's list of result files (truncated: the "
                "run may still be running, or stopped before it sent its results)"
            )
        else:
            for entry in self.manifest:
                name = str(entry["file"])
                if name in self.written:
                    if self._digests[name] != entry["sha256"]:
                        problems.append(
                            f"{name}: SHA-256 {self._digests[name][:12]}... differs from the "
                            f"manifest's {str(entry['sha256'])[:12]}..."
                        )
                    continue
                if name not in self._incoming and not any(p.startswith(name) for p in problems):
                    problems.append(f"{name}: none of its {entry['parts']} chunk(s) arrived")
        if problems:
            raise ResultTransferError(
                "result files from the coordinator not received intact into "
                f"{self.out_dir}:\n  " + "\n  ".join(problems)
            )
        order = [str(e["file"]) for e in self.manifest or []]
        return sorted(self.written, key=lambda n: order.index(n) if n in order else len(order))
