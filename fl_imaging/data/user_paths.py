"""Read the folders and files a user names (site folders, images, CSV files, run folders) so
that every failure is one sentence naming the path, what is wrong and what to do.

pathlib's ``glob`` / ``rglob`` skip a folder they may not read without a word, and ``is_dir`` /
``is_file`` / ``exists`` raise ``PermissionError`` for a path inside one; Python has no helper
that turns such an ``OSError`` into a message for a person, so these small ones are ours:
:func:`folder_entries` and :func:`files_under` list folders with ``os.scandir`` (an unreadable
folder is named, hidden names are set apart), :func:`read_text` reads a text file (a decoding
error is named too), :func:`named_os_errors` turns any ``OSError`` raised inside it into a
:class:`~fl_imaging.data.errors.SiteDataError` and :func:`os_error_message` says it in words.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fl_imaging.data.errors import SiteDataError

__all__ = [
    "files_under",
    "folder_entries",
    "is_hidden",
    "named_os_errors",
    "os_error_message",
    "read_text",
]


def is_hidden(path: Path) -> bool:
    """True for a name starting with ``.`` (``.DS_Store``, ``._IM0001``, ``.thumbs/``): what
    the operating system or a file browser leaves, never a case's data."""
    return path.name.startswith(".")


def _file_in_the_way(path: Path) -> Path | None:
    """The first of ``path`` and its parents that is a file (where a folder was expected)."""
    for candidate in (path, *path.parents):
        try:
            if candidate.is_file():
                return candidate
        except OSError:
            return None
    return None


def _blocking_folder(path: Path) -> Path:
    """The path that denies access to ``path``: the first of its parents (from the top) that
    may not be entered (its child cannot even be looked at), else ``path`` itself."""
    chain = [*reversed(path.parents), path]
    for parent, child in zip(chain, chain[1:], strict=False):
        try:
            os.stat(child)
        except PermissionError:
            return parent
        except OSError:
            return path
    return path


def os_error_message(err: OSError, path: Path | None = None, action: str = "read") -> str:
    """One sentence for an ``OSError`` raised while reading (``action`` "read") or writing
    (``action`` "written") a user's path: the path (the error's own, else ``path``), what is
    wrong (permission denied, a file where a folder is expected, a folder where a file is, a
    missing path, a link loop) and what to do."""
    where = Path(err.filename) if err.filename else path
    code = err.errno
    if code in (errno.EACCES, errno.EPERM):
        where = _blocking_folder(where) if where is not None else where
        return (
            f"{where}: cannot be {action}: permission denied; give the account that runs "
            f"fl-imaging {'read' if action == 'read' else 'write'} access (e.g. chmod -R "
            f"{'a+rX' if action == 'read' else 'u+rwX'} {where}) or run as a user who has it"
        )
    if code == errno.ENOTDIR:
        file = _file_in_the_way(where) if where is not None else None
        return (
            f"{file or where}: is a file, not a folder; give the folder, or move the file "
            "out of the way"
        )
    if code == errno.EISDIR:
        return f"{where}: is a folder, not a file; give the file, or move the folder away"
    if code == errno.ENOENT:
        return f"{where}: does not exist (it went away while being {action}); check the path"
    if code == errno.ELOOP:
        return f"{where}: a loop of symbolic links; point the link at a real file or folder"
    return f"{where}: cannot be {action} ({err.strerror or type(err).__name__}); check the disk"


@contextmanager
def named_os_errors(prefix: str = "", action: str = "read") -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block into a :class:`SiteDataError` whose message
    is ``prefix`` + :func:`os_error_message` (no traceback for the user)."""
    try:
        yield
    except OSError as err:
        raise SiteDataError(prefix + os_error_message(err, action=action)) from None


def folder_entries(folder: Path) -> list[Path]:
    """The entries of ``folder``, hidden ones included, sorted by name. Raises
    :class:`SiteDataError` naming the folder when it cannot be listed (permission, a file)."""
    try:
        with os.scandir(folder) as listing:
            return sorted(folder / entry.name for entry in listing)
    except OSError as err:
        raise SiteDataError(os_error_message(err, folder)) from None


def files_under(folder: Path) -> tuple[list[Path], list[Path]]:
    """The files under ``folder`` at every depth, sorted, and the hidden files and folders set
    apart (:func:`is_hidden`; nothing under a hidden folder is looked at). Raises
    :class:`SiteDataError` naming a folder that cannot be listed."""
    files: list[Path] = []
    hidden: list[Path] = []
    with named_os_errors():
        for entry in folder_entries(folder):
            if is_hidden(entry):
                hidden.append(entry)
            elif entry.is_dir():
                more, more_hidden = files_under(entry)
                files += more
                hidden += more_hidden
            elif entry.is_file():
                files.append(entry)
    return sorted(files), sorted(hidden)


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """The text of the file ``path``. Raises :class:`SiteDataError` naming it when it cannot
    be read (:func:`os_error_message`) or is not text in ``encoding``."""
    try:
        return path.read_text(encoding=encoding)
    except OSError as err:
        raise SiteDataError(os_error_message(err, path)) from None
    except UnicodeDecodeError as err:
        raise SiteDataError(
            f"{path}: not {encoding.upper()} text ({err.reason} at byte {err.start}); save it "
            "as UTF-8 text"
        ) from None
