"""MONAI tasks: each turns a ``task`` config into a model, transforms, a loss and metrics (a
MONAI bundle's own, with ``task.bundle``)."""

from __future__ import annotations

import torch

from fl_imaging.config import TaskConfig, TaskName
from tasks.base import ImagingTask, TrainResult
from tasks.classification import ClassificationTask
from tasks.segmentation import SegmentationTask

__all__ = ["ClassificationTask", "ImagingTask", "SegmentationTask", "TrainResult", "build_task"]


def build_task(cfg: TaskConfig, device: torch.device | None = None) -> ImagingTask:
    """Return the task object named by ``cfg.name`` (``segmentation`` or ``classification``),
    training and scoring on ``device`` (resolve ``cfg.device`` with
    :func:`fl_imaging.config.devices.resolve_device` where the task trains; None: the CPU).
    With ``cfg.bundle`` set, the bundle's task of that kind (:mod:`tasks.bundle_task`): build it
    only where the bundle's digest was accepted (it runs the bundle's code)."""
    if cfg.bundle is not None:
        from tasks.bundle_task import bundle_task  # MONAI's bundle parser only for bundles

        return bundle_task(cfg, device)
    if cfg.name == TaskName.classification:
        return ClassificationTask(cfg, device)
    return SegmentationTask(cfg, device)
