"""Turn the ``data`` config into the federation's site folders, checked and split.

For ``data=demo`` the synthetic demo is written first (reused when already there); for
``data=folders`` the folders given in ``data.sites`` are used as they are; a public dataset
(``msd``, ``class_folders``, ``medmnist``) is split into simulated site folders first
(:mod:`fl_imaging.data.simulated`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

from fl_imaging.config import DataName, RunConfig
from fl_imaging.data.demo import make_demo_data
from fl_imaging.data.inspect import SiteReport, inspect_site
from fl_imaging.data.shift import ScannerProfile
from fl_imaging.data.simulated import public_site_folder, simulated_sites
from fl_imaging.data.sites import Case, SiteData, SiteDataError, load_site
from fl_imaging.data.user_paths import named_os_errors

__all__ = [
    "checked_cases",
    "partition_summary",
    "prepare_public_site",
    "prepare_sites",
    "site_folders",
    "write_partition_summary",
]

log = logging.getLogger("fl_imaging.data")
#: Problems listed in a training error; `fl-imaging-data inspect` lists them all.
MAX_SHOWN = 30
#: About how many "checking site k/N" lines many sites get (the first, every k-th, the last).
LISTED_CHECKS = 20


def site_folders(cfg: RunConfig) -> list[Path]:
    """The federation's site folders, absolute, in site order: the demo's (written on first
    use), a public dataset's simulated sites (partitioned on first use) or ``data.sites``.
    Checks nothing inside them; raises :class:`SiteDataError` for an empty federation or two
    folders with the same name (the name is the site's)."""
    data = cfg.data
    if data.name == DataName.demo:
        if not data.root:
            raise SiteDataError("data.root is empty: give the folder for the demo data")
        log.info(
            "demo data: %d sites x %d cases in %s", data.num_sites, data.cases_per_site, data.root
        )
        folders = make_demo_data(
            Path(data.root),
            task=cfg.task.name.value,
            num_sites=data.num_sites,
            cases_per_site=data.cases_per_site,
            shape=tuple(data.shape),
            dicom_sites=tuple(data.dicom_sites),
            seed=data.partition.seed,
            test_cases=round(data.test_fraction * data.cases_per_site),
            modalities=tuple(data.modalities),
        )
    elif data.name != DataName.folders:
        with named_os_errors():  # the public dataset's folder and files, named
            folders = simulated_sites(cfg)
    else:
        if not data.sites:
            raise SiteDataError(
                "data.sites is empty: list the site folders, e.g. "
                "data.sites=[/data/hospital-a,/data/hospital-b]"
            )
        folders = [Path(p) for p in data.sites]
    if len(folders) < 1:
        raise SiteDataError("the federation has no site")
    folders = [f.resolve() for f in folders]
    names = [f.name for f in folders]
    duplicated = [n for n, k in Counter(names).items() if k > 1]
    if duplicated:
        raise SiteDataError(
            f"site folder names must be unique, they name the sites: {', '.join(duplicated)} "
            "appears more than once"
        )
    return folders


def prepare_sites(cfg: RunConfig) -> tuple[RunConfig, list[SiteData], list[SiteReport]]:
    """Resolve, check and split every site of the federation.

    Returns the config with ``data.sites`` set to absolute folder paths, one :class:`SiteData`
    per site in that order, and each site's check report (as ``fl-imaging-data inspect`` gives
    it). Raises :class:`SiteDataError` for a missing or broken site folder, naming it.
    """
    data = cfg.data
    folders = site_folders(cfg)
    sites: list[SiteData] = []
    reports: list[SiteReport] = []
    excluded: list[str] = []
    every = max(1, math.ceil(len(folders) / LISTED_CHECKS))  # many sites: about 20 lines
    for i, folder in enumerate(folders):
        if (i + 1) % every == 0 or i == 0 or i + 1 == len(folders):
            log.info("checking site %d/%d: %s", i + 1, len(folders), folder)
        cases, report = checked_cases(folder, cfg, seed=cfg.seed + i)
        left_out = {c.case_id for c in report.found} - {c.case_id for c in cases}
        left_out |= excluded_of(data.excluded_cases, folder.name)
        cases = [c for c in cases if c.case_id not in left_out]
        excluded += [f"{folder.name}/{case_id}" for case_id in sorted(left_out)]
        sites.append(
            load_site(
                folder,
                cfg.task.name,
                val_fraction=data.val_fraction,
                seed=cfg.seed + i,
                cases=cases,
            )
        )
        reports.append(report)
    if not cfg.task.class_names:
        check_class_folders_agree(reports)
    # Every site reads the same list, so that it trains on exactly the cases checked here.
    resolved = replace(
        cfg, data=replace(data, sites=[str(f) for f in folders], excluded_cases=excluded)
    )
    return resolved, sites, reports


def check_class_folders_agree(reports: list[SiteReport]) -> None:
    """Refuse sites whose class sub-folders give one class index two meanings (classification
    without labels.csv and without ``task.class_names``): each site numbers its own folders in
    sorted order, so ``normal/ tumour/`` at one site and ``cancer/ normal/`` at another would
    make class 1 mean tumour at the first and normal at the second. A site lacking a class
    whose numbering still agrees (``normal/`` beside ``normal/ tumour/``) is accepted. Takes the
    sites' check reports; raises :class:`SiteDataError` naming every site's class list and the
    shared list to set."""
    lists = {r.site: r.class_folders for r in reports if r.class_folders}
    named: dict[int, dict[str, str]] = {}  # class index -> {a name it has: the first site}
    for site, names in lists.items():
        for k, name in enumerate(names):
            named.setdefault(k, {}).setdefault(name, site)
    # a name at two indices leaves one of them with two names, so this finds every clash
    for k, names in sorted(named.items()):
        if len(names) > 1:
            (one, one_site), (other, other_site) = list(names.items())[:2]
            _refuse_class_lists(lists, k, (one_site, one), (other_site, other))


def _refuse_class_lists(
    lists: dict[str, list[str]], k: int, one: tuple[str, str], other: tuple[str, str]
) -> None:
    """Raise the :class:`SiteDataError` of :func:`check_class_folders_agree`: class ``k`` is
    ``one`` = (site, name) at one site and ``other`` at another."""
    union = sorted({n for names in lists.values() for n in names})
    shown = "; ".join(f"site {site}: [{', '.join(names)}]" for site, names in lists.items())
    raise SiteDataError(
        f"the sites' class folders differ ({shown}): each site numbers its class folders in "
        f"sorted order, so class {k} would be {one[1]!r} at site {one[0]} and {other[1]!r} at "
        f"site {other[0]}. Give every site the same class folders, or set the shared class "
        f"list task.class_names=[{','.join(union)}] (class k is its k-th name at every site; "
        f"task.num_classes={len(union)})"
    )


def prepare_public_site(cfg: RunConfig) -> SiteData:
    """The public cases that ``data.public_fraction`` holds out of a public dataset, checked like
    a site's and split into train and val by ``data.val_fraction``. Raises
    :class:`SiteDataError` when there are none (``data.public_fraction`` 0, or not a public
    dataset)."""
    if cfg.data.name in (DataName.demo, DataName.folders):
        raise SiteDataError(
            f"data={cfg.data.name.value} has no public share: data.public_fraction holds out "
            "cases of a public dataset (data=hippocampus, mednist, adrenal3d)"
        )
    folder = public_site_folder(cfg)
    log.info("public share: %s", folder)
    cases, _ = checked_cases(folder, cfg, seed=cfg.seed)
    return load_site(
        folder, cfg.task.name, val_fraction=cfg.data.val_fraction, seed=cfg.seed, cases=cases
    )


def excluded_of(entries: list[str], site: str) -> set[str]:
    """The case ids ``data.excluded_cases`` (``SITE/CASE_ID`` entries) leaves out at ``site``."""
    return {e.split("/", 1)[1] for e in entries if "/" in e and e.split("/", 1)[0] == site}


def checked_cases(
    folder: Path, cfg: RunConfig, seed: int | None = None
) -> tuple[list[Case], SiteReport]:
    """Decode and check every case of a site folder (as ``fl-imaging-data inspect`` does, with
    the task's dimensionality, channels and classes, and the split rule with ``data.val_fraction``
    and ``seed``, default ``cfg.seed``).

    Returns the cases that passed and the full report. Raises :class:`SiteDataError` listing
    every problem, unless ``data.exclude_bad_cases`` is set: then the failing cases are left out
    and named in the log.
    """
    report = inspect_site(
        folder,
        cfg.task.name,
        num_classes=cfg.task.num_classes,
        class_names=list(cfg.task.class_names) or None,
        spatial_dims=cfg.task.spatial_dims,
        in_channels=cfg.task.in_channels,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.seed if seed is None else seed,
        modalities=list(cfg.data.modalities),
    )
    for note in report.all_notes:
        log.info("[site %s] note: %s", report.site, note)
    problems = report.all_problems
    bad = {c.case_id for c in report.cases if c.problems}
    if problems and (not cfg.data.exclude_bad_cases or not report.found):
        shown = problems[:MAX_SHOWN] + (
            [f"... and {len(problems) - MAX_SHOWN} more: fl-imaging-data inspect {folder}"]
            if len(problems) > MAX_SHOWN
            else []
        )
        # with no case found (a folder that cannot be read, a split file to fix ...), leaving
        # cases out cannot help: only fixing the folder can
        instead = (
            ", or set data.exclude_bad_cases=true to train without these cases."
            if report.found
            else "; data.exclude_bad_cases cannot help here: no case could be listed."
        )
        raise SiteDataError(
            f"[site {report.site}] {len(problems)} problem(s) in {folder}:\n  - "
            + "\n  - ".join(shown)
            + f"\nFix them (fl-imaging-data inspect shows them again){instead}"
        )
    for problem in problems:
        log.warning("[site %s] excluded (data.exclude_bad_cases=true): %s", report.site, problem)
    return [c for c in report.found if c.case_id not in bad], report


def partition_summary(
    sites: list[SiteData], reports: list[SiteReport]
) -> list[dict[str, str | int | float]]:
    """One row per site: name, folder, train/val/test case counts, the label distribution and,
    for a simulated site with acquisition shift, its scanner profile.

    Label distribution: classification, the number of cases per class (``class_<k>``, all
    splits); segmentation, the percentage of voxels of each class (``voxels_%_<k>``).
    """
    rows: list[dict[str, str | int | float]] = []
    # every site gets every class column (0 when it has none), so columns keep class order
    labels = sorted(
        {c.label for s in sites for c in s.train + s.val + s.test if isinstance(c.label, int)}
    )
    for site, report in zip(sites, reports, strict=True):
        row: dict[str, str | int | float] = {
            "site": site.name,
            "folder": str(site.root),
            "train": len(site.train),
            "val": len(site.val),
            "test": len(site.test),
        }
        cases = site.train + site.val + site.test
        classes = Counter(c.label for c in cases if isinstance(c.label, int))
        for label in labels:
            row[f"class_{label}"] = classes.get(label, 0)
        used = {c.case_id for c in cases}
        voxels = [c.label_voxels for c in report.cases if c.case_id in used and c.label_voxels]
        if voxels:
            totals = [sum(v) for v in zip(*voxels, strict=True)]
            for k, count in enumerate(totals):
                row[f"voxels_%_{k}"] = round(100.0 * count / max(sum(totals), 1), 3)
        info = site.root / "site.json"
        if info.is_file():
            scanner = json.loads(info.read_text()).get("scanner", {})
            if scanner and scanner != ScannerProfile().as_dict():
                row.update({f"scanner_{k}": v for k, v in scanner.items()})
        rows.append(row)
    return rows


def write_partition_summary(rows: list[dict[str, str | int | float]], path: Path) -> str:
    """Write the partition summary as CSV at ``path`` and return it as printable text."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval=0)
        writer.writeheader()
        writer.writerows(rows)
    shown = [c for c in columns if c != "folder"]
    lines = [shown] + [[str(row.get(c, 0)) for c in shown] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(shown))]
    return "\n".join(
        "  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)) for line in lines
    )
