"""Classification task from MONAI parts: DenseNet or ResNet (2D or 3D), cross-entropy, accuracy and
ROC-AUC."""

from __future__ import annotations

import math
from typing import Any

import torch
from monai.metrics import ROCAUCMetric
from monai.transforms import (
    Compose,
    EnsureTyped,
    RandFlipd,
)
from torch import nn
from torch.utils.data import DataLoader

from fl_imaging.config import ModelName
from tasks.base import IMAGE_READERS, ORIENTATION_LABELS, ImagingTask
from tasks.definitions import instantiate

__all__ = ["ClassificationTask"]


class ClassificationTask(ImagingTask):
    """Whole-image classification into ``K = num_classes`` classes.

    Samples are ``{"image": (C_in, *roi_size) float32, "label": () class index 0..K-1}`` (label
    a 0-d float32 tensor after :meth:`load_transforms`, int64 after :meth:`train_transforms` or
    :meth:`eval_transforms`); batches hold ``image`` ``(B, C_in, *roi_size)`` and ``label``
    ``(B,)``. The model maps images to float32 logits ``(B, K)``.
    Metrics: ``accuracy`` (fraction in [0, 1]), ``auc`` (macro one-vs-rest ROC-AUC in [0, 1],
    NaN when the validation set holds a single class or, for K > 2, lacks any class), ``loss``
    (cross-entropy, >= 0).

    Args:
        cfg: the validated ``task`` config (``name: classification``).
        device: where training and evaluation run (see :class:`~tasks.base.ImagingTask`);
            None: the CPU.
    """

    main_metric = "accuracy"

    def builtin_network_definition(self) -> dict[str, Any]:
        """The MONAI ``ResNet`` or ``DenseNet`` of ``cfg.model.name``, as a bundle config item.

        ResNet: basic blocks, one per stage, the 4 stage widths of ``cfg.model.channels``, a
        3-wide stride-1 stem. DenseNet: ``init_features = growth_rate = channels[0]``, one
        dense block of 2 layers per ``channels`` entry, ``dropout``. ``cfg.model.norm`` replaces
        the network's default normalisation when set.

        Returns:
            ``{"_target_": "monai.networks.nets.ResNet" | "...DenseNet", **kwargs}``; the
            network it builds maps images ``(B, C_in, *spatial)`` float32 to logits ``(B, K)``
            float32 (no softmax); it ends in global pooling, so any spatial size large enough
            for its downsampling works (training and evaluation use ``cfg.roi_size``).
        """
        cfg = self.cfg
        channels = list(cfg.model.channels)
        norm = {"norm": cfg.model.norm} if cfg.model.norm else {}
        if cfg.model.name == ModelName.resnet:
            return {
                "_target_": "monai.networks.nets.ResNet",
                "block": "basic",
                "layers": [1, 1, 1, 1],
                "block_inplanes": channels,
                "spatial_dims": cfg.spatial_dims,
                "n_input_channels": cfg.in_channels,
                "num_classes": cfg.num_classes,
                "conv1_t_size": 3,
                "conv1_t_stride": 1,
                **norm,
            }
        return {
            "_target_": "monai.networks.nets.DenseNet",
            "spatial_dims": cfg.spatial_dims,
            "in_channels": cfg.in_channels,
            "out_channels": cfg.num_classes,
            "init_features": channels[0],
            "growth_rate": channels[0],
            "block_config": [2] * len(channels),
            "dropout_prob": cfg.model.dropout,
            **norm,
        }

    def _image_step_definitions(self) -> list[dict[str, Any]]:
        """Decoding, RAS orientation (3D), optional resampling, resizing to ``roi_size`` and
        z-score intensity of the image, as bundle config items.

        Returns:
            The list of MONAI dict transform definitions on ``image`` (not yet built), ending
            in an image ``(C_in, *roi_size)``.
        """
        steps: list[dict[str, Any]] = [
            {
                "_target_": "LoadImaged",
                "keys": "image",
                "reader": list(IMAGE_READERS),
                "image_only": True,
            },
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
        ]
        if self.cfg.spatial_dims == 3:
            steps.append(
                {
                    "_target_": "Orientationd",
                    "keys": "image",
                    "axcodes": "RAS",
                    "labels": [list(axis) for axis in ORIENTATION_LABELS],
                }
            )
        if self.cfg.spacing is not None:
            steps.append(
                {"_target_": "Spacingd", "keys": "image", "pixdim": list(self.cfg.spacing)}
            )
        steps += [
            {"_target_": "Resized", "keys": "image", "spatial_size": list(self.cfg.roi_size)},
            # the same steps load (with the label) and infer: as the task always had them
            *self.configured_image_step_definitions(with_label=True),
        ]
        return steps

    def _image_steps(self) -> list:
        """The transforms of :meth:`_image_step_definitions`, built."""
        return instantiate(self._image_step_definitions())

    def load_transforms(self) -> Compose:
        """Deterministic loading of a case: what the dataset cache keeps.

        Returns:
            A ``Compose`` mapping ``{"image": path, "label": int class index, ...}`` to plain
            tensors (no metadata): ``image`` ``(C_in, *roi_size)`` float32 (RAS-oriented in
            3D, resampled to ``cfg.spacing`` when set, resized to ``cfg.roi_size``, z-scored
            per channel) and ``label`` a 0-d float32 tensor holding the class index 0..K-1.
            Other keys (``case_id``) pass through.
        """
        return Compose(
            [
                *self._image_steps(),
                EnsureTyped(keys=["image", "label"], dtype=torch.float32, track_meta=False),
            ]
        )

    def inference_preprocessing_definition(self) -> list[dict[str, Any]]:
        """The image part of :meth:`load_transforms`, as bundle config items.

        Returns:
            Definitions mapping ``{"image": path}`` to ``image``: a ``MetaTensor``
            ``(C_in, *roi_size)`` float32 keeping its metadata.
        """
        return [
            *self._image_step_definitions(),
            {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
        ]

    def train_transforms(self) -> Compose:
        """Random flip of a loaded sample, for training.

        Returns:
            A ``Compose`` flipping ``image`` ``(C_in, *roi_size)`` float32 along its first
            spatial axis with probability 0.5 and casting ``label`` to a 0-d int64 tensor (a
            DataLoader stacks it to ``(B,)``).
        """
        return Compose(
            [
                RandFlipd(keys="image", prob=0.5, spatial_axis=0),
                *self.configured_augmentation(),
                self._label_as_long(),
            ]
        )

    def eval_transforms(self) -> Compose:
        """Transforms after :meth:`load_transforms` for evaluation (labels as long).

        Returns:
            A ``Compose`` leaving ``image`` unchanged and casting ``label`` to a 0-d int64
            tensor.
        """
        return Compose([self._label_as_long()])

    @staticmethod
    def _label_as_long() -> EnsureTyped:
        """``label`` as an int64 tensor without metadata (same shape)."""
        return EnsureTyped(keys="label", dtype=torch.long, track_meta=False)

    def default_loss(self) -> nn.Module:
        """PyTorch's ``nn.CrossEntropyLoss()`` (MONAI has no classification loss of its own).

        Returns:
            A module called as ``loss_fn(logits, target)`` with ``logits`` ``(B, K)`` float
            (log-softmax is applied inside) and ``target`` ``(B,)`` int64 class indices
            0..K-1. It returns a 0-d float tensor, >= 0: the mean over the batch.
        """
        return nn.CrossEntropyLoss()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Accuracy, macro ROC-AUC and mean cross-entropy of ``model`` on ``loader``.

        Class probabilities are the softmax of the logits over the K classes; the predicted
        class is their arg-max (the lowest index on ties). The AUC is MONAI's
        ``ROCAUCMetric(average="macro")``: the unweighted mean over the K classes of the
        one-vs-rest AUC of that class's probability (tied scores count 1/2). For K = 2 both
        classes give the same value, the AUC of the probability of class 1.

        Args:
            model: a network as :meth:`build_model` returns; moved to :attr:`device` and put in
                eval mode (it stays there).
            loader: an iterable of batch dicts holding ``image`` ``(B, C_in, *roi_size)``
                float32 and ``label`` ``(B,)`` (or ``(B, 1)``) class indices 0..K-1, any
                numeric dtype (cast to int64).

        Returns:
            ``{"accuracy": ..., "auc": ..., "loss": ...}`` as Python floats over all cases of
            ``loader`` together: ``accuracy`` in [0, 1]; ``auc`` in [0, 1], NaN when the labels
            hold a single class or (K > 2) some class has no case (its one-vs-rest AUC is
            undefined; MONAI warns); ``loss`` the sample-weighted mean cross-entropy, >= 0.

        Raises:
            ValueError: when ``loader`` yields no batch.
        """
        model.to(self.device).eval()
        loss_fn = self.loss_function()
        probs, labels = [], []
        loss_total, count = 0.0, 0
        for batch in loader:
            images = batch["image"].to(self.device)
            target = batch["label"].to(self.device).long().reshape(-1)
            with self.autocast():
                logits = model(images).float()
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
