"""Where sites compute: ``task.device`` resolution (a GPU machine simulated by patching torch's
CUDA queries, for the selection logic only), the config refusals, ``task.amp`` on a CPU (one
warning, float32 training identical to amp off), ``engine.gpus_per_client`` in Ray's backend
config and the checks before a simulation, and the summary's line of devices. CPU only."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fl_imaging.config import ConfigError, RunConfig, validate_config
from fl_imaging.config.compose import check_overrides
from fl_imaging.config.devices import (
    DEVICE_METRIC,
    MIXED_PRECISION_METRIC,
    check_simulation_devices,
    device_metrics,
    device_name,
    devices_line,
    resolve_device,
    site_device,
)
from fl_imaging.data.demo import make_demo_data
from fl_imaging.engines.simulation import ray_backend_config
from fl_imaging.flower.protocol import SiteError
from fl_imaging.flower.site.client_app import build_client_app
from fl_imaging.review.results import MetricRow, write_run_files
from fl_imaging.training.site_training import SiteTrainers
from tasks import build_task


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as a CPU-only torch build sees it (whatever the test machine has)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.version, "cuda", None)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with two CUDA GPUs, as far as device selection asks (nothing runs on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_is_the_cpu_here_and_cpu_is_always_the_cpu() -> None:
    if not torch.cuda.is_available():  # the machine the suite runs on
        assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.usefixtures("no_gpu")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_refused_naming_the_site_and_the_key(spec: str) -> None:
    cfg = check_overrides([f"task.device={spec}"]).task
    with pytest.raises(ConfigError) as err:
        site_device(cfg, "site hospital-1")
    assert str(err.value) == (
        f"[site hospital-1] task.device={spec}, but torch sees no CUDA GPU on this machine (this "
        "torch is a CPU-only build): set task.device=auto (a GPU where there is one) or cpu, or "
        "train there with a GPU and a CUDA build of torch"
    )


@pytest.mark.usefixtures("two_gpus")
def test_on_a_gpu_machine_auto_and_cuda_are_the_first_gpu_and_a_missing_one_is_refused() -> None:
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda:2", "site hospital-2")
    assert str(err.value) == (
        "[site hospital-2] task.device=cuda:2, but torch sees 2 CUDA GPU(s) on this machine "
        "(cuda:0 to cuda:1): set task.device=cuda or auto, or a number below 2"
    )


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["task.device=gpu"], "task.device=gpu: allowed values are auto"),
        (["task.device=cuda:x"], "task.device=cuda:x: allowed values are auto"),
        (["engine.gpus_per_client=-0.5"], "engine.gpus_per_client=-0.5: must be 0"),
        (
            ["task.dp_sgd.enabled=true", "task.dp_sgd.target_epsilon=8", "task.amp=true"],
            "task.amp=true with task.dp_sgd.enabled=true: Opacus clips and noises",
        ),
    ],
)
def test_config_refuses_bad_devices_gpu_shares_and_amp_with_dp_sgd(
    overrides: list[str], words: str
) -> None:
    with pytest.raises(ConfigError, match="Invalid configuration") as err:
        check_overrides(overrides)
    assert words in str(err.value)


def test_config_accepts_devices_gpu_fractions_and_amp() -> None:
    cfg = check_overrides(["task.device=cuda:1", "engine.gpus_per_client=0.25", "task.amp=true"])
    assert (cfg.task.device, cfg.engine.gpus_per_client, cfg.task.amp) == ("cuda:1", 0.25, True)
    default = check_overrides([])
    assert (default.task.device, default.task.amp, default.engine.gpus_per_client) == (
        "auto",
        False,
        0.0,
    )


def _tiny_task_cfg(amp: bool):
    task = {
        "name": "segmentation",
        "roi_size": [16, 16, 16],
        "model": {"channels": [4, 8]},
        "optimizer": {"name": "adam", "lr": 0.01},
        "amp": amp,
    }
    return validate_config({"task": task}).task


def _trained(amp: bool) -> dict[str, torch.Tensor]:
    cfg = _tiny_task_cfg(amp)
    task = build_task(cfg, site_device(cfg, "site a"))
    torch.manual_seed(0)
    model = task.build_model()
    gen = torch.Generator().manual_seed(1)
    label = (torch.rand(2, 1, 16, 16, 16, generator=gen) > 0.7).long()
    batch = {"image": torch.randn(2, 1, 16, 16, 16, generator=gen) + label, "label": label}
    term = lambda m: sum((p**2).sum() for p in m.parameters()) * 1e-3  # noqa: E731 (FedProx-like)
    task.train(model, [batch, batch], epochs=2, extra_loss=term)
    return model.state_dict()


@pytest.mark.usefixtures("no_gpu")
def test_amp_on_a_cpu_warns_once_and_trains_exactly_as_without(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="fl_imaging"):
        plain = _trained(amp=False)
        assert not caplog.records
        mixed = _trained(amp=True)
    assert [r.getMessage() for r in caplog.records] == [
        "[site a] task.amp=true is ignored on cpu: mixed precision runs on CUDA only; training "
        "and scoring run in float32"
    ]
    assert plain.keys() == mixed.keys()
    assert all(torch.equal(plain[k], mixed[k]) for k in plain)


def test_amp_is_on_only_for_a_cuda_device() -> None:
    cfg = _tiny_task_cfg(amp=True)
    assert not build_task(cfg, torch.device("cpu")).amp
    assert not build_task(cfg).amp  # no device: the CPU, as the coordinator builds its model
    on_gpu = build_task(cfg, torch.device("cuda", 0))  # built, never run: no CUDA needed
    assert on_gpu.amp and on_gpu.device == torch.device("cuda", 0)
    assert not build_task(_tiny_task_cfg(amp=False), torch.device("cuda", 0)).amp


def test_gpus_per_client_reaches_rays_client_resources() -> None:
    engine = check_overrides(["engine.gpus_per_client=0.5", "engine.cpus_per_client=2"]).engine
    config = ray_backend_config(engine, {"num_cpus": 4})
    assert config == {
        "client_resources": {"num_cpus": 2, "num_gpus": 0.5},
        "init_args": {"num_cpus": 4},
    }
    default = ray_backend_config(check_overrides([]).engine, {})
    assert default["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}


@pytest.mark.usefixtures("no_gpu")
def test_a_simulation_asking_for_a_gpu_this_machine_lacks_stops_before_the_run() -> None:
    with pytest.raises(ConfigError) as err:
        check_simulation_devices(check_overrides(["engine.gpus_per_client=0.5"]))
    assert str(err.value).startswith(
        "engine.gpus_per_client=0.5, but torch sees no CUDA GPU on this machine: Ray would wait "
        "for ever"
    )
    with pytest.raises(ConfigError, match=r"^\[simulation on this machine\] task.device=cuda"):
        check_simulation_devices(check_overrides(["task.device=cuda"]))
    check_simulation_devices(check_overrides([]))  # auto, no GPU share: the CPU
    cluster = ["engine.gpus_per_client=1", "engine.ray_address=10.0.0.1:6379"]
    check_simulation_devices(check_overrides(cluster))  # a cluster's GPUs: used as they are


@pytest.mark.usefixtures("two_gpus")
def test_a_gpu_machine_refuses_a_gpu_number_ray_hides_and_warns_on_an_unshared_gpu(
    caplog: pytest.LogCaptureFixture,
) -> None:
    check_simulation_devices(check_overrides(["engine.gpus_per_client=0.5", "task.device=cuda"]))
    with pytest.raises(ConfigError, match="Ray shows each site actor only the 1 GPU"):
        check_simulation_devices(
            check_overrides(["engine.gpus_per_client=0.5", "task.device=cuda:1"])
        )
    with caplog.at_level(logging.WARNING, logger="fl_imaging"):
        check_simulation_devices(check_overrides([]))  # auto: a GPU, but no share reserved
    assert "set engine.gpus_per_client" in caplog.text


def test_a_training_reply_codes_its_device() -> None:
    assert device_metrics(torch.device("cpu"), False) == {
        DEVICE_METRIC: -1.0,
        MIXED_PRECISION_METRIC: 0.0,
    }
    assert device_metrics(torch.device("cuda", 1), True) == {
        DEVICE_METRIC: 1.0,
        MIXED_PRECISION_METRIC: 1.0,
    }
    assert [device_name(c) for c in (-1.0, 0.0, 3.0)] == ["cpu", "cuda:0", "cuda:3"]


def _rows() -> list[MetricRow]:
    rows = []
    for rnd in (1, 2):
        rows += [
            MetricRow(rnd, "site-2", DEVICE_METRIC, 0.0),
            MetricRow(rnd, "site-2", MIXED_PRECISION_METRIC, 1.0),
            MetricRow(rnd, "site-1", DEVICE_METRIC, -1.0),
            MetricRow(rnd, "site-1", MIXED_PRECISION_METRIC, 0.0),
            MetricRow(rnd, "site-3", DEVICE_METRIC, float(rnd - 1)),  # another GPU in round 2
            MetricRow(rnd, "all", "train_loss", 0.5),
        ]
    return rows


def test_the_summary_names_the_device_each_site_trained_on(tmp_path: Path) -> None:
    line = "devices: site-1 cpu, site-2 cuda:0 (mixed precision), site-3 cuda:0/cuda:1"
    assert devices_line(_rows()) == line
    assert devices_line([MetricRow(1, "all", "train_loss", 0.5)]) == ""  # nothing said
    cfg = replace(check_overrides([]), run_dir=str(tmp_path))
    names = ["site-1", "site-2", "site-3"]
    write_run_files(tmp_path, cfg, _rows(), [], torch.nn.Linear(2, 1), names, "dice")
    assert line in (tmp_path / "summary.txt").read_text().splitlines()


def _site_config(tmp_path: Path, *overrides: str) -> RunConfig:
    (site,) = make_demo_data(
        tmp_path / "demo", num_sites=1, cases_per_site=3, shape=(16, 16, 16), dicom_sites=()
    )
    cfg = check_overrides(
        [
            "experiment=quick",
            "task.roi_size=[16,16,16]",
            "task.model.channels=[4,8]",
            "task.local_epochs=1",
            *overrides,
        ]
    )
    cfg.data.sites = [str(site)]
    return cfg


def _train(cfg: RunConfig) -> Message:
    app = build_client_app(cfg, SiteTrainers())
    context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    start = build_task(cfg.task).build_model().state_dict()
    content = RecordDict(
        {"arrays": ArrayRecord(start), "config": ConfigRecord({"server-round": 1})}
    )
    return app(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1), context)


@pytest.mark.usefixtures("no_gpu", "task_identity")
def test_a_site_reports_its_device_and_refuses_a_gpu_its_machine_lacks(tmp_path: Path) -> None:
    reply = _train(_site_config(tmp_path, "task.amp=true"))
    metrics = reply.content["metrics"]
    assert (metrics[DEVICE_METRIC], metrics[MIXED_PRECISION_METRIC]) == (-1.0, 0.0)
    with pytest.raises(SiteError) as err:
        _train(_site_config(tmp_path / "gpu", "task.device=cuda:0"))
    assert str(err.value).startswith("[site site-1] ConfigError: [site site-1] task.device=cuda:0")
