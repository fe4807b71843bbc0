"""Nothing wrong in what is read passes silently (issue 13): DICOM series geometry and SOP class,
NRRD images and labels, a label stored with an axis reversed, dimensionality and channels against
the task, labels.csv / split.csv rows, training's split rule in inspect, a segmentation folder
without labels, and public datasets in their own layout. Each broken input is built here (in
tmp_path) and must be refused by inspect (and training) with a message naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.uid import EnhancedMRImageStorage, SegmentationStorage

from fl_imaging.cli.data import main as data_cli
from fl_imaging.config.compose import check_overrides
from fl_imaging.data.inspect import inspect_site
from fl_imaging.data.prepare import prepare_sites
from fl_imaging.data.sites import SiteDataError
from tasks import build_task


def _problems(site: Path, **kwargs) -> list[str]:
    return inspect_site(site, "segmentation", **kwargs).all_problems


def _training_error(site: Path, *overrides: str) -> str:
    with pytest.raises(SiteDataError) as err:
        prepare_sites(check_overrides(["data=folders", f"data.sites=[{site}]", *overrides]))
    return str(err.value)


# ------------------------------------------------------------------------------------------
# DICOM series
# ------------------------------------------------------------------------------------------


def test_a_series_with_a_missing_slice_is_refused_by_inspect_and_training(
    dicom_site: Path,
) -> None:
    series = dicom_site / "images" / "site1-case001"
    (series / "IM0005").unlink()
    (problem,) = _problems(dicom_site)
    assert problem.startswith(f"{series}: slices are not evenly spaced along the slice normal")
    assert "gap of 3 mm between IM0004 and IM0006" in problem and "1.5 mm apart" in problem
    assert "tolerance 10%" in problem and "re-export the complete series" in problem
    error = _training_error(dicom_site)
    assert "[site hospital-a]" in error and problem in error


def test_duplicated_tilted_and_mixed_orientation_slices(dicom_site: Path) -> None:
    images = dicom_site / "images"
    shutil.copy(images / "site1-case000" / "IM0003", images / "site1-case000" / "IM0003-copy")
    ds = pydicom.dcmread(images / "site1-case001" / "IM0004")
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]
    ds.save_as(images / "site1-case001" / "IM0004")
    ds = pydicom.dcmread(images / "site1-case002" / "IM0004")
    ds.ImagePositionPatient = [
        float(ds.ImagePositionPatient[0]) + 2.0,
        *ds.ImagePositionPatient[1:],
    ]
    ds.save_as(images / "site1-case002" / "IM0004")
    duplicated, orientation, tilted = _problems(dicom_site)
    assert "share a position" in duplicated and "IM0003 and IM0003-copy" in duplicated
    assert "IM0001 and IM0004 differ in orientation" in orientation
    assert f"{images / 'site1-case002'}: slice positions drift up to 2 mm in-plane" in tilted


def _dicom_object(path: Path, sop_class: str, modality: str, frames: int, bits: int) -> Path:
    """A small DICOM object of another SOP class (e.g. a DICOM SEG: 1-bit, multi-frame)."""
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.Modality = pydicom.uid.generate_uid(), modality
    ds.Rows = ds.Columns = 8
    ds.NumberOfFrames, ds.BitsAllocated, ds.BitsStored, ds.HighBit = frames, bits, bits, bits - 1
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(8 * 8 * frames * bits // 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def test_a_dicom_seg_is_refused_as_an_image_and_as_a_label(nifti_site: Path) -> None:
    seg = _dicom_object(nifti_site / "images" / "seg" / "1.dcm", SegmentationStorage, "SEG", 4, 1)
    unlabelled, problem = _problems(nifti_site)
    assert problem.startswith(f"{seg}: a segmentation (Modality SEG, SOP Class Segmentation ")
    assert "not an image series" in problem and "segimage2itkimage" in problem
    assert "image without a label (case id seg)" in unlabelled
    shutil.rmtree(seg.parent)
    label = nifti_site / "labels" / "site2-case000.nii.gz"
    label.unlink()
    as_label = _dicom_object(
        nifti_site / "labels" / "site2-case000.dcm", SegmentationStorage, "SEG", 4, 1
    )
    problem, unlabelled = _problems(nifti_site)
    assert problem.startswith(f"{as_label}: a DICOM object (Modality SEG, SOP Class Segmentation")
    assert "format not supported as a label" in problem and "convert the segmentation" in problem
    assert "image without a label (case id site2-case000)" in unlabelled


def test_a_multi_frame_object_is_refused(nifti_site: Path) -> None:
    enhanced = _dicom_object(
        nifti_site / "images" / "site2-case000" / "1.dcm", EnhancedMRImageStorage, "MR", 3, 16
    )
    (nifti_site / "images" / "site2-case000.nii.gz").unlink()
    (problem,) = _problems(nifti_site)
    assert problem.startswith(f"{enhanced}: a multi-frame object (3 frames in one file;")
    assert "SOP Class Enhanced MR Image Storage" in problem and "dcm2niix" in problem


# ------------------------------------------------------------------------------------------
# Labels: NRRD, an axis stored reversed
# ------------------------------------------------------------------------------------------


def _image_and_mask(site: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Replace case 0 by a volume with distinct voxel values (0..1199) and return it with its
    mask (values >= 600): a mask placed on the wrong voxels cannot match it by chance."""
    rng = np.random.default_rng(0)
    volume = rng.permutation(12 * 12 * 10).reshape(12, 12, 10).astype(np.float32)
    affine = nib.load(site / "images" / "site2-case000.nii.gz").affine
    image = nib.Nifti1Image(volume, affine)
    nib.save(image, site / "images" / "site2-case000.nii.gz")
    return image, (volume >= 600).astype(np.uint8)


def _write_nrrd(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """NRRD in its usual LPS space (what 3D Slicer writes) for a RAS ``affine``."""
    lps = np.diag([-1.0, -1.0, 1.0])
    header = {
        "space": "left-posterior-superior",
        "space directions": (lps @ affine[:3, :3]).T,
        "space origin": lps @ affine[:3, 3],
    }
    nrrd.write(str(path), array, header)


@pytest.mark.parametrize("fmt", ["nifti", "nrrd"])
def test_a_label_stored_with_an_axis_reversed_is_accepted_and_lands_on_its_voxels(
    nifti_site: Path, fmt: str
) -> None:
    image, mask = _image_and_mask(nifti_site)
    flipped = np.ascontiguousarray(mask[:, ::-1, :])  # axis 1 stored the other way round
    affine = image.affine.copy()
    affine[:3, 3] += affine[:3, 1] * (mask.shape[1] - 1)
    affine[:3, 1] *= -1
    old = nifti_site / "labels" / "site2-case000.nii.gz"
    old.unlink()
    if fmt == "nifti":
        label = old
        nib.save(nib.Nifti1Image(flipped, affine), label)
    else:
        label = nifti_site / "labels" / "site2-case000.nrrd"
        _write_nrrd(label, flipped, affine)
    report = inspect_site(nifti_site, "segmentation")
    assert report.ok, report.all_problems
    assert report.cases[0].label_values == [0, 1]
    # the task's pipeline (Orientationd to RAS) puts label and image voxel to voxel together
    cfg = check_overrides([])
    sample = build_task(cfg.task, torch.device("cpu")).load_transforms()(
        {"image": str(nifti_site / "images" / "site2-case000.nii.gz"), "label": str(label)}
    )
    image_out, label_out = sample["image"][0], sample["label"][0]
    threshold = image_out[label_out == 0].max()
    assert torch.equal(label_out.bool(), image_out > threshold)
    assert int(label_out.sum()) == int(mask.sum())
    # the same label 5 mm away lies elsewhere: refused
    affine[2, 3] += 5.0
    if fmt == "nifti":
        nib.save(nib.Nifti1Image(flipped, affine), label)
    else:
        _write_nrrd(label, flipped, affine)
    (problem,) = _problems(nifti_site)
    assert problem.startswith(f"{label}: ") and "resample the label onto the image grid" in problem


def test_nrrd_images_and_detached_headers_are_read(nifti_site: Path) -> None:
    image = nib.load(nifti_site / "images" / "site2-case001.nii.gz")
    _write_nrrd(nifti_site / "images" / "site2-case001.nrrd", image.get_fdata(), image.affine)
    (nifti_site / "images" / "site2-case001.nii.gz").unlink()
    mask = nib.load(nifti_site / "labels" / "site2-case002.nii.gz")
    header = {
        "space": "left-posterior-superior",
        "space directions": (np.diag([-1.0, -1, 1]) @ mask.affine[:3, :3]).T,
        "space origin": np.diag([-1.0, -1, 1]) @ mask.affine[:3, 3],
    }
    nrrd.write(
        str(nifti_site / "labels" / "site2-case002.nhdr"),
        np.asarray(mask.dataobj),
        header,
        detached_header=True,
    )
    (nifti_site / "labels" / "site2-case002.nii.gz").unlink()
    report = inspect_site(nifti_site, "segmentation")
    assert report.ok, report.all_problems
    case = report.cases[1]
    assert (case.format, case.shape, case.spacing) == ("nrrd", [12, 12, 10], [1.5, 1.5, 1.5])
    assert case.orientation == "RAS" and report.cases[2].label_values == [0, 1]


# ------------------------------------------------------------------------------------------
# Dimensionality, channels, file content
# ------------------------------------------------------------------------------------------


def test_a_2d_nifti_in_a_3d_task_and_a_4d_image(nifti_site: Path) -> None:
    images, labels = nifti_site / "images", nifti_site / "labels"
    affine = nib.load(images / "site2-case000.nii.gz").affine
    flat = images / "site2-case000.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((12, 12), np.float32), affine), flat)
    nib.save(nib.Nifti1Image(np.zeros((12, 12), np.uint8), affine), labels / "site2-case000.nii.gz")
    four = images / "site2-case001.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((12, 12, 10, 2), np.float32), affine), four)
    problems = _problems(nifti_site, spatial_dims=3, in_channels=1)
    assert problems[0].startswith(f"{flat}: a 2D image (shape 12x12) but the task is 3D")
    assert "--spatial-dims 2" in problems[0]
    assert problems[1].startswith(f"{four}: 2 channel(s) per voxel (shape 12x12x10")
    assert "task.in_channels=1" in problems[1]
    error = _training_error(nifti_site)
    assert problems[0] in error and problems[1] in error


def test_a_png_named_nii_gz(nifti_site: Path, capsys) -> None:
    fake = nifti_site / "images" / "site2-case002.nii.gz"
    fake.unlink()
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(fake, format="PNG")
    (problem,) = _problems(nifti_site)
    assert problem == (
        f"{fake}: the file holds a PNG image, not NIfTI as its name says; rename it after what "
        "it holds, or export the scan again as NIfTI"
    )
    assert data_cli(["inspect", str(nifti_site)]) == 1
    assert f"PROBLEM {problem}" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------
# labels.csv, split.csv, the split rule, folders without labels
# ------------------------------------------------------------------------------------------


def _class_site(root: Path, n: int = 4) -> Path:
    (root / "images").mkdir(parents=True)
    for i in range(n):
        volume = np.full((6, 6, 4), float(i), np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "images" / f"c{i}.nii.gz")
    return root


def test_labels_csv_from_excel_and_its_wrong_rows(tmp_path: Path) -> None:
    site = _class_site(tmp_path / "hospital-c")
    rows = "case_id,label\r\nc0,0\r\nc1,1\r\nc2,0\r\nc3,1\r\n"
    (site / "labels.csv").write_bytes(b"\xef\xbb\xbf" + rows.encode())  # Excel's CSV UTF-8
    assert inspect_site(site, "classification").ok
    csv = site / "labels.csv"
    csv.write_text(rows + "c9,1\nc2,1\nc3,1\n")
    unknown, conflict, twice = inspect_site(site, "classification").all_problems
    assert unknown.startswith(f"{csv} line 6: case c9 has no image in images/")
    assert conflict == (
        f"{csv} line 7: case c2 two labels (0 and 1) (also line 4); keep one row per case"
    )
    assert twice.startswith(f"{csv} line 8: case c3 listed twice (also line 5)")
    csv.write_text(rows)
    (site / "split.csv").write_text("case_id,split\nc0,val\nc7,train\n")
    (problem,) = inspect_site(site, "classification").all_problems
    assert problem.startswith(f"{site / 'split.csv'} line 3: case c7 has no image in images/")


def test_inspect_applies_trainings_split_rule(tmp_path: Path, capsys) -> None:
    site = _class_site(tmp_path / "hospital-c", n=1)
    (site / "labels.csv").write_text("case_id,label\nc0,0\n")
    (problem,) = inspect_site(site, "classification").all_problems
    assert (
        "0 training and 1 validation case(s)" in problem and "the rule training applies" in problem
    )
    assert data_cli(["inspect", str(site), "--task", "classification"]) == 1
    assert "NOT ready" in capsys.readouterr().out
    site = _class_site(tmp_path / "hospital-d", n=3)
    (site / "labels.csv").write_text("case_id,label\nc0,0\nc1,1\nc2,0\n")
    (site / "split.csv").write_text("case_id,split\nc0,val\nc1,val\nc2,test\n")
    (problem,) = inspect_site(site, "classification").all_problems
    assert "0 training and 2 validation case(s)" in problem
    with pytest.raises(SiteDataError, match="0 training and 2 validation"):
        prepare_sites(
            check_overrides(["task=classification", "data=folders", f"data.sites=[{site}]"])
        )


def test_a_segmentation_folder_without_labels_lists_its_images(nifti_site: Path, capsys) -> None:
    shutil.rmtree(nifti_site / "labels")
    report = inspect_site(nifti_site, "segmentation")
    (problem,) = report.all_problems
    assert problem.startswith(f"{nifti_site / 'labels'} is missing") and "--images-only" in problem
    assert [c.shape for c in report.cases] == [[12, 12, 10]] * 3
    assert data_cli(["inspect", str(nifti_site)]) == 1
    out = capsys.readouterr().out
    assert "site2-case000  nifti   12x12x10  1.5x1.5x1.5" in out and "NOT ready" in out
    assert data_cli(["inspect", "--images-only", str(nifti_site)]) == 0
    out = capsys.readouterr().out
    assert "3 case(s), images only (no labels)" in out and "ready to predict on" in out
    flat = nifti_site / "images" / "site2-case000.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((12, 12), np.float32), np.eye(4)), flat)
    assert data_cli(["inspect", "--images-only", str(nifti_site)]) == 1
    assert f"PROBLEM {flat}: a 2D image" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------
# Public datasets in their own layout
# ------------------------------------------------------------------------------------------


def test_inspect_reads_an_msd_task_through_its_adapter(nifti_site: Path, tmp_path: Path, capsys):
    task = tmp_path / "Task99_Tiny"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    training = []
    for case in ("tiny_001", "tiny_002"):
        shutil.copy(
            nifti_site / "images" / "site2-case000.nii.gz", task / "imagesTr" / f"{case}.nii.gz"
        )
        mask = nib.load(nifti_site / "labels" / "site2-case000.nii.gz")
        values = np.asarray(mask.dataobj) * 2  # classes 0 and 2 of 3
        nib.save(nib.Nifti1Image(values, mask.affine), task / "labelsTr" / f"{case}.nii.gz")
        training.append(
            {"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"}
        )
    labels = {"0": "background", "1": "left", "2": "right"}
    meta = {"name": "Tiny", "modality": {"0": "MRI"}, "labels": labels, "training": training}
    (task / "dataset.json").write_text(json.dumps(meta))
    assert data_cli(["inspect", str(task)]) == 0
    out = capsys.readouterr().out
    assert "msd:Tiny: 3D segmentation, 3 classes (background, left, right), 2 cases" in out
    assert "ready to train on" in out
    assert data_cli(["inspect", str(task), "--num-classes", "2"]) == 1
    assert "unexpected label value(s) 2" in capsys.readouterr().out
    (task / "labelsTr" / "tiny_002.nii.gz").unlink()
    assert data_cli(["inspect", str(task)]) == 1
    assert "tiny_002.nii.gz: listed in" in capsys.readouterr().out


def test_inspect_reads_class_folders_and_a_medmnist_file(tmp_path: Path, capsys) -> None:
    for name in ("ct", "mr"):
        (tmp_path / "folders" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), i, np.uint8)).save(
                tmp_path / "folders" / name / f"{i}.png"
            )
    assert data_cli(["inspect", str(tmp_path / "folders")]) == 0
    out = capsys.readouterr().out
    assert "2D classification, 2 classes (ct, mr), 4 cases" in out
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 3), ("val", 1), ("test", 1)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1)
    np.savez(tmp_path / "tinymnist3d.npz", **arrays)
    assert data_cli(["inspect", str(tmp_path / "tinymnist3d.npz")]) == 0
    out = capsys.readouterr().out
    assert "medmnist:tinymnist3d_28: 3D classification, 2 classes (0, 1), 5 cases" in out
    assert data_cli(["inspect", str(tmp_path / "tinymnist3d.npz"), "--spatial-dims", "2"]) == 1
    assert (
        f"{tmp_path / 'tinymnist3d.npz'}:train-00000.nii.gz: a 3D image" in capsys.readouterr().out
    )
