"""Apply a trained global model to a folder of images (NIfTI or DICOM) and write the predictions.

Segmentation: one mask per image, ``<case id>.nii.gz`` (uint8 class indices), in the input's own
grid and orientation: the model sees the image through the task's transforms and MONAI's
``Invertd`` maps the logits back before the arg-max. Classification: ``predictions.csv`` with
one row per image: case id, predicted class (index and name) and each class's probability.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Invertd

from fl_imaging.config import RunConfig, TaskName, config_from_yaml
from fl_imaging.data.nifti_io import save_nifti
from fl_imaging.data.sites import SiteDataError, case_id_of, is_image_file
from fl_imaging.results import WeightsFileError, load_weights
from tasks import build_task
from tasks.segmentation import SegmentationTask

__all__ = ["PredictionError", "find_images", "load_run", "predict_folder"]

log = logging.getLogger("fl_imaging.predict")


class PredictionError(ValueError):
    """A run folder or input that cannot be predicted on; the message says what to fix."""


@dataclass
class LoadedRun:
    """The config of a training run and its final global model (in eval mode, on the CPU)."""

    cfg: RunConfig
    model: torch.nn.Module


def load_run(run_dir: Path) -> LoadedRun:
    """Read ``run_dir/config.yaml`` and ``run_dir/model.pt`` as written by ``fl-imaging``.

    Raises :class:`PredictionError` when either is missing, ``model.pt`` is truncated or
    damaged, or the weights do not fit the model the config describes.
    """
    config, weights = run_dir / "config.yaml", run_dir / "model.pt"
    for path in (config, weights):
        if not path.is_file():
            raise PredictionError(
                f"{path} not found: give the folder of a finished fl-imaging run "
                "(it holds config.yaml and model.pt)"
            )
    cfg = config_from_yaml(config.read_text())
    model = build_task(cfg.task).build_model()
    try:
        state = load_weights(weights)
    except WeightsFileError as err:
        raise PredictionError(
            f"{err}: copy model.pt again from the folder the run wrote it to, or run again"
        ) from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as err:
        raise PredictionError(
            f"{weights} does not fit the model in {config}: {str(err).splitlines()[0]}"
        ) from None
    return LoadedRun(cfg, model.eval())


def find_images(source: Path) -> list[tuple[str, Path]]:
    """List (case id, image) pairs to predict on, sorted by case id.

    ``source`` is a site folder (its ``images/`` are used), a folder of NIfTI / 2D image files
    and DICOM series folders (sub-folders holding image files, such as class folders, are
    searched too), or a single image file or DICOM series folder. Raises :class:`SiteDataError`
    when nothing to predict on is found.
    """
    if not source.exists():
        raise SiteDataError(
            f"{source} does not exist: give a site folder, a folder of images or an image"
        )
    folder = source / "images" if (source / "images").is_dir() else source
    if source.is_file() or (folder == source and _is_series(source)):
        return [(case_id_of(source), source)]
    found: dict[str, Path] = {}
    for entry in sorted(folder.rglob("*")):
        if entry.name.startswith(".") or any(p.name.startswith(".") for p in entry.parents):
            continue
        if (entry.is_file() and is_image_file(entry)) or (entry.is_dir() and _is_series(entry)):
            found.setdefault(case_id_of(entry), entry)
    if not found:
        raise SiteDataError(f"{folder}: no NIfTI file, 2D image or DICOM series folder found")
    return sorted(found.items())


def _is_series(folder: Path) -> bool:
    """A folder holding files that are not NIfTI or 2D images (DICOM files, any name)."""
    return any(
        p.is_file() and not p.name.startswith(".") and not is_image_file(p)
        for p in folder.iterdir()
    )


def predict_folder(run: LoadedRun, source: Path, output: Path) -> list[Path]:
    """Predict every image found by :func:`find_images` under ``source`` into ``output``.

    Returns the files written: one mask per image (segmentation) or ``predictions.csv``
    (classification). Raises :class:`SiteDataError` naming an image that cannot be read.
    """
    images = find_images(source)
    output.mkdir(parents=True, exist_ok=True)
    task = build_task(run.cfg.task, torch.device("cpu"))
    transform = task.inference_transforms()
    written: list[Path] = []
    rows: list[dict[str, str | float | int]] = []
    names = list(run.cfg.task.class_names) or [str(k) for k in range(run.cfg.task.num_classes)]
    for index, (case_id, path) in enumerate(images, start=1):
        try:
            sample = transform({"image": str(path)})
        except Exception as err:  # MONAI wraps the reader's error; name the file
            root = err
            while root.__cause__ is not None:
                root = root.__cause__
            reason = (str(root).strip().splitlines() or [type(root).__name__])[0]
            raise SiteDataError(
                f"{path}: cannot be read for prediction ({reason}); "
                "run fl-imaging-data inspect on its folder"
            ) from err
        with torch.no_grad():
            if run.cfg.task.name == TaskName.segmentation:
                assert isinstance(task, SegmentationTask)
                written.append(
                    _segment(task, run.model, sample, transform, output / f"{case_id}.nii.gz")
                )
            else:
                logits = run.model(sample["image"].as_tensor()[None].float())
                prob = torch.softmax(logits, dim=1)[0].numpy()
                best = int(prob.argmax())
                row: dict[str, str | float | int] = {
                    "case_id": case_id,
                    "image": str(path),
                    "predicted": best,
                    "predicted_name": names[best],
                }
                row.update({f"prob_{names[k]}": round(float(p), 6) for k, p in enumerate(prob)})
                rows.append(row)
        log.info("predicted %d/%d: %s", index, len(images), case_id)
    if rows:
        table = output / "predictions.csv"
        with table.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        written.append(table)
    return written


def _segment(
    task: SegmentationTask, model: torch.nn.Module, sample: dict, transform, target: Path
) -> Path:
    """Sliding-window logits, mapped back to the input grid by ``Invertd``, then arg-max."""
    image = sample["image"]
    logits = task.predict_logits(model, image[None].float())[0]
    sample["pred"] = logits
    inverted = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=False)(
        sample
    )["pred"]
    mask = torch.argmax(torch.as_tensor(inverted), dim=0).numpy().astype(np.uint8)
    return save_nifti(mask, np.asarray(inverted.affine), target)
