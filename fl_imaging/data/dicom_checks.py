"""Check that a DICOM folder is one regular image series before MONAI stacks it into a volume.

pydicom reads the headers (no pixel data); the checks themselves are ours: neither pydicom nor
MONAI's ``PydicomReader`` checks that the slices of a folder form one evenly spaced volume (the
reader sorts the slices and spreads them between the first and the last position, so a missing
slice stretches the spacing without a word, and a segmentation object is read as a 4D image).

Hidden files and folders of a series folder (names starting with ``.``: ``.DS_Store``,
``._IM0001`` that macOS leaves) are no part of the series: they are skipped, as MONAI's reader
skips them, and :func:`hidden_series_files` names them so that a check can say so.

What is refused, per series folder (or single DICOM file), each problem naming the file:

- a file that is not readable DICOM, or a folder mixing several series (SeriesInstanceUID);
- an object that is not an image the reader can stack: a SOP class that is not an
  "... Image Storage" class or a non-image Modality (SEG, RTSTRUCT, SR, PR, KO ...), a
  multi-frame object (NumberOfFrames > 1), 1-bit pixels (BitsAllocated 1, a binary mask);
- with two slices or more: a slice without position, orientation or pixel spacing; slices whose
  orientation (cosines differing by more than ``ORIENTATION_TOLERANCE``), pixel spacing (more than
  ``PIXEL_SPACING_TOLERANCE_MM``), rows or columns differ; two slices at the same position (closer
  than ``DUPLICATE_TOLERANCE_MM`` along the slice normal); slices shifted in-plane (gantry tilt,
  a sheared stack: more than ``IN_PLANE_TOLERANCE`` of a pixel); and uneven slice spacing: every
  gap between neighbouring slice positions along the normal must lie within
  ``GAP_TOLERANCE`` (10 %) of the median gap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from fl_imaging.data.errors import SiteDataError
from fl_imaging.data.user_paths import files_under

__all__ = [
    "DUPLICATE_TOLERANCE_MM",
    "GAP_TOLERANCE",
    "SEG_ADVICE",
    "describe_dicom",
    "dicom_files",
    "dicom_series_problems",
    "hidden_series_files",
    "not_an_image_reason",
]

#: A gap between neighbouring slices may differ from the median gap by this fraction of it.
GAP_TOLERANCE = 0.10
#: Two slices closer than this along the slice normal (mm) are at the same position.
DUPLICATE_TOLERANCE_MM = 0.01
#: Slice orientations (direction cosines) may differ by this much.
ORIENTATION_TOLERANCE = 1e-4
#: Pixel spacings of the slices may differ by this much (mm).
PIXEL_SPACING_TOLERANCE_MM = 1e-3
#: Slice positions may drift in-plane by this fraction of the pixel spacing (no gantry tilt).
IN_PLANE_TOLERANCE = 0.10
#: Modalities of DICOM objects that hold no image to read as a volume.
NON_IMAGE_MODALITIES = {
    "SEG": "a segmentation",
    "RTSTRUCT": "a radiotherapy structure set (contours)",
    "RTPLAN": "a radiotherapy plan",
    "RTDOSE": "a radiotherapy dose grid",
    "RTRECORD": "a radiotherapy record",
    "SR": "a structured report",
    "PR": "a presentation state",
    "KO": "a key object selection",
    "REG": "a registration",
    "DOC": "a document",
}
SEG_ADVICE = (
    "to use it as a label, convert the segmentation to NIfTI (e.g. with dcmqi's "
    "segimage2itkimage or highdicom) and put it in labels/ as CASE_ID.nii.gz"
)


def dicom_files(path: Path) -> list[Path]:
    """The files of a series folder (all depths, sorted, hidden ones left out:
    :func:`hidden_series_files`), or ``[path]`` for a single file. Raises
    :class:`~fl_imaging.data.errors.SiteDataError` naming a folder that cannot be read."""
    if path.is_file():
        return [path]
    return files_under(path)[0]


def hidden_series_files(path: Path) -> list[Path]:
    """The hidden files and folders (``.DS_Store`` ...) of a series folder, which are skipped;
    none for a single file. Raises :class:`~fl_imaging.data.errors.SiteDataError` as
    :func:`dicom_files`."""
    return [] if path.is_file() else files_under(path)[1]


def _what(header: Dataset) -> str:
    """``Modality MR, SOP Class MR Image Storage`` (what pydicom names the SOP class UID)."""
    sop = header.get("SOPClassUID")
    name = UID(str(sop)).name if sop else "not given"
    return f"Modality {header.get('Modality', '?')}, SOP Class {name}"


def not_an_image_reason(header: Dataset) -> str | None:
    """Why a DICOM object cannot be read as (part of) an image volume, or None when it can.

    Takes a header read by pydicom (pixel data not needed); returns one sentence saying what the
    object is (Modality, SOP Class name) and what to do.
    """
    modality = str(header.get("Modality", "")).upper()
    sop = header.get("SOPClassUID")
    sop_name = UID(str(sop)).name if sop else ""
    if modality in NON_IMAGE_MODALITIES or (sop and "Image Storage" not in sop_name):
        kind = NON_IMAGE_MODALITIES.get(modality, "not an image")
        advice = SEG_ADVICE if modality == "SEG" else "move it out of the image folder"
        return f"{kind} ({_what(header)}), not an image series: {advice}"
    if "Segmentation" in sop_name:
        return f"a segmentation ({_what(header)}), not an image series: {SEG_ADVICE}"
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return (
            f"a multi-frame object ({frames} frames in one file; {_what(header)}): fl-imaging "
            "reads classic series (one file per slice); convert it to NIfTI (e.g. with dcm2niix) "
            "or export it from the PACS as a classic series"
        )
    if int(header.get("BitsAllocated", 16) or 16) == 1:
        return (
            f"1-bit pixels (a binary mask, not an image; {_what(header)}): convert it to NIfTI; "
            "masks belong in labels/"
        )
    return None


def describe_dicom(path: Path) -> str | None:
    """Say what a DICOM file (or the first file of a folder) is, e.g. ``a DICOM object (Modality
    SEG, SOP Class Segmentation Storage)``; None when it is not readable DICOM."""
    try:
        files = dicom_files(path) if path.exists() else []
    except (SiteDataError, OSError):  # an unreadable folder is named where it is read
        return None
    if not files:
        return None
    try:
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
    except Exception:  # pydicom raises many types for a file that is not DICOM
        return None
    return f"a DICOM object ({_what(header)})"


def dicom_series_problems(path: Path) -> list[str]:
    """Check a DICOM series folder (or one DICOM file) as described in the module docstring.

    Returns the problems, one sentence each naming the file(s) and what to do; an empty list when
    the series can be read as one regular volume.
    """
    try:
        files = dicom_files(path)
    except SiteDataError as err:
        return [str(err)]
    if not files:
        hidden = hidden_series_files(path)
        only = f" (only hidden files: {', '.join(p.name for p in hidden)})" if hidden else ""
        return [f"{path}: empty DICOM folder{only}; put the series' files in it or remove it"]
    headers: list[tuple[Path, Dataset]] = []
    problems: list[str] = []
    for file in files:
        try:
            headers.append((file, pydicom.dcmread(file, stop_before_pixels=True)))
        except Exception as err:  # pydicom raises many types for broken files
            advice = (
                "give a NIfTI (.nii.gz), NRRD (.nrrd), 2D image (.png ...) or DICOM file"
                if path.is_file()
                else f"move it out of {path} or re-export the series"
            )
            problems.append(
                f"{file}: not a readable DICOM file ({type(err).__name__}: {err}); {advice}"
            )
    if problems:
        return problems
    for file, header in headers:
        reason = not_an_image_reason(header)
        if reason:
            return [f"{file}: {reason}"]
    uids = {str(h.get("SeriesInstanceUID", "")) for _, h in headers}
    if len(uids) > 1:
        return [
            f"{path}: the folder mixes {len(uids)} DICOM series; keep one series per folder "
            "(split it by SeriesInstanceUID)"
        ]
    if len(headers) < 2:
        return []
    return _geometry_problems(path, headers)


def _vector(header: Dataset, keyword: str) -> np.ndarray | None:
    value = header.get(keyword)
    try:
        return None if value is None else np.asarray([float(v) for v in value])
    except (TypeError, ValueError):
        return None


def _fmt(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _geometry_problems(folder: Path, headers: list[tuple[Path, Dataset]]) -> list[str]:
    """Same orientation, pixel spacing and size; positions on one line, evenly spaced."""
    geometry = []
    for file, header in headers:
        fields = [_vector(header, k) for k in ("ImagePositionPatient", "ImageOrientationPatient")]
        spacing = _vector(header, "PixelSpacing")
        missing = [
            k
            for k, v in zip(
                ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"),
                (*fields, spacing),
                strict=True,
            )
            if v is None
        ]
        if missing:
            return [
                f"{file}: no {', '.join(missing)}: the slices of {folder} cannot be placed in "
                "space; re-export the series with its geometry or convert it to NIfTI"
            ]
        size = (int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0))
        geometry.append((file, fields[0], fields[1], spacing, size))
    first_file, _, orientation, spacing, size = geometry[0]
    for file, _, other_orientation, other_spacing, other_size in geometry[1:]:
        what = None
        if np.abs(other_orientation - orientation).max() > ORIENTATION_TOLERANCE:
            what = (
                f"orientation (ImageOrientationPatient {_fmt(orientation)} vs "
                f"{_fmt(other_orientation)})"
            )
        elif np.abs(other_spacing - spacing).max() > PIXEL_SPACING_TOLERANCE_MM:
            what = f"pixel spacing ({_fmt(spacing)} vs {_fmt(other_spacing)} mm)"
        elif other_size != size:
            what = f"size (rows x columns {size[0]}x{size[1]} vs {other_size[0]}x{other_size[1]})"
        if what:
            return [
                f"{folder}: slices {first_file.name} and {file.name} differ in {what}; a series "
                "must be one stack of parallel slices of one size: keep one series per folder"
            ]
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    positions = np.array([g[1] for g in geometry])
    along = positions @ normal
    order = np.argsort(along)
    names = [geometry[i][0].name for i in order]
    along = along[order]
    gaps = np.diff(along)
    same = np.flatnonzero(gaps < DUPLICATE_TOLERANCE_MM)
    if same.size:
        pairs = ", ".join(f"{names[i]} and {names[i + 1]}" for i in same[:3])
        return [
            f"{folder}: {same.size} pair(s) of slices share a position (within "
            f"{DUPLICATE_TOLERANCE_MM} mm along the slice normal): {pairs}; the folder holds "
            "duplicated slices or several acquisitions: keep one of each"
        ]
    problems: list[str] = []
    in_plane = (positions[order] - positions[order][0]) @ np.stack([row, col], axis=1)
    drift = np.abs(in_plane).max()
    if drift > IN_PLANE_TOLERANCE * float(spacing.min()):
        problems.append(
            f"{folder}: slice positions drift up to {drift:.3g} mm in-plane (gantry tilt or a "
            f"sheared stack; tolerance {IN_PLANE_TOLERANCE:.0%} of a pixel): the volume would "
            "be misplaced; resample it to a regular grid (e.g. dcm2niix) and give the NIfTI"
        )
    median = float(np.median(gaps))
    uneven = np.flatnonzero(np.abs(gaps - median) > GAP_TOLERANCE * median)
    if uneven.size:
        shown = ", ".join(
            f"{gaps[i]:.4g} mm between {names[i]} and {names[i + 1]}" for i in uneven[:3]
        )
        more = f" (and {uneven.size - 3} more)" if uneven.size > 3 else ""
        problems.append(
            f"{folder}: slices are not evenly spaced along the slice normal: gap of {shown}{more}"
            f", where the series' slices are {median:.4g} mm apart (median; tolerance "
            f"{GAP_TOLERANCE:.0%}); a slice is missing or misplaced, so the volume would be "
            "stretched: re-export the complete series"
        )
    return problems
