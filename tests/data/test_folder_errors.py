"""Folders and files that cannot be read as they are, each refused in one message naming the
path, what is wrong and what to do, with no traceback (issue 30): an unreadable labels/ or
images/ folder, labels.csv or split.csv (chmod 000, also when the tests run as root:
:mod:`file_access`), split values other than train/val/test, a site path that is a file, a
folder where a CSV file belongs, hidden files in a DICOM series folder (skipped and said so),
and class folders that give one class index two meanings at two sites. Each broken input is
built here, in tmp_path."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from cli_runs import run_cli
from file_access import no_root_override, unreadable
from PIL import Image

from fl_imaging.cli.data import main as data_cli
from fl_imaging.config.compose import check_overrides
from fl_imaging.data.prepare import prepare_sites
from fl_imaging.data.sites import SiteDataError
from fl_imaging.training.site_training import SiteRef, site_cases

PERMISSION = "cannot be read: permission denied; give the account that runs fl-imaging read"


def _csv_site(root: Path, n: int = 4) -> Path:
    """A classification site: images/c<i>.nii.gz (6x6x4) and labels.csv (alternating 0, 1)."""
    (root / "images").mkdir(parents=True)
    for i in range(n):
        volume = np.full((6, 6, 4), float(i), np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "images" / f"c{i}.nii.gz")
    rows = "".join(f"c{i},{i % 2}\n" for i in range(n))
    (root / "labels.csv").write_text("case_id,label\n" + rows)
    return root


def _class_folder_site(root: Path, classes: list[str], per_class: int = 2) -> Path:
    """``root/images/<class>/<class><i>.png``, 8-bit grayscale 16x16 images."""
    for k, name in enumerate(classes):
        (root / "images" / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((16, 16), 40 * k + i, np.uint8)
            Image.fromarray(pixels).save(root / "images" / name / f"{name}{i}.png")
    return root


CLASSIFICATION_2D = ["task=classification", "task.spatial_dims=2", "task.roi_size=[16,16]"]


def _folders(*sites: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return ["data=folders", f"data.sites=[{','.join(map(str, sites))}]", *extra]


# ------------------------------------------------------------------------------------------
# Folders and files that cannot be read (permission denied)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("broken", ["labels", "images", "split.csv"])
def test_an_unreadable_folder_or_csv_is_named_by_inspect(
    nifti_site: Path, tmp_path: Path, broken: str
) -> None:
    """labels.csv is read as split.csv is (one CSV reader): split.csv stands for both."""
    (nifti_site / "split.csv").write_text("case_id,split\nsite2-case000,train\n")
    with unreadable(nifti_site / broken) as path:
        proc = run_cli(
            "fl-imaging-data",
            "inspect",
            nifti_site,
            cwd=tmp_path,
            expect=1,
            preexec_fn=no_root_override,
        )
    output = proc.stdout + proc.stderr
    assert f"{path}: {PERMISSION} access (e.g. chmod -R a+rX {path})" in output
    assert "Traceback" not in output


def test_an_unreadable_site_folder_and_dicom_series_are_named(
    dicom_site: Path, tmp_path: Path
) -> None:
    with unreadable(dicom_site):  # not even images/ can be looked at: the site is named
        proc = run_cli(
            "fl-imaging-data",
            "inspect",
            dicom_site,
            cwd=tmp_path,
            expect=1,
            preexec_fn=no_root_override,
        )
    assert proc.stderr.startswith(f"fl-imaging-data: error: {dicom_site}: {PERMISSION}")
    assert "Traceback" not in proc.stderr
    series = dicom_site / "images" / "site1-case001"
    with unreadable(series):  # was "empty DICOM folder": pathlib's rglob skips it silently
        proc = run_cli(
            "fl-imaging-data",
            "inspect",
            dicom_site,
            cwd=tmp_path,
            expect=1,
            preexec_fn=no_root_override,
        )
    assert f"PROBLEM {series}: {PERMISSION}" in proc.stdout
    assert "empty DICOM folder" not in proc.stdout and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------
# Split values, a site path that is a file, a folder where a CSV file belongs
# ------------------------------------------------------------------------------------------


def test_a_split_other_than_train_val_test_is_refused_naming_the_row(
    nifti_site: Path, tmp_path: Path, capsys
) -> None:
    split = nifti_site / "split.csv"
    split.write_text("case_id,split\nsite2-case000,train\nsite2-case001,validation\n")
    assert data_cli(["inspect", str(nifti_site)]) == 1  # was AttributeError: ... 'validation'
    out = capsys.readouterr().out
    assert (
        f"{split} line 3: case site2-case001 has split 'validation', which is not one of "
        "train, val, test ('validation' is written 'val' here); write one of them, or leave "
        "the split empty to let training split the case"
    ) in out
    # a file error, not a bad case: data.exclude_bad_cases does not train without it
    with pytest.raises(SiteDataError) as err:
        prepare_sites(check_overrides(_folders(nifti_site, extra=("data.exclude_bad_cases=true",))))
    assert f"{split} line 3: case site2-case001 has split 'validation'" in str(err.value)
    assert "data.exclude_bad_cases cannot help here" in str(err.value)

    site = _csv_site(tmp_path / "hospital-c")
    labels = site / "labels.csv"
    labels.write_text("case_id,label,split\nc0,0,train\nc1,1,Valid\nc2,0,\nc3,1,holdout\n")
    assert data_cli(["inspect", str(site), "--task", "classification"]) == 1
    out = capsys.readouterr().out
    assert "2 unknown split value(s)" in out
    assert f"{labels} line 3: case c1 has split 'Valid', which is not one of train, val" in out
    assert f"{labels} line 5: case c3 has split 'holdout', which is not one of" in out


def test_a_site_path_that_is_a_file(tmp_path: Path, capsys) -> None:
    file = tmp_path / "hospital-a.zip"
    file.write_bytes(b"PK\x03\x04")
    assert data_cli(["inspect", str(file)]) == 1
    out = capsys.readouterr().out
    assert f"[site hospital-a.zip] {file} is a file, not a folder: a site is a folder" in out
    assert "does not exist" not in out
    with pytest.raises(SiteDataError, match="is a file, not a folder"):
        prepare_sites(check_overrides(_folders(file)))


@pytest.mark.parametrize("where", ["images", "labels", "labels.csv", "split.csv"])
def test_a_file_where_a_folder_belongs_and_a_folder_where_a_file_does(
    nifti_site: Path, tmp_path: Path, capsys, where: str
) -> None:
    site = _csv_site(tmp_path / "hospital-c") if where == "labels.csv" else nifti_site
    path = site / where
    if path.is_dir():
        shutil.rmtree(path)
    if where.endswith(".csv"):
        path.unlink(missing_ok=True)
        path.mkdir()
        what = "is a folder, not a file"
    else:
        path.write_text("not a folder")
        what = "is a file, not a folder"
    task = "classification" if where == "labels.csv" else "segmentation"
    assert data_cli(["inspect", str(site), "--task", task]) == 1
    assert f"{path} {what}" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------
# Hidden files in a DICOM series folder
# ------------------------------------------------------------------------------------------


def test_hidden_files_in_a_dicom_series_are_skipped_and_said_so(
    dicom_site: Path, capsys, caplog
) -> None:
    series = dicom_site / "images" / "site1-case000"
    (series / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (series / "._IM0001").write_bytes(b"\x00\x05\x16\x07")  # macOS's AppleDouble file
    assert data_cli(["inspect", str(dicom_site)]) == 0  # was "not a readable DICOM file"
    out = capsys.readouterr().out
    assert (
        f"NOTE {series}: skipped hidden file(s) .DS_Store, ._IM0001 (not part of the series)"
    ) in out
    assert "ready to join" in out and "PROBLEM" not in out
    with caplog.at_level(logging.INFO, logger="fl_imaging.data"):
        _, (site,), _ = prepare_sites(check_overrides(_folders(dicom_site)))
    assert len(site.train) + len(site.val) == 3
    assert f"[site hospital-a] note: {series}: skipped hidden file(s) .DS_Store" in caplog.text
    for file in sorted(series.iterdir()):
        if not file.name.startswith("."):
            file.unlink()
    assert data_cli(["inspect", str(dicom_site)]) == 1
    out = capsys.readouterr().out
    assert f"{series}: empty DICOM folder (only hidden files: .DS_Store, ._IM0001)" in out


# ------------------------------------------------------------------------------------------
# Class folders that differ between sites
# ------------------------------------------------------------------------------------------


def test_sites_whose_class_folders_differ_are_refused(tmp_path: Path) -> None:
    a = _class_folder_site(tmp_path / "hospital-a", ["normal", "tumour"])
    b = _class_folder_site(tmp_path / "hospital-b", ["cancer", "normal"])
    with pytest.raises(SiteDataError) as err:
        prepare_sites(check_overrides([*CLASSIFICATION_2D, "task.num_classes=3", *_folders(a, b)]))
    assert str(err.value) == (
        "the sites' class folders differ (site hospital-a: [normal, tumour]; site hospital-b: "
        "[cancer, normal]): each site numbers its class folders in sorted order, so class 0 "
        "would be 'normal' at site hospital-a and 'cancer' at site hospital-b. Give every site "
        "the same class folders, or set the shared class list "
        "task.class_names=[cancer,normal,tumour] (class k is its k-th name at every site; "
        "task.num_classes=3)"
    )
    # the shared list maps the folders to the same indices at every site
    shared = [*CLASSIFICATION_2D, "task.num_classes=3", "task.class_names=[cancer,normal,tumour]"]
    _, sites, _ = prepare_sites(check_overrides([*shared, *_folders(a, b)]))
    labels = {c.case_id: c.label for s in sites for c in s.train + s.val}
    assert labels == {
        "normal0": 1,
        "normal1": 1,
        "tumour0": 2,
        "tumour1": 2,
        "cancer0": 0,
        "cancer1": 0,
    }
    # a site lacking a class, numbered alike, is accepted without the list
    c = _class_folder_site(tmp_path / "hospital-c", ["normal"], per_class=3)
    prepare_sites(check_overrides([*CLASSIFICATION_2D, *_folders(a, c)]))
    # a folder outside the shared list is refused by name
    (b / "images" / "benign").mkdir()
    with pytest.raises(SiteDataError) as err:
        prepare_sites(check_overrides([*shared, *_folders(a, b)]))
    assert f"{b / 'images' / 'benign'}: class folder 'benign' is not one of" in str(err.value)


def test_a_deployed_site_with_class_folders_needs_the_shared_class_list(tmp_path: Path) -> None:
    site = _class_folder_site(tmp_path / "hospital-b", ["cancer", "normal"])
    deployed = SiteRef("hospital-b", site, 0, simulated=False)  # sees only its own folder
    with pytest.raises(SiteDataError) as err:
        site_cases(check_overrides(CLASSIFICATION_2D), deployed)
    assert str(err.value).startswith(
        f"[site hospital-b] {site / 'images'} holds class folders [cancer, normal] but "
        "task.class_names is empty: in a deployment each site sees only its own folders"
    )
    shared = check_overrides(
        [*CLASSIFICATION_2D, "task.num_classes=3", "task.class_names=[cancer,normal,tumour]"]
    )
    cases = site_cases(shared, deployed)
    assert {c.case_id: c.label for c in cases} == {
        "cancer0": 0,
        "cancer1": 0,
        "normal0": 1,
        "normal1": 1,
    }
    (site / "images" / "benign").mkdir()
    with pytest.raises(SiteDataError, match="class folder 'benign' is not one of"):
        site_cases(shared, deployed)


# ------------------------------------------------------------------------------------------
# A real run: refused before anything trains
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unreadable-labels", "bad-split", "class-folders"])
def test_a_run_is_refused_before_training(tmp_path: Path, demo: list[Path], case: str) -> None:
    if case == "class-folders":
        a = _class_folder_site(tmp_path / "hospital-a", ["normal", "tumour"])
        b = _class_folder_site(tmp_path / "hospital-b", ["cancer", "normal"])
        overrides = [*CLASSIFICATION_2D, "task.model.channels=[4,8]", *_folders(a, b)]
        expected = "the sites' class folders differ (site hospital-a: [normal, tumour]; site"
    else:
        site = Path(shutil.copytree(demo[1], tmp_path / "hospital-b"))
        overrides = _folders(site, extra=("data.exclude_bad_cases=true",))
        if case == "bad-split":
            (site / "split.csv").write_text("case_id,split\nsite2-case000,valid\n")
            expected = f"{site / 'split.csv'} line 2: case site2-case000 has split 'valid'"
        else:
            expected = f"{site / 'labels'}: {PERMISSION}"
    broken = site / "labels" if case == "unreadable-labels" else None
    if broken is not None:
        broken.chmod(0)
    try:
        proc = run_cli(
            "fl-imaging",
            *overrides,
            "engine.rounds=1",
            cwd=tmp_path,
            expect=2,
            preexec_fn=no_root_override,
        )
    finally:
        if broken is not None:
            broken.chmod(0o755)
    output = proc.stdout + proc.stderr
    assert expected in output
    assert "Traceback" not in output
    assert not list(tmp_path.rglob("metrics.csv"))  # nothing trained
