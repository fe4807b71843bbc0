"""Check a site folder before it joins: decode every case and list every problem, per file.

What is checked: the site's layout (:func:`~fl_imaging.data.sites.scan_site`: image without
label, ``labels.csv`` / ``split.csv`` rows naming no image ...); per image, what
:func:`~fl_imaging.data.image_checks.check_image` checks (the file is what its name says, a DICOM
folder is one regular image series, it decodes, its dimensionality and channels fit the task, no
NaN); for segmentation, that the label lies on the image's grid once both are oriented to RAS and
holds only the expected class values; and the split rule training applies
(:func:`~fl_imaging.data.sites.load_site`: at least one training and one validation case), with
training's defaults, so that a site inspect calls ready is one training accepts.
:func:`inspect_images` checks a folder of images without labels (a folder to predict on).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from monai.data import MetaTensor

from fl_imaging.config import DataConfig, RunConfig, TaskName
from fl_imaging.config.checks import in_channels_problem
from fl_imaging.data.image_checks import CaseReport, check_image, check_label
from fl_imaging.data.image_folder import find_images, find_modality_images
from fl_imaging.data.modalities import check_modalities
from fl_imaging.data.sites import Case, SiteDataError, load_site, scan_site

__all__ = ["CaseReport", "SiteReport", "inspect_case", "inspect_images", "inspect_site"]

#: Training's defaults for the split rule (``data.val_fraction``, ``seed``).
DEFAULT_VAL_FRACTION = DataConfig().val_fraction
DEFAULT_SEED = RunConfig().seed


@dataclass
class SiteReport:
    """All cases of a site and every problem found; ``ok`` is True when there is none."""

    site: str
    root: str
    task: TaskName
    cases: list[CaseReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: The complete cases found by the layout scan (image and label), in case-id order.
    found: list[Case] = field(default_factory=list)
    #: True for a folder of images checked without labels (:func:`inspect_images`).
    images_only: bool = False
    #: For a public dataset checked in its own layout: what it holds (name, task, classes).
    dataset: str = ""
    #: Classification by class sub-folders: the site's class folder names, sorted.
    class_folders: list[str] = field(default_factory=list)

    @property
    def all_problems(self) -> list[str]:
        """Site-level problems followed by every case's problems."""
        return self.problems + [p for c in self.cases for p in c.problems]

    @property
    def all_notes(self) -> list[str]:
        """Every case's notes: what was skipped (hidden files of a DICOM series ...), nothing
        to fix."""
        return [n for c in self.cases for n in c.notes]

    @property
    def ok(self) -> bool:
        return not self.all_problems

    def to_dict(self) -> dict:
        """A JSON-ready dictionary of the report (NaN written as None)."""
        data = asdict(self)
        data.pop("found")
        for case in data["cases"]:
            if not case["images"]:  # a single-file case
                del case["images"]
            for key in ("min", "max"):
                if isinstance(case[key], float) and np.isnan(case[key]):
                    case[key] = None
        data["ok"] = self.ok
        return data


def inspect_case(
    case: Case,
    task: TaskName,
    num_classes: int,
    spatial_dims: int | None = None,
    in_channels: int | None = None,
    modalities: Sequence[str] = (),
    site: str = "",
) -> CaseReport:
    """Check one case: its image (:func:`~fl_imaging.data.image_checks.check_image`, with the
    task's ``spatial_dims`` / ``in_channels`` when given; a multi-modal case, whose ``image`` is
    one path per modality of ``modalities``:
    :func:`~fl_imaging.data.modalities.check_modalities`, naming ``site``), then its label: a
    segmentation mask (:func:`~fl_imaging.data.image_checks.check_label`, on the stacked grid)
    or a class index in ``0..num_classes-1``. Returns the :class:`CaseReport`."""
    report, image = _check_case_image(
        case.case_id, case.image, spatial_dims, in_channels, modalities, site
    )
    if image is None:
        return report
    if task == TaskName.segmentation:
        check_label(Path(str(case.label)), image, report, num_classes)
    elif not 0 <= int(case.label) < num_classes:
        report.problems.append(
            f"case {case.case_id}: class {case.label} outside 0..{num_classes - 1} in labels.csv"
        )
    return report


def _check_case_image(
    case_id: str,
    image: str | Path | tuple[str, ...],
    spatial_dims: int | None,
    in_channels: int | None,
    modalities: Sequence[str],
    site: str,
) -> tuple[CaseReport, MetaTensor | None]:
    """A single image checked by ``check_image``, a tuple of modality paths by
    ``check_modalities``: the report and the decoded (stacked) image or None."""
    if isinstance(image, tuple):
        return check_modalities(case_id, image, modalities, site=site, spatial_dims=spatial_dims)
    return check_image(case_id, Path(image), spatial_dims=spatial_dims, in_channels=in_channels)


def inspect_site(
    root: Path,
    task: TaskName,
    *,
    num_classes: int = 2,
    site: str | None = None,
    class_names: list[str] | None = None,
    spatial_dims: int | None = None,
    in_channels: int | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SEED,
    modalities: Sequence[str] = (),
) -> SiteReport:
    """Decode and check every case of the site folder ``root``.

        ``task`` is ``segmentation`` or ``classification``; label values must lie in
        ``0..num_classes-1``; ``class_names`` orders class sub-folders (classification without
        labels.csv); ``spatial_dims`` / ``in_channels``, when given, are the task's (each image must
        have as many spatial axes and channels); ``val_fraction`` and ``seed`` are training's
        (``data.val_fraction``, ``seed``) for its split rule; ``modalities`` (``data.modalities``)
    reads multi-modal cases from ``images/MODALITY/`` and checks them stacked (``in_channels``,
    when given, must be their number). Images without a label are decoded too, so that they
    are listed. Returns a :class:`SiteReport`; a folder that does not exist or holds no image
    gives a report with that single problem.
    """
    site = site or root.name
    report = SiteReport(site=site, root=str(root), task=task)
    if in_channels is not None and (problem := in_channels_problem(modalities, in_channels)):
        report.problems.append(f"{problem} (fl-imaging-data inspect --in-channels)")
        return report
    try:
        scan = scan_site(root, task, site, class_names, modalities)
    except SiteDataError as err:
        report.problems.append(str(err))
        return report
    report.found, report.problems = scan.cases, scan.problems
    report.class_folders = scan.class_folders
    report.cases = [
        inspect_case(case, task, num_classes, spatial_dims, in_channels, modalities, site)
        for case in scan.cases
    ]
    report.cases += [
        _check_case_image(case_id, path, spatial_dims, in_channels, modalities, site)[0]
        for case_id, path in scan.unlabelled
    ]
    report.cases.sort(key=lambda c: c.case_id)
    if report.found:
        try:
            load_site(
                root, task, val_fraction=val_fraction, seed=seed, name=site, cases=report.found
            )
        except SiteDataError as err:
            report.problems.append(f"{err} (the rule training applies)")
    return report


def inspect_images(
    source: Path,
    *,
    spatial_dims: int | None = None,
    in_channels: int | None = None,
    task: TaskName = TaskName.segmentation,
    modalities: Sequence[str] = (),
) -> SiteReport:
    """Check images without labels (a folder to predict on): what ``fl-imaging-predict`` would
    read in ``source`` (:func:`~fl_imaging.data.image_folder.find_images`; with ``modalities``,
    :func:`~fl_imaging.data.image_folder.find_modality_images`), each image checked as in
    :func:`inspect_site`. Returns a :class:`SiteReport` with ``images_only`` set."""
    report = SiteReport(site=source.name, root=str(source), task=task, images_only=True)
    if in_channels is not None and (problem := in_channels_problem(modalities, in_channels)):
        report.problems.append(f"{problem} (fl-imaging-data inspect --in-channels)")
        return report
    try:
        if modalities:
            images, report.problems = find_modality_images(source, modalities)
        else:
            images, report.problems = find_images(source)
    except SiteDataError as err:
        report.problems.append(str(err))
        return report
    report.cases = [
        _check_case_image(case_id, path, spatial_dims, in_channels, modalities, source.name)[0]
        for case_id, path in images
    ]
    return report
