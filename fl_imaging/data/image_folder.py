"""Find the images of a folder that has no labels: what ``fl-imaging-predict`` predicts on and
``fl-imaging-data inspect --images-only`` checks. Only names are read here, nothing is decoded."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fl_imaging.data.sites import (
    SiteDataError,
    case_id_of,
    collect_modalities,
    is_image_file,
    nhdr_data_files,
)
from fl_imaging.data.user_paths import folder_entries, is_hidden, named_os_errors

__all__ = ["find_images", "find_modality_images", "is_series"]


def is_series(folder: Path) -> bool:
    """True for a folder holding files that are not NIfTI, NRRD or 2D images (nor the data
    files of a ``.nhdr``): DICOM files, whatever their names."""
    detached = nhdr_data_files(folder)
    return any(
        p.is_file()
        and not p.name.startswith(".")
        and not is_image_file(p)
        and p.name not in detached
        for p in folder_entries(folder)
    )


def _entries_under(folder: Path) -> list[Path]:
    """Every file and folder under ``folder``, all depths, sorted; hidden ones (and what they
    hold) left out. Unlike ``Path.rglob``, a folder that cannot be read is named
    (:class:`SiteDataError`), not skipped."""
    found: list[Path] = []
    for entry in folder_entries(folder):
        if is_hidden(entry):
            continue
        found.append(entry)
        if entry.is_dir():
            found += _entries_under(entry)
    return sorted(found)


def find_images(source: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """List the (case id, image) pairs under ``source``, sorted by case id, and the problems.

    ``source`` is a site folder (its ``images/`` are used), a folder of NIfTI / NRRD / 2D image
    files and DICOM series folders (sub-folders holding image files, such as class folders, are
    searched too), or a single image file or DICOM series folder. Problems: a case id found twice
    (e.g. the same file name in two class folders), each naming both files. Raises
    :class:`SiteDataError` when ``source`` does not exist, cannot be read (naming the folder or
    file) or holds nothing to predict on.
    """
    with named_os_errors():
        return _find_images(source)


def _find_images(source: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """:func:`find_images` without its translation of ``OSError``."""
    if not source.exists():
        raise SiteDataError(
            f"{source} does not exist: give a site folder, a folder of images or an image"
        )
    folder = source / "images" if (source / "images").is_dir() else source
    if source.is_file() or (folder == source and is_series(source)):
        return [(case_id_of(source), source)], []
    found: dict[str, Path] = {}
    series: set[Path] = set()
    problems: list[str] = []
    for entry in _entries_under(folder):
        if series.intersection(entry.parents):
            continue  # a file of a DICOM series already found
        if (entry.is_file() and is_image_file(entry)) or (entry.is_dir() and is_series(entry)):
            case_id = case_id_of(entry)
            if case_id in found:
                problems.append(
                    f"{entry}: case id {case_id} appears twice ({found[case_id]}); predictions "
                    "are named by case id: give every image its own name"
                )
                continue
            found[case_id] = entry
            if entry.is_dir():
                series.add(entry)
    if not found:
        raise SiteDataError(
            f"{folder}: no NIfTI or NRRD file, 2D image or DICOM series folder found"
        )
    return sorted(found.items()), problems


def find_modality_images(
    source: Path, modalities: Sequence[str]
) -> tuple[list[tuple[str, tuple[str, ...]]], list[str]]:
    """List the multi-modal cases under ``source``: a folder holding one sub-folder per modality
    of ``modalities`` (``MODALITY/CASE_ID.nii.gz`` or a DICOM series ``MODALITY/CASE_ID/``), or a
    site folder whose ``images/`` does.

    Returns the (case id, one path per modality in ``modalities`` order) pairs, sorted by case
    id, and the problems (:func:`~fl_imaging.data.sites.collect_modalities`: a case missing a
    modality, an unknown folder ...). Raises :class:`SiteDataError` when ``source`` is not a
    folder, cannot be read or holds no complete case.
    """
    with named_os_errors():
        return _find_modality_images(source, modalities)


def _find_modality_images(
    source: Path, modalities: Sequence[str]
) -> tuple[list[tuple[str, tuple[str, ...]]], list[str]]:
    """:func:`find_modality_images` without its translation of ``OSError``."""
    if not source.is_dir():
        raise SiteDataError(
            f"{source} is not a folder: give a folder with one sub-folder per modality "
            f"({', '.join(f'{m}/' for m in modalities)}) holding CASE_ID.nii.gz files"
        )
    folder = source / "images" if (source / "images").is_dir() else source
    problems: list[str] = []
    cases = collect_modalities(folder, list(modalities), source.name, {}, problems, set())
    if not cases and not problems:
        raise SiteDataError(f"{folder}: no case found in {', '.join(modalities)}")
    return sorted(cases.items()), problems
