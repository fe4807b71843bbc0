"""``fl-imaging-data inspect`` on a public dataset in its own download layout.

A folder in the layout a dataset adapter reads (:mod:`fl_imaging.data.datasets`) is checked
through that adapter, so that ``fl-imaging-data inspect Task04_Hippocampus`` checks what training
with ``data=msd`` will read: the MSD layout (``dataset.json`` + ``imagesTr/`` + ``labelsTr/``),
a MedMNIST ``.npz`` (or a folder of them), or class folders (``ROOT/<class>/<images>``). The
task, the number of classes, their names and the dimensionality come from the dataset unless the
user gives them; every case is then checked as a site's case is.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from fl_imaging.config import TaskName
from fl_imaging.data.datasets import DatasetPool, load_class_folders, load_medmnist, load_msd
from fl_imaging.data.datasets.medmnist_download import medmnist_layout_problems
from fl_imaging.data.datasets.msd_download import msd_layout_problems
from fl_imaging.data.inspect import SiteReport, inspect_case
from fl_imaging.data.sites import SiteDataError, is_image_file

__all__ = ["dataset_layout", "inspect_dataset"]


def dataset_layout(root: Path) -> str | None:
    """The public dataset layout of ``root``: ``msd``, ``medmnist`` or ``class_folders``; None
    for anything else (a site folder: ``images/``, ``labels/``, ``labels.csv`` ...)."""
    if root.is_file():
        return "medmnist" if root.name.lower().endswith(".npz") else None
    if not root.is_dir() or any((root / n).exists() for n in ("images", "labels", "labels.csv")):
        return None
    if (root / "dataset.json").is_file():
        return "msd"
    if any(root.glob("*.npz")):
        return "medmnist"
    folders = [p for p in root.iterdir() if p.is_dir() and p.name[0] not in "._"]
    if folders and all(any(is_image_file(f) for f in p.iterdir()) for p in folders):
        return "class_folders"
    return None


def _medmnist_file(path: Path) -> tuple[str, int]:
    """(flag, size) of an official MedMNIST file name: ``flag.npz`` (28 px), ``flag_64.npz``."""
    match = re.fullmatch(r"(.+?)(?:_(\d+))?\.npz", path.name)
    if not match:
        raise SiteDataError(f"{path}: not a MedMNIST file name (FLAG.npz or FLAG_SIZE.npz)")
    return match.group(1), int(match.group(2) or 28)


def _check_pool(
    pool: DatasetPool,
    report: SiteReport,
    task: TaskName | None,
    num_classes: int | None,
    spatial_dims: int | None,
    in_channels: int | None,
    prefix: str = "",
) -> None:
    """Check every case of ``pool`` into ``report``, with the dataset's task values where the
    user gave none."""
    if task is not None and task.value != pool.task:
        report.problems.append(
            f"{pool.root}: {pool.name} holds {pool.task} data, not {task.value}: inspect it with "
            f"--task {pool.task} (or without --task)"
        )
        return
    for case in pool.cases:
        checked = inspect_case(
            case,
            TaskName(pool.task),
            num_classes or pool.num_classes,
            spatial_dims or pool.spatial_dims,
            in_channels or 1,
        )
        checked.case_id = prefix + checked.case_id
        report.cases.append(checked)


def inspect_dataset(
    root: Path,
    *,
    task: TaskName | None = None,
    num_classes: int | None = None,
    spatial_dims: int | None = None,
    in_channels: int | None = None,
    class_names: list[str] | None = None,
) -> SiteReport:
    """Check a public dataset folder (see :func:`dataset_layout`) through its adapter.

    Options left None are taken from the dataset (task, classes, dimensionality; one channel).
    Returns a :class:`~fl_imaging.data.inspect.SiteReport` whose ``dataset`` says what was found
    (e.g. ``msd:Hippocampus: segmentation, 3 classes (background, Anterior, Posterior)``).
    Raises :class:`SiteDataError` when ``root`` is not in a dataset layout.
    """
    layout = dataset_layout(root)
    if layout is None:
        raise SiteDataError(f"{root}: not a public dataset layout (MSD, MedMNIST, class folders)")
    report = SiteReport(site=root.name, root=str(root), task=task or TaskName.segmentation)
    report.dataset = f"in the {layout} layout"
    try:
        if layout == "msd":
            report.problems += msd_layout_problems(root)
            pools = [load_msd(root)]
        elif layout == "class_folders":
            pools = [load_class_folders(root, class_names)]
        else:
            pools = []
            files = [root] if root.is_file() else sorted(root.glob("*.npz"))
            with tempfile.TemporaryDirectory(prefix="fl-imaging-inspect-") as export:
                for path in files:
                    flag, size = _medmnist_file(path)
                    problems = medmnist_layout_problems(path.parent, flag, size)
                    if problems:  # e.g. not a readable .npz: the adapter would not say it
                        report.problems += problems
                        continue
                    pool = load_medmnist(path.parent, flag, size, Path(export))
                    pools.append(pool)
                    start = len(report.cases)
                    prefix = f"{path.name}:" if len(files) > 1 else ""
                    _check_pool(pool, report, task, num_classes, spatial_dims, in_channels, prefix)
                    # the exported files are gone after the check: name the .npz instead
                    exported = f"{(Path(export) / f'{flag}_{size}').absolute()}/"
                    for case in report.cases[start:]:
                        case.image = case.image.replace(exported, f"{path}:")
                        case.problems = [p.replace(exported, f"{path}:") for p in case.problems]
    except SiteDataError as err:
        report.problems.append(str(err))
        return report
    if not pools:
        return report
    first = pools[0]
    report.task = TaskName(first.task)
    report.dataset = "; ".join(
        f"{p.name}: {p.spatial_dims}D {p.task}, {p.num_classes} classes "
        f"({', '.join(p.class_names)}), {len(p.cases)} cases"
        for p in pools
    )
    if layout != "medmnist":
        _check_pool(first, report, task, num_classes, spatial_dims, in_channels)
    return report
