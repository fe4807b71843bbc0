"""What every MONAI task offers to the federated machinery: model, transforms, training, evaluation.

A task is built from the ``task`` config group. It knows nothing about Flower or sites: it takes
MONAI datasets and a model and returns numbers. The training loop is ours (a plain PyTorch loop,
MONAI has none for this); everything inside it is MONAI's (networks, losses, metrics, transforms).

Shapes in the docstrings of the tasks, as MONAI writes them:

- ``B``: batch size; ``C_in``: ``cfg.in_channels``; ``K``: ``cfg.num_classes`` (background
  included for segmentation, so foreground classes are ``1..K-1``).
- ``*spatial``: ``H, W`` when ``cfg.spatial_dims`` is 2, ``H, W, D`` when it is 3 (``H, W[, D]``);
  ``*roi_size``: the spatial sizes of ``cfg.roi_size`` (one per spatial axis).
- A *sample* is one case without the batch axis (``(C_in, *spatial)``); a DataLoader stacks
  samples into *batches* with a leading ``B`` axis.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.transforms import Compose
from torch import nn
from torch.utils.data import DataLoader

from fl_imaging.config import ConfigError, OptimizerName, TaskConfig
from fl_imaging.data.readers import IMAGE_READERS
from tasks.definitions import instantiate
from tasks.intensity import intensity_definitions
from tasks.targets import (
    check_arguments,
    filled_arguments,
    resolve_class,
    target_definition,
    transform_definitions,
)
from tasks.trainable import freeze_except

__all__ = ["IMAGE_READERS", "ORIENTATION_LABELS", "ImagingTask", "TrainResult", "build_optimizer"]

log = logging.getLogger("fl_imaging")

#: World axes of RAS+ (left->right, posterior->anterior, inferior->superior) for Orientationd.
ORIENTATION_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))

#: Extra term added to the loss of every batch (e.g. FedProx's proximal term); takes the model.
ExtraLoss = Callable[[nn.Module], torch.Tensor]


@dataclass
class TrainResult:
    """Mean training loss over the samples seen, and how many samples (not batches) were seen.

    Attributes:
        loss: mean per-sample loss of the last epoch (each batch's loss, extra term included,
            weighted by its batch size); ``0.0`` when no sample was seen.
        num_samples: number of samples (cases, not batches) seen in the last epoch, ``>= 0``.
    """

    loss: float
    num_samples: int


def build_optimizer(model: nn.Module, cfg: TaskConfig) -> torch.optim.Optimizer:
    """Return the optimizer named in ``cfg.optimizer`` over ``model``'s parameters.

    Args:
        model: the network whose trainable parameters (``requires_grad``) the optimizer
            updates.
        cfg: task config; ``cfg.optimizer`` gives ``name`` (``sgd``: SGD with ``momentum``;
            ``adamw``: AdamW; ``adam``: Adam), ``lr`` and ``weight_decay``; or a ``_target_``
            (any ``torch.optim`` class, given ``lr`` and ``weight_decay`` where it takes them,
            and ``args``).

    Returns:
        A new ``torch.optim.Optimizer`` with fresh state (no momentum or Adam moments yet).

    Raises:
        ConfigError: for a ``_target_`` that is not a ``torch.optim.Optimizer`` or arguments
            it does not take (:mod:`tasks.targets`).
    """
    opt = cfg.optimizer
    params = [p for p in model.parameters() if p.requires_grad]  # frozen ones stay as they are
    if opt._target_:  # built here, not from a definition: the parameters are no config value
        check_arguments(opt.args, "task.optimizer.args")
        cls = resolve_class(opt._target_, "optimizer", "task.optimizer._target_")
        defaults = {"lr": opt.lr, "weight_decay": opt.weight_decay}
        kwargs = filled_arguments(cls, opt.args, defaults, "task.optimizer.args")
        return cls(params, **{k: v for k, v in kwargs.items() if k != "params"})
    if opt.name == OptimizerName.sgd:
        return torch.optim.SGD(
            params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay
        )
    if opt.name == OptimizerName.adamw:
        return torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)
    return torch.optim.Adam(params, lr=opt.lr, weight_decay=opt.weight_decay)


class ImagingTask(abc.ABC):
    """A MONAI training task configured by a :class:`~fl_imaging.config.TaskConfig`.

    Args:
        cfg: the validated ``task`` config (spatial dims, channels, classes, model, optimizer,
            ``roi_size``, ...).
        device: where :meth:`train` and :meth:`evaluate` run the model (resolved from
            ``cfg.device`` by :func:`fl_imaging.config.devices.resolve_device` on the machine that
            trains); None: the CPU (the coordinator only builds the model).

    With ``cfg.amp`` on a CUDA device, training, evaluation and inference run under float16
    autocast and training scales the loss (``torch.amp.GradScaler``), as MONAI's trainers do;
    :attr:`amp` says whether it is on. On a CPU ``cfg.amp`` is ignored (float32), so that a
    config runs unchanged on a machine without a GPU.
    """

    #: Name of the metric that summarises a site's validation result (higher is better), a key
    #: of the dict :meth:`evaluate` returns. Class attribute: ``"dice"`` for segmentation,
    #: ``"accuracy"`` for classification (the base's ``"loss"`` is lower-is-better and used by
    #: no task).
    main_metric: str = "loss"

    def __init__(self, cfg: TaskConfig, device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.device = device or torch.device("cpu")
        #: Whether mixed precision is on: ``cfg.amp`` on a CUDA device.
        self.amp = bool(cfg.amp) and self.device.type == "cuda"

    def autocast(self) -> torch.autocast:
        """The context in which the model's forward passes run: float16 autocast on
        :attr:`device` when :attr:`amp` is on, else a context that changes nothing. Outputs
        computed inside may be float16: cast them with ``.float()`` before losses and metrics."""
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp)

    def build_model(self) -> nn.Module:
        """Return a freshly initialised MONAI network (on the CPU, in training mode): the task's
        :meth:`network`, made fit for per-case gradients when ``cfg.dp_sgd.enabled`` (batch norm
        as GroupNorm, no in-place activation: :func:`tasks.private_model.private_network`), so
        that the coordinator and every site build the same layers.

        Returns:
            An ``nn.Module`` taking images ``(B, C_in, *spatial)`` float32 and returning float32
            logits (no softmax): ``(B, K, *spatial)`` for segmentation, ``(B, K)`` for
            classification.

        With ``cfg.model.trainable``, only the parameters those patterns match keep
        ``requires_grad`` (:func:`tasks.trainable.freeze_except`).

        Raises:
            ConfigError: with DP-SGD, for a layer Opacus cannot train (named); for a
                ``trainable`` pattern that matches no parameter.
        """
        model = self.network()
        if self.cfg.dp_sgd.enabled:
            from tasks.private_model import private_network  # Opacus only when DP-SGD is on

            model, conversion = private_network(model)
            if conversion.message():
                log.debug("%s", conversion.message())
        if self.cfg.model.trainable:  # the others frozen: tasks.trainable
            freeze_except(model, self.cfg.model.trainable)
        return model

    def network_definition(self) -> dict[str, Any]:
        """The task's network as a MONAI bundle config item (:mod:`tasks.definitions`):
        ``{"_target_": ..., **kwargs}``, JSON-serialisable. :meth:`network` builds it, and an
        exported bundle's ``network_def`` is this dict, so MONAI rebuilds the same layers.

        With ``cfg.model._target_`` it is that class (checked by :mod:`tasks.targets`) with
        ``cfg.model.args`` and, where its constructor takes them and ``args`` leaves them
        out, ``spatial_dims``, ``in_channels`` / ``n_input_channels`` and ``out_channels`` /
        ``num_classes`` from the task; else :meth:`builtin_network_definition`.

        Raises:
            ConfigError: for a ``_target_`` that cannot be built (see :mod:`tasks.targets`),
                or ``args`` whose channels contradict ``in_channels`` / ``num_classes``.
        """
        model = self.cfg.model
        if not model._target_:
            return self.builtin_network_definition()
        cfg = self.cfg
        defaults = {
            "spatial_dims": cfg.spatial_dims,
            "in_channels": cfg.in_channels,
            "n_input_channels": cfg.in_channels,
            "out_channels": cfg.num_classes,
            "num_classes": cfg.num_classes,
        }
        for name in ("in_channels", "n_input_channels", "out_channels", "num_classes"):
            if name in model.args and model.args[name] != defaults[name]:
                task_key = "task.in_channels" if "in" in name else "task.num_classes"
                raise ConfigError(
                    f"task.model.args.{name}={model.args[name]} contradicts "
                    f"{task_key}={defaults[name]}: set {task_key} instead (the data and the "
                    "metrics follow it) and leave it out of task.model.args"
                )
        return target_definition(
            model._target_, "network", model.args, defaults, "task.model._target_"
        )

    @abc.abstractmethod
    def builtin_network_definition(self) -> dict[str, Any]:
        """The network named by ``cfg.model.name``, as :meth:`network_definition` returns it."""

    def network(self) -> nn.Module:
        """Return the task's freshly initialised MONAI network (:meth:`network_definition`,
        built; CPU, training mode), before any DP-SGD conversion; same output as
        :meth:`build_model`."""
        return instantiate(self.network_definition())

    @abc.abstractmethod
    def load_transforms(self) -> Compose:
        """Deterministic transforms from file paths to tensors: decoding, orientation, spacing,
        intensity normalisation. Their output is what a cache keeps.

        Returns:
            A ``Compose`` mapping a case dict ``{"image": path, "label": path or class index,
            ...}`` to a sample whose ``image`` is ``(C_in, *spatial)`` float32 (z-scored per
            channel); the label's form is the task's (see the subclasses). Other keys (e.g.
            ``case_id``) pass through.
        """

    @abc.abstractmethod
    def inference_preprocessing_definition(self) -> list[dict[str, Any]]:
        """The image part of :meth:`load_transforms` (no label) as MONAI bundle config items
        (:mod:`tasks.definitions`), keeping MONAI's metadata so that a prediction can be mapped
        back to the input's grid (``Invertd``). An exported bundle's ``preprocessing`` is this
        list.

        Returns:
            Definitions of dict transforms mapping ``{"image": path}`` to a dict whose
            ``image`` is a ``MetaTensor`` ``(C_in, *spatial)`` float32 carrying its affine and
            the applied operations.
        """

    def inference_transforms(self) -> Compose:
        """:meth:`inference_preprocessing_definition`, built and composed.

        Returns:
            A ``Compose`` mapping ``{"image": path}`` to a dict whose ``image`` is a
            ``MetaTensor`` ``(C_in, *spatial)`` float32 carrying its affine and the applied
            operations.
        """
        return Compose(instantiate(self.inference_preprocessing_definition()))

    @abc.abstractmethod
    def train_transforms(self) -> Compose:
        """Random augmentation applied after :meth:`load_transforms` for training batches.

        Returns:
            A ``Compose`` applied to a sample from :meth:`load_transforms`; its output is what a
            training DataLoader stacks (``image`` float32, ``label`` int64, see the subclasses).
            Seed it with ``Compose.set_random_state`` for reproducible augmentation.
        """

    def configured_image_step_definitions(self, *, with_label: bool) -> list[dict[str, Any]]:
        """The configured end of the deterministic image steps: the intensity preset
        (:mod:`tasks.intensity`) then ``cfg.transforms.preprocessing``, as bundle config items.

        Args:
            with_label: whether the samples hold a ``label`` key; without one (inference),
                each preprocessing transform gets ``allow_missing_keys=True`` where it takes it.

        Returns:
            Definitions of dict transforms on ``image`` (and the keys the user named).
        """
        return [
            *intensity_definitions(self.cfg.transforms),
            *transform_definitions(
                self.cfg.transforms.preprocessing,
                "task.transforms.preprocessing",
                None if with_label else {"allow_missing_keys": True},
            ),
        ]

    def configured_augmentation(self) -> list:
        """``cfg.transforms.augmentation``, checked (:mod:`tasks.targets`) and built: the random
        transforms each task adds after its own crop and flip, for training only."""
        return instantiate(
            transform_definitions(self.cfg.transforms.augmentation, "task.transforms.augmentation")
        )

    def eval_transforms(self) -> Compose:
        """Transforms applied after :meth:`load_transforms` for evaluation samples.

        Returns:
            A deterministic ``Compose`` (here empty: samples pass unchanged); subclasses cast the
            label to int64.
        """
        return Compose([])

    def loss_function(self) -> nn.Module:
        """The loss taking ``(prediction_logits, target)``: ``cfg.loss._target_`` when set
        (with ``cfg.loss.args`` and the task's :meth:`loss_defaults` where it takes them),
        else :meth:`default_loss`.

        Returns:
            An ``nn.Module`` called as ``loss_fn(logits, target)``, with ``logits`` as
            :meth:`build_model`'s output and ``target`` as a batch's ``label`` (class indices);
            it returns a scalar (0-d) float tensor, the mean over the batch.

        Raises:
            ConfigError: for a ``_target_`` that cannot be built (:mod:`tasks.targets`).
        """
        loss = self.cfg.loss
        if not loss._target_:
            return self.default_loss()
        return instantiate(
            target_definition(
                loss._target_, "loss", loss.args, self.loss_defaults(), "task.loss._target_"
            )
        )

    def loss_defaults(self) -> dict[str, Any]:
        """Arguments a ``task.loss._target_`` gets where it takes them and ``args`` leaves them
        out (none here; segmentation: ``to_onehot_y`` and ``softmax``)."""
        return {}

    @abc.abstractmethod
    def default_loss(self) -> nn.Module:
        """The task's own loss, as :meth:`loss_function` returns it."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Evaluate ``model`` on a loader of validation samples.

        Args:
            model: a network as :meth:`build_model` returns; moved to :attr:`device` and put in
                eval mode (it stays there).
            loader: an iterable of batch dicts (a DataLoader over samples from
                :meth:`load_transforms` + :meth:`eval_transforms`, or a list of such dicts),
                each holding at least ``image`` ``(B, C_in, *spatial)`` float32 and ``label``.

        Returns:
            Metric name -> Python float; always ``loss`` (sample-weighted mean of the batches'
            losses, ``>= 0``) and the task's :attr:`main_metric`.

        Raises:
            ValueError: when ``loader`` yields no batch.
        """

    def collate_keys(self) -> Sequence[str]:
        """Keys of a sample dictionary that training batches need.

        Returns:
            ``("image", "label")``.
        """
        return ("image", "label")

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """A new optimizer over ``model``'s parameters: :func:`build_optimizer` of ``cfg``
        (a bundle task: the bundle's own)."""
        return build_optimizer(model, self.cfg)

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

        Each call builds a new optimizer (:meth:`optimizer`), so no optimizer state is
        kept from one call (round) to the next. The model is moved to :attr:`device` and put in
        training mode (it stays there).

        Args:
            model: a network as :meth:`build_model` returns.
            loader: an iterable of batch dicts (a DataLoader over samples from
                :meth:`load_transforms` + :meth:`train_transforms`, or a list of such dicts)
                holding ``image`` ``(B, C_in, *spatial)`` float32 and ``label`` in the form
                :meth:`loss_function` takes (see the subclasses).
            epochs: number of passes over ``loader``; 0 trains nothing.
            extra_loss: when given, ``extra_loss(model)`` (a scalar tensor, e.g. FedProx's
                proximal term) is added to every batch's loss before the backward pass
                (computed in float32, outside autocast, when :attr:`amp` is on).
            log: when given, receives one line per epoch with its mean loss and sample count.

        Returns:
            A :class:`TrainResult`: the last epoch's mean per-sample loss (extra term included;
            ``0.0`` without samples) and its number of samples.
        """
        model.to(self.device).train()
        optimizer = self.optimizer(model)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)  # off: no-op
        loss_fn = self.loss_function()
        total, count = 0.0, 0
        for epoch in range(1, epochs + 1):
            total, count = 0.0, 0
            for batch in loader:
                images = batch["image"].to(self.device)
                targets = batch["label"].to(self.device)
                optimizer.zero_grad(set_to_none=True)
                with self.autocast():
                    loss = loss_fn(model(images), targets).float()
                if extra_loss is not None:
                    loss = loss + extra_loss(model)
                scaler.scale(loss).backward()
                scaler.step(optimizer)  # skipped when the scaled gradients overflowed
                scaler.update()
                total += float(loss.detach()) * images.shape[0]
                count += images.shape[0]
            if log is not None:
                log(f"epoch {epoch}/{epochs}: loss {total / max(count, 1):.4f} ({count} samples)")
        return TrainResult(loss=total / max(count, 1), num_samples=count)
