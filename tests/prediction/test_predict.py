"""``fl-imaging-predict`` on run folders made here (a validated config and a seeded, untrained
model: no training needed). Segmentation masks come back in each input's own grid (shape,
affine, orientation) and agree voxel for voxel with the prediction made in the RAS pipeline;
classification gives one row of probabilities per image; broken inputs exit 1 naming the file."""

from __future__ import annotations

import csv
import datetime
import errno
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np
import pytest
import torch
from cli_runs import run_cli
from file_access import no_root_override, unreadable
from monai.transforms import LoadImage
from PIL import Image

from fl_imaging.cli.predict import main as predict_cli
from fl_imaging.config import RunConfig, config_to_yaml
from fl_imaging.config.compose import check_overrides
from fl_imaging.data.demo import make_demo_data
from fl_imaging.data.dicom_io import write_dicom_series
from fl_imaging.data.readers import IMAGE_READERS
from fl_imaging.review.results import load_weights, save_weights
from tasks import build_task
from tasks.segmentation import SegmentationTask

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("FL_IMAGING_SHARED_DATA", REPO / ".." / "shared" / "data"))
LAS_NIFTI = SHARED / "monai_test_nifti" / "tests" / "testing_data" / "anatomical.nii"

SEGMENTATION = [
    "task.num_classes=3",
    "task.model.channels=[4,8]",
    "task.model.num_res_units=0",
    "task.roi_size=[16,16,16]",
]
CLASSIFICATION = [
    "task=classification",
    "task.spatial_dims=2",
    "task.roi_size=[32,32]",
    "task.num_classes=3",
    "task.class_names=[ct,mr,xr]",
    "task.model.channels=[4,8]",
]


def _make_run(run_dir: Path, overrides: list[str], seed: int = 0) -> tuple[RunConfig, Path]:
    """A run folder as ``fl-imaging`` leaves it: config.yaml and model.pt (seeded weights)."""
    cfg = check_overrides(overrides)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    torch.manual_seed(seed)
    model = build_task(cfg.task, torch.device("cpu")).build_model()
    torch.save(model.state_dict(), run_dir / "model.pt")
    return cfg, run_dir


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, Path]:
    return _make_run(tmp_path_factory.mktemp("seg") / "run", SEGMENTATION)


def _ras_prediction(cfg: RunConfig, run_dir: Path, image: Path) -> np.ndarray:
    """Arg-max of the model's sliding-window logits computed in the task's RAS pipeline
    (``inference_transforms``: decoded, RAS, normalised), without Invertd."""
    task = build_task(cfg.task, torch.device("cpu"))
    assert isinstance(task, SegmentationTask)
    model = task.build_model()
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    sample = task.inference_transforms()({"image": str(image)})
    with torch.no_grad():
        logits = task.predict_logits(model.eval(), sample["image"][None].float())[0]
    return torch.argmax(logits, dim=0).numpy().astype(np.uint8)


def _check_mask(
    mask_path: Path, shape: tuple, affine: np.ndarray, expected_ras: np.ndarray
) -> None:
    """The mask is uint8 in 0..2, on the input's grid, and once reoriented to RAS equals the
    prediction made in the RAS pipeline."""
    mask = nib.load(mask_path)
    assert mask.get_data_dtype() == np.uint8
    assert mask.shape == shape
    np.testing.assert_allclose(mask.affine, affine, atol=1e-4)
    values = np.asarray(mask.dataobj)
    assert set(np.unique(values).tolist()) <= {0, 1, 2}
    canonical = nib.as_closest_canonical(mask)
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(np.asarray(canonical.dataobj), expected_ras)
    # the prediction is not trivial: several classes, and no flip of an axis leaves it equal,
    # so a mask written in the wrong orientation could not pass
    assert len(np.unique(expected_ras)) >= 2
    for axis in range(3):
        assert not np.array_equal(np.flip(expected_ras, axis), expected_ras)


# ------------------------------------------------------------------------------------------
# Segmentation
# ------------------------------------------------------------------------------------------


def test_dicom_series_masks_in_the_series_geometry(
    seg_run: tuple[RunConfig, Path], tmp_path: Path, capsys
) -> None:
    cfg, run_dir = seg_run
    (site,) = make_demo_data(
        tmp_path / "demo", num_sites=1, cases_per_site=2, shape=(14, 18, 10), seed=3
    )
    series = sorted((site / "images").iterdir())
    assert [s.is_dir() for s in series] == [True, True]  # DICOM series folders
    assert predict_cli([str(run_dir), str(site)]) == 0
    out = run_dir / "predictions" / site.name  # the default output folder
    assert f"2 file(s) written to {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [f"{s.name}.nii.gz" for s in series]
    loader = LoadImage(reader=list(IMAGE_READERS), image_only=True)
    for folder in series:
        read = loader(str(folder))  # what MONAI reports for the series
        assert tuple(read.shape) == (14, 18, 10)
        _check_mask(
            out / f"{folder.name}.nii.gz",
            tuple(read.shape),
            np.asarray(read.affine),
            _ras_prediction(cfg, run_dir, folder),
        )


def test_an_lps_dicom_series_mask_maps_back_to_the_series_geometry(
    seg_run: tuple[RunConfig, Path], tmp_path: Path
) -> None:
    """Scanners store voxels in DICOM's LPS order: MONAI reads such a series as non-RAS."""
    cfg, run_dir = seg_run
    _, ras = _write_reoriented(tmp_path / "ras.nii.gz", ("R", "A", "S"))
    start = nib.orientations.io_orientation(ras.affine)
    lps = ras.as_reoriented(
        nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(("L", "P", "S")))
    )
    series = tmp_path / "site" / "images" / "ct-lps"
    write_dicom_series(np.asarray(lps.dataobj), lps.affine, series, patient_id="lps")
    read = LoadImage(reader=list(IMAGE_READERS), image_only=True)(str(series))
    assert nib.aff2axcodes(np.asarray(read.affine)) == ("L", "P", "S")
    np.testing.assert_allclose(np.asarray(read.affine), lps.affine, atol=1e-4)
    out = tmp_path / "masks"
    assert predict_cli([str(run_dir), str(tmp_path / "site"), "--output", str(out)]) == 0
    expected = _ras_prediction(cfg, run_dir, series)
    _check_mask(out / "ct-lps.nii.gz", tuple(read.shape), np.asarray(read.affine), expected)
    # the same volume as a RAS NIfTI gets the same prediction (within DICOM's int16 rounding)
    agree = expected == _ras_prediction(cfg, run_dir, tmp_path / "ras.nii.gz")
    assert agree.mean() > 0.99


def _write_reoriented(path: Path, codes: tuple[str, str, str]) -> tuple[Path, nib.Nifti1Image]:
    """A RAS volume (anisotropic, off-centre) stored in the orientation ``codes``; returns the
    file and the RAS original."""
    rng = np.random.default_rng(1)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in (14, 18, 10)], indexing="ij"))
    volume = (100 * np.exp(-((grid + [[[[0.3]]], [[[-0.2]]], [[[0.1]]]]) ** 2).sum(0) * 3)).astype(
        np.float32
    ) + rng.normal(0, 5, (14, 18, 10)).astype(np.float32)
    affine = np.diag([2.0, 1.5, 3.0, 1.0])
    affine[:3, 3] = [-14.0, 20.0, -9.0]
    ras = nib.Nifti1Image(volume, affine)
    start = nib.orientations.io_orientation(affine)
    stored = ras.as_reoriented(
        nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(codes))
    )
    nib.save(stored, path)
    return path, ras


@pytest.mark.parametrize("kind", ["PIL", "LAS-shared"])
def test_non_ras_nifti_mask_maps_back_to_the_input_geometry(
    seg_run: tuple[RunConfig, Path], tmp_path: Path, kind: str
) -> None:
    cfg, run_dir = seg_run
    folder = tmp_path / "images"
    folder.mkdir()
    if kind == "PIL":
        image, ras = _write_reoriented(folder / "scan.nii.gz", ("P", "I", "L"))
        # the RAS pipeline sees the original RAS volume again
        sample = build_task(cfg.task).inference_transforms()({"image": str(image)})
        np.testing.assert_allclose(np.asarray(sample["image"].affine), ras.affine, atol=1e-5)
    else:
        if not LAS_NIFTI.is_file():
            pytest.skip(f"public test data not found at {LAS_NIFTI} (set FL_IMAGING_SHARED_DATA)")
        image = folder / "scan.nii"
        image.symlink_to(LAS_NIFTI)
    source = nib.load(image)
    assert nib.aff2axcodes(source.affine) != ("R", "A", "S")
    out = tmp_path / "masks"
    assert predict_cli([str(run_dir), str(folder), "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["scan.nii.gz"]
    _check_mask(
        out / "scan.nii.gz", source.shape, source.affine, _ras_prediction(cfg, run_dir, image)
    )
    if kind == "PIL":  # and in RAS it is the prediction on the RAS original itself
        nib.save(ras, tmp_path / "ras.nii.gz")
        canonical = nib.as_closest_canonical(nib.load(out / "scan.nii.gz"))
        np.testing.assert_array_equal(
            np.asarray(canonical.dataobj), _ras_prediction(cfg, run_dir, tmp_path / "ras.nii.gz")
        )


def test_a_single_image_file_is_predicted(seg_run: tuple[RunConfig, Path], tmp_path: Path) -> None:
    _, run_dir = seg_run
    image, _ = _write_reoriented(tmp_path / "one.nii.gz", ("L", "P", "S"))
    assert predict_cli([str(run_dir), str(image), "--output", str(tmp_path / "out")]) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["one.nii.gz"]
    assert nib.load(tmp_path / "out" / "one.nii.gz").shape == nib.load(image).shape


# ------------------------------------------------------------------------------------------
# Classification
# ------------------------------------------------------------------------------------------


def test_classification_writes_one_row_of_probabilities_per_image(tmp_path: Path, capsys) -> None:
    cfg, run_dir = _make_run(tmp_path / "run", CLASSIFICATION, seed=1)
    images = tmp_path / "site" / "images"
    rng = np.random.default_rng(0)
    for cls in ("ct", "xr"):  # class sub-folders are searched too
        for i in range(3):
            pixels = rng.integers(0, 256, (40 + 4 * i, 36), dtype=np.uint8)
            (images / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(images / cls / f"{cls}{i}.png")
    out = tmp_path / "pred"
    assert predict_cli([str(run_dir), str(tmp_path / "site"), "--output", str(out)]) == 0
    assert f"1 file(s) written to {out}" in capsys.readouterr().out
    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["case_id"] for r in rows] == ["ct0", "ct1", "ct2", "xr0", "xr1", "xr2"]
    assert list(rows[0]) == [
        "case_id",
        "image",
        "predicted",
        "predicted_name",
        "prob_ct",
        "prob_mr",
        "prob_xr",
    ]
    task = build_task(cfg.task, torch.device("cpu"))
    model = task.build_model()
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    model.eval()
    transform = task.inference_transforms()
    for row in rows:
        prob = np.array([float(row[f"prob_{n}"]) for n in ("ct", "mr", "xr")])
        assert abs(prob.sum() - 1.0) < 1e-5 and (prob >= 0).all()
        assert int(row["predicted"]) == int(prob.argmax())
        assert row["predicted_name"] == ["ct", "mr", "xr"][int(row["predicted"])]
        assert Path(row["image"]).name == f"{row['case_id']}.png"
        with torch.no_grad():
            logits = model(transform({"image": row["image"]})["image"].as_tensor()[None].float())
        np.testing.assert_allclose(prob, torch.softmax(logits, 1)[0].numpy(), atol=2e-6)


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def test_a_run_folder_without_model_pt(tmp_path: Path, capsys) -> None:
    _, run_dir = _make_run(tmp_path / "run", SEGMENTATION)
    (run_dir / "model.pt").unlink()
    image, _ = _write_reoriented(tmp_path / "scan.nii.gz", ("R", "A", "S"))
    assert predict_cli([str(run_dir), str(image)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fl-imaging-predict: error: {run_dir / 'model.pt'} not found")
    assert not (run_dir / "predictions").exists()


def test_weights_of_another_model(tmp_path: Path, capsys) -> None:
    _, run_dir = _make_run(tmp_path / "run", SEGMENTATION)
    _, other = _make_run(tmp_path / "other", [*SEGMENTATION, "task.model.channels=[8,16]"])
    (run_dir / "model.pt").write_bytes((other / "model.pt").read_bytes())
    image, _ = _write_reoriented(tmp_path / "scan.nii.gz", ("R", "A", "S"))
    assert predict_cli([str(run_dir), str(image)]) == 1
    err = capsys.readouterr().err
    assert f"{run_dir / 'model.pt'} does not fit the model in {run_dir / 'config.yaml'}" in err


def test_an_unreadable_image(seg_run: tuple[RunConfig, Path], tmp_path: Path, capsys) -> None:
    _, run_dir = seg_run
    folder = tmp_path / "images"
    folder.mkdir()
    good, _ = _write_reoriented(folder / "a.nii.gz", ("R", "A", "S"))
    broken = folder / "b.nii.gz"
    broken.write_bytes(good.read_bytes()[:150])
    assert predict_cli([str(run_dir), str(folder), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fl-imaging-predict: error: 1 problem(s) in {folder}, nothing predicted")
    assert f"  - {broken}: cannot be read (unreadable or truncated)" in err
    assert f"fl-imaging-data inspect --images-only {folder}" in err
    assert not (tmp_path / "out").exists()  # every input is checked before anything is written


def test_an_input_that_does_not_exist(seg_run: tuple[RunConfig, Path], tmp_path: Path, capsys):
    _, run_dir = seg_run
    assert predict_cli([str(run_dir), str(tmp_path / "nowhere")]) == 1
    assert f"{tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# A damaged model.pt (see also fl_imaging.review.results.load_weights / save_weights)
# ------------------------------------------------------------------------------------------


def _cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _zip_header_changed(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:4] = b"XXXX"
    path.write_bytes(bytes(data))


def _an_object(path: Path) -> None:
    # protocol 2, torch.save's own; its weights_only loader refuses the date object
    path.write_bytes(pickle.dumps(datetime.date(2020, 1, 1), protocol=2))


def _no_tensors(path: Path) -> None:
    torch.save({"weight": [1.0, 2.0]}, path)


TRUNCATED = "the file is truncated or damaged (torch.load: "


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_cut_in_half, TRUNCATED),
        (_empty, TRUNCATED),
        (_zip_header_changed, TRUNCATED),
        (_an_object, "the file is damaged or not a weights file (it holds objects other than"),
        (_no_tensors, "holds no model weights"),
    ],
)
def test_a_damaged_model_pt_exits_1_in_one_line_naming_it(
    damage: Callable[[Path], None], message: str, tmp_path: Path, capsys
) -> None:
    _, run_dir = _make_run(tmp_path / "run", SEGMENTATION)
    damage(run_dir / "model.pt")
    image, _ = _write_reoriented(tmp_path / "scan.nii.gz", ("R", "A", "S"))
    assert predict_cli([str(run_dir), str(image)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.out + captured.err
    assert lines[0].startswith(f"fl-imaging-predict: error: {run_dir / 'model.pt'}")
    assert message in lines[0]
    assert not (run_dir / "predictions").exists()


def test_model_pt_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "model.pt"
    save_weights({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def disk_full(obj: object, handle: BinaryIO) -> None:
        handle.write(b"half a model")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        save_weights({"w": torch.zeros(3)}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    assert torch.equal(load_weights(path)["w"], torch.ones(3))


def _broken_input(kind: str, folder: Path) -> tuple[Path, str]:
    """One input predict must refuse, and the start of its message."""
    if kind == "missing-slice":
        (site,) = make_demo_data(folder / "demo", num_sites=1, cases_per_site=1, shape=(8, 8, 6))
        series = site / "images" / "site1-case000"
        (series / "IM0003").unlink()
        return series, f"{series}: slices are not evenly spaced along the slice normal: gap of 3"
    path = folder / "scan.nii.gz"
    if kind == "4d":
        nib.save(nib.Nifti1Image(np.ones((8, 8, 6, 2), np.float32), np.eye(4)), path)
        return path, f"{path}: 2 channel(s) per voxel (shape 8x8x6"
    if kind == "2d":
        nib.save(nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4)), path)
        return path, f"{path}: a 2D image (shape 8x8) but the task is 3D"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path, format="PNG")
    return path, f"{path}: the file holds a PNG image, not NIfTI as its name says"


@pytest.mark.parametrize("kind", ["missing-slice", "4d", "2d", "png-named-nifti"])
def test_an_input_the_task_cannot_take_is_refused_in_one_message(
    seg_run: tuple[RunConfig, Path], tmp_path: Path, capsys, kind: str
) -> None:
    _, run_dir = seg_run
    path, message = _broken_input(kind, tmp_path)
    out = tmp_path / "out"
    assert predict_cli([str(run_dir), str(path), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fl-imaging-predict: error: 1 problem(s) in {path}, nothing predicted")
    assert f"\n  - {message}" in err and "Traceback" not in err
    assert not out.exists()


def test_fl_imaging_predict_as_a_command(seg_run: tuple[RunConfig, Path], tmp_path: Path) -> None:
    """The command itself (its own process, :mod:`cli_runs`): masks of a demo site's volumes."""
    _, run_dir = seg_run
    (site,) = make_demo_data(
        tmp_path / "demo", num_sites=1, cases_per_site=1, shape=(14, 18, 10), dicom_sites=()
    )
    out = tmp_path / "masks"
    proc = run_cli("fl-imaging-predict", run_dir, site, "--output", out, cwd=tmp_path)
    assert f"1 file(s) written to {out}" in proc.stdout
    assert [p.name for p in out.iterdir()] == [p.name for p in (site / "images").iterdir()]


# ------------------------------------------------------------------------------------------
# Paths that cannot be used as given (issue 30): each named, exit 1, no traceback
# ------------------------------------------------------------------------------------------


def test_an_output_that_is_an_existing_file_is_refused(
    seg_run: tuple[RunConfig, Path], tmp_path: Path, capsys
) -> None:
    _, run_dir = seg_run
    image, _ = _write_reoriented(tmp_path / "scan.nii.gz", ("R", "A", "S"))
    taken = tmp_path / "masks"
    taken.write_text("an earlier export")
    assert predict_cli([str(run_dir), str(image), "--output", str(taken)]) == 1  # FileExistsError
    err = capsys.readouterr().err
    assert err == (
        f"fl-imaging-predict: error: {taken}: is a file, not a folder; the predictions are "
        "written into a folder: give another --output (a new or an existing folder) or move the "
        "file away\n"
    )
    assert taken.read_text() == "an earlier export"
    below = taken / "masks"  # a folder to make under a file: NotADirectoryError
    assert predict_cli([str(run_dir), str(image), "--output", str(below)]) == 1
    assert f"error: {taken}: is a file, not a folder" in capsys.readouterr().err


def test_a_run_folder_that_is_a_file_or_a_config_that_is_not_text(tmp_path: Path, capsys) -> None:
    image, _ = _write_reoriented(tmp_path / "scan.nii.gz", ("R", "A", "S"))
    assert predict_cli([str(image), str(image)]) == 1
    assert f"error: {image}: is a file, not a folder; give the folder of a finished" in (
        capsys.readouterr().err
    )
    _, run_dir = _make_run(tmp_path / "run", SEGMENTATION)
    config = run_dir / "config.yaml"
    config.write_bytes(b"task:\n  name: \xff\xfe\n")
    assert predict_cli([str(run_dir), str(image)]) == 1
    assert f"error: {config}: not UTF-8 text (invalid start byte at byte 14)" in (
        capsys.readouterr().err
    )
    config.write_text("task: [unclosed\n")
    assert predict_cli([str(run_dir), str(image)]) == 1
    assert f"error: {config}: not a config fl-imaging can use (while parsing" in (
        capsys.readouterr().err
    )


def test_hidden_files_in_a_series_to_predict_on_are_skipped(
    seg_run: tuple[RunConfig, Path], tmp_path: Path, capsys
) -> None:
    _, run_dir = seg_run
    (site,) = make_demo_data(
        tmp_path / "demo", num_sites=1, cases_per_site=1, shape=(14, 18, 10), seed=3
    )
    (series,) = sorted((site / "images").iterdir())
    (series / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    out = tmp_path / "masks"
    assert predict_cli([str(run_dir), str(series), "--output", str(out)]) == 0
    assert "1 file(s) written" in capsys.readouterr().out
    assert [p.name for p in out.iterdir()] == [f"{series.name}.nii.gz"]


def test_an_unreadable_input_folder_is_named(
    seg_run: tuple[RunConfig, Path], tmp_path: Path
) -> None:
    """As root too (:mod:`file_access`): the kernel's own permission check, in the command."""
    _, run_dir = seg_run
    folder = tmp_path / "images"
    folder.mkdir()
    _write_reoriented(folder / "a.nii.gz", ("R", "A", "S"))
    (folder / "more").mkdir()
    with unreadable(folder / "more") as more:  # pathlib's rglob would skip it without a word
        proc = run_cli(
            "fl-imaging-predict",
            run_dir,
            folder,
            "--output",
            tmp_path / "out",
            cwd=tmp_path,
            expect=1,
            preexec_fn=no_root_override,
        )
    assert proc.stderr.startswith(f"fl-imaging-predict: error: {more}: cannot be read: ")
    assert "permission denied" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
