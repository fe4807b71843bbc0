"""Check a multi-modal case (``data.modalities``: one file or DICOM series per modality) the
way the task reads it: MONAI's ``LoadImage`` given the list of paths stacks them as channels.

Each modality is checked as a single image (:func:`~fl_imaging.data.image_checks.check_image`:
content, decoding, dimensionality, no NaN) and must hold one channel; then the modalities of
the case must be stackable: one format (MONAI reads the list with one reader, so NIfTI and DICOM
cannot be mixed in a case), one voxel grid (same shape, and an affine equal by the test MONAI's
readers apply before they stack). A label is then checked against that grid
(:func:`~fl_imaging.data.image_checks.check_label`, in :mod:`fl_imaging.data.inspect`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from fl_imaging.data.image_checks import CaseReport, check_image

__all__ = ["check_modalities"]


def check_modalities(
    case_id: str,
    paths: Sequence[str | Path],
    modalities: Sequence[str],
    *,
    site: str,
    spatial_dims: int | None = None,
) -> tuple[CaseReport, MetaTensor | None]:
    """Check and decode the modalities of one case and stack them.

    ``paths`` holds one file or DICOM series folder per modality of ``modalities`` (same order);
    ``site`` names the site in messages; ``spatial_dims`` is the task's. Returns the case's
    :class:`~fl_imaging.data.image_checks.CaseReport` (the first modality's geometry, one
    channel per modality, the intensity range over all of them, every problem naming site,
    case and modality) and the stacked image ``(len(modalities), *spatial)`` float32 carrying
    the first modality's affine, or None when any modality cannot be decoded or stacked.
    """
    reports: list[CaseReport] = []
    images: list[MetaTensor | None] = []
    for modality, path in zip(modalities, paths, strict=True):
        report, image = check_image(case_id, Path(path), spatial_dims=spatial_dims)
        if image is not None and report.channels != 1:
            report.problems.append(
                f"[site {site}] case {case_id}: modality {modality} ({path}) holds "
                f"{report.channels} channels; a modality is one volume: split it into one "
                "images/MODALITY/ folder per channel and list them in data.modalities"
            )
            image = None
        reports.append(report)
        images.append(image)
    first = reports[0]
    case = CaseReport(
        case_id,
        first.image,
        first.format,
        shape=first.shape,
        channels=len(modalities),
        spacing=first.spacing,
        orientation=first.orientation,
        dtype=first.dtype,
        images=[str(p) for p in paths],
    )
    case.problems = [p for r in reports for p in r.problems]
    case.notes = [n for r in reports for n in r.notes]
    formats = {r.format for r in reports}
    if len(formats) > 1:
        shown = ", ".join(f"{m} {r.format}" for m, r in zip(modalities, reports, strict=True))
        case.format = "+".join(sorted(formats))
        case.problems.append(
            f"[site {site}] case {case_id}: its modalities mix formats ({shown}); MONAI stacks "
            "the modalities of a case with one reader: convert them to one format (e.g. every "
            f"modality as images/MODALITY/{case_id}.nii.gz)"
        )
    if case.problems or any(image is None for image in images):
        return case, None
    decoded = [image for image in images if image is not None]
    reference = decoded[0]
    for modality, path, image in zip(modalities[1:], paths[1:], decoded[1:], strict=True):
        problem = _grid_problem(reference, image)
        if problem:
            case.problems.append(
                f"[site {site}] case {case_id}: modality {modality} ({path}) is not on the grid "
                f"of modality {modalities[0]} ({paths[0]}): {problem}; the modalities of a case "
                f"must share one voxel grid: resample {modality} onto {modalities[0]}"
            )
    if case.problems:
        return case, None
    case.min = min(r.min for r in reports)
    case.max = max(r.max for r in reports)
    stacked = MetaTensor(torch.cat([image.as_tensor() for image in decoded]), meta=reference.meta)
    return case, stacked


def _grid_problem(reference: MetaTensor, image: MetaTensor) -> str | None:
    """What differs between the voxel grids of two decoded images, as stored (MONAI compares
    them before stacking, with ``numpy.allclose``'s default tolerance): the shape or the
    affine; None when they match."""
    shape, reference_shape = list(image.shape[1:]), list(reference.shape[1:])
    if shape != reference_shape:
        return f"shape {shape} vs {reference_shape}"
    affine, reference_affine = np.asarray(image.affine), np.asarray(reference.affine)
    if not np.allclose(affine, reference_affine):
        n = affine.shape[0] - 1
        offset = float(np.linalg.norm(affine[:n, n] - reference_affine[:n, n]))
        axes, reference_axes = (np.round(a[:n, :n], 4).tolist() for a in (affine, reference_affine))
        return (
            f"affine differs (origins {offset:.3g} mm apart, voxel axes {axes} vs {reference_axes})"
        )
    return None
