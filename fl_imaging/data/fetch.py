"""Shared machinery for fetching public datasets: downloads, checksums, safe extraction.

The dataset-specific fetchers and layout checks live beside their adapters
(:mod:`fl_imaging.data.datasets.msd_download`, :mod:`~fl_imaging.data.datasets.medmnist_download`,
:mod:`~fl_imaging.data.datasets.class_folders_download`); they all use this module, and the
download scripts (``scripts/download_*.py``) use its parser, error and report helpers.

Every download goes to ``NAME.part`` first (a second run resumes it where the server allows),
is checked against its published MD5 and only then takes its final name. Archives are unpacked
into a hidden staging folder inside OUT, refusing members with absolute paths, ``..`` or links,
and moved into place only when the whole archive unpacked and the layout checks pass, so a
failed run leaves no half-extracted dataset behind. macOS junk (``._*``, ``.DS_Store``,
``__MACOSX/``) is deleted after extraction.

Only the standard library is used.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

__all__ = [
    "ChecksumError",
    "DownloadError",
    "Fetched",
    "UnsafeArchiveError",
    "download_file",
    "extract_archive",
    "listing",
    "macos_junk_names",
    "md5_of",
    "remove_macos_junk",
    "report_layout",
    "require_out_or_check",
    "say",
    "script_main",
    "script_parser",
    "staging",
    "unpacked_top",
    "verify_md5",
]

# --------------------------------------------------------------------------------------------
# Errors and results
# --------------------------------------------------------------------------------------------


class DownloadError(RuntimeError):
    """A download, checksum, extraction or layout step failed; the message says what to do."""


class ChecksumError(DownloadError):
    """A file's MD5 is not the published one."""


class UnsafeArchiveError(DownloadError):
    """An archive holds a member that would land outside the target folder (or a link)."""


@dataclass(frozen=True)
class Fetched:
    """What a ``fetch_*`` call produced.

    ``path`` is what to give fl-imaging (a task folder, a folder of ``.npz`` files or a folder
    of class folders); ``downloaded`` is False when a complete copy was already there;
    ``junk_removed`` counts the macOS junk files deleted after extraction.
    """

    path: Path
    downloaded: bool
    junk_removed: int = 0


def say(message: str, quiet: bool) -> None:
    """Print ``message`` to stderr (a progress note for the user) unless ``quiet``; return None."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def listing(names: list[str], limit: int = 3) -> str:
    """Return ``names`` shortened for a message: ``a, b, c and 4 more`` (at most ``limit``
    names shown)."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


# --------------------------------------------------------------------------------------------
# Checksums and downloads
# --------------------------------------------------------------------------------------------


def md5_of(path: Path, chunk_size: int = 1 << 20) -> str:
    """Return the MD5 of the file at ``path`` as 32 lower-case hex digits (read in chunks)."""
    digest = hashlib.md5()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: Path, expected: str) -> None:
    """Check that the file at ``path`` has MD5 ``expected``; return None when it does.

    Raises :class:`ChecksumError` naming the file, the expected and the actual checksum, and
    telling the user to delete the file and run again.
    """
    path = Path(path)
    actual = md5_of(path)
    if actual != expected.strip().lower():
        raise ChecksumError(
            f"MD5 mismatch for {path}: expected {expected.strip().lower()}, got {actual}. "
            "The file is damaged, incomplete or not the published one. "
            f"Delete it ({path}) and run the download again."
        )


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class _Progress:
    """A ``name: done / total (pct)`` line on stderr: rewritten in place on a terminal, one
    line per 10% (or per 100 MB when the total is unknown) otherwise."""

    def __init__(self, name: str, total: int | None, done: int, quiet: bool) -> None:
        self.name, self.total, self.quiet = name, total, quiet
        self.tty = not quiet and sys.stderr.isatty()
        self.last_time = 0.0
        self.last_step = self._step(done)
        self.printed = -1  # bytes shown on the last full line (non-terminal output)

    def _step(self, done: int) -> int:
        if self.total:
            return done * 10 // self.total
        return done // (100 << 20)

    def _line(self, done: int) -> str:
        if self.total:
            pct = 100.0 * done / self.total
            return f"  {self.name}: {_human(done)} / {_human(self.total)} ({pct:.0f}%)"
        return f"  {self.name}: {_human(done)}"

    def update(self, done: int) -> None:
        if self.quiet:
            return
        if self.tty:
            now = time.monotonic()
            if now - self.last_time >= 0.2:
                self.last_time = now
                print("\r" + self._line(done), end="", file=sys.stderr, flush=True)
        elif (step := self._step(done)) > self.last_step:
            self.last_step, self.printed = step, done
            print(self._line(done), file=sys.stderr, flush=True)

    def finish(self, done: int) -> None:
        if self.quiet:
            return
        if self.tty:
            print("\r" + self._line(done), file=sys.stderr, flush=True)
        elif self.printed != done:
            print(self._line(done), file=sys.stderr, flush=True)


def _open(url: str, start: int) -> tuple[BinaryIO, int | None, bool]:
    """Open ``url`` asking for bytes from ``start`` on; return the response, the number of
    bytes it will send (None if unknown) and whether it honoured the range (resumed)."""
    headers = {"User-Agent": "fl-imaging-download/0.1"}
    if start:
        headers["Range"] = f"bytes={start}-"
    response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    length = response.headers.get("Content-Length")
    resumed = bool(start) and getattr(response, "status", None) == 206
    return response, (int(length) if length and length.isdigit() else None), resumed


def download_file(url: str, dest: Path, md5: str, *, quiet: bool = False) -> Path:
    """Download ``url`` to ``dest`` and check its MD5; return ``dest``.

    The bytes go to ``dest`` + ``.part`` first; a run that finds a ``.part`` file asks the
    server for the rest (HTTP range request) and starts over if the server will not resume.
    Only a file whose MD5 equals ``md5`` is renamed to ``dest``. If ``dest`` already exists it
    is checked and reused. A progress line (bytes done / total) goes to stderr unless
    ``quiet``. ``file://`` URLs work too (for mirrors and tests).

    Raises :class:`ChecksumError` when the MD5 differs (the bad file is kept under its name,
    and the message says to delete it) and :class:`DownloadError` when the transfer fails (the
    ``.part`` file is kept, so running again resumes).
    """
    dest = Path(dest)
    if dest.exists():
        say(f"{dest.name}: already downloaded, checking its MD5", quiet)
        verify_md5(dest, md5)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    say(
        f"downloading {url}\n  to {dest}" + (f" (resuming at {_human(start)})" if start else ""),
        quiet,
    )
    done = 0
    try:
        try:
            response, length, resumed = _open(url, start)
        except urllib.error.HTTPError as error:
            if error.code != 416 or not start:  # 416: nothing left to send, the .part is whole
                raise
            response, length, resumed = None, 0, True
        if not resumed:
            start = 0
        total = start + length if length is not None else None
        done = start
        progress = _Progress(dest.name, total, done, quiet)
        if response is not None:
            with response, part.open("ab" if resumed else "wb") as handle:
                while chunk := response.read(1 << 20):
                    handle.write(chunk)
                    done += len(chunk)
                    progress.update(done)
        progress.finish(done)
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error
        kept = f"; the partial file {part} is kept: run again to resume" if part.exists() else ""
        raise DownloadError(f"could not download {url}: {reason}{kept}") from error
    if total is not None and done != total:
        raise DownloadError(
            f"download of {url} stopped at {done} of {total} bytes; "
            f"the partial file {part} is kept: run again to resume"
        )
    verify_md5(part, md5)
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------------------------
# Safe extraction
# --------------------------------------------------------------------------------------------


def _unsafe_name(name: str) -> str | None:
    """Why an archive member name is unsafe to extract, or None when it is fine."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(posix).parts:
        return "'..' in its path"
    return None


def extract_archive(archive: Path, dest: Path) -> Path:
    """Unpack a ``.tar``, ``.tar.gz`` / ``.tgz`` or ``.zip`` archive into folder ``dest``.

    Every member is checked before anything is written: absolute paths, ``..`` components,
    links and device files raise :class:`UnsafeArchiveError` naming the member (nothing is
    extracted then). Returns ``dest``. Raises :class:`DownloadError` for a file that is neither
    a tar nor a zip archive.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if reason := _unsafe_name(info.filename):
                    raise UnsafeArchiveError(
                        f"{archive}: refusing member {info.filename!r} ({reason}); "
                        "nothing was extracted"
                    )
            zf.extractall(dest)
        return dest
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as tf:
            members = tf.getmembers()
            for member in members:
                reason = _unsafe_name(member.name)
                if reason is None and (member.issym() or member.islnk()):
                    reason = "a link"
                if reason is None and not (member.isfile() or member.isdir()):
                    reason = "not a regular file or folder"
                if reason:
                    raise UnsafeArchiveError(
                        f"{archive}: refusing member {member.name!r} ({reason}); "
                        "nothing was extracted"
                    )
            tf.extractall(dest, members=members, filter="data")
        return dest
    raise DownloadError(f"{archive} is neither a tar nor a zip archive")


def remove_macos_junk(root: Path) -> int:
    """Delete macOS junk under ``root``: AppleDouble ``._*`` files, ``.DS_Store`` files and
    ``__MACOSX`` folders. Returns how many files were deleted (those inside ``__MACOSX``
    included)."""
    removed = 0
    for dirpath, dirnames, filenames in os.walk(root):
        if "__MACOSX" in dirnames:
            dirnames.remove("__MACOSX")
            junk_dir = Path(dirpath) / "__MACOSX"
            removed += sum(len(files) for _, _, files in os.walk(junk_dir))
            shutil.rmtree(junk_dir)
        for name in filenames:
            if name.startswith("._") or name == ".DS_Store":
                (Path(dirpath) / name).unlink()
                removed += 1
    return removed


def macos_junk_names(folder: Path) -> list[str]:
    """Return the sorted names of the macOS AppleDouble ``._*`` entries directly in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("._"))


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """Yield a hidden scratch folder inside ``out`` (same file system, so moves out of it are
    renames), removed with whatever is left in it however the block ends."""
    stage = Path(tempfile.mkdtemp(prefix=".fl-imaging-extract-", dir=out))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def unpacked_top(stage: Path, expected: str) -> Path:
    """Return the folder an archive unpacked to: ``stage/expected``, or the only folder there.

    Raises :class:`DownloadError` naming what is there when it is neither.
    """
    if (stage / expected).is_dir():
        return stage / expected
    folders = [p for p in stage.iterdir() if p.is_dir()]
    if len(folders) == 1:
        return folders[0]
    found = listing(sorted(p.name for p in stage.iterdir())) or "nothing"
    raise DownloadError(f"the archive did not unpack to a folder {expected}/ (found: {found})")


# --------------------------------------------------------------------------------------------
# The download scripts (scripts/download_*.py)
# --------------------------------------------------------------------------------------------


def script_parser(
    prog: str, description: str, *, out_help: str, check_help: str
) -> argparse.ArgumentParser:
    """A download script's parser with the options they all have: ``--out DIR`` (where to
    download to), ``--check DIR`` (only check a folder) and ``--quiet``; the script adds its own.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", type=Path, help=out_help)
    parser.add_argument("--check", type=Path, metavar="DIR", help=check_help)
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def require_out_or_check(
    parser: argparse.ArgumentParser, args: argparse.Namespace, what: str = ""
) -> None:
    """Stop with a usage error (exit status 2) unless ``--out`` or ``--check`` was given;
    ``what`` ends the message ``give --out DIR to download, or --check DIR to check``."""
    if args.check is None and args.out is None:
        parser.error(f"give --out DIR to download, or --check DIR to check{what}")


def script_main(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Decorate a download script's ``main(argv) -> exit status``: a :class:`DownloadError`
    (failed download, wrong checksum, unsafe archive, ...) is printed to stderr as
    ``error: ...`` and gives exit status 1 instead of a traceback."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except DownloadError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1

    return run


def report_layout(summary: str, problems: list[str], data_root: Path) -> int:
    """Print a layout check's outcome to stdout for the download scripts.

    Prints ``summary``, then either the ``problems`` (and returns 1) or ``layout OK`` and the
    ``data.root=...`` setting that points fl-imaging at ``data_root`` (and returns 0).
    """
    print(summary)
    if problems:
        print("layout problems:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print("layout OK")
    print(f"pass it to fl-imaging as: data.root={Path(data_root).resolve()}")
    return 0
