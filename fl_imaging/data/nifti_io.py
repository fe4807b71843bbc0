"""Write arrays as NIfTI files with the geometry MONAI read them with (2D or 3D)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["save_nifti"]


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Write ``array`` (``(X, Y)`` or ``(X, Y, Z)``, no channel axis) to ``path`` (.nii.gz).

    ``affine`` is the voxel-to-world matrix in RAS millimetres as MONAI reports it: 4x4, or 3x3
    for a 2D image, which is embedded into a 4x4 matrix. Returns ``path``.
    """
    given = np.asarray(affine, dtype=np.float64)
    full = np.eye(4)
    n = given.shape[0] - 1
    full[:n, :n] = given[:n, :n]
    full[:n, 3] = given[:n, n]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array), full), path)
    return path
