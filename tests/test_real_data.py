"""Reading real public scans from ../shared/data (see its README); skipped where it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fl_imaging.data.inspect import inspect_site

SHARED = Path(
    os.environ.get("FL_IMAGING_SHARED_DATA", Path(__file__).parents[1] / ".." / "shared" / "data")
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


def test_real_dicom_series_and_a_folder_mixing_series(tmp_path: Path) -> None:
    site = _site(
        tmp_path / "dicom",
        {"ct2": DICOM / "77654033" / "CT2", "mr2": DICOM / "98892003" / "MR2"},
        {},
    )
    (site / "labels.csv").write_text("case_id,label\nct2,0\nmr2,1\n")
    report = inspect_site(site, "classification")
    ct2, mr2 = report.cases
    assert ct2.format == "dicom" and ct2.shape == [16, 16, 4] and not ct2.problems
    assert ct2.spacing[:2] == [0.4883, 0.4883]
    (problem,) = mr2.problems
    assert "mr2" in problem and "mixes 3 DICOM series" in problem
