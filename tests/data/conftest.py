"""Fixtures shared by the data tests: a small demo federation and copies of its sites."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fl_imaging.data.demo import make_demo_data


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two segmentation sites of 3 cases, 12x12x10 voxels of 1.5 mm: site-1 DICOM, site-2 NIfTI
    (made once per test module; a module may define its own ``demo``)."""
    root = tmp_path_factory.mktemp("demo")
    return make_demo_data(root, num_sites=2, cases_per_site=3, shape=(12, 12, 10), seed=0)


@pytest.fixture
def dicom_site(demo: list[Path], tmp_path: Path) -> Path:
    """A copy of the DICOM site, free to break."""
    return Path(shutil.copytree(demo[0], tmp_path / "hospital-a"))


@pytest.fixture
def nifti_site(demo: list[Path], tmp_path: Path) -> Path:
    """A copy of the NIfTI site, free to break."""
    return Path(shutil.copytree(demo[1], tmp_path / "hospital-b"))
