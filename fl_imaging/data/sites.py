"""Find the cases of one hospital site folder and split them into train and validation.

A site folder holds::

    images/CASE_ID.nii.gz | CASE_ID.nii   NIfTI volumes
    images/CASE_ID/                       one DICOM series per folder (any file names)
    images/CASE_ID.png | .jpg             2D images (2D tasks)
    labels/CASE_ID.nii.gz                 segmentation masks, paired with images by case id
    labels.csv                            classification labels: ``case_id,label[,split]``
    images/CLASS_NAME/...                 classification without labels.csv: one sub-folder
                                          per class, holding the images (or DICOM series) above
    split.csv                             optional ``case_id,split`` (train / val / test)

Only file names are read here; decoding is MONAI's job (see ``tasks``). Every problem found is
reported with the site and the file, and nothing is skipped silently.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fl_imaging.config import TaskName

__all__ = [
    "IMAGE_2D_SUFFIXES",
    "NIFTI_SUFFIXES",
    "Case",
    "SiteData",
    "SiteDataError",
    "case_id_of",
    "find_cases",
    "is_image_file",
    "load_site",
    "scan_site",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: 2D image files read by MONAI's PILReader.
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")


class SiteDataError(ValueError):
    """A site folder that cannot be trained on as it is; the message says what to fix."""


@dataclass(frozen=True)
class Case:
    """One case: ``image`` is a NIfTI file or a DICOM series folder; ``label`` a mask path
    (segmentation) or a class index (classification); ``split`` train/val/test or None."""

    case_id: str
    image: str
    label: str | int
    split: str | None = None

    def as_dict(self) -> dict[str, str | int]:
        """Return the MONAI dictionary form ``{"image": ..., "label": ..., "case_id": ...}``."""
        return {"image": self.image, "label": self.label, "case_id": self.case_id}


@dataclass
class SiteData:
    """The cases of one site, split: ``train`` and ``val`` lists of :class:`Case`."""

    name: str
    root: Path
    train: list[Case] = field(default_factory=list)
    val: list[Case] = field(default_factory=list)
    test: list[Case] = field(default_factory=list)

    @property
    def num_cases(self) -> int:
        return len(self.train) + len(self.val) + len(self.test)


def case_id_of(path: Path) -> str:
    """The case id of an image path: its name without the NIfTI or image suffix."""
    for suffix in (*NIFTI_SUFFIXES, *IMAGE_2D_SUFFIXES):
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def is_image_file(path: Path) -> bool:
    """True for a NIfTI file or a 2D image file (by its suffix)."""
    return path.name.lower().endswith((*NIFTI_SUFFIXES, *IMAGE_2D_SUFFIXES))


def _collect_images(folder: Path, images: dict[str, Path], problems: list[str]) -> list[str]:
    """Add the images of ``folder`` (files, or DICOM series sub-folders) to ``images`` by case
    id; return the case ids added. Unknown files and duplicated ids go to ``problems``."""
    added: list[str] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() or is_image_file(entry):
            case_id = case_id_of(entry)
            if case_id in images:
                problems.append(
                    f"{entry}: case id {case_id} appears twice ({images[case_id]}); "
                    "give every case its own id"
                )
                continue
            images[case_id] = entry
            added.append(case_id)
        else:
            problems.append(
                f"{entry}: not a NIfTI file (.nii, .nii.gz), a 2D image (.png, .jpg ...) "
                f"nor a DICOM series folder; move it out of {folder}"
            )
    return added


def _read_csv(path: Path, site: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise SiteDataError(
                f"[site {site}] {path}: missing column(s) {', '.join(missing)}; "
                f"the header must start with {','.join(columns)}"
            )
        return list(reader)


def find_cases(
    root: Path, task: TaskName, site: str | None = None, class_names: list[str] | None = None
) -> list[Case]:
    """List the cases of a site folder without decoding any image.

    Takes the site folder, the task name (``segmentation`` or ``classification``), a site name
    for messages and, for class sub-folders, the class names in index order; returns the cases
    sorted by case id. Raises :class:`SiteDataError` listing every problem found by
    :func:`scan_site`.
    """
    site = site or root.name
    cases, problems = scan_site(root, task, site, class_names)
    if problems:
        raise SiteDataError(
            f"[site {site}] {len(problems)} problem(s) in {root}:\n  - " + "\n  - ".join(problems)
        )
    return cases


def scan_site(
    root: Path, task: TaskName, site: str | None = None, class_names: list[str] | None = None
) -> tuple[list[Case], list[str]]:
    """List a site folder's complete cases and every problem of its layout, without decoding.

    Classification labels come from ``labels.csv`` or, without it, from class sub-folders of
    ``images/``: class k is ``class_names[k]`` when given, else the k-th folder name in sorted
    order. Returns (cases with both image and label, sorted by case id; problems, each naming the
    file). Problems: an unknown file in ``images/``, a duplicated case id, an image without a
    label, a label without an image, a class label that is not an integer, an unknown class
    folder, an unknown split. A missing or empty folder raises :class:`SiteDataError` at once,
    since nothing else can be checked.
    """
    site = site or root.name
    images_dir = root / "images"
    if not root.is_dir():
        raise SiteDataError(f"[site {site}] site folder {root} does not exist: check the path")
    if not images_dir.is_dir():
        raise SiteDataError(
            f"[site {site}] {images_dir} is missing: put the site's NIfTI files or DICOM series "
            "folders in an images/ sub-folder (see the README's site layout)"
        )
    images: dict[str, Path] = {}
    problems: list[str] = []
    labels: dict[str, str | int] = {}
    class_folders = task != TaskName.segmentation and not (root / "labels.csv").is_file()
    if class_folders:
        _scan_class_folders(images_dir, class_names, images, labels, problems)
    else:
        _collect_images(images_dir, images, problems)
    if not images and not problems:
        raise SiteDataError(f"[site {site}] {images_dir} is empty: no NIfTI file or DICOM folder")

    splits: dict[str, str] = {}
    split_file = root / "split.csv"
    if split_file.is_file():
        for row in _read_csv(split_file, site, ("case_id", "split")):
            splits[row["case_id"]] = row["split"].strip().lower()

    if task == TaskName.segmentation:
        labels_dir = root / "labels"
        if not labels_dir.is_dir():
            raise SiteDataError(
                f"[site {site}] {labels_dir} is missing: segmentation needs one NIfTI mask per "
                "image, named like the image, in labels/"
            )
        for entry in sorted(labels_dir.iterdir()):
            if entry.name.endswith(NIFTI_SUFFIXES):
                labels[case_id_of(entry)] = str(entry)
        for case_id in sorted(set(labels) - set(images)):
            problems.append(f"{labels[case_id]}: label without an image (no images/{case_id}*)")
    elif not class_folders:
        labels_csv = root / "labels.csv"
        for line, row in enumerate(_read_csv(labels_csv, site, ("case_id", "label")), start=2):
            try:
                labels[row["case_id"]] = int(row["label"])
            except ValueError:
                problems.append(
                    f"{labels_csv} line {line}: label {row['label']!r} of case {row['case_id']} "
                    "is not an integer class index"
                )
            if row.get("split"):
                splits[row["case_id"]] = row["split"].strip().lower()
    for case_id in sorted(set(images) - set(labels)):
        problems.append(f"{images[case_id]}: image without a label (case id {case_id})")
    for case_id, split in sorted(splits.items()):
        if split not in SPLITS:
            problems.append(f"split of case {case_id} is {split!r}: use one of {', '.join(SPLITS)}")
    complete = sorted(set(images) & set(labels))
    return [Case(c, str(images[c]), labels[c], splits.get(c)) for c in complete], problems


def _scan_class_folders(
    images_dir: Path,
    class_names: list[str] | None,
    images: dict[str, Path],
    labels: dict[str, str | int],
    problems: list[str],
) -> None:
    """Classification without labels.csv: ``images/CLASS/`` holds the cases of each class."""
    folders = sorted(p for p in images_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = [p for p in images_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
    series = [
        f
        for f in folders
        if any(
            p.is_file() and not p.name.startswith(".") and not is_image_file(p) for p in f.iterdir()
        )
    ]
    if loose or series or not folders:
        if loose:
            why = f"; {sorted(loose)[0]} lies directly in images/, outside any class folder"
        elif series:
            other = next(
                p
                for p in sorted(series[0].iterdir())
                if p.is_file() and not p.name.startswith(".") and not is_image_file(p)
            )
            why = (
                f"; {other} is not a NIfTI or 2D image, so {series[0].name}/ was read as a "
                "DICOM series (one case), not as a class folder"
            )
        else:
            why = ""
        raise SiteDataError(
            f"{images_dir.parent / 'labels.csv'} is missing: classification needs a labels.csv "
            "with columns case_id,label, or one sub-folder of images/ per class holding that "
            f"class's images (NIfTI, 2D images or DICOM series folders){why}"
        )
    names = list(class_names) if class_names else [p.name for p in folders]
    for folder in folders:
        if folder.name not in names:
            problems.append(
                f"{folder}: class folder {folder.name!r} is not one of the configured classes "
                f"{names} (task.class_names); rename it or add the class"
            )
            continue
        for case_id in _collect_images(folder, images, problems):
            labels[case_id] = names.index(folder.name)


def load_site(
    root: Path,
    task: TaskName,
    *,
    val_fraction: float,
    seed: int,
    name: str | None = None,
    cases: list[Case] | None = None,
    class_names: list[str] | None = None,
) -> SiteData:
    """Find a site's cases (or take ``cases``, already checked) and split them.

    Cases with an explicit split keep it; the others are split at random (seeded by ``seed``) so
    that a fraction ``val_fraction`` of them, at least one, goes to validation. Returns the
    :class:`SiteData`; raises :class:`SiteDataError` when the site cannot give at least one
    training and one validation case.
    """
    name = name or root.name
    cases = find_cases(root, task, name, class_names) if cases is None else cases
    site = SiteData(name=name, root=root)
    unassigned = [c for c in cases if c.split is None]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(unassigned))
    n_val = max(1, round(val_fraction * len(unassigned))) if unassigned else 0
    val_ids = {unassigned[i].case_id for i in order[:n_val]}
    for case in cases:
        split = case.split or ("val" if case.case_id in val_ids else "train")
        getattr(site, split).append(case)
    if not site.train or not site.val:
        raise SiteDataError(
            f"[site {name}] {root}: {len(site.train)} training and {len(site.val)} validation "
            "case(s); each site needs at least one of each: add cases or change split.csv"
        )
    return site
