"""A MONAI bundle run as a federated task (``task=bundle task.bundle=PATH``).

The bundle's own items are built by MONAI's ``ConfigParser``, as ``monai.bundle run`` builds
them, from the bundle's ``configs/train.json`` (and ``configs/metadata.json``, with
``bundle_root`` set to the bundle folder):

- ``network_def``: the network; ``models/model.pt``, when the bundle has it, is loaded into it
  (strictly), so the coordinator's initial global model is the bundle's weights;
- ``train#preprocessing`` (the model zoo's key): up to its first random transform, what a
  site decodes, caches and scores on (:meth:`load_transforms`); the rest, training
  augmentation (:meth:`train_transforms`). The split is MONAI's ``Compose.get_index_of_first``,
  where MONAI's ``CacheDataset`` stops caching;
- ``loss`` and ``optimizer`` (its ``params`` replaced by the trained model's parameters).

What the bundle lacks of these, the task's kind (:mod:`tasks.segmentation` or
:mod:`tasks.classification`, from the metadata, :func:`tasks.bundle_files.with_bundle_settings`)
gives: its transforms, loss, optimizer. Evaluation is the kind's (sliding windows of
``task.roi_size`` for segmentation).

A bundle is code: its expressions run wherever it is built. A site builds it only once its
policy accepted the bundle's digest (:func:`fl_imaging.site.policy.check_request`, before any
message is handled); the task itself refuses a copy whose digest is not the one the
coordinator named (``task.bundle_sha256``) before it reads a config item.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.transforms import CastToTyped, Compose, EnsureTyped, RandomizableTrait, Transform
from torch import nn

from fl_imaging.config import ConfigError, TaskConfig, TaskName
from tasks.base import ImagingTask, build_optimizer
from tasks.bundle_files import BundleFiles, bundle_digest, bundle_files
from tasks.classification import ClassificationTask
from tasks.segmentation import SegmentationTask

__all__ = [
    "BundleClassificationTask",
    "BundleParts",
    "BundleSegmentationTask",
    "bundle_task",
    "load_bundle_weights",
]

log = logging.getLogger("fl_imaging")

#: Name under which the trained model is given to the bundle's ``optimizer`` expression.
_MODEL_GLOBAL = "fl_imaging_model"


def load_bundle_weights(model: nn.Module, files: BundleFiles) -> nn.Module:
    """Load the bundle's ``models/model.pt`` into ``model``, strictly.

    Args:
        model: the bundle's ``network_def``, built.
        files: the bundle; ``files.weights`` is None when it has no ``models/model.pt``
            (``model`` is returned unchanged).

    Returns:
        ``model``, holding the bundle's weights. ``model.pt`` is a ``state_dict``, or MONAI's
        checkpoint form ``{"model": state_dict, ...}`` (as its ``CheckpointSaver`` writes);
        it is read with ``torch.load(weights_only=True)``: tensors only, no pickled code.

    Raises:
        ConfigError: naming the file when it cannot be read, or when its tensors do not fit
            the network (torch's message: the missing and unexpected keys, the sizes that
            differ).
    """
    if files.weights is None:
        return model
    try:
        state = torch.load(files.weights, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file that is no checkpoint
        raise ConfigError(f"bundle {files.root}: models/model.pt cannot be read: {err}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ConfigError(
            f"bundle {files.root}: models/model.pt does not fit the bundle's network_def: "
            f"{str(err).rstrip('.')}. Give the weights saved from this network "
            "(torch.save(net.state_dict()))"
        ) from None
    return model


class BundleParts:
    """The parts of a task that a bundle defines (see the module); the first base of
    :class:`BundleSegmentationTask` and :class:`BundleClassificationTask`, whose other base
    gives what the bundle lacks.

    Args:
        cfg: the task config, ``cfg.bundle`` set (with the bundle's settings applied:
            :func:`tasks.bundle_files.with_bundle_settings`).
        device: where training and evaluation run; None: the CPU.

    Raises:
        ConfigError: when ``cfg.bundle_sha256`` is set and the bundle at ``cfg.bundle`` has
            another digest (both named); nothing of the bundle is parsed before.
    """

    cfg: TaskConfig

    def __init__(self, cfg: TaskConfig, device: torch.device | None = None) -> None:
        super().__init__(cfg, device)  # type: ignore[call-arg]
        assert cfg.bundle is not None
        digest = bundle_digest(cfg.bundle)
        if cfg.bundle_sha256 and digest != cfg.bundle_sha256:
            raise ConfigError(
                f"bundle {cfg.bundle}: this copy has SHA-256 {digest}, the run names "
                f"{cfg.bundle_sha256}; refused (give this site the bundle the run names)"
            )
        #: The bundle's files, read as data.
        self.files = bundle_files(cfg.bundle)

    def _parser(self, **globals_: Any) -> ConfigParser:
        """A fresh MONAI ``ConfigParser`` over the bundle's training config and metadata,
        ``bundle_root`` the bundle folder, with ``globals_`` added to its expressions'
        names. Fresh, so that every item built from it is a new object."""
        parser = ConfigParser(globals=globals_ or None)
        assert self.files.train_config is not None  # with_bundle_settings: network_def exists
        parser.read_config(str(self.files.train_config))
        meta = self.files.root / "configs" / "metadata.json"
        if meta.is_file():
            parser.read_meta(str(meta))
        parser["bundle_root"] = str(self.files.root.resolve())
        return parser

    def _built(self, item: str, parser: ConfigParser | None = None) -> Any:
        """The bundle's config item ``item`` (a MONAI id, ``train#preprocessing``), built.
        Raises ConfigError naming the bundle, the file and the item when MONAI cannot."""
        try:
            return (parser or self._parser()).get_parsed_content(item, instantiate=True)
        except Exception as err:  # MONAI re-raises what the item's code raises
            file = self.files.train_config.name if self.files.train_config else "train.json"
            raise ConfigError(
                f"bundle {self.files.root}: configs/{file}: {item} cannot be built: {err}"
            ) from None

    def network_definition(self) -> dict[str, Any]:
        """The bundle's ``network_def`` as its config holds it (it may hold the bundle's
        ``$`` / ``@`` syntax, resolved only by the bundle's own parser)."""
        return copy.deepcopy(self.files.config["network_def"])

    def builtin_network_definition(self) -> dict[str, Any]:
        """The bundle's ``network_def``, as :meth:`network_definition` gives it."""
        return self.network_definition()

    def network(self) -> nn.Module:
        """The bundle's ``network_def``, built, holding ``models/model.pt`` when the bundle
        has it (:func:`load_bundle_weights`); CPU, training mode."""
        model = self._built("network_def")
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"bundle {self.files.root}: network_def builds a {type(model).__name__}, not a "
                "torch.nn.Module"
            )
        return load_bundle_weights(model, self.files).train()

    def _preprocessing(self) -> tuple[list, list] | None:
        """The bundle's ``train#preprocessing``, built and split before its first random
        transform: (deterministic part, the rest); None when the bundle has none."""
        if not self.files.has("train#preprocessing"):
            return None
        built = self._built("train#preprocessing")
        steps = list(built.transforms) if isinstance(built, Compose) else list(built)
        first = Compose(steps).get_index_of_first(
            lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform)
        )
        cut = len(steps) if first is None else first
        return steps[:cut], steps[cut:]

    def load_transforms(self) -> Compose:
        """The deterministic start of the bundle's ``train#preprocessing`` (decoding and what
        follows up to its first random transform), then plain tensors (no metadata); the
        kind's own when the bundle has no ``train#preprocessing``.

        Returns:
            A ``Compose`` mapping a case ``{"image": path, "label": ...}`` to a sample in the
            bundle's form (``image`` ``(C_in, *spatial)``).
        """
        parts = self._preprocessing()
        if parts is None:
            return super().load_transforms()  # type: ignore[misc]
        keys = ["image", "label"]
        return Compose(
            [*parts[0], EnsureTyped(keys=keys, track_meta=False, allow_missing_keys=True)]
        )

    def train_transforms(self) -> Compose:
        """The rest of the bundle's ``train#preprocessing`` (its random transforms and what
        follows them), then the label cast to int64; the kind's own when the bundle has no
        ``train#preprocessing``.

        Returns:
            A ``Compose`` applied to a sample of :meth:`load_transforms`, giving what the
            bundle trains on: ``image`` ``(C_in, *roi_size)`` float32, ``label`` int64.
        """
        parts = self._preprocessing()
        if parts is None:
            return super().train_transforms()  # type: ignore[misc]
        return Compose(
            [
                *parts[1],
                EnsureTyped(keys=["image", "label"], track_meta=False),
                CastToTyped(keys=["image", "label"], dtype=(torch.float32, torch.long)),
            ]
        )

    def loss_function(self) -> nn.Module:
        """The bundle's ``loss``, built; the kind's when the bundle has none."""
        if not self.files.has("loss"):
            return super().loss_function()  # type: ignore[misc]
        return self._built("loss")

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The bundle's ``optimizer`` over ``model``'s parameters (its ``params`` item
        replaced), with the bundle's learning rate and other arguments; ``task.optimizer``
        when the bundle has none.

        Raises:
            ConfigError: for an ``optimizer`` that is not a ``_target_`` item, or that does
                not build a ``torch.optim.Optimizer``.
        """
        if not self.files.has("optimizer"):
            return build_optimizer(model, self.cfg)
        if not isinstance(self.files.config["optimizer"], dict):
            raise ConfigError(
                f"bundle {self.files.root}: optimizer must be a config item with _target_ and "
                'params (e.g. {"_target_": "torch.optim.Adam", "params": '
                '"$@network.parameters()", "lr": 1e-4}), to be given the federated model'
            )
        parser = self._parser(**{_MODEL_GLOBAL: model})
        parser["optimizer#params"] = f"${_MODEL_GLOBAL}.parameters()"
        optimizer = self._built("optimizer", parser)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"bundle {self.files.root}: optimizer builds a {type(optimizer).__name__}, not "
                "a torch.optim.Optimizer"
            )
        return optimizer

    def inference_preprocessing_definition(self) -> list[dict[str, Any]]:
        """Not given: a bundle's inference transforms are its own ``configs/inference.json``.

        Raises:
            ConfigError: always, saying to run the bundle's inference config with MONAI.
        """
        raise ConfigError(
            f"bundle {self.files.root}: fl-imaging does not predict with a bundle task; run the "
            "run folder's bundle/ (the bundle with the trained weights) with MONAI, as the "
            "bundle documents its inference"
        )


class BundleSegmentationTask(BundleParts, SegmentationTask):
    """A segmentation bundle: what it defines (see :class:`BundleParts`), the rest and the
    metrics of :class:`~tasks.segmentation.SegmentationTask`."""


class BundleClassificationTask(BundleParts, ClassificationTask):
    """A classification bundle: what it defines (see :class:`BundleParts`), the rest and the
    metrics of :class:`~tasks.classification.ClassificationTask`."""


def bundle_task(cfg: TaskConfig, device: torch.device | None = None) -> ImagingTask:
    """The task of the bundle ``cfg.bundle``, of the kind ``cfg.name`` (set from the bundle's
    metadata by :func:`tasks.bundle_files.with_bundle_settings`), on ``device`` (None: the
    CPU). Raises ConfigError as :class:`BundleParts` does."""
    if cfg.name == TaskName.classification:
        return BundleClassificationTask(cfg, device)
    return BundleSegmentationTask(cfg, device)
