"""Write a 3D volume as a DICOM series (one file per slice), the way a scanner export looks.

Used by the demo generator and the tests; reading is MONAI's ``PydicomReader``. pydicom writes
datasets but has no "volume to series" function, so this small one is ours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

__all__ = ["write_dicom_series"]

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _rescale(volume: np.ndarray) -> tuple[float, float]:
    low, high = float(volume.min()), float(volume.max())
    if high - low < 1e-12:
        return 1.0, low
    return (high - low) / 60000.0, (high + low) / 2.0


def write_dicom_series(
    volume: np.ndarray,
    affine: np.ndarray,
    out_dir: Path,
    *,
    patient_id: str,
    series_description: str = "fl-imaging demo",
    modality: str = "MR",
    seed: int = 0,
) -> list[Path]:
    """Write ``volume`` as one DICOM file per slice along its third axis.

    ``volume`` is a float array ``(I, J, K)`` indexed like a NIfTI array and ``affine`` its 4x4
    voxel-to-world matrix in RAS millimetres (nibabel's convention). Pixels are stored as int16
    with RescaleSlope/RescaleIntercept, so values come back within half a quantisation step
    ((max - min) / 120000). Positions and orientation are written in DICOM's LPS frame. UIDs are
    derived from ``patient_id`` and ``seed``, so the same call writes the same files. Returns the
    paths written (``out_dir/IM0001`` ...).
    """
    if volume.ndim != 3:
        raise ValueError(f"write_dicom_series needs a 3D volume, got shape {volume.shape}")
    out_dir.mkdir(parents=True, exist_ok=True)
    axes = affine[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    row_dir = _RAS_TO_LPS @ axes[:, 0] / spacing[0]  # along increasing column index (i)
    col_dir = _RAS_TO_LPS @ axes[:, 1] / spacing[1]  # along increasing row index (j)
    slope, intercept = _rescale(volume)
    stored = np.round((volume - intercept) / slope).clip(-32768, 32767).astype(np.int16)
    entropy = [patient_id, str(seed)]
    study_uid = generate_uid(entropy_srcs=[*entropy, "study"])
    series_uid = generate_uid(entropy_srcs=[*entropy, "series"])
    frame_uid = generate_uid(entropy_srcs=[*entropy, "frame"])
    paths: list[Path] = []
    for k in range(volume.shape[2]):
        sop_uid = generate_uid(entropy_srcs=[*entropy, "slice", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientID = patient_id
        ds.PatientName = patient_id
        ds.Modality = modality
        ds.SeriesDescription = series_description
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        position = _RAS_TO_LPS @ (affine @ np.array([0.0, 0.0, float(k), 1.0]))[:3]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row spacing, column spacing
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.SpacingBetweenSlices = f"{spacing[2]:.6f}"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = f"{slope:.10g}"
        ds.RescaleIntercept = f"{intercept:.10g}"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows = j, columns = i
        path = out_dir / f"IM{k + 1:04d}"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths
