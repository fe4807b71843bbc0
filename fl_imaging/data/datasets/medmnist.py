"""MedMNIST v2 adapter: an official ``.npz`` file, exported once to NIfTI files.

Layout (``scripts/download_medmnist.py`` writes it)::

    ROOT/adrenalmnist3d.npz        28 px: train_images (N, 28, 28, 28) uint8, train_labels (N, 1)
    ROOT/adrenalmnist3d_64.npz     64 px
                                   and the same for val_* and test_*

The official train/val/test split is kept as each case's split. MONAI has no reader for one
sample of an ``.npz`` array, so each image is written once as a NIfTI file (ours, under
``export_dir``) and read from there by MONAI like any other case. Grayscale 2D and 3D sets with
one class label per image are supported; RGB and multi-label sets are refused with a message.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from fl_imaging.data.datasets.pool import DatasetPool
from fl_imaging.data.sites import Case, SiteDataError

__all__ = ["load_medmnist", "medmnist_file"]

log = logging.getLogger("fl_imaging.data")
SPLITS = ("train", "val", "test")


def medmnist_file(root: Path, flag: str, size: int) -> Path:
    """Path of the official file of ``flag`` at ``size`` px: ``flag.npz`` (28), ``flag_64.npz``."""
    return root / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")


def load_medmnist(root: Path, flag: str, size: int, export_dir: Path) -> DatasetPool:
    """Read ``root``'s MedMNIST file for ``flag`` and ``size`` into a :class:`DatasetPool`.

    Images are written once to ``export_dir/<flag>_<size>/<split>-<index>.nii.gz`` (1 mm voxels,
    values as stored, uint8); a later call with the same file reuses them. Class k is named by
    its index. Raises :class:`~fl_imaging.data.sites.SiteDataError` naming the file when it is
    missing, lacks a key, or holds RGB or multi-label data.
    """
    path = medmnist_file(root, flag, size)
    if not path.is_file():
        raise SiteDataError(
            f"{path} not found: put the official MedMNIST file there (data.root, data.flag, "
            "data.size), e.g. with scripts/download_medmnist.py"
        )
    with np.load(path) as npz:
        missing = [
            f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in npz
        ]
        if missing:
            raise SiteDataError(f"{path}: missing array(s) {', '.join(missing)}; re-download it")
        arrays = {key: npz[key] for key in npz.files}
    first = arrays["train_images"]
    if arrays["train_labels"].ndim > 1 and arrays["train_labels"].shape[1] > 1:
        raise SiteDataError(
            f"{path}: multi-label MedMNIST sets are not supported (one class per image)"
        )
    if first.ndim == 4 and first.shape[-1] == 3:
        raise SiteDataError(f"{path}: RGB MedMNIST sets are not supported (grayscale only)")
    spatial_dims = first.ndim - 1
    out = (export_dir / f"{flag}_{size}").absolute()
    stamp = {"file": str(path.resolve()), "bytes": path.stat().st_size, "version": 1}
    marker = out / "export.json"
    fresh = not (marker.is_file() and json.loads(marker.read_text()) == stamp)
    if fresh:
        log.info("exporting %s to NIfTI files in %s (once)", path, out)
        out.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
    cases: list[Case] = []
    num_classes = 0
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1)
        if len(images) != len(labels):
            raise SiteDataError(
                f"{path}: {split} has {len(images)} images but {len(labels)} labels"
            )
        num_classes = max(num_classes, int(labels.max()) + 1)
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            target = out / f"{split}-{index:05d}.nii.gz"
            if fresh:
                nib.save(nib.Nifti1Image(np.ascontiguousarray(image), np.eye(4)), target)
            cases.append(Case(target.name[: -len(".nii.gz")], str(target), int(label), split))
    if fresh:
        marker.write_text(json.dumps(stamp))
    return DatasetPool(
        name=f"medmnist:{flag}_{size}",
        root=root,
        task="classification",
        spatial_dims=spatial_dims,
        num_classes=num_classes,
        class_names=[str(k) for k in range(num_classes)],
        cases=cases,
    )
