"""A MONAI bundle as the task (tasks/bundle_task.py, tasks/bundle_files.py): a bundle made here
with MONAI's own tools runs for a round as docs/how-to/bundle-task.md says, starting from its
models/model.pt; what it lacks is said in one message; a site runs a bundle only when its
policy lists the bundle's digest and its copy is the one the coordinator named, and refuses
before any of the bundle's code runs."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_runs import run_cli
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from monai.bundle import ConfigParser
from monai_only import monai_only

from fl_imaging.config import ConfigError, RunConfig
from fl_imaging.config.compose import check_overrides
from fl_imaging.data.demo import make_demo_data
from fl_imaging.flower.protocol import SiteError
from fl_imaging.flower.site import client_app
from fl_imaging.review.bundle_export import NETWORK_SNIPPET, export_bundle
from fl_imaging.training.site_training import SiteTrainers
from tasks import build_task
from tasks.bundle_files import bundle_digest, with_bundle_settings
from tasks.bundle_task import BundleSegmentationTask

pytestmark = pytest.mark.usefixtures("task_identity")

PAGE = Path(__file__).resolve().parents[2] / "docs" / "how-to" / "bundle-task.md"

#: The bundle's patch size and its tiny U-Net (one stride-2 level: sizes divisible by 2).
ROI = [16, 16, 16]
NETWORK = {
    "_target_": "UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "channels": [4, 8],
    "strides": [2],
    "num_res_units": 0,
}


def train_config(network: dict[str, Any] | None = NETWORK) -> dict[str, Any]:
    """A training config as the model zoo writes them: network_def, train#preprocessing (a
    Compose whose random part starts at the crop), loss, optimizer over ``@network``."""
    keys = ["image", "label"]
    config: dict[str, Any] = {
        "learning_rate": 0.01,
        "device": "$torch.device('cpu')",
        "network": "$@network_def.to(@device)",
        "train": {
            "preprocessing": {
                "_target_": "Compose",
                "transforms": [
                    {"_target_": "LoadImaged", "keys": keys, "image_only": True},
                    {"_target_": "EnsureChannelFirstd", "keys": keys},
                    {"_target_": "ScaleIntensityd", "keys": "image"},
                    {
                        "_target_": "RandSpatialCropd",
                        "keys": keys,
                        "roi_size": ROI,
                        "random_size": False,
                    },
                    {"_target_": "RandFlipd", "keys": keys, "prob": 0.5, "spatial_axis": 0},
                ],
            }
        },
        "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
        "optimizer": {
            "_target_": "torch.optim.SGD",
            "params": "$@network.parameters()",
            "lr": "@learning_rate",
        },
    }
    if network is not None:
        config["network_def"] = network
    return config


def metadata(**pred: Any) -> dict[str, Any]:
    """configs/metadata.json: a 1-channel image patch of ROI in, 2-class segmentation out."""
    return {
        "version": "0.1.0",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "num_channels": 1,
                    "spatial_shape": ROI,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": 2,
                    "spatial_shape": ROI,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    **pred,
                }
            },
        },
    }


def make_bundle(
    folder: Path,
    config: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    *,
    weights: bool = True,
) -> Path:
    """Write a bundle with MONAI's tools: configs with ``ConfigParser.export_config_file``,
    ``models/model.pt`` saved from its network_def built by MONAI (seeded apart from any
    run's seed, so its weights are no fresh initialisation's). Returns ``folder``."""
    config = train_config() if config is None else config
    (folder / "configs").mkdir(parents=True)
    ConfigParser.export_config_file(config, str(folder / "configs" / "train.json"))
    ConfigParser.export_config_file(
        metadata() if meta is None else meta, str(folder / "configs" / "metadata.json")
    )
    if weights:
        torch.manual_seed(1234)
        network = ConfigParser(config).get_parsed_content("network_def")
        (folder / "models").mkdir()
        torch.save(network.state_dict(), folder / "models" / "model.pt")
    return folder


def page_commands() -> list[list[str]]:
    """The commands of the page's first bash block, continuation lines joined."""
    block = re.search(r"```bash\n(.*?)```", PAGE.read_text(), re.S)
    assert block, f"{PAGE} has no bash block"
    lines = block.group(1).replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.startswith("#")]


def page_policy() -> str:
    """The site policy the page shows (its first yaml block)."""
    block = re.search(r"```yaml\n(.*?)```", PAGE.read_text(), re.S)
    assert block, f"{PAGE} has no yaml block"
    return block.group(1)


@pytest.mark.slow
def test_the_pages_commands_run_a_bundle_that_starts_from_its_weights(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "my_bundle")
    digest = bundle_digest(bundle)
    (tmp_path / "site.yaml").write_text(page_policy().replace("SHA256_OF_THE_BUNDLE", digest))
    commands = page_commands()
    assert [c[0] for c in commands] == ["fl-imaging", "fl-imaging-deploy"]
    ran = run_cli(*commands[0], cwd=tmp_path, timeout=400)
    assert "the bundle's settings win: task.roi_size=[24, 24, 24] -> [16, 16, 16]" in ran.stdout
    run = tmp_path / "runs" / "bundle"
    assert (run / "model.pt").is_file()
    # exported back: the bundle's own configs (it has no inference config: its training config)
    exported = run / "bundle"
    assert (exported / "configs" / "train.json").is_file()
    assert json.loads((exported / "configs" / "metadata.json").read_text())["fl_imaging"][
        "source_bundle"
    ] == {"name": "my_bundle", "version": "0.1.0", "sha256": digest, "had_inference_config": False}
    monai_only(NETWORK_SNIPPET + SAME_WEIGHTS, cwd=exported)
    checked = run_cli(*commands[1], cwd=tmp_path)
    assert f"bundle my_bundle (SHA-256): {digest}" in checked.stdout
    assert "accepted by site.yaml" in checked.stdout

    # round 0: the coordinator's global model is the bundle's model.pt
    from fl_imaging.flower.coordinator.federation import plan_federation
    from fl_imaging.run import _with_bundle

    cfg = _with_bundle(check_overrides(_overrides(commands[0][1:], bundle)))
    plan = plan_federation(cfg, ["site-1", "site-2"])
    start = plan.model.state_dict()  # what round 1 sends the sites (no checkpoint here)
    saved = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert start.keys() == saved.keys()
    assert all(torch.equal(start[k], saved[k]) for k in saved)


#: Appended to :data:`NETWORK_SNIPPET`: the network MONAI built holds the run's weights.
SAME_WEIGHTS = """
run = torch.load("../model.pt", weights_only=True)
mine = net.state_dict()
assert run.keys() == mine.keys(), sorted(set(run) ^ set(mine))
assert all(torch.equal(run[k], mine[k]) for k in run)
"""


def test_a_bundle_task_exports_that_bundle_fine_tuned_which_monai_alone_runs(
    tmp_path: Path,
) -> None:
    bundle = make_bundle(tmp_path / "zoo_model", meta={**metadata(), "name": "zoo model"})
    # its inference config names its own items: the export keeps them
    inference = {"classes": 2, "network_def": {**NETWORK, "out_channels": "@classes"}}
    ConfigParser.export_config_file(inference, str(bundle / "configs" / "inference.json"))
    cfg = check_overrides(["task=bundle", f"task.bundle={bundle}"])
    cfg = replace(cfg, task=with_bundle_settings(cfg.task))
    model = build_task(cfg.task).build_model()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5)  # the run's weights, not the bundle's
    run = tmp_path / "run"
    run.mkdir()
    torch.save(model.state_dict(), run / "model.pt")
    exported = export_bundle(run, cfg, [], model, ["site-1", "site-2"])

    configs = exported / "configs"
    assert json.loads((configs / "inference.json").read_text()) == inference
    meta = json.loads((configs / "metadata.json").read_text())
    assert meta["network_data_format"] == metadata()["network_data_format"]
    assert meta["name"] == "zoo model" and meta["version"] == "0.1.0+fl-imaging"
    assert meta["fl_imaging"]["sites"] == ["site-1", "site-2"]
    assert meta["fl_imaging"]["source_bundle"]["sha256"] == bundle_digest(bundle)
    assert "fine-tuned from bundle zoo model" in (exported / "docs" / "README.md").read_text()
    x = "torch.manual_seed(0); x = torch.rand(1, 1, 16, 16, 16)"
    done = monai_only(f"{NETWORK_SNIPPET}{SAME_WEIGHTS}{x}\nprint(net(x).sum().item())", exported)
    torch.manual_seed(0)
    expected = model.eval()(torch.rand(1, 1, 16, 16, 16)).sum().item()
    assert float(done.stdout.split()[-1]) == pytest.approx(expected, rel=1e-5)


def _overrides(args: list[str], bundle: Path) -> list[str]:
    """The page's overrides with the bundle's path made absolute (the test runs elsewhere)."""
    return [f"task.bundle={bundle}" if a.startswith("task.bundle=") else a for a in args]


def test_what_the_bundle_defines_wins_and_is_what_the_task_trains_with(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    cfg = check_overrides(["task=bundle", f"task.bundle={bundle}", "task.roi_size=[8,8,8]"])
    task_cfg = with_bundle_settings(cfg.task)
    assert task_cfg.roi_size == ROI and task_cfg.bundle_sha256 == bundle_digest(bundle)
    task = build_task(task_cfg)
    assert isinstance(task, BundleSegmentationTask)
    assert type(task.loss_function()).__name__ == "DiceCELoss"
    model = task.build_model()
    optimizer = task.optimizer(model)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.01
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {
        id(p) for p in model.parameters()
    }
    loaded = [type(t).__name__ for t in task.load_transforms().transforms]
    assert loaded == ["LoadImaged", "EnsureChannelFirstd", "ScaleIntensityd", "EnsureTyped"]
    assert type(task.train_transforms().transforms[0]).__name__ == "RandSpatialCropd"


def test_a_bundle_lacking_what_fl_imaging_needs_is_refused_in_one_message(tmp_path: Path) -> None:
    meta = metadata(format=None)
    del meta["network_data_format"]["outputs"]["pred"]["num_channels"]
    bundle = make_bundle(tmp_path / "b", train_config(network=None), meta, weights=False)
    cfg = check_overrides(["task=bundle", f"task.bundle={bundle}"])
    with pytest.raises(ConfigError) as err:
        with_bundle_settings(cfg.task)
    assert str(err.value) == (
        f"bundle {bundle} lacks what fl-imaging needs to run it as a task: "
        "configs/train.json: network_def (the network as a MONAI config item, e.g. "
        '{"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, ...}); '
        "configs/metadata.json: network_data_format.outputs.pred.format "
        '("segmentation" or "classification"); configs/metadata.json: '
        "network_data_format.outputs.pred.num_channels (classes, background included for "
        "segmentation). Add these to the bundle (its SHA-256 changes: the sites list the new one)"
    )


def test_weights_that_do_not_fit_the_network_are_refused_by_name(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    wider = ConfigParser({"n": {**NETWORK, "channels": [8, 16]}}).get_parsed_content("n")
    torch.save(wider.state_dict(), bundle / "models" / "model.pt")
    cfg = check_overrides(["task=bundle", f"task.bundle={bundle}"])
    task = build_task(with_bundle_settings(cfg.task))
    with pytest.raises(
        ConfigError,
        match=r"(?s)models/model.pt does not fit the bundle's network_def: "
        r"Error\(s\) in loading state_dict for UNet:.*size mismatch",
    ):
        task.build_model()


# --- the site's side: a bundle is code, run only when the site's policy accepts it -------------


@pytest.fixture(scope="module")
def demo_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    (site,) = make_demo_data(
        tmp_path_factory.mktemp("demo"),
        num_sites=1,
        cases_per_site=4,
        shape=(16, 16, 16),
        dicom_sites=(),
    )
    return site


def marked_bundle(folder: Path, marker: Path) -> Path:
    """A bundle whose network_def runs code (it writes ``marker``) when MONAI builds it."""
    network = {
        **NETWORK,
        "dropout": f"$__import__('pathlib').Path('{marker}').write_text('ran') * 0.0",
    }
    return make_bundle(folder, train_config(network), weights=False)


def ask_train(cfg: RunConfig, node_config: dict[str, Any], weights: dict) -> Message:
    """A training message of round 1 to a ClientApp of ``cfg`` on a node of ``node_config``."""
    app = client_app.build_client_app(cfg, SiteTrainers())
    context = Context(7, 1, node_config, RecordDict(), {})
    content = RecordDict(
        {"arrays": ArrayRecord(weights), "config": ConfigRecord({"server-round": 1})}
    )
    return app(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1), context)


def site_request(site: Path, bundle: Path, digest: str, policy: Path | None) -> RunConfig:
    """What a coordinator asks: a run of the bundle at ``bundle`` with SHA-256 ``digest``."""
    cfg = check_overrides(
        ["experiment=quick", "task=bundle", f"task.bundle={bundle}", "task.local_epochs=1"]
    )
    cfg.task.bundle_sha256 = digest
    cfg.data.sites = [str(site)]
    cfg.site.policy = str(policy) if policy else None
    return cfg


def test_a_site_refuses_a_bundle_its_policy_does_not_list_before_any_of_it_runs(
    demo_site: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "bundle-code-ran"
    bundle = marked_bundle(tmp_path / "b", marker)
    digest = bundle_digest(bundle)
    other = "0" * 64
    weights = {"w": torch.zeros(1)}  # never loaded: the site refuses first
    policy = tmp_path / "site.yaml"
    policy.write_text(f"accept:\n  bundles: [{other}]\n")
    simulated = {"partition-id": 0}
    with pytest.raises(
        SiteError,
        match=rf"policy accept.bundles \({policy}\): the bundle "
        rf"{bundle} \(SHA-256 {digest}\) is not listed",
    ):
        ask_train(site_request(demo_site, bundle, digest, policy), simulated, weights)
    deployed = {"data-dir": str(demo_site)}  # a SuperNode without a policy file runs no bundle
    with pytest.raises(SiteError, match=r"policy accept.bundles: the bundle .* is not listed"):
        ask_train(site_request(demo_site, bundle, digest, None), deployed, weights)
    # the coordinator names another bundle than this site's copy: both digests named
    policy.write_text(f"accept:\n  bundles: [{digest}, {other}]\n")
    with pytest.raises(
        SiteError,
        match=rf"names the bundle {bundle} with SHA-256 {other}, but "
        rf"this site's copy has SHA-256 {digest}",
    ):
        ask_train(site_request(demo_site, bundle, other, policy), simulated, weights)
    assert not marker.exists()  # nothing of the bundle was built

    # the control: listed, the same copy -> the site builds the bundle (its code runs) and trains
    cfg = site_request(demo_site, bundle, digest, policy)
    cfg = replace(cfg, task=with_bundle_settings(cfg.task))
    assert not marker.exists()  # reading the bundle's settings runs none of it
    start = build_task(cfg.task).build_model().state_dict()
    marker.unlink()
    hospital = {**deployed, "policy": str(policy), "state-dir": str(tmp_path / "state")}
    reply = ask_train(cfg, hospital, start)
    assert not reply.has_error() and marker.read_text() == "ran"
    assert reply.content["metrics"]["num-examples"] > 0
