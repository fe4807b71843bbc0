"""Find the cases of one hospital site folder and split them into train and validation.

A site folder holds::

    images/CASE_ID.nii.gz | CASE_ID.nii   NIfTI volumes (or NRRD: CASE_ID.nrrd | CASE_ID.nhdr)
    images/CASE_ID/                       one DICOM series per folder (any file names)
    images/CASE_ID.png | .jpg             2D images (2D tasks)
    images/MODALITY/CASE_ID.nii.gz        multi-modal cases (``data.modalities``): one folder per
    images/MODALITY/CASE_ID/              modality, each holding every case (file or DICOM series),
                                          stacked as channels in ``data.modalities`` order
    labels/CASE_ID.nii.gz                 segmentation masks (NIfTI or NRRD), paired with images
                                          by case id
    labels.csv                            classification labels: ``case_id,label[,split]``
    images/CLASS_NAME/...                 classification without labels.csv: one sub-folder
                                          per class, holding the images (or DICOM series) above
    split.csv                             optional ``case_id,split`` (train / val / test)

Only file names and small text files are read here (and, for a file in ``labels/`` that is not
NIfTI or NRRD, its DICOM header, to say what it is); decoding is MONAI's job (see ``tasks``).
CSV files may carry the byte-order mark Excel writes. Every problem found is reported with the site
and the file, and nothing is skipped silently.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nrrd
import numpy as np

from fl_imaging.config import TaskName
from fl_imaging.data.dicom_checks import SEG_ADVICE, describe_dicom
from fl_imaging.data.errors import SiteDataError
from fl_imaging.data.user_paths import named_os_errors

__all__ = [
    "IMAGE_2D_SUFFIXES",
    "NIFTI_SUFFIXES",
    "NRRD_SUFFIXES",
    "VOLUME_SUFFIXES",
    "Case",
    "SiteData",
    "SiteDataError",
    "SiteScan",
    "case_id_of",
    "class_folder_names",
    "collect_modalities",
    "find_cases",
    "is_image_file",
    "load_site",
    "scan_site",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: NRRD volumes, read by MONAI's NrrdReader (pynrrd); ``.nhdr`` has its data in a separate file.
NRRD_SUFFIXES = (".nrrd", ".nhdr")
#: Volume files accepted as images and as segmentation labels.
VOLUME_SUFFIXES = (*NIFTI_SUFFIXES, *NRRD_SUFFIXES)
#: 2D image files read by MONAI's PILReader.
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: The values a ``split`` column (labels.csv, split.csv) may hold, in any case.
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Case:
    """One case: ``image`` is a NIfTI file or a DICOM series folder, or for a multi-modal case
    (``data.modalities``) a tuple of them, one per modality in channel order; ``label`` a mask
    path (segmentation) or a class index (classification); ``split`` train/val/test or None."""

    case_id: str
    image: str | tuple[str, ...]
    label: str | int
    split: str | None = None

    def as_dict(self) -> dict[str, str | int | list[str]]:
        """Return the MONAI dictionary form ``{"image": ..., "label": ..., "case_id": ...}``;
        a multi-modal ``image`` is a list of paths, which MONAI's ``LoadImaged`` stacks as
        channels."""
        image = list(self.image) if isinstance(self.image, tuple) else self.image
        return {"image": image, "label": self.label, "case_id": self.case_id}


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


@dataclass
class SiteScan:
    """What the layout of a site folder holds, nothing decoded.

    ``cases``: the complete cases (image and label), sorted by case id; ``problems``: one
    sentence per problem, naming the file; ``unlabelled``: (case id, image) of the images that
    have no label, so that they can still be checked and listed (a multi-modal case: its paths);
    ``class_folders``: for classification by class sub-folders, the names of the site's class
    folders, sorted (empty with labels.csv), so that sites can be compared.
    """

    cases: list[Case]
    problems: list[str]
    unlabelled: list[tuple[str, Path | tuple[str, ...]]] = field(default_factory=list)
    class_folders: list[str] = field(default_factory=list)


def case_id_of(path: Path) -> str:
    """The case id of an image path: its name without the NIfTI, NRRD or 2D image suffix."""
    for suffix in (*VOLUME_SUFFIXES, *IMAGE_2D_SUFFIXES):
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def is_image_file(path: Path) -> bool:
    """True for a NIfTI or NRRD file or a 2D image file (by its suffix)."""
    return path.name.lower().endswith((*VOLUME_SUFFIXES, *IMAGE_2D_SUFFIXES))


def nhdr_data_files(folder: Path) -> set[str]:
    """Names of the data files that the ``.nhdr`` headers of ``folder`` point to (read with
    pynrrd), so that they are not taken for stray files."""
    names: set[str] = set()
    for header in folder.glob("*.nhdr"):
        try:
            data_file = nrrd.read_header(str(header)).get("data file")
        except Exception:  # a broken header is reported when the image is decoded
            continue
        if isinstance(data_file, str) and not data_file.upper().startswith("LIST"):
            names.add(Path(data_file.split()[0]).name)
    return names


def _collect_images(folder: Path, images: dict[str, Path], problems: list[str]) -> list[str]:
    """Add the images of ``folder`` (files, or DICOM series sub-folders) to ``images`` by case
    id; return the case ids added. Unknown files and duplicated ids go to ``problems``."""
    added: list[str] = []
    detached = nhdr_data_files(folder)
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name in detached:
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
                f"{entry}: not a NIfTI file (.nii, .nii.gz), an NRRD file (.nrrd, .nhdr), a 2D "
                f"image (.png, .jpg ...) nor a DICOM series folder; move it out of {folder}"
            )
    return added


def collect_modalities(
    images_dir: Path,
    modalities: Sequence[str],
    site: str,
    images: dict[str, Path],
    problems: list[str],
    partial: set[str],
) -> dict[str, tuple[str, ...]]:
    """Multi-modal layout: ``images/MODALITY/`` per modality of ``modalities``, each holding the
    cases as files or DICOM series folders. Returns {case id: one path per modality, in
    ``modalities`` order} for the cases that have every modality, and adds each case's first
    file to ``images`` (for the label pairing); the ids of cases missing a modality go to
    ``partial``. Problems: an images/ entry that is not one of the modality folders, a missing
    modality folder, a case missing a modality (naming the expected path), and
    what :func:`_collect_images` finds in each folder."""
    found: dict[str, dict[str, Path]] = {}
    listed = ", ".join(modalities)
    for entry in sorted(images_dir.iterdir()):
        if entry.name.startswith(".") or entry.name in modalities:
            continue
        what = "modality folder" if entry.is_dir() else "file"
        problems.append(
            f"[site {site}] {entry}: {what} {entry.name!r} is not one of the modalities "
            f"data.modalities=[{listed}]; with data.modalities set, images/ holds one folder per "
            "modality: add it to data.modalities or move it out of images/"
        )
    for modality in modalities:
        folder = images_dir / modality
        if not folder.is_dir():
            problems.append(
                f"[site {site}] {folder} is missing: modality {modality} (data.modalities="
                f"[{listed}]) needs a folder images/{modality}/ holding every case as "
                f"images/{modality}/CASE_ID.nii.gz or a DICOM series folder "
                f"images/{modality}/CASE_ID/"
            )
            continue
        paths: dict[str, Path] = {}
        _collect_images(folder, paths, problems)
        for case_id, path in paths.items():
            found.setdefault(case_id, {})[modality] = path
    complete: dict[str, tuple[str, ...]] = {}
    for case_id, paths in sorted(found.items()):
        missing = [m for m in modalities if m not in paths and (images_dir / m).is_dir()]
        for modality in missing:
            problems.append(
                f"[site {site}] case {case_id}: modality {modality} is missing: expected "
                f"{images_dir / modality / case_id}.nii.gz (or a DICOM series folder "
                f"{images_dir / modality / case_id}/); add it, or move the case's other "
                "modalities out"
            )
        if len(paths) < len(modalities):
            partial.add(case_id)
        else:
            complete[case_id] = tuple(str(paths[m]) for m in modalities)
            images[case_id] = paths[modalities[0]]
    return complete


def _read_csv(path: Path, site: str, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV file as (line number, row with stripped values); the header names the
    ``columns`` (spaces around names and Excel's UTF-8 byte-order mark are allowed)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
            missing = [c for c in columns if c not in reader.fieldnames]
            if missing:
                raise SiteDataError(
                    f"[site {site}] {path}: missing column(s) {', '.join(missing)} (header "
                    f"{','.join(reader.fieldnames) or 'empty'}); the header must start with "
                    f"{','.join(columns)}"
                )
            return [
                (line, {k: (v or "").strip() for k, v in row.items() if isinstance(k, str)})
                for line, row in enumerate(reader, start=2)
            ]
    except UnicodeDecodeError as err:
        raise SiteDataError(
            f"[site {site}] {path}: not UTF-8 text ({err.reason} at byte {err.start}); save it "
            "as 'CSV UTF-8'"
        ) from None


def _csv_column(
    path: Path,
    rows: list[tuple[int, dict[str, str]]],
    column: str,
    images: dict[str, Path],
    problems: list[str],
) -> dict[str, tuple[int, str]]:
    """``column`` of each case id in ``rows`` as {case id: (line, value)}; rows without a value
    are left out. A case id without an image, or listed twice, goes to ``problems``."""
    values: dict[str, tuple[int, str]] = {}
    for line, row in rows:
        case_id, value = row["case_id"], row.get(column, "")
        if not value:
            continue
        if case_id in values:
            first, before = values[case_id]
            what = f"two {column}s ({before} and {value})" if before != value else "listed twice"
            problems.append(
                f"{path} line {line}: case {case_id} {what} (also line {first}); keep one row "
                "per case"
            )
            continue
        values[case_id] = (line, value)
        if case_id not in images:
            problems.append(
                f"{path} line {line}: case {case_id} has no image in images/ (no "
                f"images/{case_id}.nii.gz, .nrrd, .png ... nor a DICOM folder images/{case_id}/);"
                " fix the case id or add the image"
            )
    return values


def find_cases(
    root: Path,
    task: TaskName,
    site: str | None = None,
    class_names: list[str] | None = None,
    modalities: Sequence[str] = (),
) -> list[Case]:
    """List the cases of a site folder without decoding any image.

    Takes the site folder, the task name (``segmentation`` or ``classification``), a site name
    for messages, for class sub-folders the class names in index order and, for multi-modal
    cases, the modalities (``data.modalities``); returns the cases sorted by case id. Raises
    :class:`SiteDataError` listing every problem found by :func:`scan_site`.
    """
    site = site or root.name
    scan = scan_site(root, task, site, class_names, modalities)
    if scan.problems:
        raise SiteDataError(
            f"[site {site}] {len(scan.problems)} problem(s) in {root}:\n  - "
            + "\n  - ".join(scan.problems)
        )
    return scan.cases


def scan_site(
    root: Path,
    task: TaskName,
    site: str | None = None,
    class_names: list[str] | None = None,
    modalities: Sequence[str] = (),
) -> SiteScan:
    """List a site folder's complete cases and every problem of its layout, without decoding.

    With ``modalities`` (``data.modalities``), images are read from ``images/MODALITY/`` and a
    case's ``image`` is a tuple of one path per modality (:func:`collect_modalities` says what
    is refused; a case missing a modality is named and left out). Classification labels come
    from ``labels.csv`` or, without it, from class sub-folders of
    ``images/``: class k is ``class_names[k]`` when given, else the k-th folder name in sorted
    order. Returns a :class:`SiteScan`. Problems: an unknown file in ``images/`` or ``labels/``
    (a DICOM SEG named as such, with how to convert it), a missing ``labels/`` folder, a
    duplicated case id, an image without a label, a label without an image, a row of
    ``labels.csv`` or ``split.csv`` naming no image or repeating a case, a class label that is
    not an integer, an unknown class folder. A missing or empty folder, a site path that is a
    file, and a split value other than train / val / test (a file error, not a bad case) raise
    :class:`SiteDataError` at once; so does a folder or file that cannot be read (permission
    denied, a file where a folder belongs: :func:`~fl_imaging.data.user_paths.named_os_errors`).
    """
    site = site or root.name
    with named_os_errors(f"[site {site}] "):
        return _scan_site(root, task, site, class_names, modalities)


def _scan_site(
    root: Path,
    task: TaskName,
    site: str,
    class_names: list[str] | None,
    modalities: Sequence[str],
) -> SiteScan:
    """:func:`scan_site` without its translation of ``OSError``."""
    images_dir = root / "images"
    if root.is_file():
        raise SiteDataError(
            f"[site {site}] {root} is a file, not a folder: a site is a folder holding images/ "
            "(and labels/ or labels.csv); give the site's folder"
        )
    if not root.is_dir():
        raise SiteDataError(f"[site {site}] site folder {root} does not exist: check the path")
    if images_dir.exists() and not images_dir.is_dir():
        raise SiteDataError(
            f"[site {site}] {images_dir} is a file, not a folder: images/ is the folder holding "
            "the site's images (the layout: docs/how-to/check-a-folder.md)"
        )
    if not images_dir.is_dir():
        raise SiteDataError(
            f"[site {site}] {images_dir} is missing: put the site's NIfTI files or DICOM series "
            "folders in an images/ sub-folder (the layout: docs/how-to/check-a-folder.md), or "
            "give a public dataset folder in its own layout (MSD dataset.json + imagesTr/, a "
            "MedMNIST .npz, class folders)"
        )
    images: dict[str, Path] = {}
    problems: list[str] = []
    labels: dict[str, str | int] = {}
    stacked: dict[str, tuple[str, ...]] = {}
    partial: set[str] = set()
    found_classes: list[str] = []
    for name in ("labels.csv", "split.csv"):
        if (root / name).exists() and not (root / name).is_file():
            raise SiteDataError(
                f"[site {site}] {root / name} is a folder, not a file: {name} must be a CSV "
                "file (the layout: docs/how-to/check-a-folder.md); move the folder away"
            )
    class_folders = task != TaskName.segmentation and not (root / "labels.csv").is_file()
    if modalities:
        if class_folders:
            raise SiteDataError(
                f"[site {site}] {root / 'labels.csv'} is missing: with data.modalities set, "
                "the sub-folders of images/ are modalities, so classification needs its labels "
                "in labels.csv (columns case_id,label)"
            )
        stacked = collect_modalities(images_dir, list(modalities), site, images, problems, partial)
    elif class_folders:
        found_classes = _scan_class_folders(images_dir, class_names, images, labels, problems)
    else:
        _collect_images(images_dir, images, problems)
    if not images and not problems:
        raise SiteDataError(f"[site {site}] {images_dir} is empty: no NIfTI file or DICOM folder")
    paths: dict[str, str | tuple[str, ...]] = {c: str(p) for c, p in images.items()}
    paths.update(stacked)

    splits: dict[str, str] = {}
    unknown_splits: list[str] = []
    split_file = root / "split.csv"
    if split_file.is_file():
        rows = _read_csv(split_file, site, ("case_id", "split"))
        for case_id, (line, split) in _csv_column(
            split_file, rows, "split", images, problems
        ).items():
            splits[case_id] = split.lower()
            unknown_splits += _unknown_split(split_file, line, case_id, split)

    if task == TaskName.segmentation:
        labels_dir = root / "labels"
        if labels_dir.exists() and not labels_dir.is_dir():
            raise SiteDataError(
                f"[site {site}] {labels_dir} is a file, not a folder: labels/ is the folder "
                "holding one mask per image, named like the image"
            )
        if labels_dir.is_dir():
            _collect_labels(labels_dir, labels, problems)
        else:
            problems.append(
                f"{labels_dir} is missing: segmentation needs one mask per image (NIfTI or "
                "NRRD), named like the image, in labels/; to check images that have no labels "
                "(a folder to predict on) use fl-imaging-data inspect --images-only"
            )
        for case_id in sorted(set(labels) - set(images) - partial):
            problems.append(f"{labels[case_id]}: label without an image (no images/{case_id}*)")
    elif not class_folders:
        labels_csv = root / "labels.csv"
        rows = _read_csv(labels_csv, site, ("case_id", "label"))
        for case_id, (line, value) in _csv_column(
            labels_csv, rows, "label", images, problems
        ).items():
            try:
                labels[case_id] = int(value)
            except ValueError:
                problems.append(
                    f"{labels_csv} line {line}: label {value!r} of case {case_id} "
                    "is not an integer class index"
                )
        for case_id, (line, split) in _csv_column(labels_csv, rows, "split", images, []).items():
            if splits.get(case_id, split.lower()) != split.lower():
                problems.append(
                    f"{labels_csv} line {line}: case {case_id} has split {split!r} but "
                    f"{split_file} says {splits[case_id]!r}; keep one"
                )
            splits[case_id] = split.lower()
            unknown_splits += _unknown_split(labels_csv, line, case_id, split)
    if unknown_splits:
        raise SiteDataError(
            f"[site {site}] {len(unknown_splits)} unknown split value(s):\n  - "
            + "\n  - ".join(unknown_splits)
        )
    unlabelled = sorted(set(images) - set(labels))
    if not (task == TaskName.segmentation and not (root / "labels").is_dir()):
        for case_id in unlabelled:
            problems.append(f"{images[case_id]}: image without a label (case id {case_id})")
    complete = sorted(set(images) & set(labels))
    return SiteScan(
        [Case(c, paths[c], labels[c], splits.get(c)) for c in complete],
        problems,
        [(c, Path(paths[c]) if isinstance(paths[c], str) else paths[c]) for c in unlabelled],
        found_classes,
    )


def _unknown_split(path: Path, line: int, case_id: str, value: str) -> list[str]:
    """One sentence when ``value`` (line ``line`` of ``path``, case ``case_id``) is not one of
    :data:`SPLITS` (in any case), else none."""
    if value.lower() in SPLITS:
        return []
    hint = {"validation": "val", "valid": "val", "training": "train", "testing": "test"}
    better = hint.get(value.lower())
    instead = f" ({value!r} is written {better!r} here)" if better else ""
    return [
        f"{path} line {line}: case {case_id} has split {value!r}, which is not one of "
        f"{', '.join(SPLITS)}{instead}; write one of them, or leave the split empty to let "
        "training split the case"
    ]


def _collect_labels(labels_dir: Path, labels: dict[str, str | int], problems: list[str]) -> None:
    """Add the NIfTI / NRRD masks of ``labels_dir`` to ``labels`` by case id; anything else goes
    to ``problems``, a DICOM object saying what it is (a DICOM SEG: how to convert it)."""
    detached = nhdr_data_files(labels_dir)
    for entry in sorted(labels_dir.iterdir()):
        if entry.name.startswith(".") or entry.name in detached:
            continue
        if entry.is_file() and entry.name.lower().endswith(VOLUME_SUFFIXES):
            case_id = case_id_of(entry)
            if case_id in labels:
                problems.append(
                    f"{entry}: label of case {case_id} given twice ({labels[case_id]}); keep one"
                )
                continue
            labels[case_id] = str(entry)
            continue
        what = describe_dicom(entry)
        advice = (
            SEG_ADVICE
            if what and "Modality SEG" in what or what and "Segmentation" in what
            else "labels must be NIfTI (.nii.gz, .nii) or NRRD (.nrrd, .nhdr) masks named like "
            "their image: convert it to NIfTI"
        )
        problems.append(
            f"{entry}: {what or 'not a NIfTI or NRRD file'}: format not supported as a label; "
            f"{advice}"
        )


def _scan_class_folders(
    images_dir: Path,
    class_names: list[str] | None,
    images: dict[str, Path],
    labels: dict[str, str | int],
    problems: list[str],
) -> list[str]:
    """Classification without labels.csv: ``images/CLASS/`` holds the cases of each class.
    Returns the class folder names, sorted."""
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
    return [p.name for p in folders]


def class_folder_names(root: Path, task: TaskName, modalities: Sequence[str] = ()) -> list[str]:
    """The class sub-folders of ``root/images`` (sorted, hidden ones left out) when the site's
    classification labels come from them (no labels.csv, no ``data.modalities``); else none.
    Raises :class:`SiteDataError` naming a folder that cannot be read."""
    images = root / "images"
    with named_os_errors(f"[site {root.name}] "):
        if (
            task == TaskName.segmentation
            or modalities
            or (root / "labels.csv").is_file()
            or not images.is_dir()
        ):
            return []
        return sorted(p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_site(
    root: Path,
    task: TaskName,
    *,
    val_fraction: float,
    seed: int,
    name: str | None = None,
    cases: list[Case] | None = None,
    class_names: list[str] | None = None,
    modalities: Sequence[str] = (),
) -> SiteData:
    """Find a site's cases (or take ``cases``, already checked) and split them.

    Cases with an explicit split keep it; the others are split at random (seeded by ``seed``) so
    that a fraction ``val_fraction`` of them, at least one, goes to validation. Returns the
    :class:`SiteData`; raises :class:`SiteDataError` when the site cannot give at least one
    training and one validation case.
    """
    name = name or root.name
    cases = find_cases(root, task, name, class_names, modalities) if cases is None else cases
    site = SiteData(name=name, root=root)
    unassigned = [c for c in cases if c.split is None]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(unassigned))
    n_val = max(1, round(val_fraction * len(unassigned))) if unassigned else 0
    val_ids = {unassigned[i].case_id for i in order[:n_val]}
    unknown = sorted({c.split for c in cases if c.split is not None and c.split not in SPLITS})
    if unknown:
        raise SiteDataError(
            f"[site {name}] {root}: unknown split value(s) {', '.join(map(repr, unknown))}; a "
            f"case's split is one of {', '.join(SPLITS)} (labels.csv or split.csv)"
        )
    for case in cases:
        split = case.split or ("val" if case.case_id in val_ids else "train")
        getattr(site, split).append(case)
    if not site.train or not site.val:
        raise SiteDataError(
            f"[site {name}] {root}: {len(site.train)} training and {len(site.val)} validation "
            "case(s); each site needs at least one of each: add cases or change split.csv"
        )
    return site
