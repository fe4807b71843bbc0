"""Each MONAI task learns: one training step lowers the loss on the batch it saw; evaluation gives
the metric values computed by hand for models whose outputs are fixed."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

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


class FixedOutputs(nn.Module):
    """A stand-in network: the case whose image is filled with the value ``i`` gets
    ``outputs[i]`` (classification logits ``(K,)`` or segmentation logits ``(K, *spatial)``)."""

    def __init__(self, outputs: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("outputs", outputs.float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        index = images.flatten(1)[:, 0].round().long()
        return self.outputs[index]


def _case_batches(labels: torch.Tensor, spatial: tuple[int, ...], sizes: list[int]) -> list[dict]:
    """Batches of ``sizes`` cases (in order) whose images hold their case index."""
    batches, start = [], 0
    for size in sizes:
        index = torch.arange(start, start + size, dtype=torch.float32)
        image = index.view(-1, 1, *[1] * len(spatial)).expand(-1, 1, *spatial).clone()
        batches.append({"image": image, "label": labels[start : start + size]})
        start += size
    assert start == len(labels)
    return batches


def _classify(probs: list[list[float]], labels: list[int]) -> dict[str, float]:
    """Evaluate a classifier whose softmax output for case ``i`` is ``probs[i]`` (logits are
    their logarithms), in two batches of unequal size."""
    prob = torch.tensor(probs, dtype=torch.float64)
    task = _task("classification", spatial_dims=2, roi_size=[2, 2], num_classes=prob.shape[1])
    model = FixedOutputs(prob.log())
    batches = _case_batches(torch.tensor(labels), (2, 2), [1, len(labels) - 1])
    return task.evaluate(model, batches)


def _cross_entropy(probs: list[list[float]], labels: list[int]) -> float:
    return -sum(math.log(p[y]) for p, y in zip(probs, labels, strict=True)) / len(labels)


# Binary cases as (probability of class 1, label); the AUC counts the (positive, negative) pairs
# ranked right (a tie counts 1/2); a case is predicted 1 when its probability exceeds 1/2.
BINARY = {
    # every positive above every negative: AUC 1, all correct
    "perfect": ([0.1, 0.8, 0.3, 0.6, 0.9, 0.2], [0, 1, 0, 1, 1, 0], 1.0, 1.0),
    # the same ranking upside down: AUC 0, all wrong
    "reversed": ([0.9, 0.2, 0.7, 0.4, 0.1, 0.8], [0, 1, 0, 1, 1, 0], 0.0, 0.0),
    # positives 0.9, 0.55 over negatives 0.7, 0.3, 0.2: 3 + 2 of 6 pairs; 0.7 is wrong
    "mixed": ([0.9, 0.7, 0.3, 0.55, 0.2], [1, 0, 0, 1, 0], 5 / 6, 4 / 5),
    # positives 0.9, 0.5 over negatives 0.5, 0.2: 2 + 1/2 + 1 of 4 pairs; the tie at 0.5 picks
    # class 0 (arg-max takes the first), wrong for the positive
    "tie": ([0.9, 0.5, 0.5, 0.2], [1, 0, 1, 0], 3.5 / 4, 3 / 4),
}


@pytest.mark.parametrize("case", list(BINARY))
def test_classification_auc_and_accuracy_on_known_rankings(case: str) -> None:
    p1, labels, auc, accuracy = BINARY[case]
    probs = [[1.0 - p, p] for p in p1]
    metrics = _classify(probs, labels)
    assert metrics["auc"] == pytest.approx(auc, abs=1e-9)
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=1e-6)  # a float32 mean
    assert metrics["loss"] == pytest.approx(_cross_entropy(probs, labels), rel=1e-5)


def test_classification_macro_auc_over_three_classes() -> None:
    probs = [
        [0.7, 0.2, 0.1],  # label 0, predicted 0
        [0.3, 0.3, 0.4],  # label 0, predicted 2
        [0.6, 0.3, 0.1],  # label 0, predicted 0
        [0.2, 0.6, 0.2],  # label 1, predicted 1
        [0.4, 0.5, 0.1],  # label 1, predicted 1
        [0.1, 0.1, 0.8],  # label 2, predicted 2
        [0.5, 0.2, 0.3],  # label 2, predicted 0
    ]
    labels = [0, 0, 0, 1, 1, 2, 2]
    # One-vs-rest AUC per class, counting the (positive, negative) pairs ranked right:
    # class 0: positives 0.7, 0.3, 0.6 vs 0.2, 0.4, 0.1, 0.5 -> 4 + 2 + 4 of 12
    # class 1: positives 0.6, 0.5 vs 0.2, 0.3, 0.3, 0.1, 0.2 -> 10 of 10
    # class 2: positives 0.8, 0.3 vs 0.1, 0.4, 0.1, 0.2, 0.1 -> 5 + 4 of 10
    # macro = unweighted mean (a support-weighted mean would give 0.9, micro another value)
    macro = (10 / 12 + 10 / 10 + 9 / 10) / 3
    metrics = _classify(probs, labels)
    assert metrics["auc"] == pytest.approx(macro, abs=1e-9)
    assert metrics["accuracy"] == pytest.approx(5 / 7, abs=1e-6)
    assert metrics["loss"] == pytest.approx(_cross_entropy(probs, labels), rel=1e-5)


def test_classification_auc_is_nan_with_a_single_class() -> None:
    probs = [[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]]
    metrics = _classify(probs, [1, 1, 1])
    assert math.isnan(metrics["auc"])
    assert metrics["accuracy"] == pytest.approx(2 / 3, abs=1e-6)


def test_segmentation_dice_of_a_known_prediction() -> None:
    """Per-class Dice 2|P∩T| / (|P| + |T|) on two 4x4 cases with 3 classes."""
    truth = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    pred = torch.zeros(2, 4, 4, dtype=torch.long)
    truth[0, 0, :2] = 1  # case 0: class 1 on rows 0-1 (8 pixels)
    truth[0, 0, 2:, 2:] = 2  # and class 2 bottom right (4 pixels)
    pred[0, 0] = 1  # predicted class 1: row 0 and one more pixel (5, all inside)
    pred[0, 1, 0] = 1
    pred[0, 2:] = 2  # predicted class 2: rows 2-3 (8 pixels, 4 inside)
    truth[1, 0, 0, 0] = 1  # case 1: class 1 on one pixel, no class 2
    pred[1, 0, :2] = 1  # predicted class 1 on 2 pixels (1 inside)
    pred[1, 3, 3] = 2  # class 2 where the case has none: MONAI leaves the case out of dice_2
    # logits 3 for the predicted class, -2 elsewhere: none is zero, so only the arg-max gives pred
    logits = 5.0 * torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2) - 2.0
    task = _task("segmentation", spatial_dims=2, roi_size=[4, 4], num_classes=3)
    metrics = task.evaluate(FixedOutputs(logits), _case_batches(truth, (4, 4), [1, 1]))
    dice_1 = (2 * 5 / (5 + 8) + 2 * 1 / (2 + 1)) / 2
    dice_2 = 2 * 4 / (8 + 4)
    assert metrics["dice_1"] == pytest.approx(dice_1, abs=1e-6)
    assert metrics["dice_2"] == pytest.approx(dice_2, abs=1e-6)
    assert metrics["dice"] == pytest.approx((dice_1 + dice_2) / 2, abs=1e-6)


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


@pytest.mark.parametrize(
    ("name", "model", "channels"),
    [
        ("segmentation", "unet", [8, 16]),
        ("segmentation", "segresnet", [8, 16]),
        ("classification", "densenet", [8, 16]),
        ("classification", "resnet", [8, 16, 32, 64]),
    ],
)
def test_definitions_are_json_that_monai_builds_into_the_task_network(name, model, channels):
    """A task's network and inference transforms round-trip through JSON and MONAI's own
    ConfigParser into the same layers and transforms (what an exported bundle relies on)."""
    import json

    from monai.bundle import ConfigParser

    from fl_imaging.config import ModelConfig, TaskConfig

    task = build_task(TaskConfig(name=name, model=ModelConfig(name=model, channels=channels)))
    parser = ConfigParser(
        json.loads(
            json.dumps(
                {
                    "network_def": task.network_definition(),
                    "preprocessing": task.inference_preprocessing_definition(),
                }
            )
        )
    )
    rebuilt = parser.get_parsed_content("network_def")
    ours = task.network()
    assert type(rebuilt) is type(ours)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in ours.state_dict().items()
    }
    steps = parser.get_parsed_content("preprocessing")
    assert [type(s) for s in steps] == [type(s) for s in task.inference_transforms().transforms]
