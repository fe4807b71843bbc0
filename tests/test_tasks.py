"""Each MONAI task learns: one training step lowers the loss on the batch it saw."""

from __future__ import annotations

import pytest
import torch

from fl_imaging.config import validate_config
from tasks import build_task


def _task(name: str, **overrides):
    task_cfg = {"name": name, "roi_size": [16, 16, 16], "model": {"channels": [4, 8, 16]}}
    if name == "classification":
        task_cfg["model"]["name"] = "densenet"
    task_cfg.update(overrides)
    return build_task(validate_config({"task": task_cfg}).task, torch.device("cpu"))


def _batch(name: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(4, 1, 16, 16, 16, generator=gen)
    if name == "segmentation":
        label = (torch.rand(4, 1, 16, 16, 16, generator=gen) > 0.7).long()
        image = image + 2.0 * label  # make the structure visible
    else:
        label = torch.tensor([0, 1, 0, 1])
        image[label == 1] += 1.0
    return {"image": image, "label": label}


@pytest.mark.parametrize("name", ["segmentation", "classification"])
def test_one_train_step_lowers_the_loss(name: str) -> None:
    torch.manual_seed(0)
    task = _task(name, optimizer={"name": "adam", "lr": 0.01})
    model = task.build_model()
    batch = _batch(name)
    loss_fn = task.loss_function()

    def loss_now() -> float:
        model.train()  # batch statistics, as in the step itself (no dropout configured)
        with torch.no_grad():
            return float(loss_fn(model(batch["image"]), batch["label"]))

    before = loss_now()
    result = task.train(model, [batch], epochs=1)
    after = loss_now()
    assert result.num_samples == 4
    assert after < before


def test_segmentation_evaluation_reports_per_class_dice() -> None:
    task = _task("segmentation", num_classes=3)
    model = task.build_model()
    batch = _batch("segmentation")
    metrics = task.evaluate(model, [batch])
    assert set(metrics) == {"dice", "dice_1", "dice_2", "loss"}
    assert 0.0 <= metrics["dice_1"] <= 1.0


def test_classification_evaluation_reports_accuracy_and_auc() -> None:
    task = _task("classification")
    model = task.build_model()
    metrics = task.evaluate(model, [_batch("classification")])
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["auc"] <= 1.0


def test_models_follow_the_configured_size() -> None:
    small = _task("segmentation").build_model()
    big = _task("segmentation", model={"channels": [8, 16, 32]}).build_model()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(big) > count(small)
    seg = _task("segmentation", model={"name": "segresnet", "channels": [8, 16]}).build_model()
    assert seg(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)
    res = _task("classification", model={"name": "resnet", "channels": [4, 8, 8, 16]}).build_model()
    assert res(torch.zeros(2, 1, 16, 16, 16)).shape == (2, 2)
    two_d = _task("classification", spatial_dims=2, roi_size=[16, 16]).build_model()
    assert two_d(torch.zeros(2, 1, 16, 16)).shape == (2, 2)
