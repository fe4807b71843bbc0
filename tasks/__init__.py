"""MONAI tasks: each turns a ``task`` config into a model, transforms, a loss and metrics."""

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
    :func:`fl_imaging.config.devices.resolve_device` where the task trains; None: the CPU)."""
    if cfg.name == TaskName.classification:
        return ClassificationTask(cfg, device)
    return SegmentationTask(cfg, device)
