"""Fetch a MedNIST-style set of 2D class folders and check a class-folder layout.

The archive (RSNA / MIDL-C ``MedNIST_64x64_500.zip`` or MONAI's ``MedNIST.tar.gz``) is checked
against its published MD5, unpacked safely and rid of macOS junk (see
:mod:`fl_imaging.data.fetch`), and flattened so that the class folders sit directly in OUT, the
layout the class-folder adapter (:mod:`fl_imaging.data.datasets.class_folders`) reads::

      OUT/<ClassName>/*.jpg | *.jpeg

``scripts/download_mednist.py`` is the command line for this module. Only the standard library
is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fl_imaging.data.fetch import (
    DownloadError,
    Fetched,
    download_file,
    extract_archive,
    listing,
    macos_junk_names,
    remove_macos_junk,
    say,
    staging,
    unpacked_top,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "MEDNIST_SOURCES",
    "ArchiveSource",
    "class_folder_layout_problems",
    "class_folder_summary",
    "fetch_mednist",
]

# --------------------------------------------------------------------------------------------
# Sources and their published checksums
# --------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
"""File endings counted as images in a class folder (case-insensitive)."""


@dataclass(frozen=True)
class ArchiveSource:
    """One downloadable archive of class folders.

    ``url`` and ``md5`` say where it is and what it must hash to, ``filename`` what it is saved
    as, and ``top_folder`` the folder it unpacks to, whose sub-folders are the classes.
    """

    url: str
    md5: str
    filename: str
    top_folder: str
    description: str = ""


MEDNIST_SOURCES: dict[str, ArchiveSource] = {
    "rsna-64x64-500": ArchiveSource(
        url=(
            "https://github.com/slowvak/MIDL-C/raw/e178a530ccbd2f6205cc1dd665fc47eb2d4d5cb8/"
            "MedNIST_64x64_500.zip"
        ),
        md5="af03d2cfbd746c9ebf0b28a929dc69b3",
        filename="MedNIST_64x64_500.zip",
        top_folder="MedNIST_64x64_500",
        description=(
            "RSNA / MIDL-C MedNIST, 6 classes x 500 64x64 JPEGs "
            "(CTAbd, CTChest, CTHead, CXR, MRBrain, MRBreast), 3.3 MB"
        ),
    ),
    "monai": ArchiveSource(
        url=(
            "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
            "MedNIST.tar.gz"
        ),
        # as listed in MONAI's MedNISTDataset (monai/apps/datasets.py)
        md5="0bc7306e7427e00ad1c5526a6677552d",
        filename="MedNIST.tar.gz",
        top_folder="MedNIST",
        description=(
            "MONAI MedNIST, 6 classes of 64x64 JPEGs "
            "(AbdomenCT, BreastMRI, CXR, ChestCT, Hand, HeadCT), about 60 MB"
        ),
    ),
}

# --------------------------------------------------------------------------------------------
# Layout check
# --------------------------------------------------------------------------------------------


def _class_folders(root: Path) -> list[Path]:
    """The class folders the class-folder adapter reads: sub-folders not starting with ``.``
    or ``_`` (``__MACOSX`` included)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name[0] not in "._")


def _image_names(folder: Path) -> list[str]:
    return [
        p.name
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    ]


def class_folder_layout_problems(root: Path) -> list[str]:
    """Check a folder of 2D class folders: ``root/<ClassName>/*.jpg`` (or .jpeg, .png, ...).

    Wants at least 2 class folders (names not starting with ``.`` or ``_``), each with at least
    one image file and nothing but image files, and no macOS ``._`` files: what the
    class-folder adapter (:func:`fl_imaging.data.datasets.load_class_folders`) reads. Returns
    the problems found, one sentence each; an empty list means the layout is right. Images are
    not decoded.
    """
    root = Path(root)
    if not root.is_dir():
        return [f"{root} is not a folder"]
    classes = _class_folders(root)
    problems = []
    if len(classes) < 2:
        named = f" ({classes[0].name})" if classes else ""
        problem = f"{root} holds {len(classes)} class folder(s){named}; at least 2 are needed"
        if len(classes) == 1 and len(_class_folders(classes[0])) >= 2:
            problem += (
                f". {classes[0]} has sub-folders: pass that folder instead, or move its "
                "sub-folders up"
            )
        problems.append(problem)
    empty = [c.name for c in classes if not _image_names(c)]
    if empty:
        problems.append(
            f"{len(empty)} class folder(s) hold no image files "
            f"({', '.join(IMAGE_SUFFIXES)}): {listing(empty)}"
        )
    junk = sum(len(macos_junk_names(c)) for c in classes)
    if junk:
        problems.append(
            f"{junk} macOS '._' file(s) in the class folders: delete them, they are not images"
        )
    # the adapter refuses anything else in a class folder, so the check must too
    stray = [
        f"{c.name}/{p.name}"
        for c in classes
        for p in sorted(c.iterdir())
        if not p.name.startswith(".") and not (p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    ]
    if stray:
        problems.append(
            f"{len(stray)} entry(ies) in the class folders are not image files "
            f"({', '.join(IMAGE_SUFFIXES)}): {listing(stray)}; move them out"
        )
    return problems


def class_folder_summary(root: Path) -> str:
    """One line on a folder of class folders: each class with its number of images."""
    root = Path(root)
    if not root.is_dir():
        return f"{root}: not a folder"
    counts = {c.name: len(_image_names(c)) for c in _class_folders(root)}
    listed = ", ".join(f"{name} {n}" for name, n in counts.items())
    return f"{root}: {len(counts)} class folder(s), {sum(counts.values())} images" + (
        f" ({listed})" if listed else ""
    )


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------


def fetch_mednist(
    source: str | ArchiveSource,
    out: Path,
    *,
    keep_archive: bool = False,
    quiet: bool = False,
) -> Fetched:
    """Download a MedNIST-style archive into ``out`` and unpack it to ``out/<Class>/*.jpg``.

    ``source`` is a key of :data:`MEDNIST_SOURCES` (``"rsna-64x64-500"``, ``"monai"``) or an
    :class:`ArchiveSource`. The archive's top folder is flattened away, so the class folders
    land directly in ``out``; macOS junk is deleted. The archive is deleted afterwards unless
    ``keep_archive``. An ``out`` that already holds a valid class-folder layout is reused.

    Returns a :class:`Fetched` whose ``path`` is ``out``. Raises :class:`DownloadError` (or a
    subclass) on failure, moving no class folder into ``out`` then.
    """
    if isinstance(source, str):
        if source not in MEDNIST_SOURCES:
            raise DownloadError(
                f"unknown MedNIST source {source!r}: choose one of {', '.join(MEDNIST_SOURCES)}"
            )
        source = MEDNIST_SOURCES[source]
    out = Path(out)
    if out.is_dir() and _class_folders(out) and not class_folder_layout_problems(out):
        say(f"{out} already holds class folders", quiet)
        return Fetched(out, downloaded=False)
    out.mkdir(parents=True, exist_ok=True)
    archive = download_file(source.url, out / source.filename, source.md5, quiet=quiet)
    say(f"unpacking {archive.name}", quiet)
    with staging(out) as stage:
        extract_archive(archive, stage)
        removed = remove_macos_junk(stage)
        top = unpacked_top(stage, source.top_folder)
        problems = class_folder_layout_problems(top)
        if problems:
            raise DownloadError(
                f"{archive.name} did not unpack to class folders: {'; '.join(problems)}"
            )
        classes = _class_folders(top)
        clashes = [c.name for c in classes if (out / c.name).exists()]
        if clashes:
            raise DownloadError(
                f"{out} already has {listing(clashes)}: use an empty folder, or move those away"
            )
        for folder in classes:
            os.replace(folder, out / folder.name)
    say(f"removed {removed} macOS junk file(s) from the unpacked archive", quiet)
    if not keep_archive:
        archive.unlink()
    return Fetched(out, downloaded=True, junk_removed=removed)
