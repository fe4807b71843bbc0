"""What every MONAI task offers to the federated machinery: model, transforms, training, evaluation.

A task is built from the ``task`` config group. It knows nothing about Flower or sites: it takes
MONAI datasets and a model and returns numbers. The training loop is ours (a plain PyTorch loop,
MONAI has none for this); everything inside it is MONAI's (networks, losses, metrics, transforms).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from monai.transforms import Compose
from torch import nn
from torch.utils.data import DataLoader

from fl_imaging.config import OptimizerName, TaskConfig
from fl_imaging.data.readers import IMAGE_READERS

__all__ = ["IMAGE_READERS", "ORIENTATION_LABELS", "ImagingTask", "TrainResult", "build_optimizer"]

#: World axes of RAS+ (left->right, posterior->anterior, inferior->superior) for Orientationd.
ORIENTATION_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))

#: Extra term added to the loss of every batch (e.g. FedProx's proximal term); takes the model.
ExtraLoss = Callable[[nn.Module], torch.Tensor]


@dataclass
class TrainResult:
    """Mean training loss over the samples seen, and how many samples (not batches) were seen."""

    loss: float
    num_samples: int


def build_optimizer(model: nn.Module, cfg: TaskConfig) -> torch.optim.Optimizer:
    """Return the optimizer named in ``cfg.optimizer`` over ``model``'s parameters."""
    opt = cfg.optimizer
    params = model.parameters()
    if opt.name == OptimizerName.sgd:
        return torch.optim.SGD(
            params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay
        )
    if opt.name == OptimizerName.adamw:
        return torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)
    return torch.optim.Adam(params, lr=opt.lr, weight_decay=opt.weight_decay)


class ImagingTask(abc.ABC):
    """A MONAI training task configured by a :class:`~fl_imaging.config.TaskConfig`."""

    #: Name of the metric that summarises a site's validation result (higher is better).
    main_metric: str = "loss"

    def __init__(self, cfg: TaskConfig, device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """Return a freshly initialised MONAI network (on the CPU)."""

    @abc.abstractmethod
    def load_transforms(self) -> Compose:
        """Deterministic transforms from file paths to tensors: decoding, orientation, spacing,
        intensity normalisation. Their output is what a cache keeps."""

    @abc.abstractmethod
    def inference_transforms(self) -> Compose:
        """The image part of :meth:`load_transforms` (no label), keeping MONAI's metadata so that
        a prediction can be mapped back to the input's grid (``Invertd``)."""

    @abc.abstractmethod
    def train_transforms(self) -> Compose:
        """Random augmentation applied after :meth:`load_transforms` for training batches."""

    def eval_transforms(self) -> Compose:
        """Transforms applied after :meth:`load_transforms` for evaluation samples."""
        return Compose([])

    @abc.abstractmethod
    def loss_function(self) -> nn.Module:
        """The MONAI loss taking ``(prediction_logits, target)``."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Evaluate ``model`` on a loader of validation samples.

        Returns metric name -> value; always ``loss`` and the task's :attr:`main_metric`.
        """

    def collate_keys(self) -> Sequence[str]:
        """Keys of a sample dictionary that training batches need."""
        return ("image", "label")

    def train(
        self,
        model: nn.Module,
        loader: DataLoader,
        epochs: int,
        *,
        extra_loss: ExtraLoss | None = None,
        log: Callable[[str], None] | None = None,
    ) -> TrainResult:
        """Train ``model`` in place for ``epochs`` passes over ``loader``.

        ``extra_loss(model)`` is added to every batch's loss when given. ``log`` receives one line
        per epoch. Returns the mean loss of the last epoch and the number of samples it saw.
        """
        model.to(self.device).train()
        optimizer = build_optimizer(model, self.cfg)
        loss_fn = self.loss_function()
        total, count = 0.0, 0
        for epoch in range(1, epochs + 1):
            total, count = 0.0, 0
            for batch in loader:
                images = batch["image"].to(self.device)
                targets = batch["label"].to(self.device)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(images), targets)
                if extra_loss is not None:
                    loss = loss + extra_loss(model)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * images.shape[0]
                count += images.shape[0]
            if log is not None:
                log(f"epoch {epoch}/{epochs}: loss {total / max(count, 1):.4f} ({count} samples)")
        return TrainResult(loss=total / max(count, 1), num_samples=count)
