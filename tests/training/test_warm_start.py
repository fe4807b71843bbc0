"""Warm starts (``task.model.init``) and frozen parameters (``task.model.trainable``): the file
checked against the network, the run starting from it, frozen weights left as they were (with
DP-SGD too), ``resume=`` winning over it, a relative path taken from where the command runs."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from local_runs import local_run

from fl_imaging.config import ConfigError
from fl_imaging.config.compose import check_overrides
from fl_imaging.flower.coordinator.federation import plan_federation
from fl_imaging.review.audit import arrays_sha256
from fl_imaging.site.policy import PolicyRefusal, check_request, load_policy
from tasks import build_task

#: The smoke preset's network (a U-Net of widths 4, 8), one round on two tiny demo sites.
SMOKE = ("experiment=smoke", "engine.rounds=1")
#: The last layers of that U-Net (the up path and output), trained while the rest is frozen.
LAST_LAYERS = "model.2.*"


def _weights(tmp_path: Path, *overrides: str, name: str = "pretrained.pt") -> Path:
    """A state_dict of the network ``overrides`` configure (seeded 7, not the run's seed),
    saved with ``torch.save`` to ``tmp_path / name``."""
    torch.manual_seed(7)
    model = build_task(check_overrides([*SMOKE, *overrides]).task).build_model()
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    return path


def _run_start(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
    return next(r for r in records if r["event"] == "run_start")


def test_a_mismatched_checkpoint_is_refused_with_the_exact_keys(tmp_path: Path) -> None:
    torch.manual_seed(7)
    state = build_task(check_overrides([*SMOKE, "task.model.channels=[4,16]"]).task).network()
    weights = state.state_dict()
    del weights["model.0.residual.bias"]
    weights["head.extra"] = torch.zeros(3)
    path = tmp_path / "other.pt"
    torch.save(weights, path)
    cfg = check_overrides([*SMOKE, f"task.model.init={path}"])
    with pytest.raises(ConfigError) as caught:
        plan_federation(replace(cfg, run_dir=str(tmp_path / "run")), ["site-1", "site-2"])
    assert str(caught.value) == (
        f"task.model.init: the weights in {path} do not fit the configured network:\n"
        "  missing keys (1): model.0.residual.bias\n"
        "  unexpected keys (1): head.extra\n"
        "  shape mismatch: model.1.submodule.conv.unit0.conv.weight: checkpoint [16, 4, 3, 3, 3], "
        "network [8, 4, 3, 3, 3]\n"
        "  shape mismatch: model.1.submodule.conv.unit0.conv.bias: checkpoint [16], network [8]\n"
        "  shape mismatch: model.1.submodule.conv.unit0.adn.N.weight: checkpoint [16], "
        "network [8]\n"
        "  shape mismatch: model.1.submodule.conv.unit0.adn.N.bias: checkpoint [16], "
        "network [8]\n"
        "  shape mismatch: model.1.submodule.conv.unit0.adn.N.running_mean: checkpoint [16], "
        "network [8]\n"
        "  shape mismatch: model.1.submodule.conv.unit0.adn.N.running_var: checkpoint [16], "
        "network [8]\n"
        "  shape mismatch: model.1.submodule.residual.weight: checkpoint [16, 4, 1, 1, 1], "
        "network [8, 4, 1, 1, 1]\n"
        "  shape mismatch: model.1.submodule.residual.bias: checkpoint [16], network [8]\n"
        "  shape mismatch: model.2.0.conv.weight: checkpoint [20, 2, 3, 3, 3], "
        "network [12, 2, 3, 3, 3]\n"
        "  configure the network the weights were trained with (task.model.*, task.in_channels, "
        "task.num_classes, task.dp_sgd.enabled changes batch norm to group norm), or give "
        "weights of this network"
    )


def test_a_monai_checkpoint_of_the_network_starts_the_run(tmp_path: Path) -> None:
    weights = _weights(tmp_path)
    saved = torch.load(weights, weights_only=True)
    checkpoint = tmp_path / "checkpoint.pt"  # MONAI's CheckpointSaver form
    torch.save({"model": saved, "epoch": torch.tensor(12)}, checkpoint)
    cfg = check_overrides([*SMOKE, f"task.model.init={checkpoint}"])
    plan = plan_federation(replace(cfg, run_dir=str(tmp_path / "run")), ["site-1", "site-2"])
    start = plan.model.state_dict()
    assert all(torch.equal(start[k], saved[k]) for k in saved)


def test_a_file_that_is_no_torch_file_and_a_folder_without_weights_are_refused(
    tmp_path: Path,
) -> None:
    junk = tmp_path / "notes.pt"
    junk.write_text("not a torch file")
    cfg = replace(check_overrides(list(SMOKE)), run_dir=str(tmp_path / "run"))
    model = replace(cfg.task.model, init=str(junk))
    with pytest.raises(
        ConfigError, match=r"task.model.init: .*notes.pt: the file is damaged or not a weights file"
    ):
        plan_federation(replace(cfg, task=replace(cfg.task, model=model)), ["a", "b"])
    empty = tmp_path / "empty"
    empty.mkdir()
    model = replace(cfg.task.model, init=str(empty))
    with pytest.raises(ConfigError, match=r"holds neither model.pt .* nor models/model.pt"):
        plan_federation(replace(cfg, task=replace(cfg.task, model=model)), ["a", "b"])


def test_a_run_from_init_starts_from_those_weights_and_records_them(tmp_path: Path) -> None:
    weights = _weights(tmp_path)
    state = torch.load(weights, weights_only=True)
    bundle = tmp_path / "bundle"  # a MONAI bundle folder: its models/model.pt
    (bundle / "models").mkdir(parents=True)
    (bundle / "models" / "model.pt").write_bytes(weights.read_bytes())
    cfg = replace(check_overrides([*SMOKE, f"task.model.init={bundle}"]), run_dir=str(tmp_path))
    plan = plan_federation(cfg, ["site-1", "site-2"])
    assert plan.strategy.global_arrays is not None  # round 0's global model: the file's
    sent = plan.strategy.global_arrays.to_torch_state_dict()
    assert sent.keys() == state.keys()
    assert all(torch.equal(sent[k], state[k]) for k in state)

    run_dir = local_run(
        tmp_path / "run", *SMOKE, f"data.root={tmp_path / 'demo'}", f"task.model.init={weights}"
    )
    start = _run_start(run_dir)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert start["initial_model"] == {"path": str(weights), "sha256": digest}
    numpy = {k: v.numpy() for k, v in state.items()}
    assert start["model_sha256"] == arrays_sha256(numpy)
    assert f"initial model: {weights} (sha256 {digest}" in (run_dir / "summary.txt").read_text()


def test_frozen_parameters_are_unchanged_by_a_site_and_by_the_run(tmp_path: Path) -> None:
    cfg = check_overrides([*SMOKE, f"task.model.trainable=[{LAST_LAYERS}]"])
    task = build_task(cfg.task)
    model = task.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    image = torch.randn(2, 1, 24, 24, 24)
    batch = {"image": image, "label": (image > 0.5).long()}
    task.train(model, [batch, batch], epochs=2)
    for name, param in model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == name.startswith("model.2."), name  # frozen: exactly zero change

    weights = _weights(tmp_path)
    run_dir = local_run(
        tmp_path / "run",
        *SMOKE,
        f"data.root={tmp_path / 'demo'}",
        f"task.model.init={weights}",
        f"task.model.trainable=[{LAST_LAYERS}]",
    )
    initial = torch.load(weights, weights_only=True)
    final = torch.load(run_dir / "model.pt", weights_only=True)
    for name, _ in model.named_parameters():
        same = torch.allclose(final[name], initial[name], rtol=1e-6, atol=0)
        assert same != name.startswith("model.2."), name


def test_a_pattern_that_matches_nothing_is_refused_naming_it() -> None:
    cfg = check_overrides([*SMOKE, "task.model.trainable=[decoder.*]"])
    with pytest.raises(ConfigError, match=r"'decoder.\*' matches none .* model.0.conv.unit0"):
        build_task(cfg.task).build_model()


def test_dp_sgd_trains_only_the_trainable_parameters_and_says_which(tmp_path: Path) -> None:
    dp_sgd = ("task.dp_sgd.enabled=true", "task.dp_sgd.noise_multiplier=1.0")
    weights = _weights(tmp_path, *dp_sgd)  # group norm, as DP-SGD trains it
    run_dir = local_run(
        tmp_path / "run",
        *SMOKE,
        f"data.root={tmp_path / 'demo'}",
        *dp_sgd,
        "task.dp_sgd.delta=1e-3",
        f"task.model.init={weights}",
        f"task.model.trainable=[{LAST_LAYERS}]",
    )
    initial = torch.load(weights, weights_only=True)
    final = torch.load(run_dir / "model.pt", weights_only=True)
    trained = [k for k in initial if k.startswith("model.2.")]
    frozen = [k for k in initial if not k.startswith("model.2.")]
    assert all(torch.allclose(final[k], initial[k], rtol=1e-6, atol=0) for k in frozen)
    assert all(not torch.equal(final[k], initial[k]) for k in trained if "weight" in k)
    summary = (run_dir / "summary.txt").read_text()
    assert "trained with DP-SGD: 7 of 21 parameter tensors (765 of 1927 values)" in summary
    assert f"task.model.trainable=['{LAST_LAYERS}']: model.2.0.conv.weight" in summary


def test_a_site_policy_still_decides_on_the_model_whatever_is_trainable(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("accept:\n  models: [segresnet]\n")
    cfg = check_overrides([*SMOKE, f"task.model.trainable=[{LAST_LAYERS}]"])
    with pytest.raises(PolicyRefusal, match=r"policy accept.models .*the run's model is unet"):
        check_request(load_policy(policy_file), cfg, training=True, masked=False)


def test_resume_wins_over_init_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    weights = _weights(tmp_path)
    demo = f"data.root={tmp_path / 'demo'}"
    first = local_run(tmp_path / "first", *SMOKE, demo, f"task.model.init={weights}")
    with caplog.at_level(logging.INFO, logger="fl_imaging.server"):
        resumed = local_run(
            tmp_path / "next",
            "experiment=smoke",
            "engine.rounds=2",
            demo,
            f"task.model.init={weights}",
            f"resume={first}",
        )
    assert f"resume={first} wins over task.model.init={weights}" in caplog.text
    start = _run_start(resumed)
    assert start["initial_model"] is None
    trained = torch.load(first / "model.pt", weights_only=True)  # round 1's global model
    assert start["model_sha256"] == arrays_sha256({k: v.numpy() for k, v in trained.items()})


def test_a_relative_init_is_taken_from_where_the_command_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = _weights(tmp_path, name="start.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "start.pt").write_bytes(weights.read_bytes())
    monkeypatch.chdir(elsewhere)
    run_dir = local_run(
        tmp_path / "run", *SMOKE, f"data.root={tmp_path / 'demo'}", "task.model.init=start.pt"
    )
    assert _run_start(run_dir)["initial_model"]["path"] == str(elsewhere / "start.pt")
    saved = (run_dir / "config.yaml").read_text()
    assert f"init: {elsewhere / 'start.pt'}" in saved  # absolute before the Flower app
