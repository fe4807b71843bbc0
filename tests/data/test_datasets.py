"""Public dataset adapters (MSD, class folders, MedMNIST) on the real copies in ../shared/data,
their messages for broken inputs and for a task config that does not fit, and their agreement
with the download scripts' layout checks. Skipped, with the reason, where ../shared/data is
absent (``FL_IMAGING_SHARED_DATA`` points elsewhere)."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import LoadImage

from fl_imaging.config.compose import check_overrides
from fl_imaging.data.datasets import DatasetPool, load_class_folders, load_medmnist, load_msd
from fl_imaging.data.datasets.class_folders_download import (
    class_folder_layout_problems,
    class_folder_summary,
)
from fl_imaging.data.datasets.medmnist_download import (
    medmnist_filename,
    medmnist_layout_problems,
    medmnist_summary,
)
from fl_imaging.data.datasets.msd_download import msd_layout_problems, msd_summary
from fl_imaging.data.readers import IMAGE_READERS
from fl_imaging.data.simulated import load_pool
from fl_imaging.data.sites import SiteDataError

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("FL_IMAGING_SHARED_DATA", REPO / ".." / "shared" / "data"))
MSD = SHARED / "msd_task04_hippocampus"
MEDNIST = SHARED / "mednist_rsna_64x64"
MEDMNIST = SHARED / "medmnist_adrenalmnist3d"
MEDNIST_CLASSES = ["CTAbd", "CTChest", "CTHead", "CXR", "MRBrain", "MRBreast"]


def _shared(folder: Path) -> Path:
    if not folder.is_dir():
        pytest.skip(f"public test data not found at {folder} (set FL_IMAGING_SHARED_DATA)")
    return folder


@pytest.fixture(scope="module")
def adrenal28(tmp_path_factory: pytest.TempPathFactory) -> DatasetPool:
    """AdrenalMNIST3D 28 px, exported once for this module into ``<sites_dir>/export`` (where
    :func:`load_pool` puts it) of a temporary ``data.sites_dir``."""
    return load_medmnist(
        _shared(MEDMNIST), "adrenalmnist3d", 28, tmp_path_factory.mktemp("sites") / "export"
    )


# ------------------------------------------------------------------------------------------
# Each adapter on the real data
# ------------------------------------------------------------------------------------------


def test_msd_hippocampus_has_260_labelled_cases_and_3_named_classes() -> None:
    pool = load_msd(_shared(MSD))
    meta = json.loads((MSD / "dataset.json").read_text())
    assert (pool.task, pool.spatial_dims, pool.num_classes) == ("segmentation", 3, 3)
    assert pool.class_names == [meta["labels"][k] for k in ("0", "1", "2")]
    assert pool.class_names == ["background", "Anterior", "Posterior"]
    assert len(pool.cases) == 260 and pool.split_counts() == {"none": 260}
    ids = [c.case_id for c in pool.cases]
    assert ids == sorted(ids) and len(set(ids)) == 260
    first = pool.cases[0]
    assert first.case_id == "hippocampus_001"
    assert first.image == str((MSD / "imagesTr" / "hippocampus_001.nii.gz").resolve())
    assert first.label == str((MSD / "labelsTr" / "hippocampus_001.nii.gz").resolve())


def test_mednist_class_folders_have_3000_2d_cases_in_6_classes() -> None:
    pool = load_class_folders(_shared(MEDNIST))
    assert (pool.task, pool.spatial_dims, pool.num_classes) == ("classification", 2, 6)
    assert pool.class_names == MEDNIST_CLASSES
    assert len(pool.cases) == 3000
    assert Counter(c.label for c in pool.cases) == {k: 500 for k in range(6)}
    assert len({c.case_id for c in pool.cases}) == 3000  # file names repeat across classes
    case = next(c for c in pool.cases if c.label == 3)
    assert case.case_id.startswith("CXR-") and Path(case.image).parent.name == "CXR"


def test_class_names_reorder_the_class_indices() -> None:
    order = ["MRBreast", "CXR", "CTAbd", "CTChest", "CTHead", "MRBrain"]
    pool = load_class_folders(_shared(MEDNIST), order)
    assert pool.class_names == order
    labels = {Path(c.image).parent.name: c.label for c in pool.cases}
    assert labels == {name: k for k, name in enumerate(order)}


def test_medmnist_28px_keeps_the_official_split_as_each_cases_split(
    adrenal28: DatasetPool,
) -> None:
    pool = adrenal28
    assert (pool.task, pool.spatial_dims, pool.num_classes) == ("classification", 3, 2)
    assert pool.split_counts() == {"train": 1188, "val": 98, "test": 298}
    with np.load(MEDMNIST / "adrenalmnist3d.npz") as npz:
        labels = {s: npz[f"{s}_labels"].reshape(-1) for s in ("train", "val", "test")}
    for split in ("train", "val", "test"):
        mine = [c for c in pool.cases if c.split == split]
        assert [c.case_id for c in mine] == [f"{split}-{i:05d}" for i in range(len(mine))]
        assert [c.label for c in mine] == labels[split].tolist()
    assert Counter(c.label for c in pool.cases) == Counter(
        np.concatenate(list(labels.values())).tolist()
    )


def test_medmnist_exported_nifti_reads_back_equal_to_the_npz(adrenal28: DatasetPool) -> None:
    by_id = {c.case_id: c for c in adrenal28.cases}
    loader = LoadImage(reader=list(IMAGE_READERS), image_only=True)
    with np.load(MEDMNIST / "adrenalmnist3d.npz") as npz:
        for split, index in (("train", 0), ("train", 1187), ("val", 5), ("test", 297)):
            expected = npz[f"{split}_images"][index]
            case = by_id[f"{split}-{index:05d}"]
            assert case.label == int(npz[f"{split}_labels"][index, 0])
            stored = nib.load(case.image)
            assert stored.shape == expected.shape == (28, 28, 28)
            assert stored.get_data_dtype() == np.uint8
            np.testing.assert_array_equal(np.asarray(stored.dataobj), expected)
            read = loader(case.image)  # what training decodes
            assert tuple(read.shape) == (28, 28, 28)
            np.testing.assert_array_equal(np.asarray(read), expected)
            assert expected.max() > 0  # not an empty mask: the comparison means something


def test_medmnist_export_is_reused_by_a_second_call(
    adrenal28: DatasetPool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    first = Path(adrenal28.cases[0].image)
    before = first.stat().st_mtime_ns
    again = load_medmnist(MEDMNIST, "adrenalmnist3d", 28, first.parents[1])
    assert [c.case_id for c in again.cases] == [c.case_id for c in adrenal28.cases]
    assert first.stat().st_mtime_ns == before


def test_medmnist_64px_counts(tmp_path: Path) -> None:
    pool = load_medmnist(_shared(MEDMNIST), "adrenalmnist3d", 64, tmp_path)
    assert pool.name == "medmnist:adrenalmnist3d_64"
    assert pool.split_counts() == {"train": 1188, "val": 98, "test": 298}
    assert (pool.spatial_dims, pool.num_classes) == (3, 2)
    assert nib.load(pool.cases[0].image).shape == (64, 64, 64)


# ------------------------------------------------------------------------------------------
# Broken inputs: a SiteDataError naming the file
# ------------------------------------------------------------------------------------------


def _msd_copy(where: Path, training: list[dict[str, str]] | None = None) -> Path:
    """An MSD task folder of links to the shared one, with our own dataset.json (or none)."""
    root = where / "Task04_Hippocampus"
    root.mkdir()
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).symlink_to(_shared(MSD) / sub)
    if training is not None:
        meta = {"name": "Hippocampus", "labels": {"0": "background", "1": "A", "2": "P"}}
        (root / "dataset.json").write_text(json.dumps({**meta, "training": training}))
    return root


def test_msd_without_dataset_json(tmp_path: Path) -> None:
    root = _msd_copy(tmp_path)
    with pytest.raises(SiteDataError) as err:
        load_msd(root)
    assert str(err.value).startswith(f"{root / 'dataset.json'} not found")
    assert "scripts/download_msd.py" in str(err.value)


def test_msd_dataset_json_listing_a_missing_image(tmp_path: Path) -> None:
    nii = "./{}Tr/hippocampus_{:03d}.nii.gz".format
    good = {"image": nii("images", 1), "label": nii("labels", 1)}
    bad = {"image": nii("images", 999), "label": nii("labels", 3)}
    root = _msd_copy(tmp_path, [good, bad])
    with pytest.raises(SiteDataError) as err:
        load_msd(root)
    message = str(err.value)
    assert "1 problem(s)" in message
    assert f"{root / './imagesTr/hippocampus_999.nii.gz'}: listed in {root / 'dataset.json'}" in (
        message
    )
    assert "hippocampus_001" not in message and "hippocampus_003" not in message
    # the same folder with the entry fixed reads both cases
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][1]["image"] = "./imagesTr/hippocampus_003.nii.gz"
    (root / "dataset.json").write_text(json.dumps(meta))
    assert [c.case_id for c in load_msd(root).cases] == ["hippocampus_001", "hippocampus_003"]


def test_msd_malformed_dataset_json(tmp_path: Path) -> None:
    root = _msd_copy(tmp_path)
    (root / "dataset.json").write_text('{"training": []}')
    with pytest.raises(SiteDataError, match=re.escape(f"{root / 'dataset.json'}: not a valid")):
        load_msd(root)


def _class_copy(root: Path, classes: dict[str, int]) -> Path:
    """Class folders of links to the first ``n`` shared images of each named class."""
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for image in sorted((_shared(MEDNIST) / name).iterdir())[:n]:
            (root / name / image.name).symlink_to(image)
    return root


def test_class_folders_with_a_single_class(tmp_path: Path) -> None:
    root = _class_copy(tmp_path / "single", {"CXR": 3})
    with pytest.raises(SiteDataError) as err:
        load_class_folders(root)
    assert f"{root}: 1 class folder(s); classification needs at least 2" in str(err.value)


def test_class_folders_with_an_empty_class(tmp_path: Path) -> None:
    root = _class_copy(tmp_path / "mednist", {"CXR": 3, "CTHead": 2})
    (root / "MRBrain").mkdir()
    with pytest.raises(SiteDataError) as err:
        load_class_folders(root)
    (problem,) = str(err.value).splitlines()[1:]
    assert problem == f"  - {root / 'MRBrain'}: empty class folder"
    (root / "MRBrain").rmdir()
    pool = load_class_folders(root)
    assert [(c.case_id.split("-")[0], c.label) for c in pool.cases] == [("CTHead", 0)] * 2 + [
        ("CXR", 1)
    ] * 3


def test_class_folders_missing_a_configured_class_and_a_stray_file(tmp_path: Path) -> None:
    root = _class_copy(tmp_path / "mednist", {"CXR": 2, "CTHead": 2})
    (root / "CXR" / "notes.txt").write_text("x")
    with pytest.raises(SiteDataError) as err:
        load_class_folders(root, ["CXR", "CTHead", "MRBrain"])
    message = str(err.value)
    assert f"{root / 'MRBrain'}: class folder missing (task.class_names)" in message
    assert f"{root / 'CXR' / 'notes.txt'}: not an image file" in message


def test_medmnist_npz_missing_a_key(tmp_path: Path) -> None:
    arrays = {
        f"{s}_{k}": np.zeros((2, 28, 28, 28) if k == "images" else (2, 1), np.uint8)
        for s in ("train", "val", "test")
        for k in ("images", "labels")
    }
    del arrays["val_labels"]
    np.savez(tmp_path / "adrenalmnist3d.npz", **arrays)
    with pytest.raises(SiteDataError) as err:
        load_medmnist(tmp_path, "adrenalmnist3d", 28, tmp_path / "export")
    assert str(err.value) == (
        f"{tmp_path / 'adrenalmnist3d.npz'}: missing array(s) val_labels; re-download it"
    )
    assert not (tmp_path / "export").exists()
    with pytest.raises(SiteDataError, match=re.escape(f"{tmp_path / 'adrenalmnist3d_64.npz'}")):
        load_medmnist(tmp_path, "adrenalmnist3d", 64, tmp_path / "export")


# ------------------------------------------------------------------------------------------
# A dataset that does not fit the task config
# ------------------------------------------------------------------------------------------


def _pool_of(tmp_path: Path, overrides: list[str]) -> DatasetPool:
    return load_pool(check_overrides([*overrides, f"data.sites_dir={tmp_path / 'sites'}"]))


def test_hippocampus_with_two_classes_says_to_set_num_classes_3(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError) as err:
        _pool_of(
            tmp_path,
            ["experiment=hippocampus", f"data.root={_shared(MSD)}", "task.num_classes=2"],
        )
    message = str(err.value)
    assert "msd:Hippocampus" in message and "3D segmentation data with 3 classes" in message
    assert "run with task.num_classes=3 (or an experiment preset" in message
    assert "task.spatial_dims" not in message and "task=" not in message


def test_mednist_with_3d_task_says_to_set_spatial_dims_2(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError) as err:
        _pool_of(
            tmp_path,
            [
                "experiment=mednist",
                f"data.root={_shared(MEDNIST)}",
                "task.spatial_dims=3",
                "task.roi_size=[64,64,64]",
            ],
        )
    message = str(err.value)
    assert "2D classification data with 6 classes (CTAbd, CTChest" in message
    assert "run with task.spatial_dims=2 task.roi_size=[64,64] (or" in message
    assert "task.num_classes" not in message


def test_mednist_on_a_segmentation_task_names_every_value(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError) as err:
        _pool_of(tmp_path, ["data=mednist", f"data.root={_shared(MEDNIST)}"])
    assert (
        "run with task=classification task.spatial_dims=2 task.roi_size=[64,64] task.num_classes=6"
    ) in str(err.value)


def test_the_presets_fit_their_datasets(adrenal28: DatasetPool) -> None:
    sites_dir = Path(adrenal28.cases[0].image).parents[2]  # reuse the module's export
    got = {}
    for name, root in (("hippocampus", MSD), ("mednist", MEDNIST), ("adrenal3d", MEDMNIST)):
        overrides = [f"experiment={name}", f"data.root={_shared(root)}"]
        pool = load_pool(check_overrides([*overrides, f"data.sites_dir={sites_dir}"]))
        got[name] = (pool.num_classes, pool.spatial_dims, pool.split_counts())
    assert got == {
        "hippocampus": (3, 3, {"none": 260}),
        "mednist": (6, 2, {"none": 2400, "test": 600}),  # data.test_fraction=0.2
        "adrenal3d": (2, 3, {"train": 1188, "val": 98, "test": 298}),
    }


# ------------------------------------------------------------------------------------------
# The download scripts' layout checks agree with the adapters
# ------------------------------------------------------------------------------------------


def test_what_passes_the_msd_layout_check_is_read_by_the_adapter() -> None:
    assert msd_layout_problems(_shared(MSD)) == []
    pool = load_msd(MSD)
    assert f"{len(pool.cases)} training entries" in msd_summary(MSD)
    images = sorted(p.name for p in (MSD / "imagesTr").glob("*.nii.gz"))
    assert [Path(c.image).name for c in pool.cases] == images


def test_what_passes_the_medmnist_layout_check_is_read_by_the_adapter(
    adrenal28: DatasetPool,
) -> None:
    for size in (28, 64):
        assert medmnist_layout_problems(_shared(MEDMNIST), "adrenalmnist3d", size) == []
    counts = adrenal28.split_counts()
    summary = medmnist_summary(MEDMNIST, "adrenalmnist3d", 28)
    assert f"train {counts['train']}, val {counts['val']}, test {counts['test']}" in summary
    assert medmnist_filename("adrenalmnist3d", 64) == "adrenalmnist3d_64.npz"


def test_what_passes_the_class_folder_layout_check_is_read_by_the_adapter() -> None:
    assert class_folder_layout_problems(_shared(MEDNIST)) == []
    pool = load_class_folders(MEDNIST)
    per_class = Counter(pool.class_names[c.label] for c in pool.cases)
    listed = ", ".join(f"{name} {per_class[name]}" for name in pool.class_names)
    assert class_folder_summary(MEDNIST).endswith(
        f"{len(pool.class_names)} class folder(s), {len(pool.cases)} images ({listed})"
    )


@pytest.mark.parametrize("stray", ["notes.txt", "Thumbs.db", "nested/"])
def test_a_class_folder_the_adapter_refuses_fails_the_layout_check_too(
    tmp_path: Path, stray: str
) -> None:
    root = _class_copy(tmp_path / "mednist", {"CXR": 2, "CTHead": 2})
    if stray.endswith("/"):
        (root / "CXR" / stray).mkdir()
    else:
        (root / "CXR" / stray).write_bytes(b"x")
    with pytest.raises(SiteDataError, match=re.escape(str(root / "CXR" / stray.rstrip("/")))):
        load_class_folders(root)
    problems = class_folder_layout_problems(root)
    assert len(problems) == 1 and stray.rstrip("/") in problems[0], problems


def test_a_folder_the_adapter_skips_is_not_counted_as_a_class_by_the_layout_check(
    tmp_path: Path,
) -> None:
    root = _class_copy(tmp_path / "mednist", {"CXR": 2})
    (root / "_backup").mkdir()
    for image in sorted((MEDNIST / "CTHead").iterdir())[:2]:
        (root / "_backup" / image.name).symlink_to(image)
    with pytest.raises(SiteDataError, match="1 class folder"):
        load_class_folders(root)
    assert class_folder_layout_problems(root) == [
        f"{root} holds 1 class folder(s) (CXR); at least 2 are needed"
    ]
