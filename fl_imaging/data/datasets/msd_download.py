"""Fetch a Medical Segmentation Decathlon (MSD) task and check its folder layout.

The task tars come from MONAI's mirror on AWS and are checked against MONAI's published MD5s;
unpacked safely (see :mod:`fl_imaging.data.fetch`) and rid of the macOS ``._*`` files the
official tars carry, they give the layout the MSD adapter (:mod:`fl_imaging.data.datasets.msd`)
reads::

      OUT/Task04_Hippocampus/dataset.json
      OUT/Task04_Hippocampus/imagesTr/*.nii.gz
      OUT/Task04_Hippocampus/labelsTr/*.nii.gz      (imagesTs/ too, unlabelled)

``scripts/download_msd.py`` is the command line for this module. Only the standard library is
used.
"""

from __future__ import annotations

import json
import os
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

__all__ = ["MSD_MD5", "MSD_URL", "fetch_msd_task", "msd_layout_problems", "msd_summary"]

# --------------------------------------------------------------------------------------------
# Source and its published checksums
# --------------------------------------------------------------------------------------------

MSD_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com/{task}.tar"
"""Where MONAI's mirror of each MSD task tar lives (``{task}`` e.g. ``Task04_Hippocampus``)."""

# MD5 of each task tar, as listed in MONAI's DecathlonDataset (monai/apps/datasets.py).
MSD_MD5: dict[str, str] = {
    "Task01_BrainTumour": "240a19d752f0d9e9101544901065d872",
    "Task02_Heart": "06ee59366e1e5124267b774dbd654057",
    "Task03_Liver": "a90ec6c4aa7f6a3d087205e23d4e6397",
    "Task04_Hippocampus": "9d24dba78a72977dbd1d2e110310f31b",
    "Task05_Prostate": "35138f08b1efaef89d7424d2bcc928db",
    "Task06_Lung": "8afd997733c7fc0432f71255ba4e52dc",
    "Task07_Pancreas": "4f7080cfca169fa8066d17ce6eb061e4",
    "Task08_HepaticVessel": "641d79e80ec66453921d997fbf12a29c",
    "Task09_Spleen": "410d4a301da4e5b2f6f86ec3ddba524e",
    "Task10_Colon": "bad7a188931dc2f6acf72b08eb6202d0",
}

# --------------------------------------------------------------------------------------------
# Layout check
# --------------------------------------------------------------------------------------------


def _nifti_names(folder: Path) -> list[str]:
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name.endswith((".nii.gz", ".nii")) and not p.name.startswith(".")
    )


def msd_layout_problems(root: Path) -> list[str]:
    """Check an MSD task folder (``root`` = e.g. ``OUT/Task04_Hippocampus``).

    Looks for ``dataset.json`` with a ``training`` list whose files exist, NIfTI images in
    ``imagesTr/``, a label of the same name in ``labelsTr/`` for each, and no macOS ``._``
    files. Returns the problems found, one sentence each; an empty list means the layout is
    right. Nothing is decoded.
    """
    root = Path(root)
    if not root.is_dir():
        return [f"{root} is not a folder"]
    problems: list[str] = []
    meta = root / "dataset.json"
    if not meta.is_file():
        problems.append(f"{meta} is missing")
    else:
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError) as error:
            info = None
            problems.append(f"{meta} is not readable JSON: {error}")
        if info is not None:
            training = info.get("training") if isinstance(info, dict) else None
            if not isinstance(training, list):
                problems.append(f"{meta} has no 'training' list")
            else:
                missing = []
                for entry in training:
                    if not isinstance(entry, dict):
                        problems.append(f"{meta}: training entry {entry!r} is not an object")
                        break
                    for key in ("image", "label"):
                        rel = entry.get(key)
                        if not isinstance(rel, str) or not (root / rel).is_file():
                            missing.append(str(rel))
                if missing:
                    problems.append(
                        f"{meta} lists {len(missing)} file(s) that are not there: "
                        f"{listing(missing)}"
                    )
    images: list[str] = []
    labels: list[str] = []
    for sub in ("imagesTr", "labelsTr"):
        folder = root / sub
        if not folder.is_dir():
            problems.append(f"{folder}/ is missing")
            continue
        names = _nifti_names(folder)
        if sub == "imagesTr":
            images = names
            if not names:
                problems.append(f"{folder}/ holds no .nii.gz images")
        else:
            labels = names
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        if (root / sub).is_dir() and (junk := macos_junk_names(root / sub)):
            problems.append(
                f"{root / sub}/ holds {len(junk)} macOS '._' file(s) ({listing(junk)}): "
                "delete them, they are not NIfTI"
            )
    if images and (root / "labelsTr").is_dir():
        unlabelled = sorted(set(images) - set(labels))
        if unlabelled:
            problems.append(
                f"{len(unlabelled)} image(s) in imagesTr/ have no label of the same name in "
                f"labelsTr/: {listing(unlabelled)}"
            )
        orphans = sorted(set(labels) - set(images))
        if orphans:
            problems.append(
                f"{len(orphans)} label(s) in labelsTr/ have no image in imagesTr/: "
                f"{listing(orphans)}"
            )
    return problems


def msd_summary(root: Path) -> str:
    """One line on what an MSD task folder holds: the dataset name from ``dataset.json``, its
    number of training entries and the NIfTI files in ``imagesTr/``, ``labelsTr/``,
    ``imagesTs/``."""
    root = Path(root)
    parts = []
    try:
        info = json.loads((root / "dataset.json").read_text())
        parts.append(
            f"dataset.json: {info.get('name', '?')!r}, {len(info.get('training', []))} "
            "training entries"
        )
    except (OSError, ValueError, AttributeError, TypeError):
        parts.append("dataset.json: unreadable or missing")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        if (root / sub).is_dir():
            parts.append(f"{sub}/: {len(_nifti_names(root / sub))} NIfTI files")
    return f"{root}: " + "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------


def fetch_msd_task(
    task: str,
    out: Path,
    *,
    url: str | None = None,
    md5: str | None = None,
    keep_archive: bool = False,
    quiet: bool = False,
) -> Fetched:
    """Download one MSD task tar into ``out``, check it and unpack it to ``out/<task>/``.

    ``task`` is e.g. ``"Task04_Hippocampus"``; ``url`` and ``md5`` default to MONAI's AWS
    mirror and MONAI's published checksum (both must be given for a task not in
    :data:`MSD_MD5`). macOS ``._`` files are deleted after extraction. The tar is deleted
    afterwards unless ``keep_archive``. A complete ``out/<task>/`` is reused as it is.

    Returns a :class:`Fetched` whose ``path`` is the task folder. Raises
    :class:`DownloadError` (or its subclasses) on failure, leaving no ``out/<task>/``.
    """
    if md5 is None:
        if task not in MSD_MD5:
            raise DownloadError(
                f"unknown MSD task {task!r}: choose one of {', '.join(MSD_MD5)} "
                "(or give both a URL and its MD5)"
            )
        md5 = MSD_MD5[task]
    url = url or MSD_URL.format(task=task)
    out = Path(out)
    final = out / task
    if final.exists():
        problems = msd_layout_problems(final)
        if not problems:
            say(f"{final} is already there and complete", quiet)
            return Fetched(final, downloaded=False)
        raise DownloadError(
            f"{final} exists but is not a complete MSD task ({problems[0]}); "
            "move or delete it and run again"
        )
    out.mkdir(parents=True, exist_ok=True)
    archive = download_file(url, out / f"{task}.tar", md5, quiet=quiet)
    say(f"unpacking {archive.name}", quiet)
    with staging(out) as stage:
        extract_archive(archive, stage)
        removed = remove_macos_junk(stage)
        unpacked = unpacked_top(stage, task)
        problems = msd_layout_problems(unpacked)
        if problems:
            raise DownloadError(
                f"{archive.name} did not unpack to an MSD task layout: {'; '.join(problems)}"
            )
        os.replace(unpacked, final)
    say(f"removed {removed} macOS junk file(s) ('._*') from the unpacked task", quiet)
    if not keep_archive:
        archive.unlink()
    return Fetched(final, downloaded=True, junk_removed=removed)
