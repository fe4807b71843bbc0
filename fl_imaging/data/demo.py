"""Synthetic multi-site demo data, written on first use, so the main job needs no download.

Each case is a 3D MR-like volume: smooth background texture plus noise, with one brighter
ellipsoid (the structure to segment). Each site has its own intensity profile (scale, offset,
gamma, noise level), like a different scanner. Sites listed in ``dicom_sites`` are stored as
DICOM series, the others as NIfTI; the folders follow the documented site
layout (docs/how-to/check-a-folder.md).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import zoom

from fl_imaging.data.dicom_io import write_dicom_series

__all__ = ["make_demo_data", "site_profile"]

_VERSION = 2  # 2: scanner profiles repeat every SCANNER_STEPS sites
#: Distinct scanner steps of the demo (intensity scale, offset, gamma and noise grow with them).
SCANNER_STEPS = 8


def site_profile(site: int, seed: int) -> dict[str, float]:
    """Intensity profile of demo site ``site`` (0-based): ``scale``, ``offset``, ``gamma`` and
    ``noise`` (standard deviation, in units of the structure's contrast). The scanner's step
    repeats every :data:`SCANNER_STEPS` sites (with its own random part per site), so that
    thousands of sites stay within float32."""
    rng = np.random.default_rng([seed, site, 7])
    step = site % SCANNER_STEPS
    return {
        "scale": float(300.0 * (1.0 + 0.35 * step) * rng.uniform(0.9, 1.1)),
        "offset": float(40.0 * step + rng.uniform(0.0, 20.0)),
        "gamma": float(0.8 + 0.2 * step + rng.uniform(-0.05, 0.05)),
        "noise": float(0.08 + 0.04 * step),
    }


def _case(
    rng: np.random.Generator, shape: tuple[int, int, int], with_structure: bool, profile: dict
) -> tuple[np.ndarray, np.ndarray]:
    coarse = rng.normal(size=tuple(max(2, s // 8) for s in shape))
    texture = zoom(coarse, [s / c for s, c in zip(shape, coarse.shape, strict=True)], order=1)
    texture = 0.25 + 0.1 * texture[: shape[0], : shape[1], : shape[2]]
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    label = np.zeros(shape, dtype=np.uint8)
    if with_structure:
        extent = np.array(shape, dtype=np.float32)
        radii = rng.uniform(0.15, 0.3, size=3) * extent
        centre = rng.uniform(0.35, 0.65, size=3) * extent
        inside = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0)
        label = (inside <= 1.0).astype(np.uint8)
    signal = np.clip(texture + 0.5 * label + rng.normal(0.0, profile["noise"], shape), 0.0, None)
    image = profile["scale"] * signal ** profile["gamma"] + profile["offset"]
    return image.astype(np.float32), label


def _modality_contrast(index: int) -> tuple[float, float]:
    """The demo's synthetic contrast of modality ``index`` (0-based): (structure contrast,
    background level), in units of the texture. Every modality shows the structure, each with its
    own sign and strength (bright, dark, faint ...), like T1, T2, FLAIR."""
    contrasts = ((0.5, 0.0), (-0.3, 0.35), (0.25, 0.1), (0.4, 0.2))
    contrast, level = contrasts[index % len(contrasts)]
    return contrast * (1.0 + 0.1 * (index // len(contrasts))), level


def _modality_images(
    rng: np.random.Generator, label: np.ndarray, count: int, profile: dict
) -> list[np.ndarray]:
    """``count`` co-registered contrasts of one case with mask ``label``: each its own texture
    and noise, on the same grid, with the structure at :func:`_modality_contrast`."""
    shape = label.shape
    images = []
    for m in range(count):
        coarse = rng.normal(size=tuple(max(2, s // 8) for s in shape))
        texture = zoom(coarse, [s / c for s, c in zip(shape, coarse.shape, strict=True)], order=1)
        contrast, level = _modality_contrast(m)
        texture = 0.25 + level + 0.1 * texture[: shape[0], : shape[1], : shape[2]]
        noise = rng.normal(0.0, profile["noise"], shape)
        signal = np.clip(texture + contrast * label + noise, 0.0, None)
        images.append(profile["scale"] * signal ** profile["gamma"] + profile["offset"])
    return [image.astype(np.float32) for image in images]


def make_demo_data(
    root: Path,
    *,
    task: str = "segmentation",
    num_sites: int = 3,
    cases_per_site: int = 16,
    shape: tuple[int, int, int] = (32, 32, 32),
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5),
    dicom_sites: tuple[int, ...] = (0,),
    seed: int = 0,
    test_cases: int = 0,
    modalities: tuple[str, ...] = (),
) -> list[Path]:
    """Write (or reuse) the demo federation under ``root`` and return its site folders.

    ``root/site-1`` .. ``root/site-N`` each hold ``cases_per_site`` cases of ``shape`` voxels at
    ``spacing`` mm. Segmentation: ``labels/CASE.nii.gz`` masks (0 background, 1 structure).
    Classification: ``labels.csv`` where class 1 cases hold the structure and class 0 cases do not.
    With ``test_cases`` > 0, each site's ``split.csv`` holds its last ``test_cases`` cases out
    as test cases (the others are split into training and validation when loaded).
    With ``modalities``, each case is one image per modality, ``images/MODALITY/CASE.nii.gz``
    (or a DICOM series folder at a DICOM site), all on the case's grid, each modality with its
    own synthetic contrast of the structure (:func:`_modality_contrast`).
    The same arguments always give the same voxels; a folder already holding a demo made with the
    same arguments is reused as it is (``root/demo.json`` records them).
    """
    if task not in ("segmentation", "classification"):
        raise ValueError(f"demo data exists for segmentation and classification, not {task!r}")
    args = {
        "version": _VERSION,
        "task": task,
        "num_sites": num_sites,
        "cases_per_site": cases_per_site,
        "shape": list(shape),
        "spacing": list(spacing),
        "dicom_sites": sorted(dicom_sites),
        "seed": seed,
        "test_cases": test_cases,
    }
    if modalities:  # recorded only when set, so that single-image demos are reused as before
        args["modalities"] = list(modalities)
    sites = [root / f"site-{k + 1}" for k in range(num_sites)]
    marker = root / "demo.json"
    if marker.is_file() and json.loads(marker.read_text()) == args:
        return sites
    if marker.is_file():  # an older demo with other arguments: replace it
        for old in root.glob("site-*"):
            shutil.rmtree(old)
        marker.unlink()
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-0.5 * s * n for s, n in zip(spacing, shape, strict=True)]
    for k, site in enumerate(sites):
        profile = site_profile(k, seed)
        (site / "images").mkdir(parents=True, exist_ok=True)
        rows = []
        for c in range(cases_per_site):
            rng = np.random.default_rng([seed, k, c])
            case_id = f"site{k + 1}-case{c:03d}"
            label_value = c % 2 if task == "classification" else 1
            image, mask = _case(rng, shape, with_structure=bool(label_value), profile=profile)
            if modalities:
                contrasts = _modality_images(rng, mask, len(modalities), profile)
                for modality, volume in zip(modalities, contrasts, strict=True):
                    folder = site / "images" / modality
                    folder.mkdir(exist_ok=True)
                    if k in dicom_sites:
                        write_dicom_series(
                            volume, affine, folder / case_id, patient_id=case_id, seed=seed
                        )
                    else:
                        nib.save(nib.Nifti1Image(volume, affine), folder / f"{case_id}.nii.gz")
            elif k in dicom_sites:
                write_dicom_series(
                    image, affine, site / "images" / case_id, patient_id=case_id, seed=seed
                )
            else:
                nib.save(nib.Nifti1Image(image, affine), site / "images" / f"{case_id}.nii.gz")
            if task == "segmentation":
                (site / "labels").mkdir(exist_ok=True)
                nib.save(nib.Nifti1Image(mask, affine), site / "labels" / f"{case_id}.nii.gz")
            rows.append((case_id, label_value))
        if task == "classification":
            with (site / "labels.csv").open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(("case_id", "label"))
                writer.writerows(rows)
        if test_cases > 0:
            with (site / "split.csv").open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(("case_id", "split"))
                writer.writerows((case_id, "test") for case_id, _ in rows[-test_cases:])
    (root / "DEMO_README.txt").write_text(
        "Synthetic demo data written by fl-imaging (not patient data).\n"
        f"{num_sites} sites x {cases_per_site} cases, {task}, shape {list(shape)}, "
        + (f"modalities {list(modalities)}, " if modalities else "")
        + f"spacing {list(spacing)} mm, seed {seed}.\n"
        f"Sites stored as DICOM series: {[f'site-{k + 1}' for k in sorted(dicom_sites)]}; "
        "the others as NIfTI.\n"
    )
    marker.write_text(json.dumps(args, indent=1))
    return sites
