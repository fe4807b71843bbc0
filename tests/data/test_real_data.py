"""Reading real public scans from ../shared/data (see its README); skipped where it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from monai.transforms import LoadImage

from fl_imaging.data.inspect import inspect_site
from fl_imaging.data.readers import IMAGE_READERS

SHARED = Path(
    os.environ.get("FL_IMAGING_SHARED_DATA", Path(__file__).parents[2] / ".." / "shared" / "data")
)
DICOM = SHARED / "pydicom_test_dicom/src/pydicom/data/test_files/dicomdirtests"
NIFTI = SHARED / "monai_test_nifti/tests/testing_data"
pytestmark = pytest.mark.skipif(
    not DICOM.is_dir() or not NIFTI.is_dir(), reason=f"public test data not found at {SHARED}"
)


def _site(root: Path, images: dict[str, Path], labels: dict[str, Path]) -> Path:
    """A site folder made of symbolic links to the shared files (nothing is copied)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name, target in images.items():
        (root / "images" / name).symlink_to(target)
    for name, target in labels.items():
        (root / "labels" / name).symlink_to(target)
    return root


def test_real_nifti_volumes_read_with_their_shapes_and_spacings(tmp_path: Path) -> None:
    site = _site(
        tmp_path / "nifti",
        {"anat.nii": NIFTI / "anatomical.nii", "moved.nii": NIFTI / "reoriented_anat_moved.nii"},
        {
            "anat.nii.gz": NIFTI / "anatomical_label.nii.gz",
            "moved.nii.gz": NIFTI / "reoriented_anat_moved_label.nii.gz",
        },
    )
    report = inspect_site(site, "segmentation")
    assert report.ok, report.all_problems
    anat, moved = report.cases
    assert anat.shape == [33, 41, 25] and anat.spacing == [2.0, 2.0, 2.0]
    assert moved.shape == [21, 26, 22] and moved.spacing == [4.0, 4.0, 4.0]
    assert anat.label_values == [0, 1] and anat.dtype == "int16"


def test_real_dicom_series_sound_uneven_and_mixed(tmp_path: Path) -> None:
    """CT5N (5 slices, 2.5 mm apart) is read with pydicom's geometry; CT2 holds 3 slices 1.25 mm
    apart and a fourth 202.5 mm away (MONAI would stack them 68.3 mm apart): refused, naming the
    gap; MR2 mixes 3 series."""
    site = _site(
        tmp_path / "dicom",
        {
            "ct2": DICOM / "77654033" / "CT2",
            "ct5n": DICOM / "98892001" / "CT5N",
            "mr2": DICOM / "98892003" / "MR2",
        },
        {},
    )
    (site / "labels.csv").write_text("case_id,label\nct2,0\nct5n,0\nmr2,1\n")
    report = inspect_site(site, "classification")
    ct2, ct5n, mr2 = report.cases
    assert ct5n.format == "dicom" and ct5n.shape == [16, 16, 5] and not ct5n.problems
    assert ct5n.spacing == [0.4883, 0.4883, 2.5]
    # every slice lies where pydicom's ImagePositionPatient puts it (LPS -> RAS)
    affine = np.asarray(
        LoadImage(reader=list(IMAGE_READERS), image_only=True)(str(site / "images" / "ct5n")).affine
    )
    placed = sorted(tuple(np.round((affine @ [0, 0, k, 1])[:3], 4)) for k in range(5))
    expected = sorted(
        tuple(np.round(np.array([-1, -1, 1]) * [float(v) for v in header.ImagePositionPatient], 4))
        for header in (pydicom.dcmread(p) for p in (DICOM / "98892001" / "CT5N").iterdir())
    )
    np.testing.assert_allclose(placed, expected, atol=1e-3)
    (problem,) = ct2.problems
    assert problem.startswith(f"{site / 'images' / 'ct2'}: slices are not evenly spaced")
    assert "gap of 202.5 mm between 17106 and 17136" in problem and "1.25 mm apart" in problem
    (problem,) = mr2.problems
    assert "mr2" in problem and "mixes 3 DICOM series" in problem
