"""Apply a trained global model to a folder of images (NIfTI, NRRD, DICOM, 2D) and write the
predictions.

Every input is checked first, as ``fl-imaging-data inspect --images-only`` checks it, against the
run's task (spatial dimensions, channels; DICOM series geometry and SOP class; file content): one
that cannot be predicted on stops the command before anything is written, with a message naming
the file.

A run trained on multi-modal cases (``data.modalities``) predicts on a folder holding one
sub-folder per modality, ``MODALITY/CASE_ID.nii.gz`` (or a site folder whose ``images/`` does),
each case's modalities checked and stacked as in training.

Segmentation: one mask per image, ``<case id>.nii.gz`` (uint8 class indices), in the input's own
grid and orientation: the model sees the image through the task's transforms and MONAI's
``Invertd`` maps the logits back before the arg-max. Classification: ``predictions.csv`` with
one row per image: case id, predicted class (index and name) and each class's probability.
With ``explain``, a saliency map beside each prediction (:mod:`fl_imaging.prediction.explain`).
"""

from __future__ import annotations

import copy
import csv
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from monai.transforms import Invertd

from fl_imaging.config import ConfigError, RunConfig, TaskName, config_from_yaml
from fl_imaging.config.devices import site_device
from fl_imaging.data.image_checks import check_image
from fl_imaging.data.image_folder import find_images, find_modality_images
from fl_imaging.data.modalities import check_modalities
from fl_imaging.data.nifti_io import save_nifti
from fl_imaging.data.sites import SiteDataError
from fl_imaging.data.user_paths import named_os_errors, read_text
from fl_imaging.prediction.explain import Explainer
from fl_imaging.review.results import WeightsFileError, load_weights
from tasks import build_task
from tasks.segmentation import SegmentationTask

__all__ = ["PredictionError", "check_inputs", "load_run", "predict_folder"]

#: Problems listed in a prediction error; ``fl-imaging-data inspect --images-only`` lists all.
MAX_SHOWN = 20

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
    damaged, or the weights do not fit the model the config describes;
    :class:`~fl_imaging.data.errors.SiteDataError` naming a file or folder that cannot be read
    (permission denied, ``RUN_DIR`` a file, ``config.yaml`` not UTF-8 text).
    """
    config, weights = run_dir / "config.yaml", run_dir / "model.pt"
    if run_dir.is_file():
        raise PredictionError(
            f"{run_dir}: is a file, not a folder; give the folder of a finished fl-imaging run "
            "(it holds config.yaml and model.pt)"
        )
    with named_os_errors():
        for path in (config, weights):
            if not path.is_file():
                raise PredictionError(
                    f"{path} not found: give the folder of a finished fl-imaging run "
                    "(it holds config.yaml and model.pt)"
                )
        try:
            cfg = config_from_yaml(read_text(config))
        except (ConfigError, yaml.YAMLError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise PredictionError(
                f"{config}: not a config fl-imaging can use ({first}); copy config.yaml again "
                "from the run folder fl-imaging wrote"
            ) from None
        model = build_task(cfg.task).build_model()
        with open(weights, "rb"):  # an unreadable file is named here, not inside torch.load
            pass
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


def check_inputs(run: LoadedRun, source: Path) -> list[tuple[str, Path | tuple[str, ...]]]:
    """Find the images under ``source`` (:func:`~fl_imaging.data.image_folder.find_images`; a
    multi-modal run: :func:`~fl_imaging.data.image_folder.find_modality_images` with its
    ``data.modalities``) and check each against the run's task before anything is predicted:
    the checks of ``fl-imaging-data inspect`` (file content, DICOM series geometry and SOP
    class, decoding, spatial dimensions and channels as in the run's config, no NaN; a
    multi-modal case: every modality present, one format, one grid).

    Returns the (case id, image) pairs, the image a tuple of one path per modality for a
    multi-modal run. Raises :class:`PredictionError` listing every problem.
    """
    task, modalities = run.cfg.task, list(run.cfg.data.modalities)
    images: list[tuple[str, Path | tuple[str, ...]]] = []
    if modalities:
        stacked, problems = find_modality_images(source, modalities)
        images += stacked
    else:
        single, problems = find_images(source)
        images += single
    for case_id, path in images:
        if isinstance(path, tuple):
            report, _ = check_modalities(
                case_id, path, modalities, site=source.name, spatial_dims=task.spatial_dims
            )
        else:
            report, _ = check_image(
                case_id, path, spatial_dims=task.spatial_dims, in_channels=task.in_channels
            )
        problems += report.problems
        for note in report.notes:
            log.info("note: %s", note)
    if problems:
        shown = problems[:MAX_SHOWN] + (
            [f"... and {len(problems) - MAX_SHOWN} more"] if len(problems) > MAX_SHOWN else []
        )
        raise PredictionError(
            f"{len(problems)} problem(s) in {source}, nothing predicted:\n  - "
            + "\n  - ".join(shown)
            + f"\nfl-imaging-data inspect --images-only {_modalities_option(modalities)}{source} "
            "shows them again."
        )
    return images


def _modalities_option(modalities: list[str]) -> str:
    """``--modalities A,B `` for a multi-modal run's inspect command, else nothing."""
    return f"--modalities {','.join(modalities)} " if modalities else ""


def predict_folder(
    run: LoadedRun, source: Path, output: Path, explain: bool = False, device: str | None = None
) -> list[Path]:
    """Check every image under ``source`` (:func:`check_inputs`), then predict each into
    ``output``, on ``device`` (a ``task.device`` value; None: the run's ``task.device``) as this
    machine resolves it, with mixed precision when the run's ``task.amp`` is on and the device
    is a GPU. Saliency maps are computed on the CPU.

    Returns the files written: one mask per image (segmentation) or ``predictions.csv``
    (classification), and with ``explain`` each image's saliency map (NIfTI and PNG,
    :class:`~fl_imaging.prediction.explain.Explainer`). Raises :class:`PredictionError` listing
    every input that cannot be predicted on (nothing is written then), naming a device this
    machine lacks, or naming ``output`` when it is an existing file; :class:`SiteDataError` when
    ``source`` holds no image, an image cannot be decoded after all, or a path cannot be read or
    ``output`` cannot be written (permission denied, a file where a folder belongs).
    """
    if output.exists() and not output.is_dir():
        raise PredictionError(
            f"{output}: is a file, not a folder; the predictions are written into a folder: give "
            "another --output (a new or an existing folder) or move the file away"
        )
    images = check_inputs(run, source)
    try:
        target = site_device(replace(run.cfg.task, device=device or run.cfg.task.device), "predict")
    except ConfigError as err:
        raise PredictionError(f"{err} (fl-imaging-predict --device cpu predicts here)") from None
    with named_os_errors(action="written"):
        output.mkdir(parents=True, exist_ok=True)
    task = build_task(run.cfg.task, target)
    cpu_task = build_task(run.cfg.task, torch.device("cpu"))
    transform = task.inference_transforms()
    written: list[Path] = []
    rows: list[dict[str, str | float | int]] = []
    names = list(run.cfg.task.class_names) or [str(k) for k in range(run.cfg.task.num_classes)]
    explainer = Explainer(cpu_task, run.cfg.task, run.model) if explain else None  # a CPU copy
    model = run.model if target.type == "cpu" else copy.deepcopy(run.model).to(target)
    for index, (case_id, given) in enumerate(images, start=1):
        path = Path(given[0]) if isinstance(given, tuple) else given
        try:
            sample = transform({"image": list(given) if isinstance(given, tuple) else str(given)})
        except Exception as err:  # MONAI wraps the reader's error; name the file
            root = err
            while root.__cause__ is not None:
                root = root.__cause__
            reason = (str(root).strip().splitlines() or [type(root).__name__])[0]
            raise SiteDataError(
                f"{path}: cannot be read for prediction ({reason}); "
                "run fl-imaging-data inspect on its folder"
            ) from err
        with torch.no_grad(), named_os_errors(action="written"):  # the mask or the map
            if run.cfg.task.name == TaskName.segmentation:
                assert isinstance(task, SegmentationTask)
                mask, predicted = _segment(
                    task, model, sample, transform, output / f"{case_id}.nii.gz"
                )
                written.append(mask)
            else:
                with task.autocast():
                    logits = model(sample["image"].as_tensor()[None].float().to(target))
                prob = torch.softmax(logits.float().cpu(), dim=1)[0].numpy()
                best = int(prob.argmax())
                predicted = torch.tensor(best)
                row: dict[str, str | float | int] = {
                    "case_id": case_id,
                    "image": ";".join(given) if isinstance(given, tuple) else str(path),
                    "predicted": best,
                    "predicted_name": names[best],
                }
                row.update({f"prob_{names[k]}": round(float(p), 6) for k, p in enumerate(prob)})
                rows.append(row)
        if explainer is not None:  # the maps stay here, beside the predictions
            with named_os_errors(action="written"):
                written += explainer.write(sample, transform, predicted, case_id, path, output)
        log.info("predicted %d/%d: %s", index, len(images), case_id)
    if rows:
        table = output / "predictions.csv"
        with named_os_errors(action="written"), table.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        written.append(table)
    return written


def _segment(
    task: SegmentationTask, model: torch.nn.Module, sample: dict, transform, target: Path
) -> tuple[Path, torch.Tensor]:
    """Sliding-window logits, mapped back to the input grid by ``Invertd``, then arg-max;
    returns the mask written and the arg-max in the transforms' grid (``(*spatial)``)."""
    image = sample["image"]
    logits = task.predict_logits(model, image[None].float().to(task.device))[0].cpu()
    inverted = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=False)(
        {**sample, "pred": logits}
    )["pred"]
    mask = torch.argmax(torch.as_tensor(inverted), dim=0).numpy().astype(np.uint8)
    predicted = torch.argmax(torch.as_tensor(logits), dim=0)
    return save_nifti(mask, np.asarray(inverted.affine), target), predicted
