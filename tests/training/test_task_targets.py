"""Networks, losses, optimizers and transforms named by ``_target_`` in the task config, the
intensity presets, and what a site refuses to build when the coordinator names something else."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from local_runs import local_run

from fl_imaging.config import ConfigError, validate_config
from fl_imaging.config.compose import check_overrides
from fl_imaging.training.model_checks import check_model
from tasks import build_task
from tasks.base import build_optimizer

#: A small MONAI network that none of the built-in names builds (about 6,000 weights).
BASIC_UNET = {
    "_target_": "monai.networks.nets.BasicUNet",
    "args": {"features": [4, 4, 8, 8, 16, 4]},
}


def _task(**task):
    return build_task(validate_config({"task": {"roi_size": [16, 16, 16], **task}}).task)


def test_a_target_network_loss_and_optimizer_are_the_classes_named() -> None:
    task = _task(
        model=BASIC_UNET,
        loss={"_target_": "monai.losses.DiceFocalLoss", "args": {"gamma": 1.0}},
        optimizer={"_target_": "torch.optim.RMSprop", "lr": 0.01, "args": {"alpha": 0.9}},
    )
    model = task.build_model()
    assert type(model).__name__ == "BasicUNet"
    assert model.conv_0.conv_0.conv.in_channels == 1  # in_channels came from the task
    assert model.final_conv.out_channels == 2  # out_channels from task.num_classes
    loss_fn = task.loss_function()
    assert type(loss_fn).__name__ == "DiceFocalLoss"
    assert loss_fn.to_onehot_y and loss_fn.dice.softmax  # filled in for class indices
    optimizer = build_optimizer(model, task.cfg)
    assert isinstance(optimizer, torch.optim.RMSprop)
    assert optimizer.defaults["lr"] == 0.01 and optimizer.defaults["alpha"] == 0.9


def test_one_step_with_a_target_network_lowers_the_loss() -> None:
    torch.manual_seed(0)
    task = _task(model=BASIC_UNET, optimizer={"lr": 0.01}, roi_size=[32, 32, 32])
    model = task.build_model()
    image = torch.randn(2, 1, 32, 32, 32)  # BasicUNet halves 4 times
    label = (image > 0.5).long()
    loss_fn = task.loss_function()
    with torch.no_grad():
        before = float(loss_fn(model(image), label))
    task.train(model, [{"image": image, "label": label}], epochs=3)
    with torch.no_grad():
        assert float(loss_fn(model(image), label)) < before


def test_a_run_trains_a_target_network_and_says_so(tmp_path: Path) -> None:
    run_dir = local_run(
        tmp_path / "run",
        "experiment=quick",
        "engine.rounds=1",
        f"data.root={tmp_path / 'demo'}",
        "task.roi_size=[32,32,32]",
        "task.model._target_=monai.networks.nets.BasicUNet",
        "+task.model.args.features=[4,4,8,8,16,4]",
        "task.transforms.intensity=mr",
        "task.transforms.augmentation=[{_target_: RandGaussianNoised, keys: image, prob: 0.5}]",
    )
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert "final_conv.weight" in state and "conv_0.conv_0.conv.weight" in state  # BasicUNet
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert any(r["metric"] == "dice" for r in rows)


def test_ct_preset_clips_hounsfield_units_to_the_window_and_mr_ignores_the_air() -> None:
    ct = _task(transforms={"intensity": "ct", "hu_window": [-100, 300]})
    step = ct.inference_transforms().transforms[-2]
    hu = torch.tensor([[[-1000.0, -100.0, 100.0, 300.0, 2000.0]]])
    assert step({"image": hu})["image"].flatten().tolist() == pytest.approx(
        [0.0, 0.0, 0.5, 1.0, 1.0]
    )
    mr = _task(transforms={"intensity": "mr"})
    body = torch.tensor([[[0.0, 0.0, 0.0, 10.0, 20.0, 30.0]]])
    out = mr.inference_transforms().transforms[-2]({"image": body})["image"].flatten()
    assert out[:3].tolist() == [0.0, 0.0, 0.0]  # the air stays 0
    assert float(out[3:].mean()) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match=r"hu_window=\[300.0, -100.0\]"):
        _task(transforms={"intensity": "ct", "hu_window": [300, -100]}).inference_transforms()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"_target_": "os.system"}, "only classes of monai and torch"),
        ({"_target_": "monai.networks.nets.SwinUNETRR"}, "no class 'SwinUNETRR'"),
        ({"_target_": "monai.transforms.LoadImage"}, "is not a torch.nn.Module"),
        (
            {"_target_": "monai.networks.nets.UNet", "args": {"chanels": [4, 8]}},
            "takes no argument chanels; it takes spatial_dims",
        ),
        (
            {"_target_": "monai.networks.nets.UNet", "args": {"out_channels": 5}},
            "task.model.args.out_channels=5 contradicts task.num_classes=2",
        ),
    ],
)
def test_a_target_that_is_not_a_fitting_monai_class_is_refused_by_name(model, message) -> None:
    with pytest.raises(ConfigError, match=message):
        _task(model=model).network()


def test_a_site_never_runs_the_bundle_syntax_a_coordinator_could_send(monkeypatch) -> None:
    """A deviating coordinator's config asks the site to evaluate code through MONAI's bundle
    syntax (an expression, a reference, a _requires_ key): the site refuses before building
    anything, and the code never runs."""
    ran = []
    monkeypatch.setattr(os, "system", lambda command: ran.append(command))
    attacks = [
        {"_target_": "monai.networks.nets.UNet", "args": {"act": "$os.system('id')"}},
        {"_target_": "monai.networks.nets.UNet", "args": {"norm": "@network_def"}},
        {"_target_": "monai.networks.nets.UNet", "args": {"x": {"_requires_": "$os.system('id')"}}},
    ]
    for model in attacks:
        with pytest.raises(ConfigError, match="bundle"):
            _task(model=model).network()
    with pytest.raises(ConfigError, match="expressions"):
        _task(
            transforms={"augmentation": [{"_target_": "Lambdad", "keys": "image", "func": "$eval"}]}
        ).train_transforms()
    assert ran == []


def test_a_network_that_cannot_take_the_crop_stops_the_run_before_the_data(tmp_path) -> None:
    cfg = check_overrides(
        [
            "experiment=quick",
            "task.roi_size=[20,20,20]",
            "task.model._target_=monai.networks.nets.SwinUNETR",
            "+task.model.args.feature_size=12",
            "+task.model.args.depths=[1,1,1,1]",
        ]
    )
    with pytest.raises(
        ConfigError, match=r"cannot take an image of task.roi_size=\[20, 20, 20\]"
    ) as err:
        check_model(cfg)
    assert "ImportError" not in str(err.value)  # the size, not a missing package


def test_extra_preprocessing_is_applied_and_kept_for_inference() -> None:
    task = _task(
        transforms={
            "intensity": "none",
            "preprocessing": [{"_target_": "ScaleIntensityd", "keys": ["image", "label"]}],
        }
    )
    steps = task.inference_transforms().transforms
    assert type(steps[-2]).__name__ == "ScaleIntensityd"
    out = steps[-2]({"image": torch.tensor(np.array([[[2.0, 4.0]]]))})  # no label at inference
    assert out["image"].flatten().tolist() == [0.0, 1.0]


def test_a_network_missing_an_optional_package_is_named_as_such(monkeypatch) -> None:
    """MONAI imports some packages only when a layer first runs (einops for SwinUNETR): the
    message names the missing package, not the crop size."""
    from monai.networks.nets import BasicUNet
    from monai.utils import OptionalImportError

    def forward(self, x):  # noqa: ANN001, ANN202
        raise OptionalImportError("from einops import rearrange (No module named 'einops')")

    monkeypatch.setattr(BasicUNet, "forward", forward)
    cfg = check_overrides(
        [
            "experiment=quick",
            "task.model._target_=monai.networks.nets.BasicUNet",
            "+task.model.args.features=[4,4,8,8,16,4]",
        ]
    )
    with pytest.raises(ConfigError, match="needs a package that is not installed: from einops"):
        check_model(cfg)
