"""Public datasets split into simulated site folders: every partitioner is reproducible from its
seed, covers the pool exactly once, keeps official splits, honours sizes, skews label mixes as
asked; ``shift`` gives each site its own scanner; folders are reused; the partition summary
shows the label distribution. Small seeded subsets (``data.max_cases``) of the real data in
../shared/data; skipped, with the reason, where it is absent."""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fl_imaging.config import RunConfig
from fl_imaging.config.compose import check_overrides
from fl_imaging.data.datasets import load_medmnist
from fl_imaging.data.inspect import SiteReport, inspect_site
from fl_imaging.data.partition import PartitionError, assign_sites, size_strata
from fl_imaging.data.prepare import partition_summary, prepare_sites, write_partition_summary
from fl_imaging.data.shift import ScannerProfile, scanner_profiles
from fl_imaging.data.simulated import MARKER, load_pool, simulated_sites
from fl_imaging.data.sites import Case, SiteData, find_cases, load_site

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("FL_IMAGING_SHARED_DATA", REPO / ".." / "shared" / "data"))
ROOTS = {
    "hippocampus": SHARED / "msd_task04_hippocampus",
    "mednist": SHARED / "mednist_rsna_64x64",
    "adrenal3d": SHARED / "medmnist_adrenalmnist3d",
}


@pytest.fixture(scope="module")
def medmnist_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """AdrenalMNIST3D exported to NIfTI once for the module (``load_medmnist`` reuses it)."""
    export = tmp_path_factory.mktemp("export")
    if ROOTS["adrenal3d"].is_dir():
        load_medmnist(ROOTS["adrenal3d"], "adrenalmnist3d", 28, export)
    return export / "adrenalmnist3d_28"


@pytest.fixture(autouse=True)
def _reuse_medmnist_export(tmp_path: Path, medmnist_export: Path) -> None:
    """Each test's ``data.sites_dir`` (its tmp_path) links to the module's export."""
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / medmnist_export.name).symlink_to(medmnist_export)


def _cfg(sites_dir: Path, preset: str, *overrides: str) -> RunConfig:
    """The ``experiment=<preset>`` config on the shared copy, writing under ``sites_dir``."""
    root = ROOTS[preset]
    if not root.is_dir():
        pytest.skip(f"public test data not found at {root} (set FL_IMAGING_SHARED_DATA)")
    return check_overrides(
        [f"experiment={preset}", f"data.root={root}", f"data.sites_dir={sites_dir}", *overrides]
    )


def _site_cases(folders: list[Path], cfg: RunConfig) -> list[list[Case]]:
    """The cases each written site folder holds, read back as a site folder."""
    return [find_cases(folder, cfg.task.name.value) for folder in folders]


def _ids(sites: list[list[Case]]) -> list[list[str]]:
    return [[c.case_id for c in cases] for cases in sites]


def _class_counts(sites: list[list[Case]], num_classes: int) -> np.ndarray:
    return np.array([np.bincount([int(c.label) for c in s], minlength=num_classes) for s in sites])


def _tv_from_pooled(counts: np.ndarray) -> np.ndarray:
    """Total-variation distance of each site's class mix from the pooled mix (0 = same mix,
    1 = disjoint)."""
    per_site = counts / counts.sum(axis=1, keepdims=True)
    pooled = counts.sum(axis=0) / counts.sum()
    return 0.5 * np.abs(per_site - pooled).sum(axis=1)


# Each partitioner on a dataset it is meant for; max_cases keeps them fast.
PARTITIONS = {
    "iid": ("hippocampus", ["data.max_cases=40"]),
    "sizes": (
        "mednist",
        ["data.max_cases=60", "data.num_sites=3", "data.partition.name=sizes"]
        + ["data.partition.sizes=[1,2,3]"],
    ),
    "dirichlet-label": (
        "adrenal3d",
        ["data.max_cases=120", "data.num_sites=3", "data.partition.alpha=0.5"],
    ),
    "dirichlet-size": (
        "hippocampus",
        ["data.max_cases=60", "data.partition.name=dirichlet", "data.partition.by=size"],
    ),
    "shift": ("hippocampus", ["data.max_cases=9", "data.partition.name=shift"]),
}


@pytest.mark.parametrize("name", sorted(PARTITIONS))
def test_partition_is_seeded_and_covers_every_case_once(name: str, tmp_path: Path) -> None:
    preset, overrides = PARTITIONS[name]
    cfg = _cfg(tmp_path, preset, *overrides)
    pool = load_pool(cfg)
    folders = simulated_sites(cfg)
    sites = _site_cases(folders, cfg)
    assert [f.name for f in folders] == [f"site-{k + 1}" for k in range(cfg.data.num_sites)]
    # every case of the pool exactly once, with its label, over the written folders
    written = [c.case_id for cases in sites for c in cases]
    assert len(written) == len(set(written)) == len(pool.cases) == cfg.data.max_cases
    assert set(written) == {c.case_id for c in pool.cases}
    by_id = {c.case_id: c for c in pool.cases}
    for case in (c for cases in sites for c in cases):
        source = by_id[case.case_id]
        if pool.task == "classification":
            assert case.label == source.label
        else:
            assert Path(case.label).resolve() == Path(source.label).resolve()
    assert all(len(cases) >= cfg.data.partition.min_cases for cases in sites)
    # the marker's assignment is what the folders hold
    marker = json.loads((folders[0].parent / MARKER).read_text())
    site_of = {cid: k for k, ids in enumerate(_ids(sites)) for cid in ids}
    assert marker["assignment"] == [site_of[c.case_id] for c in pool.cases]

    # the same config in a fresh folder gives the same sites ...
    shutil.rmtree(folders[0].parent)
    assert _ids(_site_cases(simulated_sites(cfg), cfg)) == _ids(sites)
    # ... and another partition seed, on the same pool, another assignment
    strata = _strata(pool.cases, cfg) if name.startswith("dirichlet") else None
    splits = [c.split for c in pool.cases]
    part = cfg.data.partition
    again = assign_sites(splits, strata, cfg.data.num_sites, part)
    assert again == marker["assignment"]
    other = assign_sites(splits, strata, cfg.data.num_sites, replace(part, seed=part.seed + 1))
    assert other != again and sorted(set(other)) == list(range(cfg.data.num_sites))


def _strata(cases: list[Case], cfg: RunConfig) -> list[int]:
    """Each case's Dirichlet stratum, recomputed here: its class label, or the quantile bin of
    its foreground volume counted in its label file."""
    if cfg.data.partition.by.value == "label":
        return [int(c.label) for c in cases]
    volumes = [int((np.asarray(nib.load(str(c.label)).dataobj) > 0).sum()) for c in cases]
    return size_strata(volumes, cfg.data.partition.size_bins)


def test_size_strata_are_quantile_bins() -> None:
    volumes = [float(v) for v in np.random.default_rng(0).permutation(60) * 10 + 5]
    strata = size_strata(volumes, 4)
    assert np.bincount(strata).tolist() == [15, 15, 15, 15]
    order = np.argsort(volumes)
    assert [strata[i] for i in order] == sorted(strata)  # bigger volume, higher bin


def test_official_medmnist_splits_are_kept_at_every_site(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "adrenal3d", "data.max_cases=120", "data.num_sites=3")
    pool = load_pool(cfg)
    official = {c.case_id: c.split for c in pool.cases}
    assert Counter(official.values()) == {"train": 94, "val": 6, "test": 20}  # seeded subset
    for k, folder in enumerate(simulated_sites(cfg)):
        cases = find_cases(folder, "classification")
        assert {c.case_id: c.split for c in cases} == {
            c.case_id: official[c.case_id] for c in cases
        }
        assert all(c.case_id.startswith(f"{c.split}-") for c in cases)  # MedMNIST's own split
        site = load_site(folder, "classification", val_fraction=0.25, seed=k)
        assert [c.case_id for c in site.test] == [c.case_id for c in cases if c.split == "test"]
        assert [c.case_id for c in site.val] == [c.case_id for c in cases if c.split == "val"]
        assert site.test and site.train
    # the written labels.csv carries the split column
    with (folder / "labels.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["split"] for row in rows} <= {"train", "val", "test"} and rows


def test_sizes_are_honoured_within_every_split(tmp_path: Path) -> None:
    preset, overrides = PARTITIONS["sizes"]
    cfg = _cfg(tmp_path, preset, *overrides)
    sites = _site_cases(simulated_sites(cfg), cfg)
    # 60 cases, data.test_fraction=0.2: 48 without a split and 12 test, each cut 1:2:3
    assert [len(s) for s in sites] == [10, 20, 30]
    assert [sum(c.split == "test" for c in s) for s in sites] == [2, 4, 6]
    shares = _cfg(tmp_path, preset, *overrides[:-1], "data.partition.sizes=[50,25,25]")
    assert [len(s) for s in _site_cases(simulated_sites(shares), shares)] == [30, 15, 15]


def test_small_alpha_skews_the_label_mix_and_iid_keeps_it(tmp_path: Path) -> None:
    common = ["data.max_cases=120", "data.num_sites=3"]
    tv = {}
    for label, setting in (
        ("iid", "data.partition.name=iid"),
        ("alpha=0.1", "data.partition.alpha=0.1"),
        ("alpha=100", "data.partition.alpha=100"),
    ):
        cfg = _cfg(tmp_path, "mednist", *common, setting)
        counts = _class_counts(_site_cases(simulated_sites(cfg), cfg), 6)
        assert counts.sum() == 120
        tv[label] = _tv_from_pooled(counts)
    assert tv["iid"].max() < 0.2, tv
    assert tv["alpha=100"].max() < 0.2, tv
    assert tv["alpha=0.1"].mean() > 0.4, tv
    assert tv["alpha=0.1"].min() > tv["iid"].max(), tv


def test_small_alpha_skews_foreground_sizes_for_segmentation(tmp_path: Path) -> None:
    common = ["data.max_cases=60", "data.partition.by=size", "data.partition.size_bins=3"]
    tv = {}
    for label, setting in (
        ("iid", "data.partition.name=iid"),
        ("alpha=0.1", "data.partition.name=dirichlet data.partition.alpha=0.1"),
    ):
        cfg = _cfg(tmp_path, "hippocampus", *common, *setting.split())
        pool = load_pool(cfg)
        strata = dict(zip([c.case_id for c in pool.cases], _strata(pool.cases, cfg), strict=True))
        sites = _site_cases(simulated_sites(cfg), cfg)
        counts = np.array([np.bincount([strata[c.case_id] for c in s], minlength=3) for s in sites])
        tv[label] = _tv_from_pooled(counts)
    assert tv["iid"].max() < 0.25, tv
    assert tv["alpha=0.1"].mean() > 0.35, tv


def test_tiny_alpha_that_cannot_meet_min_cases_fails_with_what_to_change(tmp_path: Path) -> None:
    args = ["data.max_cases=40", "data.partition.name=dirichlet", "data.partition.by=size"]
    args += ["data.partition.size_bins=2", "data.partition.min_cases=12"]
    with pytest.raises(PartitionError) as err:
        simulated_sites(_cfg(tmp_path, "hippocampus", *args, "data.partition.alpha=0.001"))
    assert str(err.value) == (
        "Dirichlet(alpha=0.001) could not give each of 3 sites at least 12 cases in 200 draws: "
        "raise data.partition.alpha, lower data.num_sites or data.partition.min_cases"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no site folder written
    # the same min_cases with a large alpha can be met
    folders = simulated_sites(_cfg(tmp_path, "hippocampus", *args, "data.partition.alpha=100"))
    assert all(len(find_cases(f, "segmentation")) >= 12 for f in folders)


def test_sizes_that_cannot_meet_min_cases_fail_with_the_site(tmp_path: Path) -> None:
    args = ["data.max_cases=40", "data.partition.name=sizes", "data.partition.sizes=[1,1,18]"]
    with pytest.raises(PartitionError, match="site 1 would get 2 .*min_cases=3"):
        simulated_sites(_cfg(tmp_path, "hippocampus", *args, "data.partition.min_cases=3"))


# ------------------------------------------------------------------------------------------
# Acquisition shift
# ------------------------------------------------------------------------------------------


def test_shift_writes_shifted_nifti_on_the_same_grid(tmp_path: Path) -> None:
    preset, overrides = PARTITIONS["shift"]
    cfg = _cfg(tmp_path, preset, *overrides)
    pool = {c.case_id: c for c in load_pool(cfg).cases}
    folders = simulated_sites(cfg)
    profiles = scanner_profiles(3, 1.0, cfg.data.partition.seed)
    assert len(set(profiles)) == 3 and ScannerProfile() not in profiles
    for folder, profile in zip(folders, profiles, strict=True):
        info = json.loads((folder / "site.json").read_text())
        assert info["scanner"] == profile.as_dict()
        for case in find_cases(folder, "segmentation"):
            image, source = Path(case.image), Path(pool[case.case_id].image)
            assert not image.is_symlink() and image.name.endswith(".nii.gz")
            shifted, original = nib.load(image), nib.load(source)
            assert shifted.shape == original.shape
            np.testing.assert_allclose(shifted.affine, original.affine, atol=1e-5)
            a, b = np.asarray(shifted.dataobj, float), np.asarray(original.dataobj, float)
            assert np.abs(a - b).mean() > 0.01 * np.abs(b).mean(), case.case_id
            assert Path(case.label).resolve() == Path(pool[case.case_id].label).resolve()
        report = inspect_site(folder, "segmentation", num_classes=3)
        assert report.ok, report.all_problems
        assert len(report.cases) == 3


def _write_msd(root: Path, affine: np.ndarray, n: int = 6) -> Path:
    """A tiny MSD task folder whose volumes have a non-RAS, anisotropic, shifted affine."""
    rng = np.random.default_rng(0)
    training = []
    for i in range(n):
        image = rng.normal(100.0, 20.0, (10, 12, 8)).astype(np.float32)
        label = np.zeros((10, 12, 8), np.uint8)
        label[2 : 5 + i % 3, 3:8, 2:6] = 1
        for sub, array in (("imagesTr", image), ("labelsTr", label)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, affine), root / sub / f"case_{i}.nii.gz")
        training.append(
            {"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"}
        )
    meta = {"name": "Tiny", "labels": {"0": "background", "1": "thing"}, "modality": {"0": "MR"}}
    (root / "dataset.json").write_text(json.dumps({**meta, "training": training}))
    return root


def test_shift_keeps_a_non_ras_affine_and_strength_0_changes_nothing(tmp_path: Path) -> None:
    affine = np.array(
        [[0.0, -2.0, 0.0, 30.0], [0.0, 0.0, 3.0, -12.0], [-1.5, 0.0, 0.0, 7.5], [0, 0, 0, 1]]
    )
    root = _write_msd(tmp_path / "Task99_Tiny", affine)
    base = [
        "data.name=msd",
        f"data.root={root}",
        f"data.sites_dir={tmp_path / 'sites'}",
        "task.num_classes=2",
        "data.num_sites=2",
        "data.partition.name=shift",
        "data.partition.min_cases=1",
    ]
    folders = simulated_sites(check_overrides(base))
    for folder in folders:
        assert inspect_site(folder, "segmentation").ok
        for image in (folder / "images").iterdir():
            shifted, original = nib.load(image), nib.load(root / "imagesTr" / image.name)
            assert nib.aff2axcodes(shifted.affine) == ("I", "L", "A")
            np.testing.assert_allclose(shifted.affine, affine, atol=1e-5)
            assert not np.allclose(np.asarray(shifted.dataobj), np.asarray(original.dataobj))

    still = simulated_sites(check_overrides([*base, "data.partition.shift_strength=0"]))
    iid = simulated_sites(check_overrides([*base[:-2], "data.partition.min_cases=1"]))
    assert still[0].parent != folders[0].parent
    for folder in still:
        info = json.loads((folder / "site.json").read_text())
        assert info["scanner"] == ScannerProfile().as_dict()
        for image in (folder / "images").iterdir():
            original = root / "imagesTr" / image.name
            assert image.resolve() == original.resolve()
            np.testing.assert_array_equal(
                np.asarray(nib.load(image).dataobj), np.asarray(nib.load(original).dataobj)
            )
    # with the same seed, shift deals the cases to the sites as iid does
    assert _ids(_site_cases(still, check_overrides(base))) == _ids(
        _site_cases(iid, check_overrides(base))
    )


# ------------------------------------------------------------------------------------------
# Reuse, and the partition summary
# ------------------------------------------------------------------------------------------


def test_the_same_config_reuses_the_folder_and_a_changed_one_writes_a_new(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg(tmp_path, "mednist", "data.max_cases=30", "data.num_sites=3")
    folders = simulated_sites(cfg)
    out = folders[0].parent
    stamps = {p: p.lstat().st_mtime_ns for p in out.rglob("*")}
    caplog.set_level("INFO", logger="fl_imaging.data")
    assert simulated_sites(cfg) == folders
    assert {p: p.lstat().st_mtime_ns for p in out.rglob("*")} == stamps
    assert any("reused from" in r.message for r in caplog.records)

    changed = _cfg(
        tmp_path, "mednist", "data.max_cases=30", "data.num_sites=3", "data.partition.alpha=0.9"
    )
    other = simulated_sites(changed)
    assert other[0].parent != out and out.is_dir()
    assert other[0].parent.name.startswith("mednist_rsna_64x64-dirichlet-3sites-")
    assert {p: p.lstat().st_mtime_ns for p in out.rglob("*")} == stamps


def test_partition_summary_counts_classes_per_site(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path, "mednist", "data.max_cases=60", "data.num_sites=3", "data.partition.alpha=0.1"
    )
    resolved, sites, reports = prepare_sites(cfg)
    rows = partition_summary(sites, reports)
    counts = _class_counts(_site_cases([Path(p) for p in resolved.data.sites], cfg), 6)
    assert (counts == 0).any()  # a site without some class: the CSV must say 0
    for row, site, expected in zip(rows, sites, counts, strict=True):
        assert row["site"] == site.name
        assert row["train"] + row["val"] + row["test"] == expected.sum()
        assert [row[f"class_{k}"] for k in range(6)] == expected.tolist()
        assert not any(k.startswith(("voxels_%", "scanner_")) for k in row)
    text = write_partition_summary(rows, tmp_path / "run" / "partition.csv")
    header = text.splitlines()[0].split()
    assert header == ["site", "train", "val", "test"] + [f"class_{k}" for k in range(6)]
    with (tmp_path / "run" / "partition.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [[int(r[f"class_{k}"]) for k in range(6)] for r in table] == counts.tolist()


def test_partition_summary_gives_voxel_percentages_and_scanners(tmp_path: Path) -> None:
    preset, overrides = PARTITIONS["shift"]
    cfg = _cfg(tmp_path, preset, *overrides)
    _, sites, reports = prepare_sites(cfg)
    rows = partition_summary(sites, reports)
    profiles = scanner_profiles(3, 1.0, cfg.data.partition.seed)
    for row, site, profile in zip(rows, sites, profiles, strict=True):
        voxels = np.zeros(3)
        for case in site.train + site.val + site.test:
            label = np.asarray(nib.load(str(case.label)).dataobj)
            voxels += [(label == k).sum() for k in range(3)]
        expected = [round(100.0 * v / voxels.sum(), 3) for v in voxels]
        assert [row[f"voxels_%_{k}"] for k in range(3)] == expected
        assert abs(sum(expected) - 100.0) < 0.01 and expected[0] > 90.0
        assert {k: row[f"scanner_{k}"] for k in profile.as_dict()} == profile.as_dict()
        assert (row["train"], row["val"], row["test"]) == (2, 1, 0)  # 3 cases, val 0.2
        assert not any(k.startswith("class_") for k in row)
    text = write_partition_summary(rows, tmp_path / "partition.csv")
    assert text.splitlines()[0].split()[:7] == [
        "site",
        "train",
        "val",
        "test",
        "voxels_%_0",
        "voxels_%_1",
        "voxels_%_2",
    ]


def test_a_site_without_an_official_val_case_is_refused_when_partitioning(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path, "adrenal3d", "data.max_cases=40", "data.num_sites=5", "data.partition.name=iid"
    )
    n_val = sum(c.split == "val" for c in load_pool(cfg).cases)
    assert 0 < n_val < 5
    with pytest.raises(PartitionError) as err:
        simulated_sites(cfg)
    assert str(err.value) == (
        f"site {n_val + 1} would get no case of the dataset's official val split ({n_val} in "
        "all), and each site needs one: use fewer sites (data.num_sites) or more cases "
        "(data.max_cases)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no site folder written


def test_summary_columns_keep_class_order_when_a_site_lacks_a_class(tmp_path: Path) -> None:
    def site(name: str, labels: list[int]) -> SiteData:
        cases = [Case(f"{name}-{i}", f"{name}-{i}.png", label) for i, label in enumerate(labels)]
        return SiteData(name, tmp_path / name, train=cases[:-1], val=cases[-1:])

    sites = [site("a", [0, 2, 2, 3]), site("b", [0, 1, 1, 3])]
    reports = [SiteReport(s.name, str(s.root), "classification") for s in sites]
    rows = partition_summary(sites, reports)
    assert [row["class_1"] for row in rows] == [0, 2]
    assert [row["class_2"] for row in rows] == [2, 0]
    text = write_partition_summary(rows, tmp_path / "partition.csv")
    assert text.splitlines() == [
        "site  train  val  test  class_0  class_1  class_2  class_3",
        "   a      3    1     0        1        0        2        1",
        "   b      3    1     0        1        2        0        1",
    ]
