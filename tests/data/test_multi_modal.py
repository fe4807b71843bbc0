"""Multi-modal cases (``data.modalities``): the ``images/MODALITY/CASE_ID`` layout read and
stacked as channels in the configured order, every refusal by name (a missing modality, an
unknown modality folder, modalities on different grids, a label off their grid, mixed formats,
``task.in_channels`` not their number), ``fl-imaging-data inspect --modalities``, a whole
federated run on multi-modal demo data and ``fl-imaging-predict`` on ``MODALITY/`` folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from local_runs import local_run

from fl_imaging.cli.data import main as inspect_cli
from fl_imaging.cli.predict import main as predict_cli
from fl_imaging.config import ConfigError, TaskName
from fl_imaging.config.compose import check_overrides
from fl_imaging.data.demo import make_demo_data
from fl_imaging.data.dicom_io import write_dicom_series
from fl_imaging.data.inspect import inspect_site
from fl_imaging.data.sites import SiteDataError, find_cases
from fl_imaging.deploy.roles import SiteCheckError, check_site_folder
from tasks import build_task

MODALITIES = ["t1", "t1c", "t2", "flair"]
#: The demo as the run below makes it: 2 NIfTI sites of 6 cases of 16^3 voxels.
DEMO = {"num_sites": 2, "cases_per_site": 6, "shape": (16, 16, 16), "dicom_sites": ()}
RUN = [
    "experiment=quick",
    "data.num_sites=2",
    "data.cases_per_site=6",
    "data.shape=[16,16,16]",
    "data.dicom_sites=[]",
    f"data.modalities=[{','.join(MODALITIES)}]",
    "task.in_channels=4",
    "task.roi_size=[16,16,16]",
    "task.model.channels=[4,8]",
    "task.model.num_res_units=0",
    "engine.rounds=1",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The multi-modal demo's site folders (written once for the module)."""
    root = tmp_path_factory.mktemp("demo-mm")
    return make_demo_data(root, modalities=tuple(MODALITIES), **DEMO)  # type: ignore[arg-type]


@pytest.fixture
def site(demo: list[Path], tmp_path: Path) -> Path:
    """A copy of the first demo site, for a test to break."""
    return Path(shutil.copytree(demo[0], tmp_path / "site-1"))


def _problems(site: Path) -> list[str]:
    report = inspect_site(
        site, TaskName.segmentation, spatial_dims=3, in_channels=4, modalities=MODALITIES
    )
    return report.all_problems


def test_layout_is_read_and_stacked_in_the_configured_order(demo: list[Path]) -> None:
    cases = find_cases(demo[0], TaskName.segmentation, modalities=MODALITIES)
    assert len(cases) == DEMO["cases_per_site"]
    first = cases[0]
    assert [Path(p).parent.name for p in first.image] == MODALITIES
    assert all(Path(p).name == f"{first.case_id}.nii.gz" for p in first.image)
    assert _problems(demo[0]) == []
    cfg = check_overrides(RUN)
    sample = build_task(cfg.task, torch.device("cpu")).load_transforms()(first.as_dict())
    assert tuple(sample["image"].shape) == (4, 16, 16, 16)
    assert tuple(sample["label"].shape) == (1, 16, 16, 16)
    # channel k is modality k, z-scored on its own
    for k, path in enumerate(first.image):
        raw = nib.load(path).get_fdata()
        expected = (raw - raw.mean()) / raw.std()
        np.testing.assert_allclose(sample["image"][k].numpy(), expected, atol=1e-3)
    # the demo's contrasts differ: the structure is brighter in t1, darker in t1c
    label = sample["label"][0].bool()
    inside = [float(sample["image"][k][label].mean()) for k in range(2)]
    outside = [float(sample["image"][k][~label].mean()) for k in range(2)]
    assert inside[0] > outside[0] and inside[1] < outside[1]


def test_a_missing_modality_is_refused_by_name(site: Path) -> None:
    case = "site1-case002"
    (site / "images" / "t2" / f"{case}.nii.gz").unlink()
    with pytest.raises(SiteDataError) as err:
        find_cases(site, TaskName.segmentation, modalities=MODALITIES)
    message = str(err.value)
    assert f"[site site-1] case {case}: modality t2 is missing" in message
    assert str(site / "images" / "t2" / f"{case}.nii.gz") in message
    assert "label without an image" not in message  # named once, as the missing modality
    assert any(f"case {case}: modality t2 is missing" in p for p in _problems(site))


def test_a_missing_modality_folder_and_an_unknown_one_are_refused(site: Path) -> None:
    (site / "images" / "flair").rename(site / "images" / "FLAIR-old")
    problems = _problems(site)
    assert any("FLAIR-old" in p and "not one of the modalities" in p for p in problems)
    assert any(
        "[site site-1]" in p and str(site / "images" / "flair") in p and "is missing" in p
        for p in problems
    )


def _rewrite(path: Path, data: np.ndarray | None = None, shift: float = 0.0) -> None:
    image = nib.load(path)
    affine = image.affine.copy()
    affine[0, 3] += shift
    nib.save(nib.Nifti1Image(image.get_fdata() if data is None else data, affine), path)


def test_modalities_on_different_grids_are_refused(site: Path) -> None:
    shifted, cropped = "site1-case001", "site1-case003"
    _rewrite(site / "images" / "t2" / f"{shifted}.nii.gz", shift=3.0)
    _rewrite(site / "images" / "flair" / f"{cropped}.nii.gz", np.zeros((16, 16, 12), np.float32))
    problems = _problems(site)
    assert any(
        f"case {shifted}: modality t2" in p
        and "not on the grid of modality t1" in p
        and "origins 3 mm apart" in p
        for p in problems
    )
    assert any(
        f"case {cropped}: modality flair" in p and "shape [16, 16, 12] vs [16, 16, 16]" in p
        for p in problems
    )


def test_a_label_off_the_modalities_grid_is_refused(site: Path) -> None:
    case = "site1-case004"
    _rewrite(site / "labels" / f"{case}.nii.gz", shift=5.0)
    problems = _problems(site)
    assert any(
        str(site / "labels" / f"{case}.nii.gz") in p and "differs from its image" in p
        for p in problems
    )


def test_a_case_mixing_nifti_and_dicom_is_refused(site: Path) -> None:
    case = "site1-case000"
    path = site / "images" / "t1c" / f"{case}.nii.gz"
    image = nib.load(path)
    write_dicom_series(
        image.get_fdata().astype(np.float32), image.affine, path.parent / case, patient_id=case
    )
    path.unlink()
    problems = _problems(site)
    assert any(
        f"case {case}: its modalities mix formats" in p and "t1c dicom" in p for p in problems
    )


def test_in_channels_must_be_the_number_of_modalities() -> None:
    with pytest.raises(ConfigError) as err:
        check_overrides([o for o in RUN if o != "task.in_channels=4"])
    assert "data.modalities lists 4 modalities" in str(err.value)
    assert "task.in_channels=1: set task.in_channels=4" in str(err.value)


def test_inspect_command_checks_modalities(demo: list[Path], site: Path, capsys) -> None:
    assert inspect_cli(["inspect", str(demo[0]), "--modalities", ",".join(MODALITIES)]) == 0
    assert "(4 ch)" in capsys.readouterr().out
    (site / "images" / "t1" / "site1-case005.nii.gz").unlink()
    assert inspect_cli(["inspect", str(site), "--modalities", ",".join(MODALITIES)]) == 1
    assert "case site1-case005: modality t1 is missing" in capsys.readouterr().out
    mismatch = ["inspect", str(demo[0]), "--modalities", "t1,t2", "--in-channels", "4"]
    assert inspect_cli(mismatch) == 1


def test_a_federated_run_trains_and_predicts_on_modality_folders(
    demo: list[Path], tmp_path: Path, capsys
) -> None:
    root = demo[0].parent
    run = local_run(tmp_path / "run", *RUN, f"data.root={root}")
    weights = torch.load(run / "model.pt", weights_only=True)
    assert next(iter(weights.values())).shape[1] == 4  # the first convolution takes 4 channels
    source = tmp_path / "to-predict"
    for modality in MODALITIES:  # two cases of site 2, laid out as MODALITY/CASE_ID.nii.gz
        (source / modality).mkdir(parents=True)
        for case in ("site2-case000", "site2-case001"):
            shutil.copy(demo[1] / "images" / modality / f"{case}.nii.gz", source / modality)
    out = tmp_path / "predicted"
    assert predict_cli([str(run), str(source), "--output", str(out)]) == 0
    masks = sorted(p.name for p in out.iterdir())
    assert masks == ["site2-case000.nii.gz", "site2-case001.nii.gz"]
    mask = nib.load(out / masks[0])
    reference = nib.load(source / "t1" / masks[0])
    assert mask.shape == reference.shape
    np.testing.assert_allclose(mask.affine, reference.affine, atol=1e-4)
    (source / "flair" / "site2-case001.nii.gz").unlink()
    assert predict_cli([str(run), str(source), "--output", str(tmp_path / "again")]) == 1
    assert "case site2-case001: modality flair is missing" in capsys.readouterr().err


def test_classification_reads_modalities_with_labels_csv_only(tmp_path: Path) -> None:
    (site,) = make_demo_data(
        tmp_path / "cls",
        task="classification",
        num_sites=1,
        cases_per_site=4,
        shape=(8, 8, 8),
        dicom_sites=(),
        modalities=("t1", "t2"),
    )
    cases = find_cases(site, TaskName.classification, modalities=["t1", "t2"])
    assert [c.label for c in cases] == [0, 1, 0, 1]
    assert all(len(c.image) == 2 for c in cases)
    (site / "labels.csv").unlink()
    with pytest.raises(SiteDataError, match="sub-folders of images/ are modalities"):
        find_cases(site, TaskName.classification, modalities=["t1", "t2"])


def test_a_deployed_sites_data_check_knows_its_modalities(demo: list[Path]) -> None:
    """``fl-imaging-deploy supernode --modalities`` checks the folder with them."""
    report = check_site_folder(demo[1], modalities=",".join(MODALITIES))
    assert "ready to join" in report
    with pytest.raises(SiteCheckError, match="not one of the modalities"):
        check_site_folder(demo[1], modalities="t1,t2")
