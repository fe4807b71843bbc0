"""The files of a checkpoint on disk: written so that a reader never sees half of one, checked
when read, and never unpickled.

A checkpoint is two files in the run folder:

- ``checkpoint.json``: ``{"format": "fl-imaging checkpoint", "version": 1, "arrays": {"file":
  NAME, "bytes": N, "sha256": HEX}, "content": {...}, "sha256": HEX}``; ``content`` is what
  :mod:`fl_imaging.flower.coordinator.checkpoint` stores (round, config, metric rows, strategy
  state, with
  references to arrays), the last ``sha256`` that of the rest of the document (its keys sorted,
  no spaces, as ``json.dumps(..., sort_keys=True, separators=(",", ":"))`` writes it);
- ``checkpoint-<round>-<random>.npz``: every NumPy array (global model, strategy state), read
  with ``np.load(allow_pickle=False)``, its size and SHA-256 recorded in ``checkpoint.json``.

Writing: the arrays go to a new file name (the previous checkpoint's arrays file stays as it
is), then ``checkpoint.json`` is replaced in one step
(:func:`fl_imaging.common.atomic.write_atomically`),
then the previous arrays file is removed. Until that one step, ``checkpoint.json`` names the
previous, complete checkpoint; after it, the new one. A failed write leaves nothing new behind.

The checksums find damage (a truncated copy, a changed byte), not a deliberate forgery: whoever
can edit the file can recompute them. What makes the files safe to load is that they hold no
code: JSON and NPZ without pickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fl_imaging.common.atomic import write_atomically
from fl_imaging.config import ConfigError

__all__ = [
    "CHECKPOINT_FILE",
    "FORMAT",
    "LEGACY_CHECKPOINT_FILE",
    "VERSION",
    "read_checkpoint_files",
    "write_checkpoint_files",
]

log = logging.getLogger("fl_imaging.server")

CHECKPOINT_FILE = "checkpoint.json"
#: The pickle earlier versions wrote; named in the error, never read.
LEGACY_CHECKPOINT_FILE = "checkpoint.pkl"
FORMAT = "fl-imaging checkpoint"
VERSION = 1
_ARRAYS_NAME = re.compile(r"checkpoint-[0-9A-Za-z_-]+\.npz")
_AGAIN = "resume from an earlier copy of the run folder or start the run again"


def _digest(document: dict[str, Any]) -> str:
    """SHA-256 of ``document`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _file_digest(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _damaged(path: Path, why: str) -> ConfigError:
    return ConfigError(f"the checkpoint file {path} is damaged ({why}): {_AGAIN}")


def write_checkpoint_files(
    folder: Path, label: str, content: dict[str, Any], arrays: dict[str, np.ndarray]
) -> Path:
    """Write ``content`` (JSON-able) and ``arrays`` as the checkpoint in ``folder`` (see the
    module docstring); ``label`` (e.g. the round, ``0003``) goes into the arrays file's name.
    Returns the path of ``checkpoint.json``. Raises ``OSError`` when the folder cannot be
    written (disk full, no permission); the previous checkpoint there is then left whole."""
    arrays_path = folder / f"checkpoint-{label}-{uuid.uuid4().hex[:8]}.npz"
    try:
        write_atomically(arrays_path, lambda handle: np.savez(handle, **arrays))
        document: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "arrays": {
                "file": arrays_path.name,
                "bytes": arrays_path.stat().st_size,
                "sha256": _file_digest(arrays_path),
            },
            "content": content,
        }
        document["sha256"] = _digest(document)
        text = json.dumps(document, indent=1, allow_nan=True)
        path = write_atomically(folder / CHECKPOINT_FILE, lambda h: h.write(text.encode()))
    except BaseException:
        with contextlib.suppress(OSError):
            arrays_path.unlink()
        raise
    for old in [*folder.glob("checkpoint-*.npz"), *folder.glob(".checkpoint*.tmp")]:
        if old != arrays_path:
            try:
                old.unlink()
            except OSError as err:  # the new checkpoint is complete; the old file just stays
                log.warning("could not remove the previous checkpoint's %s: %s", old, err)
    return path


def _read_document(folder: Path) -> dict[str, Any]:
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        if (folder / LEGACY_CHECKPOINT_FILE).is_file():
            raise ConfigError(
                f"resume={folder}: its {LEGACY_CHECKPOINT_FILE} is a pickle written by an "
                "earlier fl-imaging, which this version does not read (loading a pickle can run "
                "code): start the run again"
            )
        raise ConfigError(
            f"resume={folder}: no {CHECKPOINT_FILE} there; give the folder of a run that "
            "finished at least one round"
        )
    try:
        document = json.loads(path.read_bytes())
    except OSError as err:
        raise ConfigError(f"cannot read the checkpoint file {path}: {err.strerror}") from None
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError included
        raise _damaged(path, "not complete JSON: truncated or altered") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ConfigError(
            f"{path} is not an fl-imaging checkpoint: give the folder of an fl-imaging run"
        )
    if document.get("version") != VERSION:
        raise ConfigError(
            f"{path} is a checkpoint of format version {document.get('version')!r}, and this "
            f"fl-imaging reads version {VERSION}: resume with the fl-imaging that wrote it, or "
            "start the run again"
        )
    recorded = document.pop("sha256", None)
    if recorded != _digest(document):
        raise _damaged(path, "checksum mismatch: the file was altered")
    return document


def _read_arrays(folder: Path, entry: Any) -> dict[str, np.ndarray]:
    json_path = folder / CHECKPOINT_FILE
    if not isinstance(entry, dict) or not _ARRAYS_NAME.fullmatch(str(entry.get("file"))):
        raise _damaged(json_path, "no valid arrays file named")
    path = folder / entry["file"]
    if not path.is_file():
        raise ConfigError(
            f"the checkpoint {json_path} names {path.name}, which is not there: copy the whole "
            f"run folder, or {_AGAIN}"
        )
    size = path.stat().st_size
    if size != entry.get("bytes"):
        raise _damaged(path, f"truncated or altered: {size} bytes, {entry.get('bytes')} written")
    if _file_digest(path) != entry.get("sha256"):
        raise _damaged(path, "checksum mismatch: the file was altered")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise _damaged(path, f"not a NumPy arrays file: {err}") from None


def read_checkpoint_files(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read the checkpoint in ``folder``: its ``content`` (JSON) and its arrays (name -> NumPy
    array). Raises :class:`~fl_imaging.config.ConfigError`, one line naming the file and what
    to do, when it is missing, truncated, altered (checksum mismatch), of another format
    version, or not an fl-imaging checkpoint."""
    document = _read_document(folder)
    arrays = _read_arrays(folder, document.get("arrays"))
    content = document.get("content")
    if not isinstance(content, dict):
        raise _damaged(folder / CHECKPOINT_FILE, "no content")
    return content, arrays
