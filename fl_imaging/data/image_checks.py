"""Check one image (and its segmentation label) the way the task will read it.

Used by ``fl-imaging-data inspect`` (and so by training, which inspects every site) and by
``fl-imaging-predict`` before it predicts on an input. Per image: a file's content is the format
its name says (a PNG named ``.nii.gz`` is refused by name, not decoded as a 2D image); a DICOM
series is one regular series of images (:mod:`fl_imaging.data.dicom_checks`); the image decodes
with MONAI's ``LoadImage`` and ``EnsureChannelFirst`` (as the task's transforms read it); its
number of spatial axes and channels fit the task; no voxel is NaN or infinite. Per label: it
decodes, it has one channel, it lies on the image's voxel grid once both are oriented to RAS as
MONAI's ``Orientation`` does in the task (so a label stored with an axis reversed, or in another
axis order, is accepted), and its values are the expected class indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirst, LoadImage, Orientation
from PIL import Image

from fl_imaging.data.dicom_checks import dicom_files, dicom_series_problems, hidden_series_files
from fl_imaging.data.errors import SiteDataError
from fl_imaging.data.readers import IMAGE_READERS
from fl_imaging.data.sites import IMAGE_2D_SUFFIXES, NIFTI_SUFFIXES, NRRD_SUFFIXES
from fl_imaging.data.user_paths import os_error_message

#: World axes of RAS+, as the tasks give them to Orientationd (tasks.base.ORIENTATION_LABELS).
ORIENTATION_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))

__all__ = ["CaseReport", "check_image", "check_label", "file_content_problem", "read_image"]


@dataclass
class CaseReport:
    """What one case holds: shape (voxels, spatial axes only), channels, spacing (mm),
    orientation (axis codes, e.g. RAS), the stored dtype, the intensity range, the label values,
    its problems (empty when fine) and its notes (what was skipped, e.g. hidden files of a
    DICOM series folder: worth knowing, nothing to fix)."""

    case_id: str
    image: str
    format: str
    shape: list[int] = field(default_factory=list)
    channels: int = 0
    spacing: list[float] = field(default_factory=list)
    orientation: str = ""
    dtype: str = ""
    min: float = float("nan")
    max: float = float("nan")
    label_values: list[int] = field(default_factory=list)
    #: Segmentation: number of voxels of each class 0..num_classes-1 in the label.
    label_voxels: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: A multi-modal case: its files, one per modality in channel order (``image`` is the
    #: first); empty for a single-file case.
    images: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@cache
def _loader() -> LoadImage:
    return LoadImage(reader=list(IMAGE_READERS), image_only=True, dtype=np.float32)


def read_image(path: str | Path) -> MetaTensor:
    """Decode an image file or DICOM series folder as the tasks do: a float32 ``MetaTensor``
    ``(C, *spatial)`` (channel first, MONAI's ``EnsureChannelFirst``) carrying its affine.

    float32 because MONAI cannot hand over big-endian arrays as stored. Raises what the reader
    raises for an unreadable file."""
    return EnsureChannelFirst()(_loader()(str(path)))


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
    """``dicom`` (series folder or file), ``nifti``, ``nrrd``, or the 2D image type (``png``,
    ``jpeg`` ...)."""
    name = path.name.lower()
    if path.is_dir():
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(NRRD_SUFFIXES):
        return "nrrd"
    if name.endswith(IMAGE_2D_SUFFIXES):
        suffix = path.suffix.lower().lstrip(".")
        return "jpeg" if suffix == "jpg" else suffix
    return "dicom"


def _stored_dtype(path: Path, kind: str) -> str:
    """The dtype the file stores its voxels in (e.g. int16), read from the header."""
    if kind == "dicom":
        first = dicom_files(path)[0]
        header = pydicom.dcmread(first, stop_before_pixels=True)
        signed = "int" if int(getattr(header, "PixelRepresentation", 0)) else "uint"
        return f"{signed}{int(getattr(header, 'BitsAllocated', 16))}"
    if kind == "nifti":
        return np.dtype(nib.load(path).get_data_dtype()).newbyteorder("=").name
    if kind == "nrrd":
        kind_name = str(nrrd.read_header(str(path)).get("type", "?"))
        types = getattr(nrrd.reader, "_TYPEMAP_NRRD2NUMPY", {})  # pynrrd's own type table
        return np.dtype(types[kind_name]).name if kind_name in types else kind_name
    with Image.open(path) as image:
        return _PIL_DTYPES.get(image.mode, image.mode)


def _actual_format(path: Path) -> str | None:
    """What a file holds by its content, asking each library in turn: ``NIfTI`` (nibabel),
    ``NRRD`` (pynrrd), ``DICOM`` (pydicom), or PIL's format name (``PNG``, ``JPEG`` ...)."""
    try:
        with Image.open(path) as image:
            return str(image.format)
    except Exception:  # PIL raises several types for what it does not know
        pass
    try:
        pydicom.dcmread(path, stop_before_pixels=True)
        return "DICOM"
    except Exception:
        pass
    try:
        nrrd.read_header(str(path))
        return "NRRD"
    except Exception:
        pass
    return None


def file_content_problem(path: Path) -> str | None:
    """One sentence when a file's content is not the format its name says (a PNG named
    ``.nii.gz``, a JPEG named ``.nrrd`` ...), None when it is or when the content is unknown
    (a truncated file: the decoder says why). Only the header is read."""
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        expected = "NIfTI"
        try:
            nib.load(path)
            return None
        except Exception:  # nibabel raises several types for a file that is not NIfTI
            pass
    elif name.endswith(NRRD_SUFFIXES):
        expected = "NRRD"
        try:
            nrrd.read_header(str(path))
            return None
        except Exception:
            pass
    elif name.endswith(IMAGE_2D_SUFFIXES):
        expected = "a 2D image"
        try:
            with Image.open(path):
                return None
        except Exception:
            pass
    else:
        return None
    actual = _actual_format(path)
    if actual is None or actual == expected:
        return None
    return (
        f"{path}: the file holds a {actual} image, not {expected} as its name says; rename it "
        f"after what it holds, or export the scan again as {expected}"
    )


def check_image(
    case_id: str,
    path: Path,
    *,
    spatial_dims: int | None = None,
    in_channels: int | None = None,
) -> tuple[CaseReport, MetaTensor | None]:
    """Check and decode one image (file or DICOM series folder).

    ``spatial_dims`` (2 or 3) and ``in_channels``, when given, are the task's: an image with
    another number of spatial axes or channels is refused. Returns the :class:`CaseReport`
    (shape, channels, spacing, orientation, dtype, range, problems) and the decoded image
    ``(C, *spatial)`` float32, or None when it could not be decoded.
    """
    report = CaseReport(case_id, str(path), _format_of(path))
    if report.format == "dicom":
        report.problems += dicom_series_problems(path)
        try:
            hidden = hidden_series_files(path)
        except SiteDataError:  # an unreadable folder: dicom_series_problems named it
            hidden = []
        if hidden:
            report.notes.append(
                f"{path}: skipped hidden file(s) {', '.join(p.name for p in hidden)} (not part "
                "of the series)"
            )
    elif (problem := file_content_problem(path)) is not None:
        report.problems.append(problem)
    if report.problems:
        return report, None
    try:
        image = read_image(path)
    except Exception as err:  # the reader's own reason is the useful part
        root = err
        while root.__cause__ is not None:
            root = root.__cause__
        if isinstance(root, OSError) and root.errno is not None:
            report.problems.append(os_error_message(root, path))
            return report, None
        reason = (str(root).strip().splitlines() or [type(root).__name__])[0]
        report.problems.append(f"{path}: cannot be read (unreadable or truncated): {reason}")
        return report, None
    affine = np.asarray(image.affine)
    report.shape = [int(s) for s in image.shape[1:]]
    report.channels = int(image.shape[0])
    dims = min(len(report.shape), 3)
    report.spacing = [round(float(s), 4) for s in np.linalg.norm(affine[:3, :dims], axis=0)]
    report.orientation = "".join(nib.orientations.aff2axcodes(affine))[:dims]
    report.dtype = _stored_dtype(path, report.format)
    shown = "x".join(map(str, report.shape))
    if spatial_dims is not None and len(report.shape) != spatial_dims:
        report.problems.append(
            f"{path}: a {len(report.shape)}D image (shape {shown}) but the task is "
            f"{spatial_dims}D (task.spatial_dims={spatial_dims}); give {spatial_dims}D images, "
            f"or use a {len(report.shape)}D task (task.spatial_dims={len(report.shape)}; "
            f"fl-imaging-data inspect --spatial-dims {len(report.shape)})"
        )
    if in_channels is not None and report.channels != in_channels:
        report.problems.append(
            f"{path}: {report.channels} channel(s) per voxel (shape {shown}, e.g. a 4D file or "
            f"an RGB image) but the task takes {in_channels} (task.in_channels={in_channels}); "
            "give one volume per case (split a 4D file), or set task.in_channels "
            "(fl-imaging-data inspect --in-channels)"
        )
    array = image.numpy()
    finite = np.isfinite(array)
    if not finite.all():
        report.problems.append(
            f"{path}: {int((~finite).sum())} NaN or infinite voxel(s); fix or re-export it"
        )
    if finite.any():
        report.min, report.max = float(array[finite].min()), float(array[finite].max())
    return report, image


def _in_ras(image: MetaTensor) -> MetaTensor:
    """The image reoriented to RAS (its first ``spatial`` axis codes) by MONAI's Orientation,
    as the tasks' ``Orientationd`` does."""
    return Orientation(axcodes="RAS"[: min(image.ndim - 1, 3)], labels=ORIENTATION_LABELS)(image)


def check_label(label: Path, image: MetaTensor, report: CaseReport, num_classes: int) -> None:
    """Check a segmentation label against its decoded ``image`` ``(C, *spatial)``; add what is
    wrong to ``report.problems`` and fill ``report.label_values`` / ``label_voxels``.

    Both are oriented to RAS first (MONAI's Orientation, as in training), then the grids must
    match: same shape and an affine equal within 1e-3 of its largest entry (mm)."""
    path = Path(label)
    problem = file_content_problem(path)
    if problem:
        report.problems.append(problem)
        return
    try:
        decoded = read_image(path)
    except Exception as err:
        report.problems.append(f"{path}: label cannot be read: {str(err).splitlines()[0]}")
        return
    array = decoded.numpy()
    values, counts = np.unique(array[np.isfinite(array)], return_counts=True)
    report.label_values = [int(v) for v in values if float(v).is_integer()]
    voxels = dict(zip(values.tolist(), counts.tolist(), strict=True))
    report.label_voxels = [int(voxels.get(float(k), 0)) for k in range(num_classes)]
    if decoded.shape[0] != 1:
        report.problems.append(
            f"{path}: label has {decoded.shape[0]} channels; a label holds one class index per "
            "voxel: give a single 3D (or 2D) mask"
        )
    elif decoded.ndim != image.ndim:
        report.problems.append(
            f"{path}: a {decoded.ndim - 1}D label for the {image.ndim - 1}D image {report.image}"
        )
    else:
        _check_grid(path, _in_ras(decoded), _in_ras(image), report)
    unexpected = [float(v) for v in values if not float(v).is_integer() or not 0 <= v < num_classes]
    if unexpected or not np.isfinite(array).all():
        shown = ", ".join(f"{v:g}" for v in unexpected[:5]) or "NaN"
        report.problems.append(
            f"{path}: unexpected label value(s) {shown}; expected integers 0..{num_classes - 1}"
        )


def _check_grid(path: Path, label: MetaTensor, image: MetaTensor, report: CaseReport) -> None:
    """Label and image, both in RAS: same voxel grid (shape and affine)."""
    shape, image_shape = list(label.shape[1:]), list(image.shape[1:])
    if shape != image_shape:
        report.problems.append(
            f"{path}: label shape {shape} does not match its image {report.image} shape "
            f"{image_shape} (both oriented to RAS); the label must lie on the image's voxel grid:"
            " resample the label onto the image grid"
        )
        return
    affine, image_affine = np.asarray(label.affine), np.asarray(image.affine)
    if not np.allclose(affine, image_affine, atol=1e-3 * max(1.0, np.abs(image_affine).max())):
        n = affine.shape[0] - 1
        offset = float(np.linalg.norm(affine[:n, n] - image_affine[:n, n]))
        axes, image_axes = (np.round(a[:n, :n], 3).tolist() for a in (affine, image_affine))
        report.problems.append(
            f"{path}: label geometry (affine) differs from its image {report.image} even once "
            f"both are oriented to RAS (origins {offset:.3g} mm apart, voxel axes {axes} vs "
            f"{image_axes}); the label lies elsewhere or on another grid: resample the label "
            "onto the image grid"
        )
