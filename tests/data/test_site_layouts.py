"""User site folders beyond NIfTI volumes: classification by class sub-folders
(``images/<class>/<files>``, ordered by ``task.class_names``), 2D PNG images, DICOM series in
class folders, and the messages and exit codes of ``fl-imaging-data inspect`` for their mistakes.
Every image is written here, in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fl_imaging.cli.data import main as data_cli
from fl_imaging.config.compose import check_overrides
from fl_imaging.data.dicom_io import write_dicom_series
from fl_imaging.data.inspect import inspect_site
from fl_imaging.data.prepare import prepare_sites
from fl_imaging.data.sites import SiteDataError, find_cases


def _png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _class_site(root: Path, per_class: dict[str, int], height: int = 30, width: int = 40) -> Path:
    """``root/images/<class>/<class><i>.png``: 8-bit grayscale, (height, width) pixels, with
    pixel values that identify the image (class index * 50 + i, and 255 in one corner)."""
    for k, (name, count) in enumerate(per_class.items()):
        for i in range(count):
            pixels = np.full((height, width), k * 50 + i, np.uint8)
            pixels[0, -1] = 255
            _png(root / "images" / name / f"{name}{i}.png", pixels)
    return root


def test_class_subfolders_give_labels_in_sorted_order(tmp_path: Path) -> None:
    site = _class_site(tmp_path / "hospital-a", {"tumour": 2, "normal": 3})
    report = inspect_site(site, "classification")
    assert report.ok, report.all_problems
    labels = {c.case_id: c.label for c in report.found}
    assert labels == {
        "normal0": 0,
        "normal1": 0,
        "normal2": 0,
        "tumour0": 1,
        "tumour1": 1,
    }
    assert all(c.split is None for c in report.found)


def test_class_names_set_the_class_order(tmp_path: Path) -> None:
    site = _class_site(tmp_path / "hospital-a", {"tumour": 2, "normal": 3})
    report = inspect_site(site, "classification", class_names=["tumour", "normal"])
    assert report.ok, report.all_problems
    assert {c.case_id: c.label for c in report.found} == {
        "normal0": 1,
        "normal1": 1,
        "normal2": 1,
        "tumour0": 0,
        "tumour1": 0,
    }
    # the same through the config, as training sees the site
    cfg = check_overrides(
        [
            "task=classification",
            "task.spatial_dims=2",
            "task.roi_size=[32,32]",
            "task.class_names=[tumour,normal]",
            "data=folders",
            f"data.sites=[{site}]",
            "data.val_fraction=0.4",
        ]
    )
    _, (data,), _ = prepare_sites(cfg)
    cases = data.train + data.val
    assert len(data.val) == 2 and len(data.train) == 3
    assert {c.case_id: c.label for c in cases} == {c.case_id: c.label for c in report.found}


def test_a_class_folder_outside_class_names_is_named(tmp_path: Path) -> None:
    site = _class_site(tmp_path / "hospital-a", {"tumour": 1, "normal": 1, "other": 1})
    report = inspect_site(site, "classification", class_names=["tumour", "normal"])
    (problem,) = report.all_problems
    assert problem.startswith(f"{site / 'images' / 'other'}: class folder 'other' is not one of")
    assert "task.class_names" in problem
    assert sorted(c.case_id for c in report.found) == ["normal0", "tumour0"]


def test_2d_png_images_are_inspected(tmp_path: Path) -> None:
    site = _class_site(tmp_path / "hospital-a", {"a": 1, "b": 2}, height=30, width=40)
    wide = np.zeros((20, 16), np.uint16)
    wide[3, 5] = 4000
    _png(site / "images" / "b" / "deep.png", wide)  # 16-bit grayscale
    report = inspect_site(site, "classification")
    assert report.ok, report.all_problems
    cases = {c.case_id: c for c in report.cases}
    for case_id, value in (("a0", 0), ("b0", 50), ("b1", 51)):
        case = cases[case_id]
        assert case.format == "png" and case.dtype == "uint8"
        assert case.shape == [40, 30]  # MONAI's PILReader: (width, height)
        assert case.spacing == [1.0, 1.0] and len(case.orientation) == 2
        assert (case.min, case.max) == (value, 255.0)
    deep = cases["deep"]
    assert (deep.format, deep.dtype, deep.shape) == ("png", "uint16", [16, 20])
    assert (deep.min, deep.max) == (0.0, 4000.0)


def test_jpeg_and_png_extensions_give_the_case_id(tmp_path: Path) -> None:
    site = tmp_path / "hospital-a"
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
    _png(site / "images" / "x" / "one.PNG", pixels)
    (site / "images" / "y").mkdir()
    Image.fromarray(pixels).save(site / "images" / "y" / "two.jpeg")
    report = inspect_site(site, "classification")
    assert report.ok, report.all_problems
    assert [(c.case_id, c.format) for c in report.cases] == [("one", "png"), ("two", "jpeg")]


def test_class_folders_of_dicom_series(tmp_path: Path) -> None:
    site = tmp_path / "hospital-a"
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    for k, name in enumerate(("ct", "mr")):
        for i in range(2):
            volume = np.full((8, 6, 3), 10.0 * k + i, np.float32)
            volume[0, 0, 0] = 100.0
            write_dicom_series(
                volume, affine, site / "images" / name / f"{name}-{i}", patient_id=f"{name}{i}"
            )
    report = inspect_site(site, "classification")
    assert report.ok, report.all_problems
    assert [(c.case_id, c.label) for c in report.found] == [
        ("ct-0", 0),
        ("ct-1", 0),
        ("mr-0", 1),
        ("mr-1", 1),
    ]
    case = report.cases[3]
    assert (case.format, case.shape, case.spacing) == ("dicom", [8, 6, 3], [0.8, 0.8, 2.0])
    assert case.min == pytest.approx(11.0, abs=0.01) and case.max == pytest.approx(100.0, abs=0.01)


def test_dicom_files_in_a_folder_without_labels_csv(tmp_path: Path, capsys) -> None:
    site = tmp_path / "hospital-a"
    for name in ("ct", "mr"):  # series folders straight in images/: class folders, or cases?
        write_dicom_series(
            np.ones((6, 6, 2), np.float32), np.eye(4), site / "images" / name, patient_id=name
        )
    (problem,) = inspect_site(site, "classification").all_problems
    assert problem.startswith(f"{site / 'labels.csv'} is missing: classification needs")
    assert problem.endswith(
        f"; {site / 'images' / 'ct' / 'IM0001'} is not a NIfTI or 2D image, so ct/ was read as "
        "a DICOM series (one case), not as a class folder"
    )
    with pytest.raises(SiteDataError, match="labels.csv is missing"):
        find_cases(site, "classification")
    assert data_cli(["inspect", str(site), "--task", "classification"]) == 1
    out = capsys.readouterr().out
    assert f"PROBLEM {site / 'labels.csv'} is missing" in out and "NOT ready" in out

    (site / "labels.csv").write_text("case_id,label\nct,0\nmr,1\n")
    assert data_cli(["inspect", str(site), "--task", "classification"]) == 0
    assert "ready to join" in capsys.readouterr().out


def test_loose_images_without_labels_csv(tmp_path: Path) -> None:
    site = tmp_path / "hospital-a"
    _png(site / "images" / "a.png", np.zeros((4, 4), np.uint8))
    _png(site / "images" / "sub" / "b.png", np.zeros((4, 4), np.uint8))
    (problem,) = inspect_site(site, "classification").all_problems
    assert "labels.csv is missing" in problem
    assert problem.endswith(
        f"; {site / 'images' / 'a.png'} lies directly in images/, outside any class folder"
    )


def test_a_stray_file_in_a_class_folder_is_named(tmp_path: Path) -> None:
    site = _class_site(tmp_path / "hospital-a", {"normal": 2, "tumour": 2})
    (site / "images" / "tumour" / "notes.txt").write_text("scanned 2024")
    (problem,) = inspect_site(site, "classification").all_problems
    assert problem.startswith(f"{site / 'labels.csv'} is missing")
    assert f"; {site / 'images' / 'tumour' / 'notes.txt'} is not a NIfTI or 2D image" in problem
    (site / "images" / "tumour" / "notes.txt").unlink()
    (site / "images" / "tumour" / ".DS_Store").write_bytes(b"\x00")  # hidden files are ignored
    assert inspect_site(site, "classification").ok


def test_a_case_id_in_two_class_folders_is_reported(tmp_path: Path, capsys) -> None:
    site = _class_site(tmp_path / "hospital-a", {"normal": 2, "tumour": 1})
    twin = _png(site / "images" / "tumour" / "normal1.png", np.zeros((30, 40), np.uint8))
    report = inspect_site(site, "classification")
    (problem,) = report.all_problems
    first = site / "images" / "normal" / "normal1.png"
    assert problem == (
        f"{twin}: case id normal1 appears twice ({first}); give every case its own id"
    )
    assert [c.case_id for c in report.found] == ["normal0", "normal1", "tumour0"]
    assert report.found[1].image == str(first)
    assert (
        data_cli(
            ["inspect", str(site), "--task", "classification", "--spatial-dims", "2", "--json"]
        )
        == 1
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["ok"] is False and printed["problems"] == [problem]


def test_inspect_exit_codes_on_class_folder_sites(tmp_path: Path, capsys) -> None:
    two = _class_site(tmp_path / "two", {"a": 2, "b": 2})
    assert data_cli(["inspect", str(two), "--task", "classification", "--spatial-dims", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 case(s), task classification, formats png; 0 problem(s)" in out
    three = _class_site(tmp_path / "three", {"a": 1, "b": 1, "c": 1})
    assert data_cli(["inspect", str(three), "--task", "classification", "--spatial-dims", "2"]) == 1
    assert "case c0: class 2 outside 0..1" in capsys.readouterr().out
    three_classes = ["--task", "classification", "--num-classes", "3", "--spatial-dims", "2"]
    assert data_cli(["inspect", str(three), *three_classes]) == 0
    (tmp_path / "empty" / "images" / "a").mkdir(parents=True)
    assert data_cli(["inspect", str(tmp_path / "empty"), "--task", "classification"]) == 1
    assert "empty" in capsys.readouterr().out
