"""``fl-imaging-predict --explain``: saliency maps in each input's own geometry, highest on the
structure of a toy case whose answer is known (a hand-made network that sees a bright cube or
square), for segmentation (occlusion sensitivity) and classification (Grad-CAM), and through
the command with MONAI's real networks on NIfTI and DICOM inputs."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fl_imaging.cli.predict import main as predict_cli
from fl_imaging.config import config_to_yaml
from fl_imaging.config.compose import check_overrides
from fl_imaging.data.demo import make_demo_data
from fl_imaging.prediction.explain import gradcam_layer
from fl_imaging.prediction.predict import LoadedRun, predict_folder
from tasks import build_task

#: Voxels of the bright cube in the toy volume (off-centre on every axis).
CUBE = (slice(3, 8), slice(9, 13), slice(2, 5))
#: An LPS volume with anisotropic voxels, as DICOM-derived NIfTI files often are.
LPS_AFFINE = np.array(
    [[-1.2, 0.0, 0.0, 30.0], [0.0, -1.0, 0.0, 20.0], [0.0, 0.0, 2.0, -10.0], [0, 0, 0, 1]]
)


def _toy_volume(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    volume = rng.normal(0.0, 0.02, (20, 16, 12)).astype(np.float32)
    volume[CUBE] += 1.0
    folder.mkdir(parents=True)
    path = folder / "toy.nii.gz"
    nib.save(nib.Nifti1Image(volume, LPS_AFFINE), path)
    return path


def _threshold_segmenter() -> nn.Module:
    """Foreground where the (z-scored) image is above 4: the cube."""
    conv = nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[1] = 1.0
        conv.bias.copy_(torch.tensor([2.0, -2.0]))
    return conv.eval()


def test_occlusion_map_is_in_the_inputs_geometry_and_highest_on_the_structure(
    tmp_path: Path,
) -> None:
    image = _toy_volume(tmp_path / "in")
    cfg = check_overrides(["task.roi_size=[16,16,16]", "task.model.channels=[4,8]"])
    out = tmp_path / "out"
    written = predict_folder(LoadedRun(cfg, _threshold_segmenter()), image, out, explain=True)
    assert [p.name for p in written] == ["toy.nii.gz", "toy_occlusion.nii.gz", "toy_occlusion.png"]
    mask = np.asarray(nib.load(out / "toy.nii.gz").dataobj)
    inside = np.zeros(mask.shape, bool)
    inside[CUBE] = True
    assert mask[inside].mean() > 0.9 and mask[~inside].sum() == 0  # the toy finds its cube
    saliency = nib.load(out / "toy_occlusion.nii.gz")
    assert saliency.shape == (20, 16, 12) and saliency.get_data_dtype() == np.float32
    np.testing.assert_allclose(saliency.affine, LPS_AFFINE, atol=1e-5)
    values = np.asarray(saliency.dataobj)
    peak = np.unravel_index(np.argmax(values), values.shape)
    assert inside[peak], peak  # a map flipped along any axis would peak elsewhere
    assert values[inside].mean() > 4 * np.abs(values[~inside]).mean()
    assert values[inside].min() > 0
    png = Image.open(out / "toy_occlusion.png")
    assert max(png.size) >= 256 and png.size[0] / png.size[1] == pytest.approx(20 / 16)


def test_a_case_without_a_predicted_structure_gets_an_empty_map(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    image = _toy_volume(tmp_path / "in")
    cfg = check_overrides(["task.roi_size=[16,16,16]", "task.model.channels=[4,8]"])
    model = _threshold_segmenter()
    with torch.no_grad():
        model.bias.copy_(torch.tensor([100.0, -100.0]))  # background everywhere
    predict_folder(LoadedRun(cfg, model), image, tmp_path / "out", explain=True)
    values = np.asarray(nib.load(tmp_path / "out" / "toy_occlusion.nii.gz").dataobj)
    assert values.shape == (20, 16, 12) and not values.any()
    assert "toy: no structure predicted, its occlusion map is empty" in caplog.text


#: Rows and columns of the bright square in the toy picture (top right; not square-symmetric).
ROWS, COLS = slice(5, 13), slice(38, 48)


def _bright_square_classifier() -> nn.Module:
    """Class 1 when the mean of the rectified (z-scored) image is high: a bright square."""
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2, 2),
    )
    with torch.no_grad():
        conv, linear = model[0], model[4]
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1] = 1.0
        conv.bias.zero_()
        linear.weight.zero_()
        linear.weight[1, 0] = 8.0
        linear.bias.copy_(torch.tensor([0.5, 0.0]))
    return model.eval()


def test_gradcam_is_highest_on_the_square_in_the_pictures_own_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 20, (40, 56)).astype(np.uint8)  # 40 rows, 56 columns
    pixels[ROWS, COLS] = 250
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(pixels).save(folder / "pic.png")
    cfg = check_overrides(
        [
            "task=classification",
            "task.spatial_dims=2",
            "task.roi_size=[32,32]",
            "task.num_classes=2",
            "task.class_names=[plain,square]",
        ]
    )
    out = tmp_path / "out"
    written = predict_folder(LoadedRun(cfg, _bright_square_classifier()), folder, out, True)
    assert sorted(p.name for p in written) == [
        "pic_gradcam.nii.gz",
        "pic_gradcam.png",
        "predictions.csv",
    ]
    assert "square" in (out / "predictions.csv").read_text().splitlines()[1]
    saliency = np.asarray(nib.load(out / "pic_gradcam.nii.gz").dataobj)
    assert saliency.shape == (56, 40)  # MONAI's (width, height) grid of the picture
    rows_cols = saliency.T  # back to the picture's rows and columns
    peak = np.unravel_index(np.argmax(rows_cols), rows_cols.shape)
    assert ROWS.start <= peak[0] < ROWS.stop and COLS.start <= peak[1] < COLS.stop, peak
    png = np.asarray(Image.open(out / "pic_gradcam.png").convert("RGB")).astype(int)
    assert png.shape == (40, 56, 3)  # the picture's own size and layout
    colour = png.max(axis=2) - png.min(axis=2)  # grey where nothing is salient
    assert colour[ROWS, COLS].mean() > 60 and colour[30:, :20].mean() < 5


def test_gradcam_layers_of_monai_networks() -> None:
    for overrides, layer in (
        (["task.model.name=densenet", "task.model.channels=[4,8]"], "class_layers.relu"),
        (["task.model.name=resnet", "task.model.channels=[4,8,8,8]"], "layer4"),
    ):
        cfg = check_overrides(["task=classification", "task.num_classes=2", *overrides])
        assert gradcam_layer(build_task(cfg.task).build_model(), cfg.task) == layer
    toy = check_overrides(["task=classification", "task.num_classes=2"])
    assert gradcam_layer(_bright_square_classifier(), toy.task) == "0"  # its last convolution
    with pytest.raises(ValueError, match="no convolution"):
        gradcam_layer(nn.Linear(2, 2), toy.task)


def _run_folder(run_dir: Path, overrides: list[str]) -> None:
    cfg = check_overrides(overrides)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    torch.manual_seed(0)
    torch.save(build_task(cfg.task).build_model().state_dict(), run_dir / "model.pt")


def test_explain_through_the_command_with_monai_networks(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    # a 3D DenseNet on an LPS NIfTI volume: Grad-CAM resized and reoriented back to it
    _run_folder(
        tmp_path / "cls",
        [
            "task=classification",
            "task.num_classes=2",
            "task.roi_size=[16,16,16]",
            "task.model.channels=[4,8]",
        ],
    )
    image = _toy_volume(tmp_path / "volume")
    assert (
        predict_cli(
            [str(tmp_path / "cls"), str(image), "--explain", "--output", str(tmp_path / "c")]
        )
        == 0
    )
    assert "3 file(s) written" in capsys.readouterr().out
    cam = nib.load(tmp_path / "c" / "toy_gradcam.nii.gz")
    assert cam.shape == (20, 16, 12)
    np.testing.assert_allclose(cam.affine, LPS_AFFINE, atol=1e-5)
    assert (
        0.0 <= float(np.asarray(cam.dataobj).min()) <= float(np.asarray(cam.dataobj).max()) <= 1.0
    )
    # a U-Net on a DICOM series: the map on the series' grid, as the mask
    _run_folder(
        tmp_path / "seg",
        ["task.roi_size=[16,16,16]", "task.model.channels=[4,8]", "task.model.num_res_units=0"],
    )
    (site,) = make_demo_data(tmp_path / "demo", num_sites=1, cases_per_site=1, shape=(14, 18, 10))
    assert (
        predict_cli(
            [str(tmp_path / "seg"), str(site), "--explain", "--output", str(tmp_path / "s")]
        )
        == 0
    )
    (mask_path,) = [p for p in (tmp_path / "s").glob("*.nii.gz") if "_occlusion" not in p.name]
    mask = nib.load(mask_path)
    saliency = nib.load(mask_path.with_name(mask_path.name.replace(".nii.gz", "_occlusion.nii.gz")))
    assert saliency.shape == mask.shape == (14, 18, 10)
    np.testing.assert_allclose(saliency.affine, mask.affine, atol=1e-5)
