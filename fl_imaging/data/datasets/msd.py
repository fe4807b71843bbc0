"""Medical Segmentation Decathlon (MSD) adapter: a task folder as downloaded from the MSD.

Layout (``scripts/download_msd.py`` writes it)::

    Task04_Hippocampus/dataset.json     "labels", "modality", "training": [{"image", "label"}]
    Task04_Hippocampus/imagesTr/*.nii.gz
    Task04_Hippocampus/labelsTr/*.nii.gz

Only the labelled ``training`` cases are used (the MSD's own test images carry no labels).
"""

from __future__ import annotations

import json
from pathlib import Path

from fl_imaging.data.datasets.pool import DatasetPool
from fl_imaging.data.sites import Case, SiteDataError, case_id_of

__all__ = ["load_msd"]


def load_msd(root: Path) -> DatasetPool:
    """Read an MSD task folder into a :class:`DatasetPool` of its labelled cases.

    Raises :class:`~fl_imaging.data.sites.SiteDataError` naming the file when ``dataset.json`` is
    missing or malformed, when a listed image or label does not exist, or when the task is
    multi-modal (4D images, e.g. BraTS), which fl-imaging does not train yet.
    """
    manifest = root / "dataset.json"
    if not manifest.is_file():
        raise SiteDataError(
            f"{manifest} not found: {root} is not a Medical Segmentation Decathlon task folder "
            "(dataset.json, imagesTr/, labelsTr/); get one with scripts/download_msd.py"
        )
    try:
        meta = json.loads(manifest.read_text())
        labels = {int(k): str(v) for k, v in meta["labels"].items()}
        training = list(meta["training"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise SiteDataError(
            f"{manifest}: not a valid MSD dataset.json ({type(err).__name__}: {err}); it needs "
            "'labels' and a 'training' list of {image, label} entries"
        ) from None
    if len(meta.get("modality", {"0": ""})) > 1:
        raise SiteDataError(
            f"{manifest}: {meta.get('name', root.name)} is multi-modal "
            f"({', '.join(meta['modality'].values())}); fl-imaging trains single-modality tasks"
        )
    problems: list[str] = []
    cases: list[Case] = []
    for entry in training:
        image, label = root / entry["image"], root / entry["label"]
        missing = [str(p) for p in (image, label) if not p.is_file()]
        if missing:
            problems += [f"{p}: listed in {manifest} but missing" for p in missing]
            continue
        cases.append(Case(case_id_of(image), str(image.resolve()), str(label.resolve())))
    if problems:
        raise SiteDataError(
            f"{len(problems)} problem(s) in {root}:\n  - "
            + "\n  - ".join(problems[:20])
            + "\nRe-download the task (scripts/download_msd.py) or fix dataset.json."
        )
    if not cases:
        raise SiteDataError(f"{manifest} lists no training case")
    return DatasetPool(
        name=f"msd:{meta.get('name', root.name)}",
        root=root,
        task="segmentation",
        spatial_dims=3,
        num_classes=max(labels) + 1,
        class_names=[labels.get(k, str(k)) for k in range(max(labels) + 1)],
        cases=sorted(cases, key=lambda c: c.case_id),
    )
