"""Segmentation task from MONAI parts: U-Net or SegResNet, Dice+CE loss, per-class Dice with
sliding-window inference."""

from __future__ import annotations

import torch
from monai.data import decollate_batch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import SegResNet, UNet
from monai.transforms import (
    AsDiscrete,
    CastToTyped,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandFlipd,
    RandSpatialCropd,
    Spacingd,
    SpatialPadd,
)
from torch import nn
from torch.utils.data import DataLoader

from fl_imaging.config import ModelName
from tasks.base import IMAGE_READERS, ORIENTATION_LABELS, ImagingTask

__all__ = ["SegmentationTask"]


class SegmentationTask(ImagingTask):
    """Voxel-wise segmentation of ``num_classes`` classes (background included).

    Samples are ``{"image": (C, *spatial) float, "label": (1, *spatial) int class index}``.
    Metrics: ``dice`` (mean over foreground classes), ``dice_<k>`` per foreground class, ``loss``.
    """

    main_metric = "dice"

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        channels = tuple(cfg.model.channels)
        if cfg.model.name == ModelName.segresnet:
            return SegResNet(
                spatial_dims=cfg.spatial_dims,
                init_filters=channels[0],
                in_channels=cfg.in_channels,
                out_channels=cfg.num_classes,
                dropout_prob=cfg.model.dropout or None,
                blocks_down=(1,) * len(channels),
                blocks_up=(1,) * (len(channels) - 1),
                num_groups=min(8, channels[0]),
                **({"norm": cfg.model.norm} if cfg.model.norm else {}),
            )
        return UNet(
            spatial_dims=cfg.spatial_dims,
            in_channels=cfg.in_channels,
            out_channels=cfg.num_classes,
            channels=channels,
            strides=(2,) * (len(channels) - 1),
            num_res_units=cfg.model.num_res_units,
            dropout=cfg.model.dropout,
            **({"norm": cfg.model.norm} if cfg.model.norm else {}),
        )

    def _image_steps(self, keys: list[str]) -> list:
        """Decoding, RAS orientation, optional resampling and z-score intensity of ``keys``
        (``image`` first); labels are resampled with nearest-neighbour interpolation."""
        modes = ("bilinear", "nearest")[: len(keys)]
        steps: list = [
            LoadImaged(keys=keys, reader=list(IMAGE_READERS), image_only=True),
            EnsureChannelFirstd(keys=keys),
            Orientationd(
                keys=keys, axcodes="RAS"[: self.cfg.spatial_dims], labels=ORIENTATION_LABELS
            ),
        ]
        if self.cfg.spacing is not None:
            steps.append(Spacingd(keys=keys, pixdim=tuple(self.cfg.spacing), mode=modes))
        steps.append(NormalizeIntensityd(keys="image", channel_wise=True))
        return steps

    def load_transforms(self) -> Compose:
        keys = ["image", "label"]
        return Compose(
            [
                *self._image_steps(keys),
                CastToTyped(keys=keys, dtype=(torch.float32, torch.uint8)),
                EnsureTyped(keys=keys, track_meta=False),
            ]
        )

    def inference_transforms(self) -> Compose:
        return Compose(
            [*self._image_steps(["image"]), CastToTyped(keys="image", dtype=torch.float32)]
        )

    def train_transforms(self) -> Compose:
        keys = ["image", "label"]
        roi = tuple(self.cfg.roi_size)
        return Compose(
            [
                SpatialPadd(keys=keys, spatial_size=roi),
                RandSpatialCropd(keys=keys, roi_size=roi, random_size=False),
                RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
                CastToTyped(keys="label", dtype=torch.long),
            ]
        )

    def eval_transforms(self) -> Compose:
        """Transforms after :meth:`load_transforms` for evaluation (labels as long)."""
        return Compose([CastToTyped(keys="label", dtype=torch.long)])

    def loss_function(self) -> nn.Module:
        return DiceCELoss(to_onehot_y=True, softmax=True)

    def predict_logits(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Sliding-window logits ``(B, num_classes, *spatial)`` for images ``(B, C, *spatial)``."""
        return sliding_window_inference(
            images,
            roi_size=tuple(self.cfg.roi_size),
            sw_batch_size=self.cfg.sw_batch_size,
            predictor=model,
            overlap=self.cfg.sw_overlap,
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        model.to(self.device).eval()
        n_classes = self.cfg.num_classes
        dice = DiceMetric(include_background=False, reduction="mean_batch")
        to_pred = AsDiscrete(argmax=True, to_onehot=n_classes)
        to_onehot = AsDiscrete(to_onehot=n_classes)
        loss_fn = self.loss_function()
        loss_total, count = 0.0, 0
        for batch in loader:
            images = batch["image"].to(self.device)
            labels = batch["label"].to(self.device)
            logits = self.predict_logits(model, images)
            loss_total += float(loss_fn(logits, labels)) * images.shape[0]
            count += images.shape[0]
            preds = [to_pred(p) for p in decollate_batch(logits)]
            truths = [to_onehot(t) for t in decollate_batch(labels)]
            dice(y_pred=preds, y=truths)
        # NaN for a class absent from every validation case (Dice is undefined there).
        per_class = torch.as_tensor(dice.aggregate()).reshape(-1)
        metrics = {f"dice_{k + 1}": float(v) for k, v in enumerate(per_class)}
        metrics["dice"] = float(torch.nanmean(per_class))
        metrics["loss"] = loss_total / max(count, 1)
        return metrics
