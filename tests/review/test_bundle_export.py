"""The final model of a run as a MONAI bundle (``bundle/``): MONAI alone, in an interpreter that
cannot import fl-imaging, reads its configs, builds its network, loads its weights strictly and
predicts what ``fl-imaging-predict`` predicts; its metadata carries the run's provenance and
privacy; DP-SGD's converted network exports a definition that takes its weights."""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from pathlib import Path

import monai
import nibabel
import numpy as np
import pytest
import torch
from local_runs import local_run
from monai_only import monai_only

from fl_imaging.cli.predict import main as predict_cli
from fl_imaging.config import validate_config
from fl_imaging.config.compose import check_overrides
from fl_imaging.review.audit import verify_run
from fl_imaging.review.bundle_export import (
    BUNDLE_FILES,
    NETWORK_SNIPPET,
    RUN_SNIPPET,
    BundleExportError,
    export_bundle,
)
from fl_imaging.review.result_transfer import RESULT_FILES
from tasks import build_task

REPO = Path(__file__).resolve().parents[2]
DOCS_PAGE = REPO / "docs" / "how-to" / "monai-bundles.md"
#: A 1-round run of the smoke preset (2 sites, 24^3 demo volumes, a U-Net with batch norm).
SMOKE = ["experiment=smoke", "engine.rounds=1"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundle")
    return local_run(root / "run", *SMOKE, f"data.root={root / 'demo'}")


def _one_volume(run_dir: Path, folder: Path) -> Path:
    """A demo volume of the run's data, copied into ``folder``."""
    image = sorted((run_dir.parent / "demo").glob("site-1/images/*.nii.gz"))[0]
    folder.mkdir(parents=True)
    return Path(shutil.copy(image, folder / image.name))


def test_monai_alone_runs_the_bundle_as_fl_imaging_predict_does(
    smoke_run: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(smoke_run / "bundle", bundle)  # away from the run folder
    image = _one_volume(smoke_run, bundle / "images")
    assert (
        predict_cli([str(smoke_run), str(bundle / "images"), "--output", str(tmp_path / "p")]) == 0
    )
    expected = nibabel.load(tmp_path / "p" / image.name)
    # the docs' snippet, verbatim, then MONAI's own loader and a strict load of the weights
    check = textwrap.dedent(
        """
        import monai.bundle
        net = monai.bundle.load(
            "bundle", bundle_dir="..", workflow_type="inference", source="github", device="cpu"
        )
        state = torch.load("models/model.pt", weights_only=True)
        fresh = parser.get_parsed_content("network_def", instantiate=True, lazy=False)
        fresh.load_state_dict(state, strict=True)
        assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
        print("monai.bundle.load:", type(net).__name__)
        monai.bundle.ckpt_export(
            net_id="network_def", filepath="model.ts", ckpt_file="models/model.pt",
            meta_file="configs/metadata.json", config_file="configs/inference.json",
        )
        x = torch.randn(1, 1, 24, 24, 24)
        with torch.no_grad():
            assert torch.allclose(torch.jit.load("model.ts")(x), net.eval()(x), atol=1e-5)
        """
    )
    done = monai_only(RUN_SNIPPET + check, cwd=bundle)
    assert "monai.bundle.load: UNet" in done.stdout
    got = nibabel.load(bundle / "predictions" / image.name.replace(".nii.gz", "_seg.nii.gz"))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.affine, expected.affine, atol=1e-5)
    mask, want = np.asarray(got.dataobj), np.asarray(expected.dataobj)
    assert len(np.unique(want)) > 1  # a prediction with both classes, not a blank one
    assert np.array_equal(mask.astype(np.uint8), want)


def test_the_bundle_is_hashed_by_the_audit_and_sent_with_the_results(
    smoke_run: Path, tmp_path: Path
) -> None:
    run = Path(shutil.copytree(smoke_run, tmp_path / "run"))
    end = json.loads((run / "audit.jsonl").read_text().splitlines()[-1])
    written = {f for f in BUNDLE_FILES if (run / f).is_file()}  # train.json: bundle tasks only
    assert written == set(BUNDLE_FILES) - {"bundle/configs/train.json"}
    assert written <= set(end["files"])
    assert set(BUNDLE_FILES) <= set(RESULT_FILES)
    assert verify_run(run).ok
    (run / "bundle" / "configs" / "inference.json").write_text("{}")  # replaced
    verification = verify_run(run)
    assert not verification.ok and "bundle/configs/inference.json" in verification.problem


def test_metadata_holds_monais_fields_and_the_runs_provenance(tmp_path: Path) -> None:
    run = local_run(tmp_path / "run", *SMOKE, f"data.root={tmp_path / 'demo'}")
    meta = json.loads((run / "bundle" / "configs" / "metadata.json").read_text())
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version"):
        assert meta[key], key
    assert meta["monai_version"] == monai.__version__
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert image["num_channels"] == 1 and pred["num_channels"] == 2
    assert pred["channel_def"] == {"0": "background", "1": "class 1"}
    info = meta["fl_imaging"]
    assert info["rounds"] == 1 and info["num_sites"] == 2 and info["strategy"] == "fedavg"
    start = json.loads((run / "audit.jsonl").read_text().splitlines()[0])
    assert info["config_sha256"] == start["config_sha256"]
    assert info["privacy"]["client_level_dp"] == {"mode": "none"}
    assert info["privacy"]["patient_level_dp"] == {"enabled": False}
    assert info["privacy"]["secure_aggregation"] is False
    inference = json.loads((run / "bundle" / "configs" / "inference.json").read_text())
    assert inference["inferer"] == {
        "_target_": "SlidingWindowInferer",
        "roi_size": [24, 24, 24],
        "sw_batch_size": 4,
        "overlap": 0.25,
    }
    assert {"dataset_dir", "output_dir", "bundle_root"} <= set(inference)


def test_a_dp_sgd_run_exports_its_converted_network_and_its_epsilon(tmp_path: Path) -> None:
    run = local_run(
        tmp_path / "run",
        *SMOKE,
        f"data.root={tmp_path / 'demo'}",
        "task.dp_sgd.enabled=true",
        "task.dp_sgd.noise_multiplier=1.0",
    )
    meta = json.loads((run / "bundle" / "configs" / "metadata.json").read_text())
    patient = meta["fl_imaging"]["privacy"]["patient_level_dp"]
    summary = (run / "summary.txt").read_text()  # "  site NAME: epsilon E at delta D ..."
    stated = dict(re.findall(r"^  site (\S+): epsilon (\S+) at delta", summary, flags=re.M))
    assert patient["enabled"] and len(stated) == 2
    assert set(patient["epsilon_per_site"]) == set(stated)
    for site, epsilon in patient["epsilon_per_site"].items():
        assert epsilon == pytest.approx(float(stated[site]), rel=1e-3)
    assert patient["epsilon"] == max(patient["epsilon_per_site"].values()) > 0
    assert patient["delta"] == 1e-5
    assert "opacus" in meta["required_packages_version"]
    # MONAI alone (and Opacus) rebuilds GroupNorm where the trained network had it
    script = textwrap.dedent(
        """
        import torch
        from monai.bundle import ConfigParser
        parser = ConfigParser()
        parser.read_config("configs/inference.json")
        net = parser.get_parsed_content("network_def")
        net.load_state_dict(torch.load("models/model.pt", weights_only=True), strict=True)
        kinds = {type(m).__name__ for m in net.modules()}
        assert "GroupNorm" in kinds and "BatchNorm3d" not in kinds, kinds
        """
    )
    monai_only(script, cwd=run / "bundle")


def test_weights_that_the_definition_does_not_take_are_refused(tmp_path: Path) -> None:
    cfg = validate_config({"task": {"model": {"channels": [4, 8], "norm": "batch"}}})
    private = validate_config(
        {
            "task": {
                "model": {"channels": [4, 8], "norm": "batch"},
                "dp_sgd": {"enabled": True, "noise_multiplier": 1.0},
            }
        }
    )
    model = build_task(private.task).build_model()  # GroupNorm weights, no running statistics
    with pytest.raises(BundleExportError, match="does not take the run's weights"):
        export_bundle(tmp_path, cfg, [], model, ["a"])
    assert not (tmp_path / "bundle").exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left


def test_the_docs_page_holds_the_snippet_the_bundle_runs() -> None:
    page = DOCS_PAGE.read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert RUN_SNIPPET in blocks
    assert NETWORK_SNIPPET in blocks  # a bundle run as the task, exported back


def test_tracking_mlflow_logs_the_model_that_mlflow_loads_and_runs(tmp_path: Path) -> None:
    import mlflow.pytorch
    from mlflow import MlflowClient

    store = tmp_path / "mlruns"
    run = local_run(
        tmp_path / "run",
        *SMOKE,
        f"data.root={tmp_path / 'demo'}",
        "tracking=mlflow",
        f"tracking.uri={store}",
    )
    info = json.loads((run / "tracking.json").read_text())
    assert info["status"] == "FINISHED" and "failed" not in info
    assert info["model_uri"].startswith("models:/")
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    bundle = {a.path for a in client.list_artifacts(info["run_id"], "bundle/configs")}
    assert bundle == {"bundle/configs/inference.json", "bundle/configs/metadata.json"}
    mlflow.set_tracking_uri(info["tracking_uri"])
    try:
        loaded = mlflow.pytorch.load_model(info["model_uri"])
        image = torch.randn(1, 1, 24, 24, 24)  # the graph MLflow saved (pt2), not our class
        state = torch.load(run / "model.pt", weights_only=True)
        assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
        # the docs' snippet, verbatim, with the URI of tracking.json
        page = DOCS_PAGE.read_text()
        snippet = next(b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "mlflow" in b)
        scope: dict = {"model_uri": info["model_uri"]}
        exec(snippet, scope)
        assert scope["logits"].shape == (1, 2, 32, 32, 32)
        trained = build_task(check_overrides(SMOKE).task).build_model()
        trained.load_state_dict(state)
        with torch.no_grad():
            want = trained.eval()(torch.zeros(1, 1, 32, 32, 32)).numpy()
            np.testing.assert_allclose(loaded(image), trained(image), atol=1e-5)
        np.testing.assert_allclose(scope["logits"], want, atol=1e-5)
    finally:
        mlflow.set_tracking_uri(None)
    assert not (REPO / "mlflow.db").exists() and not (REPO / "mlruns").exists()


def test_a_classification_bundle_gives_the_tasks_probabilities(tmp_path: Path) -> None:
    from monai.bundle import ConfigParser
    from PIL import Image

    cfg = validate_config(
        {
            "task": {
                "name": "classification",
                "spatial_dims": 2,
                "roi_size": [32, 32],
                "num_classes": 3,
                "class_names": ["ct", "mr", "xr"],
                "model": {"name": "densenet", "channels": [4, 8]},
            }
        }
    )
    task = build_task(cfg.task)
    torch.manual_seed(0)
    model = task.build_model().eval()
    export_bundle(tmp_path, cfg, [], model, ["a", "b"])
    image = tmp_path / "scan.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 36), dtype=np.uint8)).save(image)
    parser = ConfigParser()
    parser.read_config(str(tmp_path / "bundle" / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(tmp_path / "bundle" / "models" / "model.pt"), strict=True)
    sample = parser.get_parsed_content("preprocessing")({"image": str(image)})
    with torch.no_grad():
        pred = parser.get_parsed_content("inferer")(sample["image"][None], net.eval())[0]
        prob = parser.get_parsed_content("postprocessing")({**sample, "pred": pred})["pred"]
        want = torch.softmax(
            model(task.inference_transforms()({"image": str(image)})["image"][None]), 1
        )
    assert parser["inferer"] == {"_target_": "SimpleInferer"}
    np.testing.assert_allclose(np.asarray(prob), want[0].numpy(), atol=1e-6)
    meta = json.loads((tmp_path / "bundle" / "configs" / "metadata.json").read_text())
    pred_format = meta["network_data_format"]["outputs"]["pred"]
    assert pred_format["channel_def"] == {"0": "ct", "1": "mr", "2": "xr"}
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32]
