"""Public dataset -> simulated hospital sites, as site folders in the documented layout
(docs/how-to/check-a-folder.md).

The pool of a dataset adapter is split by a partitioner and each simulated site is written as a
site folder (``site-1`` ... under ``data.sites_dir``) so that everything downstream (checks,
training, prediction, deployment) treats it like a real hospital's folder. Images are symbolic
links to the dataset's files; with the ``shift`` partition each site's images are instead written
through that site's scanner transform (NIfTI, same grid, so labels still match). A folder made
with the same arguments is reused, so every strategy of a benchmark sees the same split.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.transforms import EnsureChannelFirst, LoadImage

from fl_imaging.config import DataName, PartitionBy, PartitionName, RunConfig
from fl_imaging.data.datasets import (
    DatasetPool,
    load_class_folders,
    load_medmnist,
    load_msd,
)
from fl_imaging.data.nifti_io import save_nifti
from fl_imaging.data.partition import assign_sites, size_strata
from fl_imaging.data.readers import IMAGE_READERS
from fl_imaging.data.shift import ScannerProfile, apply_scanner, scanner_profiles
from fl_imaging.data.sites import Case, SiteDataError, case_id_of

__all__ = ["PUBLIC_FOLDER", "PUBLIC_SPLIT", "load_pool", "public_site_folder", "simulated_sites"]

log = logging.getLogger("fl_imaging.data")
_VERSION = 2  # bump when the partition code changes what a folder holds
MARKER = "partition.json"
#: Split name of the cases ``data.public_fraction`` holds out, and the folder they are written to
#: next to the sites' (``site-1`` ...): a site folder in the same layout, held by no site.
PUBLIC_SPLIT = "public"
PUBLIC_FOLDER = "public"


def load_pool(cfg: RunConfig) -> DatasetPool:
    """Read the public dataset named by ``cfg.data`` and check that it fits ``cfg.task``.

    Returns the pool, with ``data.test_fraction`` of the cases that have no official split moved
    to ``test``, ``data.public_fraction`` of the cases a site would train on (the other unsplit
    ones and the official ``train`` split) marked ``public`` (drawn
    from their own seeded stream, so the test cases are the same with or without a public
    share) and, when ``data.max_cases`` is set, a seeded subset of that many cases. Raises
    :class:`SiteDataError` when the dataset is missing or does not fit the task, saying which
    ``task.*`` values to set.
    """
    data = cfg.data
    if not data.root:
        raise SiteDataError(f"data.root is empty: give the folder of the {data.name} dataset")
    root = Path(data.root)
    if data.name == DataName.msd:
        pool = load_msd(root)
    elif data.name == DataName.class_folders:
        pool = load_class_folders(root, list(cfg.task.class_names) or None)
    elif data.name == DataName.medmnist:
        if not data.flag:
            raise SiteDataError("data.flag is empty: name the MedMNIST set, e.g. adrenalmnist3d")
        pool = load_medmnist(root, data.flag, data.size, Path(data.sites_dir) / "export")
    else:
        raise SiteDataError(f"data.name={data.name} is not a public dataset")
    _check_fits_task(pool, cfg)
    rng = np.random.default_rng([data.partition.seed, 7919])
    cases = pool.cases
    if data.max_cases is not None and data.max_cases < len(cases):
        keep = np.sort(rng.choice(len(cases), size=data.max_cases, replace=False))
        cases = [cases[i] for i in keep]
    unsplit = [i for i, c in enumerate(cases) if c.split is None]
    n_test = round(data.test_fraction * len(unsplit))
    test = {unsplit[i] for i in rng.permutation(len(unsplit))[:n_test]}
    # Public cases come from those a site would train on: unsplit (not test) or official train.
    rest = [
        i for i, c in enumerate(cases) if c.split == "train" or c.split is None and i not in test
    ]
    n_public = round(data.public_fraction * len(rest))
    public_rng = np.random.default_rng([data.partition.seed, 7927])
    public = {rest[i] for i in public_rng.permutation(len(rest))[:n_public]}
    if data.public_fraction and not 0 < n_public < len(rest):
        raise SiteDataError(
            f"data.public_fraction={data.public_fraction} of {len(rest)} training cases of "
            f"{pool.name} holds out {n_public}: choose a share that leaves both public cases and "
            "cases for the sites"
        )
    split_of = {**dict.fromkeys(test, "test"), **dict.fromkeys(public, PUBLIC_SPLIT)}
    pool.cases = [
        Case(c.case_id, c.image, c.label, split_of[i]) if i in split_of else c
        for i, c in enumerate(cases)
    ]
    return pool


def _check_fits_task(pool: DatasetPool, cfg: RunConfig) -> None:
    task = cfg.task
    wrong: list[str] = []
    if pool.task != task.name.value:
        wrong.append(f"task={pool.task}")
    if pool.spatial_dims != task.spatial_dims:
        example = ",".join(["64"] * pool.spatial_dims)
        wrong.append(f"task.spatial_dims={pool.spatial_dims} task.roi_size=[{example}]")
    if pool.num_classes != task.num_classes:
        wrong.append(f"task.num_classes={pool.num_classes}")
    if wrong:
        raise SiteDataError(
            f"{pool.name} ({pool.root}) holds {pool.spatial_dims}D {pool.task} data with "
            f"{pool.num_classes} classes ({', '.join(pool.class_names)}), which the task "
            f"config does not fit: run with {' '.join(wrong)} (or an experiment preset such as "
            "experiment=hippocampus, experiment=mednist, experiment=adrenal3d)"
        )


def _strata(pool: DatasetPool, cfg: RunConfig) -> list[int] | None:
    """Each case's stratum for the Dirichlet partition: its class label (classification) or the
    quantile bin of its foreground volume (segmentation); None for other partitions."""
    part = cfg.data.partition
    if part.name != PartitionName.dirichlet:
        return None
    if (part.by == PartitionBy.label) != (pool.task == "classification"):
        raise SiteDataError(
            f"data.partition.by={part.by.value} does not fit {pool.task}: use by=label for "
            "classification and by=size (foreground volume) for segmentation"
        )
    if part.by == PartitionBy.label:
        return [int(c.label) for c in pool.cases]
    volumes = [float((np.asarray(nib.load(str(c.label)).dataobj) > 0).sum()) for c in pool.cases]
    return size_strata(volumes, part.size_bins)


def simulated_sites(cfg: RunConfig) -> list[Path]:
    """Write (or reuse) the simulated site folders of ``cfg.data`` and return them in order.

    The folder is ``data.sites_dir/<dataset>-<partition>-<N>sites-<hash of the arguments>``;
    with ``data.public_fraction`` it also holds the public cases as ``public/`` (see
    :func:`public_site_folder`), which no site is given.
    Raises :class:`SiteDataError` (or a :class:`~fl_imaging.data.partition.PartitionError`) with
    what to change when the dataset or the partition cannot be made.
    """
    return _simulated(cfg)[0]


def public_site_folder(cfg: RunConfig) -> Path:
    """The folder of the public cases that ``data.public_fraction`` holds out of a public
    dataset (written with the sites' folders on first use): a site folder whose cases are split
    into train and val by ``data.val_fraction``. Raises :class:`SiteDataError` when
    ``data.public_fraction`` is 0."""
    if not cfg.data.public_fraction:
        raise SiteDataError(
            "no public cases: data.public_fraction is 0; set e.g. data.public_fraction=0.2 to "
            "hold out a share of the dataset as public data"
        )
    public = _simulated(cfg)[1]
    assert public is not None  # public_fraction > 0 always writes it
    return public


def _simulated(cfg: RunConfig) -> tuple[list[Path], Path | None]:
    """(site folders, public folder or None), written on first use."""
    data, part = cfg.data, cfg.data.partition
    pool = load_pool(cfg)
    args = {
        "version": _VERSION,
        "dataset": pool.name,
        "root": str(pool.root.resolve()),
        "cases": [c.case_id for c in pool.cases],
        "splits": [c.split for c in pool.cases],
        "num_sites": data.num_sites,
        "partition": {k: getattr(part, k) for k in part.__dataclass_fields__},
    }
    args["partition"] = json.loads(json.dumps(args["partition"], default=str))
    digest = hashlib.sha1(json.dumps(args, sort_keys=True).encode()).hexdigest()[:8]
    slug = pool.name.split(":")[-1].lower()
    out = Path(data.sites_dir) / f"{slug}-{part.name}-{data.num_sites}sites-{digest}"
    folders = [out / f"site-{k + 1}" for k in range(data.num_sites)]
    public_cases = [c for c in pool.cases if c.split == PUBLIC_SPLIT]
    public = out / PUBLIC_FOLDER if public_cases else None
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("args") == args:
        log.info("simulated sites of %s reused from %s", pool.name, out)
        return folders, public
    site_cases = [c for c in pool.cases if c.split != PUBLIC_SPLIT]
    strata = _strata(replace(pool, cases=site_cases), cfg)
    assignment = assign_sites([c.split for c in site_cases], strata, data.num_sites, part)
    profiles = (
        scanner_profiles(data.num_sites, part.shift_strength, part.seed)
        if part.name == PartitionName.shift
        else [ScannerProfile()] * data.num_sites
    )
    log.info(
        "splitting %s (%d cases) into %d sites (%s partition) in %s",
        pool.name,
        len(pool.cases),
        data.num_sites,
        part.name.value,
        out,
    )
    if out.exists():
        shutil.rmtree(out)
    for k, folder in enumerate(folders):
        cases = [c for c, s in zip(site_cases, assignment, strict=True) if s == k]
        _write_site(folder, pool, cases, profiles[k], seed=part.seed * 1000 + k)
    if public is not None:
        log.info("public share: %d cases held out of every site, in %s", len(public_cases), public)
        unsplit = [Case(c.case_id, c.image, c.label, None) for c in public_cases]
        _write_site(public, pool, unsplit, ScannerProfile(), seed=0)
    record = {
        "args": args,
        "assignment": assignment,
        "public": [c.case_id for c in public_cases],
    }
    marker.write_text(json.dumps(record, indent=1))
    return folders, public


def _write_site(
    folder: Path, pool: DatasetPool, cases: list[Case], profile: ScannerProfile, seed: int
) -> None:
    """Write one simulated site folder: images (links or scanner-shifted NIfTI), labels, splits."""
    images = folder / "images"
    images.mkdir(parents=True)
    shifted = profile != ScannerProfile()
    loader = LoadImage(reader=list(IMAGE_READERS), image_only=True, dtype=np.float32)
    first_channel = EnsureChannelFirst()
    for index, case in enumerate(cases):
        source = Path(case.image).absolute()
        if shifted:
            image = first_channel(loader(str(source)))
            out = apply_scanner(image, profile, seed=seed * 100_000 + index)[0].numpy()
            save_nifti(out, np.asarray(image.affine), images / f"{case.case_id}.nii.gz")
        else:
            suffix = source.name[len(case_id_of(source)) :]
            (images / f"{case.case_id}{suffix}").symlink_to(source)
    if pool.task == "segmentation":
        (folder / "labels").mkdir()
        for case in cases:
            (folder / "labels" / f"{case.case_id}.nii.gz").symlink_to(
                Path(str(case.label)).absolute()
            )
        with (folder / "split.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(("case_id", "split"))
            writer.writerows((c.case_id, c.split) for c in cases if c.split)
    else:
        with (folder / "labels.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(("case_id", "label", "split"))
            writer.writerows((c.case_id, c.label, c.split or "") for c in cases)
    info = {
        "dataset": pool.name,
        "source": str(pool.root),
        "site": folder.name,
        "cases": len(cases),
        "class_names": pool.class_names,
        "scanner": profile.as_dict(),
    }
    (folder / "site.json").write_text(json.dumps(info, indent=1))
