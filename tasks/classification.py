"""Classification task from MONAI parts: DenseNet or ResNet (2D or 3D), cross-entropy, accuracy and
ROC-AUC."""

from __future__ import annotations

import math

import torch
from monai.metrics import ROCAUCMetric
from monai.networks.nets import DenseNet, ResNet
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandFlipd,
    Resized,
    Spacingd,
)
from torch import nn
from torch.utils.data import DataLoader

from fl_imaging.config import ModelName
from tasks.base import IMAGE_READERS, ORIENTATION_LABELS, ImagingTask

__all__ = ["ClassificationTask"]


class ClassificationTask(ImagingTask):
    """Whole-image classification into ``num_classes`` classes.

    Samples are ``{"image": (C, *roi_size) float, "label": () long class index}``.
    Metrics: ``accuracy`` (fraction), ``auc`` (macro one-vs-rest ROC-AUC, NaN when the validation
    set holds a single class), ``loss`` (cross-entropy).
    """

    main_metric = "accuracy"

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        channels = list(cfg.model.channels)
        if cfg.model.name == ModelName.resnet:
            return ResNet(
                block="basic",
                layers=[1, 1, 1, 1],
                block_inplanes=channels,
                spatial_dims=cfg.spatial_dims,
                n_input_channels=cfg.in_channels,
                num_classes=cfg.num_classes,
                conv1_t_size=3,
                conv1_t_stride=1,
                **({"norm": cfg.model.norm} if cfg.model.norm else {}),
            )
        return DenseNet(
            spatial_dims=cfg.spatial_dims,
            in_channels=cfg.in_channels,
            out_channels=cfg.num_classes,
            init_features=channels[0],
            growth_rate=channels[0],
            block_config=tuple(2 for _ in channels),
            dropout_prob=cfg.model.dropout,
            **({"norm": cfg.model.norm} if cfg.model.norm else {}),
        )

    def _image_steps(self) -> list:
        """Decoding, RAS orientation (3D), optional resampling, resizing to ``roi_size`` and
        z-score intensity of the image."""
        steps: list = [
            LoadImaged(keys="image", reader=list(IMAGE_READERS), image_only=True),
            EnsureChannelFirstd(keys="image"),
        ]
        if self.cfg.spatial_dims == 3:
            steps.append(Orientationd(keys="image", axcodes="RAS", labels=ORIENTATION_LABELS))
        if self.cfg.spacing is not None:
            steps.append(Spacingd(keys="image", pixdim=tuple(self.cfg.spacing)))
        steps += [
            Resized(keys="image", spatial_size=tuple(self.cfg.roi_size)),
            NormalizeIntensityd(keys="image", channel_wise=True),
        ]
        return steps

    def load_transforms(self) -> Compose:
        return Compose(
            [
                *self._image_steps(),
                EnsureTyped(keys=["image", "label"], dtype=torch.float32, track_meta=False),
            ]
        )

    def inference_transforms(self) -> Compose:
        return Compose([*self._image_steps(), EnsureTyped(keys="image", dtype=torch.float32)])

    def train_transforms(self) -> Compose:
        return Compose([RandFlipd(keys="image", prob=0.5, spatial_axis=0), self._label_as_long()])

    def eval_transforms(self) -> Compose:
        return Compose([self._label_as_long()])

    @staticmethod
    def _label_as_long() -> EnsureTyped:
        return EnsureTyped(keys="label", dtype=torch.long, track_meta=False)

    def loss_function(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        model.to(self.device).eval()
        loss_fn = self.loss_function()
        probs, labels = [], []
        loss_total, count = 0.0, 0
        for batch in loader:
            images = batch["image"].to(self.device)
            target = batch["label"].to(self.device).long().reshape(-1)
            logits = model(images)
            loss_total += float(loss_fn(logits, target)) * images.shape[0]
            count += images.shape[0]
            probs.append(torch.softmax(logits, dim=1).cpu())
            labels.append(target.cpu())
        prob = torch.cat(probs)
        truth = torch.cat(labels)
        accuracy = float((prob.argmax(dim=1) == truth).float().mean())
        auc = math.nan
        if truth.unique().numel() > 1:
            metric = ROCAUCMetric(average="macro")
            onehot = torch.nn.functional.one_hot(truth, self.cfg.num_classes)
            metric(prob, onehot)
            auc = float(metric.aggregate())
        return {"accuracy": accuracy, "auc": auc, "loss": loss_total / max(count, 1)}
