"""Check a site folder before it joins: decode every case and list every problem, per file.

What is checked, per case: the image decodes (unreadable or truncated files are reported with the
reader's reason), a DICOM folder holds a single series, no voxel is NaN or infinite, and for
segmentation the label has the image's shape and geometry (affine) and only the expected class
values. Layout problems (image without label, ...) come from
:func:`~fl_imaging.data.sites.scan_site`.
Decoding is MONAI's ``LoadImage`` with its nibabel and pydicom readers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from monai.transforms import LoadImage
from PIL import Image

from fl_imaging.config import TaskName
from fl_imaging.data.readers import IMAGE_READERS
from fl_imaging.data.sites import NIFTI_SUFFIXES, Case, SiteDataError, scan_site

__all__ = ["CaseReport", "SiteReport", "inspect_site"]


@dataclass
class CaseReport:
    """What one case holds: shape (voxels), spacing (mm), orientation (axis codes, e.g. RAS), the
    stored dtype, the intensity range, the label values, and its problems (empty when fine)."""

    case_id: str
    image: str
    format: str
    shape: list[int] = field(default_factory=list)
    spacing: list[float] = field(default_factory=list)
    orientation: str = ""
    dtype: str = ""
    min: float = float("nan")
    max: float = float("nan")
    label_values: list[int] = field(default_factory=list)
    #: Segmentation: number of voxels of each class 0..num_classes-1 in the label.
    label_voxels: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class SiteReport:
    """All cases of a site and every problem found; ``ok`` is True when there is none."""

    site: str
    root: str
    task: TaskName
    cases: list[CaseReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: The complete cases found by the layout scan (image and label), in case-id order.
    found: list[Case] = field(default_factory=list)

    @property
    def all_problems(self) -> list[str]:
        """Site-level problems followed by every case's problems."""
        return self.problems + [p for c in self.cases for p in c.problems]

    @property
    def ok(self) -> bool:
        return not self.all_problems

    def to_dict(self) -> dict:
        """A JSON-ready dictionary of the report (NaN written as None)."""
        data = asdict(self)
        data.pop("found")
        for case in data["cases"]:
            for key in ("min", "max"):
                if isinstance(case[key], float) and np.isnan(case[key]):
                    case[key] = None
        data["ok"] = self.ok
        return data


def _series_uids(folder: Path) -> tuple[set[str], list[str]]:
    uids: set[str] = set()
    problems: list[str] = []
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        return uids, [f"{folder}: empty DICOM folder"]
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            uids.add(str(header.SeriesInstanceUID))
        except Exception as err:  # pydicom raises many types for broken files
            problems.append(f"{path}: not a readable DICOM file ({type(err).__name__}: {err})")
    return uids, problems


def _load(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Voxels as float32 (MONAI cannot hand over big-endian arrays as stored) and the affine."""
    image = LoadImage(reader=list(IMAGE_READERS), image_only=True, dtype=np.float32)(path)
    return np.asarray(image), np.asarray(image.affine)


#: PIL image modes -> the dtype of their pixels.
_PIL_DTYPES = {
    "1": "bool",
    "L": "uint8",
    "P": "uint8",
    "RGB": "uint8",
    "RGBA": "uint8",
    "I;16": "uint16",
    "I": "int32",
    "F": "float32",
}


def _format_of(path: Path) -> str:
    """``dicom`` (series folder), ``nifti``, or the 2D image type (``png``, ``jpeg`` ...)."""
    if path.is_dir():
        return "dicom"
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return "nifti"
    suffix = path.suffix.lower().lstrip(".")
    return "jpeg" if suffix == "jpg" else suffix


def _stored_dtype(path: Path) -> str:
    """The dtype the file stores its voxels in (e.g. int16), read from the header."""
    if not path.is_dir() and not path.name.lower().endswith(NIFTI_SUFFIXES):
        with Image.open(path) as image:
            return _PIL_DTYPES.get(image.mode, image.mode)
    if path.is_dir():
        header = pydicom.dcmread(
            next(p for p in sorted(path.rglob("*")) if p.is_file()), stop_before_pixels=True
        )
        signed = "int" if int(getattr(header, "PixelRepresentation", 0)) else "uint"
        return f"{signed}{int(getattr(header, 'BitsAllocated', 16))}"
    return np.dtype(nib.load(path).get_data_dtype()).newbyteorder("=").name


def _inspect_case(case: Case, task: TaskName, num_classes: int) -> CaseReport:
    image_path = Path(case.image)
    report = CaseReport(case.case_id, case.image, _format_of(image_path))
    if image_path.is_dir():
        uids, problems = _series_uids(image_path)
        report.problems += problems
        if len(uids) > 1:
            report.problems.append(
                f"{image_path}: the folder mixes {len(uids)} DICOM series; keep one series per "
                "folder (split it by SeriesInstanceUID)"
            )
        if report.problems:
            return report
    try:
        array, affine = _load(case.image)
    except Exception as err:  # the reader's own reason is the useful part
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        report.problems.append(f"{case.image}: cannot be read (unreadable or truncated): {reason}")
        return report
    report.shape = [int(s) for s in array.shape]
    dims = min(array.ndim, 3)
    report.spacing = [round(float(s), 4) for s in np.linalg.norm(affine[:3, :dims], axis=0)]
    report.orientation = "".join(nib.orientations.aff2axcodes(affine))[:dims]
    report.dtype = _stored_dtype(image_path)
    finite = np.isfinite(array)
    if not finite.all():
        report.problems.append(
            f"{case.image}: {int((~finite).sum())} NaN or infinite voxel(s); fix or re-export it"
        )
    if finite.any():
        report.min, report.max = float(array[finite].min()), float(array[finite].max())
    if task == TaskName.segmentation:
        _check_label(case, report, array.shape, affine, num_classes)
    elif not 0 <= int(case.label) < num_classes:
        report.problems.append(
            f"case {case.case_id}: class {case.label} outside 0..{num_classes - 1} in labels.csv"
        )
    return report


def _check_label(
    case: Case, report: CaseReport, shape: tuple, affine: np.ndarray, num_classes: int
) -> None:
    try:
        label, label_affine = _load(str(case.label))
    except Exception as err:
        report.problems.append(f"{case.label}: label cannot be read: {str(err).splitlines()[0]}")
        return
    values, counts = np.unique(label[np.isfinite(label)], return_counts=True)
    report.label_values = [int(v) for v in values if float(v).is_integer()]
    voxels = dict(zip(values.tolist(), counts.tolist(), strict=True))
    report.label_voxels = [int(voxels.get(float(k), 0)) for k in range(num_classes)]
    if label.shape != shape:
        report.problems.append(
            f"{case.label}: label shape {list(label.shape)} does not match its image "
            f"{case.image} shape {list(shape)}"
        )
    elif not np.allclose(label_affine, affine, atol=1e-3 * max(1.0, np.abs(affine).max())):
        report.problems.append(
            f"{case.label}: label geometry (affine) differs from its image {case.image}; "
            "resample the label onto the image grid"
        )
    unexpected = [float(v) for v in values if not float(v).is_integer() or not 0 <= v < num_classes]
    if unexpected or not np.isfinite(label).all():
        shown = ", ".join(f"{v:g}" for v in unexpected[:5]) or "NaN"
        report.problems.append(
            f"{case.label}: unexpected label value(s) {shown}; "
            f"expected integers 0..{num_classes - 1}"
        )


def inspect_site(
    root: Path,
    task: TaskName,
    *,
    num_classes: int = 2,
    site: str | None = None,
    class_names: list[str] | None = None,
) -> SiteReport:
    """Decode and check every case of the site folder ``root``.

    ``task`` is ``segmentation`` or ``classification``; label values must lie in
    ``0..num_classes-1``; ``class_names`` orders class sub-folders (classification without
    labels.csv). Returns a :class:`SiteReport`; a folder that does not exist or holds no image
    gives a report with that single problem.
    """
    site = site or root.name
    report = SiteReport(site=site, root=str(root), task=task)
    try:
        report.found, report.problems = scan_site(root, task, site, class_names)
    except SiteDataError as err:
        report.problems.append(str(err))
        return report
    report.cases = [_inspect_case(case, task, num_classes) for case in report.found]
    return report
