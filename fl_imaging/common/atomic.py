"""Write a file so that readers see either its old content or its complete new content.

Ours: neither the standard library nor NumPy or torch has an atomic file write. The content goes
to a temporary name in the target's own folder (same file system), is flushed and fsync'ed, then
``os.replace`` puts it in place in one step and the folder is fsync'ed so that the rename
survives a crash. When anything fails (disk full, no permission), the temporary file is
removed and the old file, if any, is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["fsync_folder", "reason_of", "write_atomically"]


def fsync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries (renames, removals) to disk; a no-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself is done
    finally:
        os.close(fd)


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(handle)`` on a temporary file next to ``path``, then put it at ``path``.

    ``path``'s folder is created when missing. Returns ``path``. Raises ``OSError`` (the
    operating system's, e.g. ``No space left on device``) when the folder or the file cannot
    be written; no temporary file is left behind then, and an earlier ``path`` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    # os.open, not tempfile.mkstemp: the file gets the usual permissions (umask), not 0600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_folder(path.parent)
    return path


def reason_of(err: OSError) -> str:
    """The operating system's words for ``err`` (``No space left on device``), without the
    temporary file's name that ``str(err)`` would show."""
    return err.strerror or str(err) or type(err).__name__
