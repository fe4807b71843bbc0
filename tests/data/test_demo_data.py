"""The demo generator: deterministic, in the documented site layout, sites that differ, and a
DICOM series that reads back equal to its NIfTI twin."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

from fl_imaging.data.demo import make_demo_data
from fl_imaging.data.dicom_io import write_dicom_series
from tasks.base import ORIENTATION_LABELS

SMALL = {"num_sites": 2, "cases_per_site": 3, "shape": (12, 14, 10)}


def _load(path: Path) -> torch.Tensor:
    return Compose(
        [
            LoadImaged("image", image_only=True),
            EnsureChannelFirstd("image"),
            Orientationd("image", axcodes="RAS", labels=ORIENTATION_LABELS),
        ]
    )({"image": str(path)})["image"]


def _arrays(root: Path) -> list[np.ndarray]:
    arrays = []
    for site in sorted(root.glob("site-*")):
        for image in sorted((site / "images").iterdir()):
            arrays.append(np.asarray(_load(image)))
        for label in sorted((site / "labels").glob("*.nii.gz")):
            arrays.append(np.asarray(nib.load(label).dataobj))
    return arrays


def test_same_seed_same_data_other_seed_other_data(tmp_path: Path) -> None:
    make_demo_data(tmp_path / "a", seed=3, **SMALL)
    make_demo_data(tmp_path / "b", seed=3, **SMALL)
    make_demo_data(tmp_path / "c", seed=4, **SMALL)
    a, b, c = (_arrays(tmp_path / x) for x in "abc")
    assert len(a) == len(b) == 2 * 3 * 2
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_layout_labels_and_formats(tmp_path: Path) -> None:
    sites = make_demo_data(tmp_path, dicom_sites=(0,), seed=0, **SMALL)
    assert [s.name for s in sites] == ["site-1", "site-2"]
    dicom_cases = sorted((sites[0] / "images").iterdir())
    assert all(case.is_dir() and len(list(case.iterdir())) == 10 for case in dicom_cases)
    nifti_cases = sorted((sites[1] / "images").iterdir())
    assert all(case.name.endswith(".nii.gz") for case in nifti_cases)
    for site in sites:
        for image in (site / "images").iterdir():
            case_id = image.name.removesuffix(".nii.gz")
            label = np.asarray(nib.load(site / "labels" / f"{case_id}.nii.gz").dataobj)
            assert label.shape == (12, 14, 10)
            assert set(np.unique(label)) == {0, 1}


def test_classification_writes_both_classes(tmp_path: Path) -> None:
    sites = make_demo_data(tmp_path, task="classification", seed=0, **SMALL)
    lines = (sites[0] / "labels.csv").read_text().splitlines()
    assert lines[0] == "case_id,label"
    assert {line.split(",")[1] for line in lines[1:]} == {"0", "1"}
    assert not (sites[0] / "labels").exists()


def test_sites_have_different_intensity_profiles(tmp_path: Path) -> None:
    sites = make_demo_data(
        tmp_path, num_sites=3, cases_per_site=2, shape=(12, 12, 12), dicom_sites=(), seed=0
    )
    means = [
        np.mean([np.asarray(nib.load(p).dataobj).mean() for p in (s / "images").iterdir()])
        for s in sites
    ]
    assert min(abs(x - y) for i, x in enumerate(means) for y in means[i + 1 :]) > 20.0


def test_existing_demo_is_reused_and_changed_arguments_regenerate(tmp_path: Path) -> None:
    make_demo_data(tmp_path, seed=0, **SMALL)
    stamp = (tmp_path / "site-2" / "images" / "site2-case000.nii.gz").stat().st_mtime_ns
    make_demo_data(tmp_path, seed=0, **SMALL)
    assert (tmp_path / "site-2" / "images" / "site2-case000.nii.gz").stat().st_mtime_ns == stamp
    make_demo_data(tmp_path, seed=0, num_sites=3, cases_per_site=2, shape=(12, 14, 10))
    assert len(list((tmp_path / "site-1" / "images").iterdir())) == 2


def test_dicom_series_reads_back_like_the_nifti(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    volume = (rng.normal(size=(20, 24, 12)) * 150 + 300).astype(np.float32)
    affine = np.diag([0.8, 1.5, 2.5, 1.0])
    affine[:3, 3] = [-12.0, 30.5, 7.25]
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "v.nii.gz")
    write_dicom_series(volume, affine, tmp_path / "series", patient_id="p1")
    from_nifti, from_dicom = _load(tmp_path / "v.nii.gz"), _load(tmp_path / "series")
    assert from_dicom.shape == from_nifti.shape == (1, 20, 24, 12)
    step = (volume.max() - volume.min()) / 60000
    assert float((from_dicom - from_nifti).abs().max()) <= step / 2 + 1e-4
    assert torch.allclose(from_dicom.affine, from_nifti.affine, atol=1e-3)
    assert torch.allclose(from_dicom.pixdim, torch.tensor([0.8, 1.5, 2.5], dtype=torch.float64))


def test_a_thousand_sites_keep_profiles_that_float32_holds() -> None:
    from fl_imaging.data.demo import SCANNER_STEPS, site_profile

    profiles = [site_profile(k, seed=0) for k in range(1000)]
    assert max(p["gamma"] for p in profiles) < 0.8 + 0.2 * SCANNER_STEPS
    assert max(p["noise"] for p in profiles) < 0.08 + 0.04 * SCANNER_STEPS
    # the brightest voxel a site can write (signal <= 3, i.e. > 20 noise sigmas) stays finite
    assert all(
        np.isfinite(np.float32(p["scale"] * 3.0 ** p["gamma"] + p["offset"])) for p in profiles
    )
    assert profiles[0] != profiles[SCANNER_STEPS]  # same step, its own random part
