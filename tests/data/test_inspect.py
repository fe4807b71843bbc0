"""`fl-imaging-data inspect`: every broken input gets a message naming its file and exit code 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from cli_runs import run_cli

from fl_imaging.cli.data import main as data_cli
from fl_imaging.data.demo import make_demo_data
from fl_imaging.data.dicom_io import write_dicom_series
from fl_imaging.data.inspect import inspect_site


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("demo")
    return make_demo_data(root, num_sites=2, cases_per_site=3, shape=(12, 12, 10), seed=0)


@pytest.fixture
def nifti_site(demo: list[Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(demo[1], tmp_path / "hospital-b"))


def _problems(site: Path) -> list[str]:
    return inspect_site(site, "segmentation").all_problems


def test_clean_sites_pass_and_report_their_cases(demo: list[Path], capsys) -> None:
    for site in demo:
        report = inspect_site(site, "segmentation")
        assert report.ok, report.all_problems
        assert {c.format for c in report.cases} == ({"dicom"} if site == demo[0] else {"nifti"})
        case = report.cases[0]
        assert case.shape == [12, 12, 10] and case.spacing == [1.5, 1.5, 1.5]
        assert case.orientation == "RAS" and case.label_values == [0, 1]
    assert data_cli(["inspect", str(demo[0])]) == 0
    out = capsys.readouterr().out
    assert "site1-case000" in out and "dicom" in out and "ready to join" in out


def test_truncated_nifti(nifti_site: Path) -> None:
    path = nifti_site / "images" / "site2-case001.nii.gz"
    path.write_bytes(path.read_bytes()[:200])
    (problem,) = _problems(nifti_site)
    assert str(path) in problem and "cannot be read" in problem


def test_label_shape_geometry_and_values(nifti_site: Path) -> None:
    labels = nifti_site / "labels"
    affine = nib.load(labels / "site2-case000.nii.gz").affine
    nib.save(
        nib.Nifti1Image(np.zeros((12, 12, 9), np.uint8), affine), labels / "site2-case000.nii.gz"
    )
    shifted = affine.copy()
    shifted[0, 3] += 5.0
    nib.save(
        nib.Nifti1Image(np.zeros((12, 12, 10), np.uint8), shifted), labels / "site2-case001.nii.gz"
    )
    bad_values = np.zeros((12, 12, 10), np.uint8)
    bad_values[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(bad_values, affine), labels / "site2-case002.nii.gz")
    problems = _problems(nifti_site)
    assert len(problems) == 3
    assert "site2-case000" in problems[0] and "shape" in problems[0]
    assert "site2-case001" in problems[1] and "geometry" in problems[1]
    assert "site2-case002" in problems[2] and "unexpected label value(s) 3" in problems[2]


def test_nan_voxels_and_image_without_label(nifti_site: Path) -> None:
    path = nifti_site / "images" / "site2-case000.nii.gz"
    img = nib.load(path)
    data = np.asarray(img.dataobj).copy()
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), path)
    (nifti_site / "labels" / "site2-case002.nii.gz").unlink()
    problems = _problems(nifti_site)
    assert any(str(path) in p and "NaN" in p for p in problems)
    assert any("site2-case002" in p and "image without a label" in p for p in problems)


def test_dicom_folder_mixing_two_series(demo: list[Path], tmp_path: Path) -> None:
    site = Path(shutil.copytree(demo[0], tmp_path / "hospital-a"))
    series = site / "images" / "site1-case000"
    write_dicom_series(
        np.ones((12, 12, 2), np.float32), np.eye(4), tmp_path / "other", patient_id="other"
    )
    for i, path in enumerate(sorted((tmp_path / "other").iterdir())):
        shutil.copy(path, series / f"extra{i}.dcm")
    (problem,) = _problems(site)
    assert str(series) in problem and "mixes 2 DICOM series" in problem


def test_empty_and_missing_folders(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (problem,) = _problems(tmp_path / "empty")
    assert "images is empty" in problem
    assert "does not exist" in _problems(tmp_path / "nowhere")[0]
    assert data_cli(["inspect", str(tmp_path / "empty"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["problems"]


def _config(site: Path, **data):
    from fl_imaging.config import validate_config

    return validate_config(
        {"data": {"name": "folders", "sites": [str(site)], **data}, "run_dir": "unused"}
    )


def test_training_refuses_a_broken_site_with_the_same_messages(nifti_site: Path) -> None:
    from fl_imaging.data.prepare import prepare_sites
    from fl_imaging.data.sites import SiteDataError

    path = nifti_site / "images" / "site2-case001.nii.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(SiteDataError) as err:
        prepare_sites(_config(nifti_site))
    assert "[site hospital-b]" in str(err.value) and str(path) in str(err.value)
    assert "data.exclude_bad_cases=true" in str(err.value)


def test_exclude_bad_cases_trains_on_the_rest_and_says_which(nifti_site: Path, caplog) -> None:
    from fl_imaging.data.prepare import prepare_sites

    path = nifti_site / "images" / "site2-case001.nii.gz"
    path.write_bytes(path.read_bytes()[:200])
    _, (site,), _ = prepare_sites(_config(nifti_site, exclude_bad_cases=True, val_fraction=0.4))
    kept = {c.case_id for c in site.train + site.val}
    assert kept == {"site2-case000", "site2-case002"}
    assert any("excluded" in r.message and "site2-case001" in r.message for r in caplog.records)


def test_fl_imaging_data_inspect_as_a_command(demo: list[Path], tmp_path: Path) -> None:
    """The command itself (its own process, :mod:`cli_runs`)."""
    proc = run_cli("fl-imaging-data", "inspect", demo[1], cwd=tmp_path)
    assert "ready to join" in proc.stdout and "nifti" in proc.stdout
