"""Patient-level DP (``task.dp_sgd``) on the coordinator's side: the zero-weight replies of sites
whose budget is spent in every aggregator, the guarantees stated in summary.txt and the progress
line, the benchmark's per-site epsilon, FedBN and FedProx with DP-SGD at a site, and real runs
through the engine (slow): the budget stop, a resume that keeps counting, a refused setting."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import run_cli
from flower_fakes import Arrays, FakeGrid, numpy_of, record
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from local_runs import local_run

from fl_imaging.benchmark.report import site_results, summarise, write_summary
from fl_imaging.config import ConfigError, RunConfig, StrategyConfig
from fl_imaging.config.compose import check_overrides
from fl_imaging.data.demo import make_demo_data
from fl_imaging.flower.coordinator.federation import PatientBudgetsSpent, plan_federation
from fl_imaging.flower.protocol import ReplySites, site_reply
from fl_imaging.flower.site import client_app
from fl_imaging.flower.site.local_norms import LOCAL_NORMS
from fl_imaging.privacy.dp_sgd import PrivacyLedger
from fl_imaging.privacy.report import disclosure_lines, privacy_lines
from fl_imaging.review.results import MetricRow, progress_line, read_metrics
from fl_imaging.training.site_training import SiteTrainers
from strategies import build_strategy
from strategies.recording import RecordingStrategy
from strategies.validation import IDLE, UpdateCheck
from tasks import build_task

pytestmark = pytest.mark.usefixtures("task_identity")

GLOBAL: Arrays = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(1, np.float32)}


def reply(node: int, arrays: Arrays, num_examples: int) -> Message:
    instruction = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    metrics = {"num-examples": num_examples, "patient_budget_spent": float(num_examples == 0)}
    return site_reply(instruction, f"hospital-{node}", metrics, record(arrays))


def aggregate(name: str, replies: list[Message], **params: object) -> Arrays:
    cfg = check_overrides([f"strategy={name}"]).strategy
    cfg.params.update(params)
    checks: list[UpdateCheck] = []
    strategy = build_strategy(
        cfg,
        num_sites=len(replies),
        sites=ReplySites({n: f"hospital-{n}" for n in range(1, len(replies) + 1)}),
        on_checks=lambda rnd, c: checks.extend(c),
    )
    grid_arrays = record(GLOBAL)
    list(
        strategy.configure_train(
            1, grid_arrays, ConfigRecord(), FakeGrid(len(replies), lambda n, r, s: s)
        )
    )
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return numpy_of(arrays)


def site_arrays(i: int) -> Arrays:
    return {"w": np.full((2, 2), float(i), np.float32), "b": np.asarray([i * 0.5], np.float32)}


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("fedavg", {}),
        ("fedmedian", {}),
        ("fedtrimmedavg", {"beta": 0.2}),
        ("krum", {"num_malicious_nodes": 1}),
        ("geomedian", {}),
        ("centeredclip", {}),
        ("fedadam", {}),
        ("fedprox", {}),
    ],
)
def test_a_site_that_trained_nothing_is_counted_by_no_aggregator(name: str, params: dict) -> None:
    """Five sites and one whose budget is spent (global weights, num-examples 0): the aggregate
    is the one of the five alone (the median, Krum's vote, the clipping centre would move)."""

    def trained() -> list[Message]:  # new messages each time: FedMedian pops their arrays
        return [reply(i, site_arrays(i), 40 + i) for i in range(1, 6)]

    with_idle = aggregate(name, [*trained(), reply(6, GLOBAL, 0)], **params)
    without = aggregate(name, trained(), **params)
    for key in GLOBAL:
        np.testing.assert_allclose(with_idle[key], without[key], rtol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "spent", "rnd", "stops"),
    [
        ([], ["site-1"], 1, False),  # site-2 still trains
        ([], ["site-1", "site-2"], 1, True),
        ([], ["site-1", "site-2"], 3, False),  # the last round: nothing to stop
        (["strategy=dpfedavg"], ["site-1"], 1, True),  # DP-FedAvg assumes every site
    ],
)
def test_the_run_stops_when_no_site_trains_again_or_dp_fedavg_would_lose_one(
    tmp_path: Path, overrides: list[str], spent: list[str], rnd: int, stops: bool
) -> None:
    """Flower's DP-FedAvg noise and accountant assume every site in every round (and its
    clipping divides by the update's norm: a zero update fails), so with client-level DP the
    run stops once one site's patient-level budget is spent, before any site sits out."""
    cfg = check_overrides(
        [
            "experiment=quick",
            "task.dp_sgd.enabled=true",
            "task.dp_sgd.noise_multiplier=1",
            "engine.rounds=3",
            *overrides,
        ]
    )
    cfg = replace(cfg, run_dir=str(tmp_path))
    plan = plan_federation(cfg, ["site-1", "site-2"])
    rows = [
        MetricRow(rnd, site, "patient_budget_spent", float(site in spent))
        for site in ("site-1", "site-2")
    ]
    plan.strategy.rows = rows  # what the checkpoint after the round keeps
    if not stops:
        plan.after_round(rnd, rows)
        return
    with pytest.raises(PatientBudgetsSpent, match=f"stopped after round {rnd} of 3"):
        plan.after_round(rnd, rows)
    # and a resume of it is refused: no round could run
    later = replace(cfg, resume=str(tmp_path), run_dir=str(tmp_path / "next"))
    later = replace(later, engine=replace(cfg.engine, rounds=4))
    with pytest.raises(ConfigError, match="cannot resume .*patient-level privacy budget"):
        plan_federation(later, ["site-1", "site-2"])


def test_an_idle_site_is_no_failure_in_the_records() -> None:
    recorder = RecordingStrategy(build_strategy(StrategyConfig(), num_sites=2))
    check = UpdateCheck("hospital-2", 2, 0.0, float("nan"), IDLE, "trained on no case")
    recorder.record_checks(1, [check])
    assert recorder.failures == []
    values = {r.metric: r.value for r in recorder.rows}
    assert values["update_accepted"] == 0.0


# --- what the run says about privacy ------------------------------------------------------------


def patient_rows() -> list[MetricRow]:
    rows = []
    for rnd, steps, spent in ((1, 5, 0.0), (2, 10, 1.0)):
        for site, eps in (("site-1", 2.0 * rnd), ("site-2", 1.5 * rnd)):
            values = {
                "patient_epsilon": eps,
                "patient_delta": 1e-5,
                "patient_noise": 1.2,
                "patient_sample_rate": 0.19,
                "patient_steps": steps,
                "patient_budget_spent": spent if site == "site-1" else 0.0,
                "num_train": 42.0,
            }
            rows += [MetricRow(rnd, site, k, v) for k, v in values.items()]
    return rows


def quick(*overrides: str) -> RunConfig:
    """The quick experiment's checked config with ``overrides``."""
    return check_overrides(["experiment=quick", *overrides])


def test_the_summary_states_every_guarantee_of_the_run() -> None:
    plain = quick()
    assert "no formal DP" in "\n".join(privacy_lines([], plain))
    patient = quick("task.dp_sgd.enabled=true", "task.dp_sgd.target_epsilon=8")
    text = "\n".join(privacy_lines(patient_rows(), patient))
    assert "patient-level DP (DP-SGD at every site, Opacus, RDP accountant" in text
    assert "site site-1: epsilon 4 at delta 1e-05 after 2 round(s) (10 steps, noise 1.2, " in text
    assert "sample rate 0.19)" in text
    assert "site site-2: epsilon 3 at delta 1e-05" in text
    assert "budget spent (no further round fits): site-1; still training: site-2" in text
    assert "no formal DP" not in text and "client-level" not in text
    both = quick("strategy=dpfedavg", "task.dp_sgd.enabled=true", "task.dp_sgd.noise_multiplier=1")
    rows = [*patient_rows(), MetricRow(2, "all", "epsilon", 7.0)]
    text = "\n".join(privacy_lines(rows, both))
    assert (
        "epsilon 7.0000 at delta 1e-05 after round 2 (client-level: protects a whole site" in text
    )
    assert "patient-level DP" in text


def test_the_summary_says_what_each_party_could_learn() -> None:
    plain = disclosure_lines([], quick())
    assert plain[0] == "what each party could learn, by threat:"
    assert plain[1].endswith("honest but curious: every site's model update in the clear")
    assert plain[2].startswith("  coordinator deviating from the protocol: every site's update")
    assert plain[3].startswith("  another site: the global model of every round")
    assert "whoever receives the model:" in plain[4] and "no formal bound" in plain[4]
    assert "each site's training case count (num-examples)" in plain[5]
    assert "no formal DP" in plain[6] and "cross_site" not in "".join(plain)
    shared = quick("engine.cross_site=true", "engine.contributions=true")
    text = "\n".join(disclosure_lines([], shared))
    assert "each site's own model and its scores at every site (engine.cross_site)" in text
    assert "every other site's own model, to score it (engine.cross_site)" in text
    assert "single updates, left out one at a time (engine.contributions)" in text
    assert "hence each site's last update up to its weight (engine.contributions)" in text
    private = quick(
        "strategy.secagg.enabled=true", "task.dp_sgd.enabled=true", "task.dp_sgd.target_epsilon=8"
    )
    rows = [*patient_rows(), MetricRow(1, "all", "secagg_sites", 2.0)]
    rows.append(MetricRow(2, "all", "secagg_sites", 2.0))
    lines = disclosure_lines(rows, private)
    assert lines[1] == (
        "  coordinator, honest but curious: only the sum of 2 sites' updates in every round"
    )
    assert "still no single site's update" in lines[2] and "patient-level DP holds" in lines[2]
    assert "bounded by the differential privacy below" in lines[4]
    assert "DP-SGD's noise, steps and sample rate" in lines[5]
    assert any(line.startswith("patient-level DP") for line in lines[6:])


def test_the_progress_line_shows_each_sites_patient_epsilon() -> None:
    line = progress_line(2, 6, patient_rows(), "dice", ["site-1", "site-2"])
    assert "patient epsilon site-1 4.000  site-2 3.000 (budget spent: site-1)" in line
    assert "train loss -" in line  # DP-SGD sites keep their training loss


def test_the_benchmark_reports_each_sites_final_patient_epsilon_and_the_reference(
    tmp_path: Path,
) -> None:
    rows = [*patient_rows(), *(MetricRow(3, s, "test_dice", 0.6) for s in ("site-1", "site-2"))]

    def results(rows: list[MetricRow], method: str) -> list:
        return site_results(
            rows,
            setup="iid",
            method=method,
            kind="federated",
            seed=0,
            dataset="d",
            partition="p",
            main="dice",
            wall_s=1.0,
        )

    dp = results(rows, "dp")
    fedavg = results([MetricRow(3, s, "test_dice", 0.8) for s in ("site-1", "site-2")], "fedavg")
    assert [r.patient_epsilon for r in dp] == [4.0, 3.0]
    summary = summarise([*fedavg, *dp], ["dice"])
    by_method = {r.method: r for r in summary}
    assert by_method["dp"].figures["patient_epsilon"][0] == 4.0  # the weakest site's
    _, md = write_summary(summary, ["dice"], tmp_path, "# t", reference="fedavg")
    text = md.read_text()
    assert "vs fedavg" in text and "| dp | 1 | 0.600 ± 0.000 | 0.750 |" in text
    assert "patient epsilon (max over sites)" in text


# --- FedBN and FedProx with DP-SGD at a site ------------------------------------------------------


def test_fedbn_and_fedprox_train_under_dp_sgd(tmp_path: Path) -> None:
    (site,) = make_demo_data(tmp_path / "demo", num_sites=1, cases_per_site=8, shape=(16, 16, 16))
    cfg = check_overrides(
        [
            "experiment=quick",
            "task.roi_size=[16,16,16]",
            "task.model.channels=[4,8]",
            "task.local_epochs=1",
            "task.batch_size=2",
            "task.model.norm=batch",
            "strategy=fedprox",
            "strategy.fedbn=true",
            "task.dp_sgd.enabled=true",
            "task.dp_sgd.noise_multiplier=1",
        ]
    )
    cfg.data.sites = [str(site)]
    app = client_app.build_client_app(cfg, SiteTrainers())
    context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    weights = build_task(cfg.task).build_model().state_dict()
    config = ConfigRecord({"server-round": 1, "proximal-mu": 0.1})
    msg = Message(
        content=RecordDict({"arrays": ArrayRecord(weights), "config": config}),
        message_type=MessageType.TRAIN,
        dst_node_id=1,
    )
    reply_msg = app(msg, context)
    assert not reply_msg.has_error(), reply_msg.error.reason if reply_msg.has_error() else ""
    assert reply_msg.content["metrics"]["patient_steps"] == 3
    kept = context.state.array_records[LOCAL_NORMS].to_torch_state_dict()
    assert kept and all(".adn.N." in k for k in kept)  # the GroupNorm layers stay at the site
    sent = reply_msg.content["arrays"].to_torch_state_dict()
    assert any(not torch.equal(sent[k], weights[k]) for k in weights)


# --- real runs through the engine ----------------------------------------------------------------


DP_SGD = ("experiment=quick", "task.dp_sgd.enabled=true")


@pytest.mark.slow
def test_a_run_stops_when_every_sites_budget_is_spent(tmp_path: Path) -> None:
    """quick: 4 training cases per site, batch 2, 3 epochs: 6 steps per round at rate 0.5; the
    budget lies between one and two rounds' epsilon, so both sites stop after round 1 of 3.
    Through the command and Flower's simulation engine (DP-SGD in the Ray workers)."""
    cfg = check_overrides([*DP_SGD, "task.dp_sgd.noise_multiplier=1.5"])
    one = PrivacyLedger(1.5, 0.5, 6).epsilon(cfg.task.dp_sgd)
    two = PrivacyLedger(1.5, 0.5, 12).epsilon(cfg.task.dp_sgd)
    budget = round((one + two) / 2, 3)
    run_cli(
        "fl-imaging",
        *DP_SGD,
        f"data.root={tmp_path / 'demo'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "task.dp_sgd.noise_multiplier=1.5",
        f"task.dp_sgd.target_epsilon={budget}",
        "engine.rounds=3",
        cwd=tmp_path,
    )
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert {r.round for r in rows} == {1}
    eps = {r.site: r.value for r in rows if r.metric == "patient_epsilon" and r.site != "all"}
    assert eps == {"site-1": pytest.approx(one, rel=1e-5), "site-2": pytest.approx(one, rel=1e-5)}
    summary = (tmp_path / "run" / "summary.txt").read_text()
    assert (
        "stopped after round 1 of 3: every site's patient-level privacy budget is spent" in summary
    )
    assert "site site-1: epsilon" in summary and "after 1 round(s) (6 steps, noise 1.5" in summary


def test_a_resumed_run_keeps_counting_each_sites_steps(tmp_path: Path) -> None:
    """Two rounds, then a resumed third (the real sites in-process, :mod:`local_runs`): each
    site's own ledger goes on counting its steps."""
    demo = f"data.root={tmp_path / 'demo'}"
    first = local_run(tmp_path / "first", *DP_SGD, demo, "task.dp_sgd.noise_multiplier=1.5")
    local_run(
        tmp_path / "second",
        *DP_SGD,
        demo,
        "task.dp_sgd.noise_multiplier=1.5",
        "engine.rounds=3",
        f"resume={first}",
    )
    cfg = check_overrides([*DP_SGD, "task.dp_sgd.noise_multiplier=1.5"])
    rows = read_metrics(tmp_path / "second" / "metrics.csv")
    for site in ("site-1", "site-2"):
        got = {r.metric: r.value for r in rows if r.round == 3 and r.site == site}
        assert got["patient_steps"] == 18  # 12 before the resume, 6 in round 3
        assert got["patient_epsilon"] == pytest.approx(
            PrivacyLedger(1.5, 0.5, 18).epsilon(cfg.task.dp_sgd), rel=1e-5
        )


def test_a_site_with_fewer_cases_than_the_batch_is_refused_before_training(
    tmp_path: Path,
) -> None:
    overrides = (*DP_SGD, f"data.root={tmp_path / 'demo'}", "task.dp_sgd.target_epsilon=8")
    with pytest.raises(
        ConfigError, match=r"site site-1 has 4 training case\(s\), fewer than task.batch_size=5"
    ):
        local_run(tmp_path / "run", *overrides, "task.batch_size=5")
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_a_benchmark_baseline_with_dp_sgd_in_its_config_is_refused() -> None:
    from fl_imaging.benchmark.plan import Cell
    from fl_imaging.benchmark.runner import _checked

    overrides = ("experiment=quick", "task.dp_sgd.enabled=true", "task.dp_sgd.target_epsilon=8")
    with pytest.raises(ConfigError, match="the pooled baseline trains without DP-SGD"):
        _checked(Cell("iid", "pooled", "pooled", 0, overrides))
    assert _checked(Cell("iid", "dp", "federated", 0, overrides)).task.dp_sgd.enabled


def test_the_training_config_carries_the_run_key_and_a_resumed_run_keeps_it(
    tmp_path: Path,
) -> None:
    """No ledger travels with the training messages (each site keeps its own); the run's key
    does, and a resumed run sends the key of the run it continues, so each site's ledger goes
    on counting in the same entry."""
    cfg = check_overrides(
        ["experiment=quick", "task.dp_sgd.enabled=true", "task.dp_sgd.noise_multiplier=1"]
    )
    plan = plan_federation(replace(cfg, run_dir=str(tmp_path)), ["site-1", "site-2"])
    config = plan.round_config({"local-epochs": 3})
    assert dict(config) == {"local-epochs": 3, "run-key": plan.run_key}
    rows = [MetricRow(1, site, "patient_steps", 6.0) for site in ("site-1", "site-2")]
    plan.strategy.rows = rows
    plan.after_round(1, rows)
    assert sorted(config) == ["local-epochs", "run-key"]
    resumed = plan_federation(
        replace(cfg, run_dir=str(tmp_path / "next"), resume=str(tmp_path)), ["site-1", "site-2"]
    )
    assert resumed.run_key == plan.run_key
    fresh = plan_federation(replace(cfg, run_dir=str(tmp_path / "new")), ["site-1", "site-2"])
    assert fresh.run_key != plan.run_key
