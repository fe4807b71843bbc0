"""A site's side of ``fl-imaging-data stats``: compute statistics of its own cases, then release
only what its own policy allows.

:func:`site_statistics` reads every complete case of the site folder (the layout of
:mod:`fl_imaging.data.sites`, decoded as the tasks decode it,
:func:`~fl_imaging.data.image_checks.read_image`) and returns its private statistics
(:class:`Statistic`, never sent as they are):

- ``case_count`` (``cases``): the complete cases;
- per modality (``data.modalities``, else ``image``; a multi-channel file: ``channel-K``):
  ``intensity_histogram`` (voxels per bin of the request's ``intensity_edges``, stored
  intensities), ``intensity_moments`` (finite voxels, their sum and sum of squares, so that
  means and standard deviations can be pooled), ``nonfinite_voxels`` (NaN or infinite);
- per axis (``axis-0``, ...): ``spacing_histogram`` (cases per bin of ``spacing_edges``, mm) and
  ``shape_histogram`` (cases per bin of ``shape_edges``, voxels as stored);
- segmentation, per label value: ``label_voxels`` and, in 3D, ``label_ml`` (summed over the
  cases); classification, per class: ``class_count``;
- ``cases_missing``: ``label`` (an image without its label), ``modality`` (a case missing a
  modality), ``unreadable`` (a case that could not be decoded).

:func:`release` is the site's privacy rule, applied from its own policy
(``statistics.min_count`` of :mod:`fl_imaging.site.policy`; the coordinator's ``min_count`` only
when larger). With ``m`` that minimum, a statistic is released only when

1. the site has at least ``m`` complete cases (so no number is one case's value);
2. the cases behind it (for a label value: the cases holding it) are 0 or at least ``m``;
3. for a histogram or a count, every bin (value) is 0 or at least ``m``.

Otherwise the **whole statistic is withheld**, with the reason, and no bin of it leaves: a
suppressed bin would follow from the others and the total (``intensity_moments``'s voxel count,
``case_count``). A request for fine bins, in which bins hold a case or a few voxels each, so
gets the reason instead of the histogram. Minima and maxima are never computed.

Ours: no library computes federated statistics of imaging sites under a per-site policy (NVIDIA
FLARE's statistics are for tabular data in its own runtime).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fl_imaging.config import TaskName
from fl_imaging.data.image_checks import read_image
from fl_imaging.data.sites import Case, case_id_of, scan_site
from fl_imaging.statistics.request import StatsRequest

__all__ = [
    "Release",
    "SiteStatistics",
    "Statistic",
    "histogram",
    "release",
    "site_statistics",
]

log = logging.getLogger("fl_imaging.client")


@dataclass(frozen=True)
class Statistic:
    """One statistic of one site, before release: ``name`` and ``key`` (modality, axis, class),
    its ``values`` (bin counts, or the numbers the module lists), ``behind`` (the cases behind
    it) and ``counts`` (whether every value is a count, each checked against the minimum)."""

    name: str
    key: str
    values: tuple[float, ...]
    behind: int
    counts: bool = True


@dataclass
class SiteStatistics:
    """A site's statistics before release: ``cases`` (its complete cases) and ``statistics``."""

    cases: int
    statistics: list[Statistic] = field(default_factory=list)


@dataclass
class Release:
    """What a site releases: ``values[(name, key)]``, ``withheld[(name, key)]`` (the reason)
    and ``min_count``, the minimum it applied."""

    min_count: int
    values: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    withheld: dict[tuple[str, str], str] = field(default_factory=dict)


def histogram(values: np.ndarray, edges: Sequence[float]) -> list[int]:
    """Counts of ``values`` (any shape, finite) per bin of ``edges`` (``len(edges) - 1`` bins,
    ``[e_k, e_k+1)``), the first and last bins open (values below ``e_0`` go to the first,
    from ``e_n`` on to the last)."""
    inner = np.asarray(edges[1:-1], dtype=np.float64)
    index = np.searchsorted(inner, np.asarray(values, dtype=np.float64).ravel(), side="right")
    return [int(c) for c in np.bincount(index, minlength=len(edges) - 1)]


def _spacing(image: object) -> list[float]:
    """Voxel spacing (mm) of a decoded image, per spatial axis, from its affine."""
    affine = np.asarray(image.affine)  # type: ignore[attr-defined]
    dims = min(len(image.shape) - 1, 3)  # type: ignore[attr-defined]
    return [float(s) for s in np.linalg.norm(affine[:3, :dims], axis=0)]


def _missing_modality(root: Path, modalities: Sequence[str], complete: set[str]) -> int:
    """Cases of ``root/images/MODALITY/`` found in some modality folder but not in all."""
    seen: set[str] = set()
    for modality in modalities:
        folder = root / "images" / modality
        if folder.is_dir():
            seen |= {case_id_of(p) for p in folder.iterdir() if not p.name.startswith(".")}
    return len(seen - complete)


class _Sums:
    """Running sums of one site's cases (see :func:`site_statistics`)."""

    def __init__(self, request: StatsRequest) -> None:
        self.request = request
        self.intensity: dict[str, np.ndarray] = {}
        self.moments: dict[str, np.ndarray] = {}
        self.nonfinite: dict[str, int] = {}
        self.spacing: dict[int, np.ndarray] = {}
        self.shape: dict[int, np.ndarray] = {}
        self.label_voxels: dict[int, int] = {}
        self.label_ml: dict[int, float] = {}
        self.label_cases: dict[int, int] = {}

    def add_image(self, modality: str, array: np.ndarray) -> None:
        """Add one modality's voxels ``(*spatial)``."""
        finite = np.isfinite(array)
        values = array[finite].astype(np.float64)
        bins = len(self.request.intensity_edges) - 1
        self.intensity.setdefault(modality, np.zeros(bins, dtype=np.int64))
        self.intensity[modality] += histogram(values, self.request.intensity_edges)
        moments = np.array([values.size, values.sum(), np.square(values).sum()])
        self.moments[modality] = self.moments.get(modality, np.zeros(3)) + moments
        self.nonfinite[modality] = self.nonfinite.get(modality, 0) + int((~finite).sum())

    def add_geometry(self, shape: Sequence[int], spacing: Sequence[float]) -> None:
        """Add one case's shape (voxels) and spacing (mm) per axis."""
        for axis, (size, step) in enumerate(zip(shape, spacing, strict=True)):
            for sums, value, edges in (
                (self.shape, size, self.request.shape_edges),
                (self.spacing, step, self.request.spacing_edges),
            ):
                sums.setdefault(axis, np.zeros(len(edges) - 1, dtype=np.int64))
                sums[axis] += histogram(np.array([value]), edges)

    def add_label(self, label: np.ndarray, voxel_ml: float | None, num_classes: int) -> None:
        """Add one segmentation mask ``(*spatial)``: voxels (and ml) per label value."""
        counts = np.bincount(np.rint(label).astype(np.int64).ravel(), minlength=num_classes)
        for value, n in enumerate(counts):
            self.label_voxels[value] = self.label_voxels.get(value, 0) + int(n)
            self.label_cases[value] = self.label_cases.get(value, 0) + int(n > 0)
            if voxel_ml is not None:
                self.label_ml[value] = self.label_ml.get(value, 0.0) + float(n) * voxel_ml


def site_statistics(
    root: Path,
    task: TaskName,
    request: StatsRequest,
    *,
    site: str,
    num_classes: int,
    class_names: Sequence[str] = (),
    modalities: Sequence[str] = (),
) -> SiteStatistics:
    """The private statistics (see the module) of the site folder ``root`` (named ``site``) for
    ``task`` with ``num_classes`` classes (and their ``class_names``), its cases read with
    ``modalities`` (``data.modalities``) as training reads them, binned over ``request``'s
    edges. Raises :class:`~fl_imaging.data.sites.SiteDataError` for a folder with no cases."""
    scan = scan_site(root, task, site, list(class_names) or None, modalities)
    sums = _Sums(request)
    unreadable = 0
    cases: list[Case] = []
    for case in scan.cases:
        try:
            _add_case(sums, case, task, modalities, num_classes)
        except Exception as err:  # the reader's reason, logged at the site only
            unreadable += 1
            log.warning("[site %s] statistics: case %s left out: %s", site, case.case_id, err)
            continue
        cases.append(case)
    n = len(cases)
    out = SiteStatistics(n, [Statistic("case_count", "cases", (n,), n)])
    for modality, counts in sums.intensity.items():
        out.statistics += [
            Statistic("intensity_histogram", modality, tuple(map(float, counts)), n),
            Statistic(
                "intensity_moments", modality, tuple(map(float, sums.moments[modality])), n, False
            ),
            Statistic("nonfinite_voxels", modality, (sums.nonfinite[modality],), n),
        ]
    for name, per_axis in (("spacing_histogram", sums.spacing), ("shape_histogram", sums.shape)):
        out.statistics += [
            Statistic(name, f"axis-{axis}", tuple(map(float, c)), n)
            for axis, c in sorted(per_axis.items())
        ]
    for value, voxels in sorted(sums.label_voxels.items()):
        behind = sums.label_cases[value]
        out.statistics.append(Statistic("label_voxels", str(value), (voxels,), behind, False))
        if value in sums.label_ml:
            ml = (sums.label_ml[value],)
            out.statistics.append(Statistic("label_ml", str(value), ml, behind, False))
    if task == TaskName.classification:
        for index in range(num_classes):
            name = class_names[index] if index < len(class_names) else str(index)
            count = sum(1 for c in cases if c.label == index)
            out.statistics.append(Statistic("class_count", name, (count,), n))
    missing = {
        "label": len(scan.unlabelled),
        "modality": _missing_modality(root, modalities, {c.case_id for c in scan.cases})
        if modalities
        else 0,
        "unreadable": unreadable,
    }
    out.statistics += [
        Statistic("cases_missing", what, (count,), count) for what, count in missing.items()
    ]
    return out


def _add_case(
    sums: _Sums, case: Case, task: TaskName, modalities: Sequence[str], num_classes: int
) -> None:
    """Decode ``case`` (each modality; its label for segmentation) and add it to ``sums``."""
    paths = case.image if isinstance(case.image, tuple) else (case.image,)
    images = [read_image(path) for path in paths]
    arrays: list[tuple[str, np.ndarray]] = []
    for index, image in enumerate(images):
        data = image.numpy()
        if modalities:
            arrays.append((modalities[index], data[0]))
        elif data.shape[0] == 1:
            arrays.append(("image", data[0]))
        else:
            arrays += [(f"channel-{c}", data[c]) for c in range(data.shape[0])]
    label = None
    if task == TaskName.segmentation:
        label = read_image(str(case.label))
    for modality, array in arrays:
        sums.add_image(modality, array)
    first = images[0]
    spacing = _spacing(first)
    sums.add_geometry([int(s) for s in first.shape[1:]], spacing)
    if label is not None:
        voxel_ml = float(np.prod(_spacing(label))) / 1000.0 if len(spacing) == 3 else None
        sums.add_label(label.numpy()[0], voxel_ml, num_classes)


def release(statistics: SiteStatistics, own_min_count: int, requested_min_count: int) -> Release:
    """What may leave the site (the module's rules) with the minimum ``max(own_min_count,
    requested_min_count)``: ``own_min_count`` is the site policy's ``statistics.min_count``,
    ``requested_min_count`` the coordinator's (it can only raise the minimum). Returns the
    :class:`Release`: every statistic either released whole or withheld with its reason."""
    m = max(own_min_count, requested_min_count)
    out = Release(m)
    for stat in statistics.statistics:
        ident = (stat.name, stat.key)
        if statistics.cases < m:
            out.withheld[ident] = (
                f"the site has fewer than {m} cases (statistics.min_count); nothing of it leaves"
            )
        elif 0 < stat.behind < m:
            out.withheld[ident] = f"fewer than {m} cases behind it (statistics.min_count)"
        elif stat.counts and any(0 < v < m for v in stat.values):
            small = sum(1 for v in stat.values if 0 < v < m)
            out.withheld[ident] = (
                f"{small} of its {len(stat.values)} bin(s) count between 1 and {m - 1} "
                f"(statistics.min_count={m}); ask for coarser bins"
            )
        else:
            out.values[ident] = [float(v) for v in stat.values]
    return out
