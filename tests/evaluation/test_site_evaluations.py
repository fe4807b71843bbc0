"""Cross-site evaluation and site contributions: leave-one-out aggregates on hand-made updates
against direct computations, the whole server side driven in-process by a fake Grid whose
sites score models by their distance to a target (a site sending noise gets the lowest
contribution; every figure equals its direct computation), a real site's fine-tuned model
scoring exactly what its test round reported, the refusals, and a real simulation run."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import run_cli
from flower_fakes import Answer, FakeGrid, numpy_of, record
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
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedMedian
from local_runs import local_run

from fl_imaging.config import ConfigError, RunConfig
from fl_imaging.config.compose import check_overrides
from fl_imaging.data.demo import make_demo_data
from fl_imaging.data.sites import load_site
from fl_imaging.evaluation.files import CrossSiteRow, cross_site_line
from fl_imaging.evaluation.site_evaluations import check_test_cases
from fl_imaging.evaluation.site_scoring import (
    FINETUNE_ACTION,
    MODEL_PREFIX,
    SCORE_ACTION,
    SCORES_PREFIX,
)
from fl_imaging.flower.coordinator.federation import plan_federation
from fl_imaging.flower.coordinator.server_app import run_federation
from fl_imaging.flower.protocol import site_reply
from fl_imaging.flower.site import client_app
from fl_imaging.review.audit import AUDIT_FILE, verify_run
from fl_imaging.review.results import read_metrics
from strategies.last_updates import LastUpdates
from strategies.wrapper import wrapper_chain

pytestmark = pytest.mark.usefixtures("task_identity")

Arrays = dict[str, np.ndarray]

# --- leave-one-out on hand-made updates ------------------------------------------------------


def _train_reply(node: int, arrays: Arrays, cases: int) -> Message:
    sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    metrics = {"num-examples": cases, "train_loss": 1.0}
    return site_reply(sent, f"site-{node}", metrics, record(arrays))


def _round(inner, updates: dict[int, tuple[Arrays, int]], start: Arrays) -> LastUpdates:  # type: ignore[no-untyped-def]
    keeper = LastUpdates(inner)
    list(keeper.configure_train(1, record(start), ConfigRecord({}), FakeGrid(3, lambda *a: a[2])))
    replies = [_train_reply(node, arrays, cases) for node, (arrays, cases) in updates.items()]
    keeper.aggregate_train(1, replies)
    return keeper


HAND_MADE = {
    1: ({"w": np.array([1.0, 2.0, 3.0]), "n": np.array(4, np.int64)}, 10),
    2: ({"w": np.array([4.0, -2.0, 0.0]), "n": np.array(4, np.int64)}, 30),
    3: ({"w": np.array([10.0, 0.0, 6.0]), "n": np.array(4, np.int64)}, 60),
}
START = {"w": np.zeros(3), "n": np.array(0, np.int64)}


def test_leave_one_out_with_fedavg_is_the_weighted_mean_of_the_others() -> None:
    keeper = _round(FedAvg(), HAND_MADE, START)
    assert keeper.round == 1 and sorted(keeper.replies) == ["site-1", "site-2", "site-3"]
    for left_out in (1, 2, 3):
        others = [HAND_MADE[n] for n in (1, 2, 3) if n != left_out]
        direct = sum(c * a["w"] for a, c in others) / sum(c for _, c in others)
        got = keeper.aggregate([f"site-{left_out}"])
        assert got is not None
        np.testing.assert_allclose(got["w"], direct, rtol=1e-12)
        assert got["n"].dtype == np.int64 and int(got["n"]) == 4  # the global model's dtype
    everyone = keeper.aggregate()
    assert everyone is not None
    direct = sum(c * a["w"] for a, c in HAND_MADE.values()) / 100
    np.testing.assert_allclose(everyone["w"], direct, rtol=1e-12)
    assert keeper.aggregate(["site-1", "site-2", "site-3"]) is None


def test_leave_one_out_with_the_median_is_the_median_of_the_others() -> None:
    keeper = _round(FedMedian(), HAND_MADE, START)
    got = keeper.aggregate(["site-3"])
    assert got is not None
    np.testing.assert_allclose(got["w"], np.median([[1.0, 2.0, 3.0], [4.0, -2.0, 0.0]], axis=0))
    full = keeper.aggregate()
    assert full is not None
    np.testing.assert_allclose(full["w"], [4.0, 0.0, 3.0])


def test_leave_one_out_leaves_a_stateful_aggregator_as_it_was() -> None:
    inner = FedAvgM(server_learning_rate=1.0, server_momentum=0.9)
    keeper = LastUpdates(inner)
    grid = FakeGrid(3, lambda *a: a[2])
    start = record(START)
    list(keeper.configure_train(1, start, ConfigRecord({}), grid))
    replies = [_train_reply(n, a, c) for n, (a, c) in HAND_MADE.items()]
    aggregate, _ = keeper.aggregate_train(1, replies)
    assert aggregate is not None
    momentum = [m.copy() for m in inner.momentum_vector] if inner.momentum_vector else None
    loo = keeper.aggregate(["site-2"])
    again = keeper.aggregate()
    assert loo is not None and again is not None
    # the aggregate of everyone, re-computed, is the round's own
    np.testing.assert_allclose(again["w"], numpy_of(aggregate)["w"])
    assert not np.allclose(loo["w"], again["w"])
    now = inner.momentum_vector
    assert momentum is not None and now is not None
    assert all(np.array_equal(a, b) for a, b in zip(momentum, now, strict=True))


# --- the server side in-process --------------------------------------------------------------

NOISE_NODE = 3


class EvaluatingGrid(FakeGrid):
    """Sites 1-3 move the model half-way to a target; site 3 sends noise instead. A model's
    ``dice`` at site n is ``1 / (1 + mean |w - target|) + n / 100`` (site n's cases are a little
    easier); test-round evaluations and score queries both use it. ``test_cases[n] = 0``: site n
    has none."""

    def __init__(
        self, target: Arrays, test_cases: dict[int, int] | None = None, refuse: str = ""
    ) -> None:
        super().__init__(3, self._respond)
        self.target = target
        self.test_cases = test_cases or {}
        self.refuse = refuse  # every site answers this query action with an error
        self.replied: dict[int, dict[int, Arrays]] = {}
        self.queries: list[str] = []

    def _respond(self, site: int, rnd: int, sent: Arrays) -> Arrays:
        rng = np.random.default_rng(rnd * 10 + site)
        out = {}
        for k, v in sent.items():
            if not np.issubdtype(v.dtype, np.floating):
                out[k] = v
            elif site == NOISE_NODE:
                out[k] = (v + rng.normal(0.0, 3.0, v.shape)).astype(v.dtype)
            else:
                out[k] = (v + 0.5 * (self.target[k] - v)).astype(v.dtype)
        self.replied.setdefault(rnd, {})[site] = out
        return out

    def score(self, arrays: Arrays, site: int) -> float:
        keys = [k for k, v in self.target.items() if np.issubdtype(v.dtype, np.floating)]
        gap = np.concatenate([np.abs(arrays[k] - self.target[k]).ravel() for k in keys]).mean()
        return float(1.0 / (1.0 + gap) + site / 100)

    def answer(self, msg: Message, site: int) -> Answer:
        kind = msg.metadata.message_type
        config = msg.content.config_records.get("config", ConfigRecord())
        cases = self.test_cases.get(site, 2)
        if self.refuse and kind == f"query.{self.refuse}":
            return Message(Error(0, f"[site site-{site}] MemoryError: out of memory"), reply_to=msg)
        if kind == MessageType.EVALUATE and config.get("split") == "test":
            dice = self.score(numpy_of(msg.content["arrays"]), site)
            metrics = {"num-examples": cases, "test_dice": dice, "finetuned_dice": dice}
            return site_reply(msg, f"site-{site}", metrics if cases else {})
        if kind == f"query.{FINETUNE_ACTION}":
            self.queries.append(kind)
            tuned = self._respond(site, 99, numpy_of(msg.content["arrays"]))
            return site_reply(msg, f"site-{site}", {"num-examples": 3}, record(tuned))
        if kind == f"query.{SCORE_ACTION}":
            self.queries.append(f"{kind}:{config['split']}")
            split_cases = cases if config["split"] == "test" else 4
            reply = site_reply(msg, f"site-{site}", {"num-examples": split_cases})
            for key, rec in msg.content.array_records.items():
                if split_cases:
                    label = key.removeprefix(MODEL_PREFIX)
                    dice = self.score(numpy_of(rec), site)
                    reply.content[SCORES_PREFIX + label] = _scores(dice)
            return reply
        return super().answer(msg, site)


def _scores(dice: float) -> MetricRecord:
    return MetricRecord({"dice": dice, "loss": 1.0 - dice})


def _cfg(tmp_path: Path, *overrides: str) -> RunConfig:
    cfg = check_overrides(["experiment=quick", "engine.rounds=2", "engine.num_sites=3", *overrides])
    return replace(cfg, run_dir=str(tmp_path))


def _target(cfg: RunConfig) -> Arrays:
    plan = plan_federation(cfg, [])
    assert plan.strategy.global_arrays is not None
    start = numpy_of(plan.strategy.global_arrays)
    return {k: (v + 0.3 if np.issubdtype(v.dtype, np.floating) else v) for k, v in start.items()}


def _fedavg(models: list[Arrays]) -> Arrays:
    return {k: np.mean([m[k] for m in models], axis=0) for k in models[0]}  # equal cases


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_site_sending_noise_contributes_least_and_every_figure_is_direct(
    tmp_path: Path,
) -> None:
    cfg = _cfg(tmp_path, "engine.contributions=true")
    grid = EvaluatingGrid(_target(cfg))
    plan = plan_federation(cfg, [])
    run_federation(grid, cfg, [], plan)
    assert grid.queries == [f"query.{SCORE_ACTION}:val"] * 3  # validation cases, never test
    table = {row["site"]: row for row in _csv(tmp_path / "contributions.csv")}
    assert sorted(table) == ["site-1", "site-2", "site-3"]
    # direct: FedAvg (equal case counts) of round 2's replies, with and without each site,
    # scored at each of the 3 sites, averaged over the sites
    last = grid.replied[2]

    def utility(model: Arrays) -> float:
        return float(np.mean([grid.score(model, node) for node in (1, 2, 3)]))

    full = utility(_fedavg([last[n] for n in (1, 2, 3)]))
    for node in (1, 2, 3):
        row = table[f"site-{node}"]
        without = utility(_fedavg([last[n] for n in (1, 2, 3) if n != node]))
        assert row["method"] == "leave-one-out" and row["round"] == "2"
        assert row["metric"] == "dice" and row["aggregator"] == "fedavg"
        assert row["scored_on"].endswith("site-1 (4), site-2 (4), site-3 (4)")
        assert float(row["with_site"]) == pytest.approx(full, rel=1e-4)
        assert float(row["without_site"]) == pytest.approx(without, rel=1e-4)
        assert float(row["contribution"]) == pytest.approx(full - without, abs=1e-5)
    contributions = {site: float(row["contribution"]) for site, row in table.items()}
    assert min(contributions, key=contributions.__getitem__) == f"site-{NOISE_NODE}"
    assert contributions[f"site-{NOISE_NODE}"] < 0 < contributions["site-1"]
    summary = (tmp_path / "summary.txt").read_text()
    assert "site contributions (leave-one-out over round 2's updates, fedavg" in summary
    assert f"site-{NOISE_NODE} {contributions[f'site-{NOISE_NODE}']:+.4f}" in summary
    assert "from each site's update of round 2 (seen in the clear)" in summary
    assert not (tmp_path / "cross_site.csv").exists()


@pytest.mark.parametrize("epochs", [1, 0])
def test_cross_site_matrix_scores_every_model_at_every_site(tmp_path: Path, epochs: int) -> None:
    cfg = _cfg(tmp_path, "engine.cross_site=true", f"engine.finetune_epochs={epochs}")
    grid = EvaluatingGrid(_target(cfg), test_cases={2: 0})  # site-2 has no test cases
    plan = plan_federation(cfg, [])
    run_federation(grid, cfg, [], plan)
    asked = [f"query.{FINETUNE_ACTION}"] * 3 if epochs else []
    assert grid.queries == [*asked, *[f"query.{SCORE_ACTION}:test"] * 3]
    rows = [r for r in _csv(tmp_path / "cross_site.csv") if r["metric"] == "dice"]
    matrix = {(r["model"], r["site"]): float(r["value"]) for r in rows}
    assert set(matrix) == {
        (m, s) for m in ("global", "site-1", "site-2", "site-3") for s in ("site-1", "site-3")
    }
    # the global row is the test round's figure at every site (cross-site implied the test round)
    tested = {
        r.site: r.value for r in read_metrics(tmp_path / "metrics.csv") if r.metric == "test_dice"
    }
    for site in ("site-1", "site-3"):
        assert matrix[("global", site)] == pytest.approx(tested[site], rel=1e-5)
    # each site's model, scored directly: fine-tuned (the fake's round "99"), or its last reply
    for node in (1, 2, 3):
        own = grid.replied[99 if epochs else 2][node]
        for scorer in (1, 3):
            assert matrix[(f"site-{node}", f"site-{scorer}")] == pytest.approx(
                grid.score(own, scorer), rel=1e-5
            )
    kinds = {r["model"]: r["kind"] for r in rows}
    assert kinds["global"] == "global model"
    assert kinds["site-1"] == (
        "fine-tuned 1 epoch(s) at site-1" if epochs else "last local model of round 2 at site-1"
    )
    summary = (tmp_path / "summary.txt").read_text()
    assert "cross-site evaluation (test dice, 4 models x 2 sites" in summary
    assert "site-2 have no test cases, so no model was scored there" in summary
    travelled = "fine-tuned model went to the coordinator" if epochs else "last local model"
    assert travelled in summary
    assert (tmp_path / "cross_site.png").stat().st_size > 1000
    # the audit log says what went where and holds the matrix's hash: a changed figure is named
    records = [json.loads(line) for line in (tmp_path / AUDIT_FILE).read_text().splitlines()]
    evaluations = [r for r in records if r["event"] == "site_evaluations"]
    assert len(evaluations) == 1 and "cross-site evaluation" in evaluations[0]["summary"][0]
    assert "cross_site.csv" in records[-1]["files"] and verify_run(tmp_path).ok
    matrix_file = tmp_path / "cross_site.csv"
    matrix_file.write_text(matrix_file.read_text().replace("global", "globa1", 1))
    assert "cross_site.csv: sha256" in (verify_run(tmp_path).problem or "")


def test_sites_that_fail_to_score_are_named_and_the_run_ends_with_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(tmp_path, "engine.cross_site=true", "engine.contributions=true")
    grid = EvaluatingGrid(_target(cfg), refuse=SCORE_ACTION)
    run_federation(grid, cfg, [], plan_federation(cfg, []))
    summary = (tmp_path / "summary.txt").read_text()
    assert "cross-site evaluation: no site sent a test dice (see the failures above)" in summary
    for node in (1, 2, 3):
        assert (
            f"round 2: site site-{node} failed: cross-site evaluation: scoring (test): "
            f"[site site-{node}] MemoryError: out of memory" in summary
        )
        assert f"site contributions: scoring (val): [site site-{node}]" in summary
    rows = _csv(tmp_path / "contributions.csv")
    assert [r["note"] for r in rows] == ["the models were not scored (see the failures)"] * 3
    assert _csv(tmp_path / "cross_site.csv") == [] and not (tmp_path / "cross_site.png").exists()
    # a step that breaks is named, and the run's own files are still written
    from fl_imaging.evaluation import site_evaluations

    def broken(*args: object) -> None:
        raise RuntimeError("matrix exploded")

    monkeypatch.setattr(site_evaluations, "cross_site_evaluation", broken)
    again = tmp_path / "again"
    run_federation(EvaluatingGrid(_target(cfg)), replace(cfg, run_dir=str(again)), [])
    summary = (again / "summary.txt").read_text()
    assert "cross-site evaluation failed: RuntimeError: matrix exploded" in summary
    assert (again / "model.pt").is_file() and (again / "contributions.csv").is_file()


def test_cross_site_line_means_of_the_diagonal_and_the_rest() -> None:
    rows = [
        CrossSiteRow(model, "k", site, "dice", value, 1)
        for (model, site), value in {
            ("global", "a"): 0.5,
            ("global", "b"): 0.7,
            ("a", "a"): 0.9,
            ("a", "b"): 0.3,
            ("b", "a"): 0.1,
            ("b", "b"): 0.8,
        }.items()
    ]
    line = cross_site_line(rows, "dice")
    assert "global model 0.6000" in line and "0.8500 at its own site, 0.2000 at the other" in line


# --- a real site: its fine-tuned model is the one its test round scored --------------------


def test_a_sites_fine_tuned_model_scores_what_its_test_round_reported(tmp_path: Path) -> None:
    (site,) = make_demo_data(
        tmp_path / "demo",
        num_sites=1,
        cases_per_site=5,
        shape=(16, 16, 16),
        dicom_sites=(),
        test_cases=2,
    )
    cfg = check_overrides(
        ["experiment=quick", "task.roi_size=[16,16,16]", "task.model.channels=[4,8]", "seed=3"]
    )
    cfg.data.sites = [str(site)]
    app = client_app.build_client_app(cfg)
    context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    torch.manual_seed(1)
    from tasks import build_task

    glob = ArrayRecord(build_task(cfg.task).build_model().state_dict())

    def ask(kind: str, content: dict) -> Message:
        msg = Message(RecordDict(content), dst_node_id=1, message_type=kind)
        reply = app(msg, context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        return reply

    config = ConfigRecord({"split": "test", "finetune-epochs": 2})
    tested = ask(MessageType.EVALUATE, {"arrays": glob, "config": config}).content["metrics"]
    tuned = ask(
        f"query.{FINETUNE_ACTION}",
        {"arrays": glob, "config": ConfigRecord({"finetune-epochs": 2})},
    ).content["arrays"]
    scores = ask(
        f"query.{SCORE_ACTION}",
        {
            f"{MODEL_PREFIX}global": glob,
            f"{MODEL_PREFIX}site-1": tuned,
            "config": ConfigRecord({"split": "test", "site-norms": ["global"]}),
        },
    ).content
    assert scores["metrics"]["num-examples"] == 2
    assert scores[f"{SCORES_PREFIX}global"]["dice"] == tested["test_dice"]
    assert scores[f"{SCORES_PREFIX}site-1"]["dice"] == tested["finetuned_dice"]
    assert scores[f"{SCORES_PREFIX}site-1"]["loss"] == tested["finetuned_loss"]
    assert tested["finetuned_loss"] != tested["test_loss"]  # fine-tuning changed the model
    val = ask(
        f"query.{SCORE_ACTION}",
        {f"{MODEL_PREFIX}global": glob, "config": ConfigRecord({"split": "val"})},
    ).content
    assert val["metrics"]["num-examples"] == 1  # 3 training, 1 validation, 2 test cases


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["engine.cross_site", "engine.contributions"])
@pytest.mark.parametrize(
    ("other", "named"),
    [
        ("strategy.secagg.enabled=true", "strategy.secagg.enabled=true exists to hide"),
        ("strategy=dpfedavg", "outside the privacy accounting of strategy.dp.mode=server_fixed"),
    ],
)
def test_single_models_are_refused_with_secure_aggregation_and_dp(
    key: str, other: str, named: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        check_overrides([f"{key}=true", other])
    assert f"{key}=true" in str(refused.value) and named in str(refused.value)


def test_fl_imaging_refuses_before_the_run_with_exit_2(tmp_path: Path) -> None:
    proc = run_cli(
        "fl-imaging", "engine.contributions=true", "strategy=dpfedavg", cwd=tmp_path, expect=2
    )
    assert "engine.contributions=true computes leave-one-out aggregates" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cross_site_without_any_test_case_is_refused(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    folders = make_demo_data(
        tmp_path / "demo", num_sites=2, cases_per_site=4, shape=(8, 8, 8), dicom_sites=()
    )
    sites = [load_site(f, "segmentation", val_fraction=0.25, seed=0) for f in folders]
    cfg = check_overrides(["experiment=quick", "engine.cross_site=true"])
    with pytest.raises(ConfigError, match="no site has any: set data.test_fraction"):
        check_test_cases(cfg, sites)
    check_test_cases(check_overrides(["experiment=quick"]), sites)  # off: nothing to check
    with_test = make_demo_data(
        tmp_path / "demo2",
        num_sites=1,
        cases_per_site=4,
        shape=(8, 8, 8),
        dicom_sites=(),
        test_cases=1,
    )
    check_test_cases(
        cfg, [*sites, load_site(with_test[0], "segmentation", val_fraction=0.25, seed=0)]
    )
    assert "site-1, site-2 have no test cases" in caplog.text


def test_the_chain_keeps_updates_only_when_asked(tmp_path: Path) -> None:
    kept = plan_federation(_cfg(tmp_path, "engine.contributions=true"), [])
    assert any(isinstance(n, LastUpdates) for n in wrapper_chain(kept.strategy))
    plain = plan_federation(_cfg(tmp_path), [])
    assert not any(isinstance(n, LastUpdates) for n in wrapper_chain(plain.strategy))


# --- a whole run -----------------------------------------------------------------------------


def test_a_run_with_a_noise_site(tmp_path: Path) -> None:
    """3 demo sites, site-2 sends noise (attack=noise): it contributes least; the cross-site
    diagonal is each site's test round figure (global: test_dice, own: finetuned_dice). The
    real sites in-process (:mod:`local_runs`); across real Flower processes:
    test_cross_site_deployment.py."""
    run = local_run(
        tmp_path / "run",
        "experiment=quick",
        "data.num_sites=3",
        "data.cases_per_site=8",
        "data.test_fraction=0.25",
        f"data.root={tmp_path / 'demo'}",
        "attack=noise",
        "attack.sites=[1]",
        "engine.cross_site=true",
        "engine.contributions=true",
        "engine.finetune_epochs=1",
    )
    contributions = {r["site"]: float(r["contribution"]) for r in _csv(run / "contributions.csv")}
    assert min(contributions, key=contributions.__getitem__) == "site-2", contributions
    rows = read_metrics(run / "metrics.csv")
    tested = {(r.site, r.metric): r.value for r in rows}
    matrix = {
        (r["model"], r["site"]): float(r["value"])
        for r in _csv(run / "cross_site.csv")
        if r["metric"] == "dice"
    }
    assert len(matrix) == 4 * 3
    for site in ("site-1", "site-2", "site-3"):
        assert matrix[("global", site)] == pytest.approx(tested[(site, "test_dice")], abs=1e-5)
        assert matrix[(site, site)] == pytest.approx(tested[(site, "finetuned_dice")], abs=1e-5)
    assert all(math.isfinite(v) for v in matrix.values())
    assert (run / "cross_site.png").is_file()
