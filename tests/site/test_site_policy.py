"""A site's own policy (fl_imaging/site/policy.py), enforced at the site
(fl_imaging/flower/site/gate.py): every key accepted and refused with its message, the site's
own record of what it answered and refused, and a run that stops with the site's reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_runs import run_cli
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from local_runs import sites_in_process

from fl_imaging.config import RunConfig
from fl_imaging.config.compose import check_overrides
from fl_imaging.data.demo import make_demo_data
from fl_imaging.flower.protocol import SiteError
from fl_imaging.flower.site import client_app
from fl_imaging.review.results import SitesFailed
from fl_imaging.review.site_record import SiteRecord
from fl_imaging.run import run
from fl_imaging.site.policy import (
    PolicyError,
    PolicyRefusal,
    check_request,
    check_rounds,
    load_policy,
    release_metrics,
    required_protections,
    training_config_hash,
)
from fl_imaging.training.site_training import SiteTrainers
from tasks import build_task

pytestmark = pytest.mark.usefixtures("task_identity")


def policy_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


def config(*overrides: str) -> RunConfig:
    return check_overrides(["experiment=quick", *overrides])


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("secure_aggregaton:\n  required: true\n", "unknown key 'secure_aggregaton'"),
        ("max_rounds: many\n", "invalid value 'many' for 'max_rounds'"),
        ("secure_aggregation:\n  min_sites: 1\n", "min_sites must be at least 2"),
        ("dp_sgd:\n  delta: 2\n", "dp_sgd.delta must lie between 0 and 1"),
        ("release: [\n", "cannot be read as YAML"),
    ],
)
def test_a_policy_file_that_cannot_be_used_names_the_file_and_the_key(
    tmp_path: Path, text: str, words: str
) -> None:
    path = policy_file(tmp_path, text)
    with pytest.raises(PolicyError, match=f"site policy {path}: .*{words}"):
        load_policy(path)
    with pytest.raises(PolicyError, match="no such file"):
        load_policy(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("text", "overrides", "key", "words"),
    [
        ("accept:\n  tasks: [classification]\n", [], "accept.tasks", "task is segmentation"),
        ("accept:\n  strategies: [fedprox]\n", [], "accept.strategies", "strategy is fedavg"),
        ("accept:\n  models: [segresnet]\n", [], "accept.models", "model is unet"),
        ("accept:\n  config_hashes: [abc]\n", [], "accept.config_hashes", "has SHA-256"),
        ("max_rounds: 1\n", [], "max_rounds", "asks for 2 rounds, more than 1"),
        ("dp_sgd:\n  required: true\n", [], "dp_sgd.required", "does not train with DP-SGD"),
        ("release:\n  case_counts: false\n", [], "release.case_counts", "weighs sites by"),
        (
            "secure_aggregation:\n  required: true\n",
            [],
            "secure_aggregation.required",
            "asked for this site's update unmasked",
        ),
        (
            "protection:\n  required: [secure_aggregation, homomorphic_encryption]\n",
            [],
            "protection.required",
            "only under secure aggregation .* or homomorphic encryption",
        ),
    ],
)
def test_every_policy_key_refuses_with_its_name_and_accepts_what_it_allows(
    tmp_path: Path, text: str, overrides: list[str], key: str, words: str
) -> None:
    policy = load_policy(policy_file(tmp_path, text))
    cfg = config(*overrides)
    with pytest.raises(PolicyRefusal, match=f"policy {key} .*: .*{words}"):
        check_request(policy, cfg, training=True, masked=False)
    allowed = {
        "accept.tasks": config("task=classification", "data=mednist"),
        "accept.strategies": config("strategy=fedprox"),
        "accept.models": config("task.model.name=segresnet"),
        "max_rounds": config("engine.rounds=1"),
        "dp_sgd.required": config("task.dp_sgd.enabled=true", "task.dp_sgd.noise_multiplier=1"),
        "release.case_counts": config(
            "strategy.secagg.enabled=true", "strategy.secagg.weighting=equal"
        ),
        "secure_aggregation.required": cfg,
        "protection.required": cfg,
    }
    if key == "accept.config_hashes":
        digest = training_config_hash(cfg)
        policy = load_policy(policy_file(tmp_path, f"accept:\n  config_hashes: [{digest}]\n"))
        allowed[key] = cfg
    masked = key in ("secure_aggregation.required", "protection.required")
    check_request(policy, allowed[key], training=True, masked=masked)  # no refusal
    if key == "protection.required":  # either protection will do
        check_request(policy, cfg, training=True, masked=False, encrypted=True)


def test_protection_required_extends_secure_aggregation_required(tmp_path: Path) -> None:
    only_he = load_policy(
        policy_file(tmp_path, "protection:\n  required: [homomorphic_encryption]\n")
    )
    with pytest.raises(PolicyRefusal, match="protection.required .*homomorphic encryption"):
        check_request(only_he, config(), training=True, masked=True)
    check_request(only_he, config(), training=True, masked=False, encrypted=True)
    both = load_policy(
        policy_file(
            tmp_path,
            "secure_aggregation:\n  required: true\nprotection:\n"
            "  required: [homomorphic_encryption]\n",
        )
    )
    assert required_protections(both) == ["secure_aggregation", "homomorphic_encryption"]
    check_request(both, config(), training=False, masked=False)  # evaluation carries no update
    with pytest.raises(PolicyError, match="protection.required: unknown masking"):
        load_policy(policy_file(tmp_path, "protection:\n  required: [masking]\n"))


def test_rounds_are_counted_by_the_site_and_metrics_cut_to_what_it_releases(
    tmp_path: Path,
) -> None:
    policy = load_policy(
        policy_file(
            tmp_path,
            "max_rounds: 2\nrelease:\n  losses: false\n  case_counts: false\n"
            "  privacy_details: false\n",
        )
    )
    check_rounds(policy, 1)
    with pytest.raises(PolicyRefusal, match="policy max_rounds .*trained in 2 round"):
        check_rounds(policy, 2)
    metrics = {
        "train_loss": 0.4,
        "val_loss": 0.5,
        "dice": 0.8,
        "num-examples": 42,
        "patient_noise": 1.1,
        "patient_sample_rate": 0.05,
        "patient_steps": 20,
        "patient_epsilon": 3.0,
    }
    assert release_metrics(policy, metrics) == {
        "dice": 0.8,
        "num-examples": 1.0,
        "patient_epsilon": 3.0,
    }
    assert release_metrics(policy, {"num-examples": 0})["num-examples"] == 0.0  # no training


@pytest.fixture(scope="module")
def demo_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    (site,) = make_demo_data(
        tmp_path_factory.mktemp("demo"), num_sites=1, cases_per_site=6, shape=(16, 16, 16)
    )
    return site


class Site:
    """A simulated site's ClientApp on its own context (partition 0)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.app = client_app.build_client_app(cfg, SiteTrainers())
        self.context = Context(7, 1, {"partition-id": 0}, RecordDict(), {})
        self.weights = {
            k: v.clone() for k, v in build_task(cfg.task).build_model().state_dict().items()
        }

    def ask(self, kind: str, rnd: int) -> Message:
        content = RecordDict(
            {"arrays": ArrayRecord(self.weights), "config": ConfigRecord({"server-round": rnd})}
        )
        return self.app(Message(content=content, message_type=kind, dst_node_id=1), self.context)


def site_config(site: Path, policy: Path) -> RunConfig:
    cfg = config("task.roi_size=[16,16,16]", "task.model.channels=[4,8]", "task.local_epochs=1")
    cfg.data.sites = [str(site)]
    cfg.site.policy = str(policy)
    return cfg


def test_the_site_enforces_its_policy_and_records_every_answer_and_refusal(
    demo_site: Path, tmp_path: Path
) -> None:
    policy = policy_file(tmp_path, "release:\n  losses: false\nmax_rounds: 2\n")
    site = Site(site_config(demo_site, policy))
    for rnd in (1, 2):
        reply = site.ask(MessageType.TRAIN, rnd)
        assert not reply.has_error() and "train_loss" not in reply.content["metrics"]
    evaluation = site.ask(MessageType.EVALUATE, 2)
    assert (
        "val_loss" not in evaluation.content["metrics"] and "dice" in evaluation.content["metrics"]
    )
    with pytest.raises(SiteError, match=r"\[site site-1\] refused: policy max_rounds"):
        site.ask(MessageType.TRAIN, 3)  # a third round of this Flower run: counted by the site
    (path,) = (tmp_path / "site-state").glob("site-1-*/site-record.jsonl")
    records = SiteRecord(path, "site-1").records()
    assert [(r["type"], r["round"]) for r in records] == [
        ("train", 1),
        ("train", 2),
        ("evaluate", 2),
        ("train", 3),
    ]
    assert all(len(r["reply_sha256"]) == 64 for r in records[:3])
    assert "policy max_rounds" in records[3]["refusal"] and records[3]["flower_run"] == 1
    assert [r["prev"] for r in records[1:]] == [r["hash"] for r in records[:-1]]  # chained
    path.write_text(path.read_text()[:-10])  # a damaged record: the site answers no more
    with pytest.raises(SiteError, match="cannot append to its record"):
        site.ask(MessageType.EVALUATE, 3)
    assert torch.is_tensor(next(iter(site.weights.values())))


def test_a_run_a_sites_policy_refuses_stops_with_the_sites_reason(tmp_path: Path) -> None:
    policy = policy_file(tmp_path, "secure_aggregation:\n  required: true\n")
    cfg = check_overrides(
        [
            "experiment=quick",
            f"data.root={tmp_path / 'demo'}",
            f"+site.policies.site-2={policy}",
        ]
    )
    cfg.run_dir = str(tmp_path / "run")
    with (
        pytest.raises(
            SitesFailed, match="round 1: site site-2 refused: policy secure_aggregation.required"
        ),
        sites_in_process(),  # the real sites, in this process (local_runs.py)
    ):
        run(cfg)
    summary = (tmp_path / "run" / "summary.txt").read_text()
    assert "secure_aggregation.required" in summary


def test_check_policy_prints_the_hash_and_the_verdict_as_the_readme_shows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fl_imaging.cli.deploy import main

    monkeypatch.chdir(tmp_path)
    policy_file(tmp_path, "secure_aggregation:\n  required: true\n")
    secure = ["experiment=quick", "strategy.secagg.enabled=true"]
    assert main(["check-policy", "site.yaml", *secure]) == 0
    out = capsys.readouterr().out
    digest = training_config_hash(config("strategy.secagg.enabled=true"))
    assert f"config hash (task and strategy, SHA-256): {digest}" in out
    assert "accepted by site.yaml" in out
    assert main(["check-policy", "site.yaml", "experiment=quick"]) == 1
    assert "refused: policy secure_aggregation.required" in capsys.readouterr().out
    assert main(["check-policy", "missing.yaml", "experiment=quick"]) == 2


def test_fl_imaging_deploy_check_policy_as_a_command(tmp_path: Path) -> None:
    """The command itself (its own process, :mod:`cli_runs`): exit 0 when the policy accepts
    the run, 1 when it refuses it."""
    policy_file(tmp_path, "secure_aggregation:\n  required: true\n")
    command = ("fl-imaging-deploy", "check-policy", "site.yaml", "experiment=quick")
    accepted = run_cli(*command, "strategy.secagg.enabled=true", cwd=tmp_path)
    assert "accepted by site.yaml" in accepted.stdout
    refused = run_cli(*command, cwd=tmp_path, expect=1)
    assert "refused: policy secure_aggregation.required" in refused.stdout
