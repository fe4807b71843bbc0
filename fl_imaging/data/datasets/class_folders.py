"""Class-folder adapter: one sub-folder per class holding that class's images (MedNIST layout).

Layout (``scripts/download_mednist.py`` writes it)::

    ROOT/CXR/00000001.jpg
    ROOT/CTHead/00000001.jpg
    ...

Class k is the k-th folder name in sorted order (or ``class_names[k]`` when given). Case ids are
``<class>-<file stem>``, since file names repeat across classes.
"""

from __future__ import annotations

from pathlib import Path

from fl_imaging.data.datasets.pool import DatasetPool
from fl_imaging.data.sites import IMAGE_2D_SUFFIXES, Case, SiteDataError, case_id_of, is_image_file
from fl_imaging.data.user_paths import folder_entries

__all__ = ["load_class_folders"]


def load_class_folders(root: Path, class_names: list[str] | None = None) -> DatasetPool:
    """Read ``root/<class>/<images>`` into a :class:`DatasetPool` for classification.

    2D image files (PNG, JPEG ...) give a 2D pool, NIfTI files a 3D one. Raises
    :class:`~fl_imaging.data.sites.SiteDataError` for a missing folder, fewer than two classes, a
    configured class without a folder, an empty class folder or a file that is not an image.
    """
    if not root.is_dir():
        raise SiteDataError(
            f"{root} does not exist: give the folder holding one sub-folder per class "
            "(data.root=...); scripts/download_mednist.py writes one"
        )
    folders = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and p.name[0] not in "._"}
    names = list(class_names) if class_names else sorted(folders)
    problems = [
        f"{root / n}: class folder missing (task.class_names)" for n in names if n not in folders
    ]
    if len(names) < 2:
        problems.append(f"{root}: {len(names)} class folder(s); classification needs at least 2")
    cases: list[Case] = []
    for label, name in enumerate(names):
        folder = folders.get(name, root / name)
        # folder_entries, not glob: an unreadable class folder is named, not taken as empty
        files = (
            [p for p in folder_entries(folder) if not p.name.startswith(".")]
            if name in folders
            else []
        )
        if name in folders and not files:
            problems.append(f"{folders[name]}: empty class folder")
        for path in files:
            if not path.is_file() or not is_image_file(path):
                problems.append(f"{path}: not an image file; move it out of the class folder")
                continue
            cases.append(Case(f"{name}-{case_id_of(path)}", str(path.resolve()), label))
    if problems:
        raise SiteDataError(
            f"{len(problems)} problem(s) in {root}:\n  - " + "\n  - ".join(problems[:20])
        )
    flat = all(c.image.lower().endswith(IMAGE_2D_SUFFIXES) for c in cases)
    return DatasetPool(
        name=f"class_folders:{root.name}",
        root=root,
        task="classification",
        spatial_dims=2 if flat else 3,
        num_classes=len(names),
        class_names=names,
        cases=cases,
    )
