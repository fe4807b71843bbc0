"""A site's side of a run and the test round: FedBN's local normalisation layers, the site
trainers a process keeps, fine-tuning at the test round (and the pooled baseline's, which must
match it), the server's test round, and the demo's held-out test cases."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_fakes import Answer, FakeGrid, record
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fl_imaging.benchmark.all_test_cases import ALL_TEST_CASES_FILE, all_test_cases_metrics
from fl_imaging.config import ConfigError, DataName, RunConfig
from fl_imaging.config.compose import check_overrides
from fl_imaging.data.demo import make_demo_data
from fl_imaging.data.sites import load_site
from fl_imaging.evaluation.final_scoring import score_final_model
from fl_imaging.flower.site import client_app
from fl_imaging.flower.site.local_norms import LOCAL_NORMS, restore_local_norms, save_local_norms
from fl_imaging.run import run
from fl_imaging.training.baselines import train_pooled
from fl_imaging.training.model_checks import check_fedbn, norm_state_keys
from fl_imaging.training.site_training import (
    SiteRef,
    SiteTrainer,
    SiteTrainers,
    finetune_seed,
    training_seed,
)
from tasks import build_task

# --- FedBN at a site ----------------------------------------------------------------------------


@pytest.fixture
def demo_site(tmp_path: Path) -> Path:
    (site,) = make_demo_data(
        tmp_path / "demo",
        num_sites=1,
        cases_per_site=4,
        shape=(16, 16, 16),
        dicom_sites=(),
        test_cases=1,
    )
    return site


def _site_config(site: Path, *overrides: str) -> RunConfig:
    cfg = check_overrides(
        [
            "experiment=quick",
            "task.roi_size=[16,16,16]",
            "task.model.channels=[4,8]",
            "task.local_epochs=1",
            "task.model.norm=batch",
            *overrides,
        ]
    )
    cfg.data.sites = [str(site)]
    return cfg


def _message(kind: str, arrays: dict[str, torch.Tensor], **config: object) -> Message:
    return Message(
        content=RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord(config)}),
        message_type=kind,
        dst_node_id=1,
    )


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("fedbn", [True, False])
def test_fedbn_site_keeps_its_own_normalisation_layers(demo_site: Path, fedbn: bool) -> None:
    trainers = SiteTrainers()
    cfg = _site_config(demo_site, f"strategy.fedbn={str(fedbn).lower()}")
    app = client_app.build_client_app(cfg, trainers)
    context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    start = {k: v.clone() for k, v in build_task(cfg.task).build_model().state_dict().items()}

    reply = app(_message(MessageType.TRAIN, start, **{"server-round": 1}), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    (trainer,) = trainers.values()
    norms = norm_state_keys(trainer.model)
    assert any(k.endswith("running_mean") for k in norms)
    trained = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert (LOCAL_NORMS in context.state.array_records) == fedbn
    if fedbn:
        kept = context.state.array_records[LOCAL_NORMS].to_torch_state_dict()
        assert sorted(kept) == sorted(norms)
        assert all(torch.equal(kept[k], trained[k]) for k in norms)

    # the next global model: normalisation layers far from any site's, other weights moved
    sent = reply.content["arrays"].to_torch_state_dict()
    other = next(k for k in sent if k not in norms and sent[k].is_floating_point())
    weight = next(k for k in norms if k.endswith(".weight"))
    glob = {
        k: (torch.full_like(v, 7.0) if k in norms and v.is_floating_point() else v + 0.5)
        if v.is_floating_point()
        else v
        for k, v in sent.items()
    }
    reply = app(_message(MessageType.EVALUATE, glob), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content["metrics"]["num-examples"] == 1
    now = trainer.model.state_dict()
    assert torch.equal(now[other], glob[other])
    if fedbn:
        assert all(torch.equal(now[k], trained[k]) for k in norms)
        assert not torch.equal(now[weight], glob[weight])
    else:
        assert all(torch.equal(now[k], glob[k]) for k in norms)


@pytest.mark.usefixtures("task_identity")
def test_test_round_scores_the_global_model_and_keeps_it_after_fine_tuning(demo_site: Path) -> None:
    trainers = SiteTrainers()
    cfg = _site_config(demo_site)
    app = client_app.build_client_app(cfg, trainers)
    context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    glob = build_task(cfg.task).build_model().state_dict()
    msg = _message(MessageType.EVALUATE, glob, split="test", **{"finetune-epochs": 1})
    reply = app(msg, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = dict(reply.content["metrics"])
    assert metrics["num-examples"] == 1  # the demo's split.csv holds 1 test case out
    assert {"test_dice", "test_loss", "finetuned_dice", "finetuned_loss"} <= set(metrics)
    assert "dice" not in metrics and "val_loss" not in metrics
    assert metrics["test_loss"] != metrics["finetuned_loss"]  # fine-tuning changed the model
    # ... a copy of it: the site's model is the global model again afterwards
    (trainer,) = trainers.values()
    now = trainer.model.state_dict()
    assert all(torch.equal(now[k], glob[k]) for k in glob)


def test_site_trainer_state_is_a_copy_and_test_metrics_put_the_model_back(
    demo_site: Path,
) -> None:
    cfg = _site_config(demo_site)
    site = load_site(demo_site, "segmentation", val_fraction=0.34, seed=0)
    task = build_task(cfg.task)
    trainer = SiteTrainer("site-1", site.train, site.val, task, batch_size=1, test_cases=site.test)
    before = trainer.state()
    trainer.fit(1, seed=training_seed(0, 1, 0))
    after = trainer.state()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed  # training moved the model, not the earlier copy of its weights
    metrics = trainer.test_metrics(1, seed=finetune_seed(0, 0))
    assert {"test_dice", "finetuned_dice", "test_loss", "finetuned_loss"} <= set(metrics)
    assert metrics["test_loss"] != metrics["finetuned_loss"]
    now = trainer.state()
    assert all(torch.equal(now[k], after[k]) for k in after)
    no_test = SiteTrainer("site-2", site.train, site.val, task, batch_size=1)
    assert no_test.test_metrics(1, seed=0) == {}


def test_training_and_finetuning_seeds_never_collide() -> None:
    grid = [(seed, rnd, site) for seed in range(3) for rnd in range(1, 21) for site in range(8)]
    training = {training_seed(*key) for key in grid}
    finetuning = {finetune_seed(seed, site) for seed in range(3) for site in range(8)}
    assert len(training) == len(grid) and len(finetuning) == 24
    assert not training & finetuning


@pytest.mark.usefixtures("task_identity")
def test_pooled_baseline_fine_tunes_each_site_as_its_test_round_does(demo_site: Path) -> None:
    """The pooled model's ``finetuned_*`` rows are what a site's test round reports for that
    model: same cases, same seed, same epochs."""
    trainers = SiteTrainers()
    cfg = _site_config(demo_site, "engine.rounds=1")
    site = load_site(demo_site, "segmentation", val_fraction=cfg.data.val_fraction, seed=cfg.seed)
    rows, model = train_pooled(cfg, [site], finetune_epochs=1)
    metrics = {r.metric: r.value for r in rows if r.site == site.name}
    assert metrics["num_test"] == 1 and {"test_dice", "finetuned_dice"} <= set(metrics)
    app = client_app.build_client_app(cfg, trainers)
    context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    msg = _message(MessageType.EVALUATE, model.state_dict(), split="test", **{"finetune-epochs": 1})
    reply = app(msg, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    site_metrics = reply.content["metrics"]
    for name in ("test_dice", "test_loss", "finetuned_dice", "finetuned_loss"):
        assert site_metrics[name] == pytest.approx(metrics[name], rel=1e-4, abs=1e-5), name


@pytest.mark.usefixtures("task_identity")
def test_a_site_process_keeps_only_the_current_runs_trainers(demo_site: Path) -> None:
    trainers = SiteTrainers()
    context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    site = SiteRef.of_node(context.node_config, [str(demo_site)])
    first = trainers.get(_site_config(demo_site), site)
    assert trainers.get(_site_config(demo_site), site) is first  # same run: reused
    second = trainers.get(_site_config(demo_site, "seed=1"), site)
    assert second is not first and list(trainers.values()) == [second]


def test_local_norms_round_trip_through_the_context() -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2), torch.nn.GroupNorm(1, 2)
    )
    assert norm_state_keys(model) == [
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
        "2.weight",
        "2.bias",
    ]
    context = Context(1, 1, {}, RecordDict(), {})
    assert not restore_local_norms(model, context)
    torch.nn.init.constant_(model[1].weight, 3.0)
    save_local_norms(model, context)
    torch.nn.init.constant_(model[1].weight, -1.0)
    torch.nn.init.constant_(model[0].weight, 5.0)
    assert restore_local_norms(model, context)
    assert torch.all(model[1].weight == 3.0) and torch.all(model[0].weight == 5.0)
    assert norm_state_keys(torch.nn.Sequential(torch.nn.InstanceNorm3d(2))) == []


def test_fedbn_needs_a_model_with_normalisation_parameters(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # the run folder (partition.csv)
    cfg = check_overrides(
        [
            "experiment=quick",
            "strategy.fedbn=true",
            "data.cases_per_site=3",
            "data.shape=[12,12,12]",
            f"data.root={tmp_path / 'demo'}",
        ]
    )
    with pytest.raises(ConfigError, match=r"task\.model\.norm=null.*task\.model\.norm=batch"):
        run(cfg)  # refused before the engine starts
    check_fedbn(check_overrides(["strategy.fedbn=true", "task.model.norm=batch"]))
    check_fedbn(check_overrides(["task=classification", "strategy.fedbn=true"]))  # DenseNet


def test_all_test_cases_of_a_cell_without_its_models_says_which_file(
    tmp_path: Path, demo_site: Path
) -> None:
    cfg = _site_config(demo_site)
    cfg.data.name = DataName.folders
    for kind, lacking in (("pooled", "model.pt"), ("local", "SITE.pt")):
        with pytest.raises(FileNotFoundError, match=lacking):
            all_test_cases_metrics(cfg, tmp_path, kind)
    assert not (tmp_path / ALL_TEST_CASES_FILE).exists()


# --- the test round on the server ---------------------------------------------------------------


class ScoringGrid(FakeGrid):
    """Sites 1 and 2 score the model; site 2 has an AUC-like NaN; site 3 fails."""

    def __init__(self) -> None:
        super().__init__(3, lambda n, r, s: s)
        self.configs: list[dict] = []

    def answer(self, msg: Message, site: int) -> Answer:
        assert msg.metadata.message_type == MessageType.EVALUATE
        self.configs.append(dict(msg.content["config"]))
        if site == 3:
            return Message(Error(code=0, reason="out of memory"), reply_to=msg)
        metrics = {
            "num-examples": 3 if site == 1 else 1,
            "test_dice": 0.8 if site == 1 else 0.4,
            "test_auc": 0.9 if site == 1 else math.nan,
            "finetuned_dice": 0.9 if site == 1 else 0.5,
            "unit-weight": 1,
        }
        content = RecordDict(
            {"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": f"hospital-{site}"})}
        )
        return Message(content, reply_to=msg)


@pytest.mark.usefixtures("task_identity")
def test_final_test_round_rows_per_site_weighted_mean_and_failures() -> None:
    grid = ScoringGrid()
    rows, failures = score_final_model(
        grid, record({"w": np.zeros(3, np.float32)}), 5, finetune_epochs=2, timeout=10
    )
    assert grid.configs == [{"split": "test", "finetune-epochs": 2}] * 3
    table = {(r.site, r.metric): r.value for r in rows}
    assert {r.round for r in rows} == {5}
    assert table[("hospital-1", "test_dice")] == 0.8 and table[("hospital-2", "num_test")] == 1
    assert math.isnan(table[("hospital-2", "test_auc")])
    assert ("hospital-1", "unit-weight") not in table
    assert table[("all", "test_dice")] == pytest.approx((3 * 0.8 + 0.4) / 4)
    assert table[("all", "finetuned_dice")] == pytest.approx((3 * 0.9 + 0.5) / 4)
    assert table[("all", "test_auc")] == pytest.approx(0.9)  # the NaN site left out
    unnamed = f"node-{grid.node_of[3]}"  # it never replied with its name: Flower's node id
    assert not [k for k in table if k[0] == unnamed]
    assert failures == [(5, unnamed, "test round: out of memory")]


# --- the demo's test cases ----------------------------------------------------------------------


def test_demo_test_cases_are_held_out_in_split_csv(tmp_path: Path) -> None:
    sites = make_demo_data(
        tmp_path, num_sites=2, cases_per_site=5, shape=(12, 12, 12), dicom_sites=(), test_cases=2
    )
    for site in sites:
        lines = (site / "split.csv").read_text().splitlines()
        assert lines[0] == "case_id,split" and len(lines) == 3
        data = load_site(site, "segmentation", val_fraction=0.34, seed=0)
        assert sorted(c.case_id for c in data.test) == [
            f"{site.name.replace('-', '')}-case{c:03d}" for c in (3, 4)
        ]
        assert len(data.train) == 2 and len(data.val) == 1
    # without test cases, no split.csv: every case is for training and validation
    (plain,) = make_demo_data(
        tmp_path / "plain", num_sites=1, cases_per_site=3, shape=(12, 12, 12), dicom_sites=()
    )
    assert not (plain / "split.csv").exists()
    assert load_site(plain, "segmentation", val_fraction=0.34, seed=0).test == []


def test_processes_serving_a_site_decode_each_case_once_through_the_shared_folder(
    demo_site: Path, tmp_path: Path
) -> None:
    cfg = _site_config(demo_site)
    site = load_site(demo_site, "segmentation", val_fraction=0.34, seed=0)
    task = build_task(cfg.task)
    shared = tmp_path / "decoded"
    shared.mkdir()

    def trainer(folder: Path | None) -> SiteTrainer:
        return SiteTrainer(
            "site-1",
            site.train,
            site.val,
            task,
            batch_size=1,
            test_cases=site.test,
            decoded_cache=folder,
        )

    first, second, alone = trainer(shared), trainer(shared), trainer(None)
    cases = len(site.train) + len(site.val) + len(site.test)
    assert first.cases_reused == 0 and second.cases_reused == cases
    assert len(list(shared.glob("*.pt"))) == cases
    for split in ("val_data", "test_data"):
        for i in range(len(getattr(alone, split))):
            a, b = getattr(second, split)[i], getattr(alone, split)[i]
            for key in ("image", "label"):
                assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), (split, key)
    # Training from the shared folder is training from the files: same seed, same weights.
    alone.load_state(second.state())
    second.fit(1, seed=training_seed(0, 1, 0))
    alone.fit(1, seed=training_seed(0, 1, 0))
    a, b = second.state(), alone.state()
    assert all(torch.equal(a[k], b[k]) for k in a)
