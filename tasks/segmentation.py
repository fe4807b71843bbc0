"""Segmentation task from MONAI parts: U-Net or SegResNet, Dice+CE loss, per-class Dice with
sliding-window inference."""

from __future__ import annotations

from typing import Any

import torch
from monai.data import decollate_batch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.transforms import (
    AsDiscrete,
    CastToTyped,
    Compose,
    EnsureTyped,
    RandFlipd,
    RandSpatialCropd,
    SpatialPadd,
)
from torch import nn
from torch.utils.data import DataLoader

from fl_imaging.config import ModelName
from tasks.base import IMAGE_READERS, ORIENTATION_LABELS, ImagingTask
from tasks.definitions import instantiate

__all__ = ["SegmentationTask"]


class SegmentationTask(ImagingTask):
    """Voxel-wise segmentation of ``K = num_classes`` classes (background 0 included).

    Samples are ``{"image": (C_in, *spatial) float32, "label": (1, *spatial) class indices
    0..K-1}`` (label uint8 after :meth:`load_transforms`, int64 after :meth:`train_transforms`
    or :meth:`eval_transforms`); batches add the leading ``B`` axis. The model maps
    ``(B, C_in, *spatial)`` to float32 logits ``(B, K, *spatial)``.
    Metrics: ``dice`` (mean over foreground classes), ``dice_<k>`` per foreground class
    ``k = 1..K-1`` (each in [0, 1]), ``loss`` (Dice + cross-entropy, >= 0).

    Args:
        cfg: the validated ``task`` config (``name: segmentation``).
        device: where training and evaluation run (see :class:`~tasks.base.ImagingTask`);
            None: the CPU.
    """

    main_metric = "dice"

    def builtin_network_definition(self) -> dict[str, Any]:
        """The MONAI ``UNet`` or ``SegResNet`` of ``cfg.model.name``, as a bundle config item.

        UNet: one level per ``cfg.model.channels`` entry, stride 2 between levels,
        ``num_res_units`` residual units, ``dropout``; SegResNet: ``init_filters =
        channels[0]``, one down block per entry. ``cfg.model.norm`` replaces the network's
        default normalisation when set.

        Returns:
            ``{"_target_": "monai.networks.nets.UNet" | "...SegResNet", **kwargs}``; the
            network it builds maps images ``(B, C_in, *spatial)`` float32 to logits
            ``(B, K, *spatial)`` float32 (no softmax), same spatial size. Each spatial size it
            sees (``cfg.roi_size`` for the sliding windows) must be a multiple of
            ``2 ** (len(channels) - 1)``.

        Raises:
            ValueError: for SegResNet with MONAI's default group norm (``cfg.model.norm``
                unset) when ``channels[0]`` is not a multiple of 8: MONAI ignores the
                ``num_groups`` argument passed here unless ``norm_name`` is set (raised when
                the network is built).
        """
        cfg = self.cfg
        channels = list(cfg.model.channels)
        norm = {"norm": cfg.model.norm} if cfg.model.norm else {}
        if cfg.model.name == ModelName.segresnet:
            return {
                "_target_": "monai.networks.nets.SegResNet",
                "spatial_dims": cfg.spatial_dims,
                "init_filters": channels[0],
                "in_channels": cfg.in_channels,
                "out_channels": cfg.num_classes,
                "dropout_prob": cfg.model.dropout or None,
                "blocks_down": [1] * len(channels),
                "blocks_up": [1] * (len(channels) - 1),
                "num_groups": min(8, channels[0]),
                **norm,
            }
        return {
            "_target_": "monai.networks.nets.UNet",
            "spatial_dims": cfg.spatial_dims,
            "in_channels": cfg.in_channels,
            "out_channels": cfg.num_classes,
            "channels": channels,
            "strides": [2] * (len(channels) - 1),
            "num_res_units": cfg.model.num_res_units,
            "dropout": cfg.model.dropout,
            **norm,
        }

    def _image_step_definitions(self, keys: list[str]) -> list[dict[str, Any]]:
        """Decoding, RAS orientation, optional resampling and z-score intensity of ``keys``
        (``image`` first), as bundle config items; labels are resampled with
        nearest-neighbour interpolation.

        Args:
            keys: ``["image"]`` or ``["image", "label"]``.

        Returns:
            The list of MONAI dict transform definitions (not yet built); each key becomes
            channel-first ``(C, *spatial)``, oriented to ``"RAS"[:spatial_dims]``.
        """
        modes = ["bilinear", "nearest"][: len(keys)]
        steps: list[dict[str, Any]] = [
            {
                "_target_": "LoadImaged",
                "keys": keys,
                "reader": list(IMAGE_READERS),
                "image_only": True,
            },
            {"_target_": "EnsureChannelFirstd", "keys": keys},
            {
                "_target_": "Orientationd",
                "keys": keys,
                "axcodes": "RAS"[: self.cfg.spatial_dims],
                "labels": [list(axis) for axis in ORIENTATION_LABELS],
            },
        ]
        if self.cfg.spacing is not None:
            steps.append(
                {
                    "_target_": "Spacingd",
                    "keys": keys,
                    "pixdim": list(self.cfg.spacing),
                    "mode": modes,
                }
            )
        return steps + self.configured_image_step_definitions(with_label="label" in keys)

    def _image_steps(self, keys: list[str]) -> list:
        """The transforms of :meth:`_image_step_definitions` for ``keys``, built."""
        return instantiate(self._image_step_definitions(keys))

    def load_transforms(self) -> Compose:
        """Deterministic loading of a case: what the dataset cache keeps.

        Returns:
            A ``Compose`` mapping ``{"image": path, "label": path, ...}`` to plain tensors (no
            metadata): ``image`` ``(C_in, *spatial)`` float32, z-scored per channel over all
            voxels; ``label`` ``(1, *spatial)`` uint8 class indices 0..K-1. ``*spatial`` is the
            image's grid after RAS orientation and, when ``cfg.spacing`` is set, resampling to
            that spacing (bilinear image, nearest-neighbour label); image and label files must
            share a grid. Other keys (``case_id``) pass through.
        """
        keys = ["image", "label"]
        return Compose(
            [
                *self._image_steps(keys),
                CastToTyped(keys=keys, dtype=(torch.float32, torch.uint8)),
                EnsureTyped(keys=keys, track_meta=False),
            ]
        )

    def inference_preprocessing_definition(self) -> list[dict[str, Any]]:
        """The image part of :meth:`load_transforms`, as bundle config items.

        Returns:
            Definitions mapping ``{"image": path}`` to ``image``: a ``MetaTensor``
            ``(C_in, *spatial)`` float32 (oriented, resampled, z-scored as in
            :meth:`load_transforms`) keeping its metadata, so that ``Invertd`` can map logits
            ``(K, *spatial)`` back to the file's grid.
        """
        return [
            *self._image_step_definitions(["image"]),
            {"_target_": "CastToTyped", "keys": "image", "dtype": "$torch.float32"},
        ]

    def train_transforms(self) -> Compose:
        """Random patch and flip of a loaded sample, for training.

        Pads ``image`` and ``label`` (zeros) to at least ``cfg.roi_size``, crops one random
        ``roi_size`` patch from both, flips both along the first spatial axis with probability
        0.5, and casts the label to int64.

        Returns:
            A ``Compose`` mapping a sample from :meth:`load_transforms` to ``image``
            ``(C_in, *roi_size)`` float32 and ``label`` ``(1, *roi_size)`` int64 class indices
            0..K-1.
        """
        keys = ["image", "label"]
        roi = tuple(self.cfg.roi_size)
        return Compose(
            [
                SpatialPadd(keys=keys, spatial_size=roi),
                RandSpatialCropd(keys=keys, roi_size=roi, random_size=False),
                RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
                *self.configured_augmentation(),
                CastToTyped(keys="label", dtype=torch.long),
            ]
        )

    def eval_transforms(self) -> Compose:
        """Transforms after :meth:`load_transforms` for evaluation (labels as long).

        Returns:
            A ``Compose`` keeping the whole image ``(C_in, *spatial)`` float32 (no crop:
            :meth:`evaluate` uses sliding windows) and casting ``label`` to ``(1, *spatial)``
            int64.
        """
        return Compose([CastToTyped(keys="label", dtype=torch.long)])

    def default_loss(self) -> nn.Module:
        """MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``.

        Returns:
            A module called as ``loss_fn(logits, target)`` with ``logits`` ``(B, K, *spatial)``
            float (softmax is applied inside) and ``target`` ``(B, 1, *spatial)`` class indices
            0..K-1 (one-hot encoded inside). It returns a 0-d float tensor, >= 0: soft Dice
            loss over all K classes (background included), averaged over batch and classes,
            plus the mean voxel-wise cross-entropy, with equal weights.
        """
        return DiceCELoss(to_onehot_y=True, softmax=True)

    def loss_defaults(self) -> dict[str, Any]:
        """For a ``task.loss._target_``: the labels are class indices and the network gives
        logits, so ``to_onehot_y=True`` and ``softmax=True`` where the loss takes them."""
        return {"to_onehot_y": True, "softmax": True}

    def predict_logits(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Sliding-window logits ``(B, num_classes, *spatial)`` for images ``(B, C, *spatial)``.

        Windows of ``cfg.roi_size`` overlap by ``cfg.sw_overlap`` and are blended with equal
        weights; ``cfg.sw_batch_size`` windows go through ``model`` at once. Neither the
        model's mode nor gradient tracking is changed: call it under ``torch.no_grad()`` with
        ``model.eval()`` for inference.

        Args:
            model: a network as :meth:`build_model` returns, on the device of ``images``.
            images: ``(B, C_in, *spatial)`` float32, any spatial size (smaller images are
                padded for the windows, the output is cropped back).

        Returns:
            Logits ``(B, K, *spatial)`` float32 (no softmax), same spatial size and device as
            ``images``; with :attr:`amp`, each window runs under float16 autocast and the
            windows are blended in float32.

        Raises:
            ValueError: when ``images`` has not ``2 + cfg.spatial_dims`` dimensions.
        """
        with self.autocast():
            logits = sliding_window_inference(
                images,
                roi_size=tuple(self.cfg.roi_size),
                sw_batch_size=self.cfg.sw_batch_size,
                predictor=model,
                overlap=self.cfg.sw_overlap,
            )
        return logits.float()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Per-class Dice of the arg-max prediction and the mean loss on ``loader``.

        Logits come from :meth:`predict_logits` on whole images; the prediction is their
        arg-max over classes. Dice is computed per case and foreground class; a case whose
        ground truth lacks class ``k`` is left out of ``dice_<k>`` (a false positive there
        costs nothing), and ``dice_<k>`` is the mean over the remaining cases. When no case
        holds class ``k``, MONAI's reduction gives ``dice_<k> = 0.0`` (not NaN).

        Args:
            model: a network as :meth:`build_model` returns; moved to :attr:`device` and put in
                eval mode (it stays there).
            loader: an iterable of batch dicts holding ``image`` ``(B, C_in, *spatial)``
                float32 and ``label`` ``(B, 1, *spatial)`` int64 class indices 0..K-1 (spatial
                sizes may differ between batches, not within one).

        Returns:
            ``{"dice_1": ..., ..., "dice_<K-1>": ..., "dice": ..., "loss": ...}`` as Python
            floats: ``dice_<k>`` in [0, 1]; ``dice`` the mean of the ``dice_<k>`` (NaN ones
            ignored) in [0, 1]; ``loss`` the sample-weighted mean of :meth:`loss_function` over
            the batches, >= 0.

        Raises:
            ValueError: when ``loader`` yields no batch.
        """
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
