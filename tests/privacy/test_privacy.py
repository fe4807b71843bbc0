"""Client-level differential privacy (strategies/privacy.py): Flower's DP wrappers as
``build_strategy`` composes them, the epsilon of Flower's RDP accountant, the settings refused
before a run, client-side clipping in the ClientApp, and the privacy-budget stop of a real run.

Replies are Flower Messages built by hand and a fake Grid answers ``Strategy.start``; one run goes
through Flower's simulation engine (slow).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_fakes import Arrays, FakeGrid, FakeTrainer, numpy_of, record
from flwr.app import (
    ConfigRecord,
)
from flwr.serverapp import PrivacyConfig, RdpAccountant
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    SamplingMethod,
)
from local_runs import local_run

from fl_imaging.config import DPConfig, DPMode, RunConfig, StrategyConfig, config_from_yaml
from fl_imaging.config.compose import check_overrides
from fl_imaging.flower.site import client_app
from fl_imaging.review.results import read_metrics
from fl_imaging.training.model_checks import warn_dp_running_statistics
from fl_imaging.training.site_training import SiteTrainers
from strategies import StrategyError, build_strategy
from strategies.privacy import privacy_spent
from strategies.recording import RecordingStrategy
from tasks import build_task

pytestmark = pytest.mark.usefixtures("task_identity")


def site_metrics(node: int) -> dict[str, float]:
    """What site ``node`` reports after training: ``10 * node`` cases, and the equal weight
    DP-FedAvg aggregates by."""
    return {"num-examples": 10 * node, "unit-weight": 1}


# --- helpers ----------------------------------------------------------------------------------


def dpfedavg(*overrides: str) -> StrategyConfig:
    """The strategy config of ``strategy=dpfedavg`` with ``overrides``, composed from conf/."""
    return check_overrides(["strategy=dpfedavg", *overrides]).strategy


def accountant_epsilons(noise: float, sites: int, rounds: int, delta: float = 1e-5) -> list[float]:
    """Epsilon after each round, from Flower's RDP accountant directly: one Gaussian release of
    all ``sites`` per round, no sampling amplification."""
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=sites,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    out = []
    for _ in range(rounds):
        accountant.compose(GaussianPrivacyEvent(noise, sites, sites))
        out.append(accountant.get_privacy_spent().epsilon)
    return out


# --- the noise ----------------------------------------------------------------------------------

PARAMS = 20_000


@pytest.mark.parametrize("noise", [0.5, 2.0])
def test_server_side_noise_has_std_noise_times_clip_over_sites(noise: float) -> None:
    sites, clip = 4, 1.0
    strategy = build_strategy(dpfedavg(f"strategy.dp.noise_multiplier={noise}"), num_sites=sites)
    dp = strategy.inner
    assert isinstance(dp, DifferentialPrivacyServerSideFixedClipping)
    rng = np.random.default_rng(0)
    global_arrays = {"w": rng.normal(size=PARAMS).astype(np.float32)}
    update = rng.normal(size=PARAMS).astype(np.float32)
    update *= 0.5 / np.linalg.norm(update)  # below the clipping norm: nothing is clipped
    site_arrays = {"w": global_arrays["w"] + update}
    grid = FakeGrid(sites, lambda node, rnd, sent: site_arrays, site_metrics)
    messages = list(strategy.configure_train(1, record(global_arrays), ConfigRecord(), grid))
    replies = grid.send_and_receive(messages)  # every site sends the same update
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    noise_drawn = numpy_of(arrays)["w"].astype(np.float64) - site_arrays["w"]
    expected_std = noise * clip / sites
    assert noise_drawn.std() == pytest.approx(expected_std, rel=0.03)
    assert abs(noise_drawn.mean()) < 5 * expected_std / np.sqrt(PARAMS)


def test_server_side_clipping_bounds_each_update_before_the_noise() -> None:
    # no noise (allowed without accounting): the aggregate is the mean of the clipped updates
    strategy = build_strategy(
        dpfedavg(
            "strategy.dp.noise_multiplier=0",
            "strategy.dp.account=false",
            "strategy.dp.clipping_norm=2.0",
        ),
        num_sites=2,
    )
    zero = {"w": np.zeros(PARAMS, np.float32)}
    big = {"w": np.full(PARAMS, 30.0 / np.sqrt(PARAMS), np.float32)}  # norm 30 -> clipped to 2
    small = {"w": np.full(PARAMS, 1.0 / np.sqrt(PARAMS), np.float32)}  # norm 1 -> unchanged
    grid = FakeGrid(2, lambda node, rnd, sent: big if node == 1 else small, site_metrics)
    replies = grid.send_and_receive(strategy.configure_train(1, record(zero), ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    out = numpy_of(arrays)["w"].astype(np.float64)
    # sites weighted equally (unit-weight), although they report 10 and 20 cases
    assert np.linalg.norm(out) == pytest.approx((2.0 + 1.0) / 2, rel=1e-5)
    np.testing.assert_allclose(out, out[0], rtol=1e-5)  # clipping scales, it keeps directions


# --- epsilon ------------------------------------------------------------------------------------


def step(node: int, rnd: int, sent: Arrays) -> Arrays:
    return {"w": sent["w"] + 0.01 * node}


@pytest.mark.parametrize("noise", [1.0, 1.7])
def test_epsilon_grows_every_round_and_equals_the_rdp_accountant(noise: float) -> None:
    sites = 4
    strategy = build_strategy(dpfedavg(f"strategy.dp.noise_multiplier={noise}"), num_sites=sites)
    recorder = RecordingStrategy(strategy)
    recorder.start(
        grid=FakeGrid(sites, step, site_metrics),
        initial_arrays=record({"w": np.zeros(10, np.float32)}),
        num_rounds=3,
    )
    rows = {(r.round, r.metric): r.value for r in recorder.rows if r.site == "all"}
    epsilons = [rows[(rnd, "epsilon")] for rnd in (1, 2, 3)]
    assert epsilons == pytest.approx(accountant_epsilons(noise, sites, 3), rel=1e-9)
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert [rows[(rnd, "delta")] for rnd in (1, 2, 3)] == [1e-5] * 3
    assert privacy_spent(recorder) == pytest.approx((epsilons[2], 1e-5))
    if noise == 1.0:  # FLOWER_NOTES: noise 1.0, all of 4 sites, delta 1e-5
        assert epsilons == pytest.approx([4.73, 7.08, 9.01], abs=0.005)


def test_the_budget_stops_before_the_round_that_would_exceed_it() -> None:
    eps = accountant_epsilons(1.0, 3, 3)
    budget = (eps[1] + eps[2]) / 2
    strategy = build_strategy(dpfedavg(f"strategy.dp.max_epsilon={budget}"), num_sites=3)
    recorder = RecordingStrategy(strategy)
    with pytest.raises(PrivacyBudgetExhausted, match="exceed max_epsilon"):
        recorder.start(
            grid=FakeGrid(3, step, site_metrics),
            initial_arrays=record({"w": np.zeros(10, np.float32)}),
            num_rounds=5,
        )
    spent = [r.value for r in recorder.rows if r.metric == "epsilon"]
    assert spent == pytest.approx(eps[:2])
    assert max(r.round for r in recorder.rows) == 2
    assert recorder.global_arrays is not None  # round 2's model is kept for saving


# --- settings refused before a run ----------------------------------------------------------------


def test_sampling_a_subset_of_sites_is_refused_when_accounted() -> None:
    with pytest.raises(StrategyError, match=r"clients_per_round=2 of 3 sites.*amplification"):
        build_strategy(dpfedavg(), num_sites=3, clients_per_round=2)
    # without accounting it runs (no epsilon is claimed)
    strategy = build_strategy(
        dpfedavg("strategy.dp.account=false"), num_sites=3, clients_per_round=2
    )
    assert privacy_spent(strategy) is None


@pytest.mark.parametrize("mode", ["server_adaptive", "client_adaptive"])
def test_adaptive_clipping_is_refused_when_accounted(mode: str) -> None:
    with pytest.raises(StrategyError, match=f"mode={mode}.*does not account adaptive clipping"):
        build_strategy(dpfedavg(f"strategy.dp.mode={mode}"), num_sites=3)
    # without accounting it runs (Flower needs more than 10 sites for noise 1.0 here)
    strategy = build_strategy(
        dpfedavg(f"strategy.dp.mode={mode}", "strategy.dp.account=false"), num_sites=30
    )
    assert type(strategy.inner).__name__.endswith("AdaptiveClipping")
    assert privacy_spent(strategy) is None


def test_dp_around_another_strategy_is_refused() -> None:
    cfg = check_overrides(["strategy=fedmedian", "strategy.dp.mode=server_fixed"]).strategy
    with pytest.raises(StrategyError, match=r"wraps FedAvg only.*got strategy=fedmedian"):
        build_strategy(cfg, num_sites=3)
    # account=false does not lift it: Flower's wrappers clip and add noise around FedAvg only
    cfg.dp.account = False
    with pytest.raises(StrategyError, match="wraps FedAvg only"):
        build_strategy(cfg, num_sites=3)


def test_dp_with_a_norm_bound_is_refused() -> None:
    with pytest.raises(StrategyError, match=r"no strategy.norm_bound.*with norm_bound=5.0"):
        build_strategy(dpfedavg("strategy.norm_bound=5"), num_sites=3)


def test_zero_noise_with_accounting_is_refused() -> None:
    with pytest.raises(StrategyError, match="noise_multiplier must be positive"):
        build_strategy(dpfedavg("strategy.dp.noise_multiplier=0"), num_sites=3)
    strategy = build_strategy(
        dpfedavg("strategy.dp.noise_multiplier=0", "strategy.dp.account=false"), num_sites=3
    )
    assert isinstance(strategy.inner, DifferentialPrivacyServerSideFixedClipping)
    assert strategy.inner.noise_multiplier == 0.0


def test_a_refused_dp_setting_stops_the_run_before_training(tmp_path: Path) -> None:
    demo = f"data.root={tmp_path / 'demo'}"
    with pytest.raises(StrategyError, match="engine.clients_per_round=1 of 2 sites"):
        local_run(
            tmp_path / "run", "experiment=quick", "strategy=dpfedavg",
            "engine.clients_per_round=1", demo,
        )  # fmt: skip
    for name in ("metrics.csv", "model.pt", "checkpoint.json"):
        assert not (tmp_path / "run" / name).exists()


# --- client-side DP -----------------------------------------------------------------------------


@pytest.mark.parametrize(("shift", "clipped"), [(0.1, True), (0.001, False)])
def test_client_fixed_mode_clips_the_site_update_to_the_clipping_norm(
    shift: float, clipped: bool
) -> None:
    cfg = check_overrides(
        ["strategy=dpfedavg", "strategy.dp.mode=client_fixed", "strategy.dp.clipping_norm=0.5"]
    )
    cfg.data.sites = ["/nowhere/site-1"]
    strategy = build_strategy(cfg.strategy, num_sites=1)
    assert isinstance(strategy.inner, DifferentialPrivacyClientSideFixedClipping)
    global_arrays = {"w": np.zeros((40, 50), np.float32), "b": np.ones(10, np.float32)}
    # the server's train message, with the clipping norm the DP wrapper puts in its config
    grid = FakeGrid(1, lambda n, r, s: s, site_metrics)
    (msg,) = strategy.configure_train(1, record(global_arrays), ConfigRecord(), grid)
    trainer = FakeTrainer(shift)
    trainers = SiteTrainers(build=lambda run_cfg, site, label_transforms: trainer)
    out = client_app.build_client_app(cfg, trainers)(msg, grid.context_of(1))
    assert not out.has_error(), out.error.reason if out.has_error() else ""
    assert trainer.fits == [cfg.task.local_epochs]
    sent = numpy_of(out.content["arrays"])
    update = np.sqrt(sum(np.sum((sent[k] - global_arrays[k]) ** 2) for k in global_arrays))
    honest = cfg.task.local_epochs * shift * np.sqrt(40 * 50 + 10)  # shift per epoch
    assert update == pytest.approx(0.5 if clipped else honest, rel=1e-5)
    # a scaled copy of the site's update: every weight moved by the same amount
    moved = np.concatenate([(sent[k] - global_arrays[k]).ravel() for k in global_arrays])
    np.testing.assert_allclose(moved, moved[0], rtol=1e-4)
    assert out.content["metrics"]["unit-weight"] == 1


# --- end to end: epsilon rows and the budget stop of a real run ---------------------------------


def test_a_run_reports_epsilon_and_stops_at_the_budget_with_its_model(
    tmp_path: Path,
) -> None:
    """One run covers both: epsilon after rounds 1..3 (noise 1.0, delta 1e-5), and a budget
    between round 3's and round 4's epsilon that stops a 4-round run after round 3 (the real
    sites in-process, :mod:`local_runs`; DP-FedAvg through Flower's engine:
    test_secure_aggregation.py)."""
    eps = accountant_epsilons(1.0, 2, 4)
    budget = round((eps[2] + eps[3]) / 2, 3)
    run = local_run(
        tmp_path / "run",
        "experiment=quick",
        "strategy=dpfedavg",
        "strategy.dp.clipping_norm=0.01",  # keeps the tiny model trainable; epsilon unchanged
        f"strategy.dp.max_epsilon={budget}",
        "engine.rounds=4",
        f"data.root={tmp_path / 'demo'}",
    )
    rows = read_metrics(run / "metrics.csv")
    assert sorted({r.round for r in rows}) == [1, 2, 3]
    epsilon = {r.round: r.value for r in rows if r.site == "all" and r.metric == "epsilon"}
    # metrics.csv keeps 6 significant digits
    assert [epsilon[k] for k in (1, 2, 3)] == pytest.approx(eps[:3], rel=1e-5)
    assert [epsilon[k] for k in (1, 2, 3)] == pytest.approx([4.73, 7.08, 9.01], abs=0.005)
    cfg: RunConfig = config_from_yaml((run / "config.yaml").read_text())
    assert cfg.strategy.dp == DPConfig(
        mode=DPMode.server_fixed, clipping_norm=0.01, max_epsilon=budget
    )
    model = build_task(cfg.task).build_model()
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    summary = (run / "summary.txt").read_text()
    assert "stopped after round 3 of 4: the privacy budget" in summary
    assert f"max_epsilon={budget}" in summary and "epsilon 9.0" in summary


@pytest.mark.parametrize(
    ("overrides", "warns"),
    [
        (["strategy=dpfedavg", "task.model.norm=batch"], True),
        (["strategy=dpfedavg", "task.model.norm=instance"], False),
        (["strategy=dpfedavg"], False),
        (["strategy=fedavg", "task.model.norm=batch"], False),
    ],
)
def test_dp_with_batch_norm_running_statistics_warns(
    caplog: pytest.LogCaptureFixture, overrides: list[str], warns: bool
) -> None:
    cfg = check_overrides(["experiment=quick", *overrides])
    with caplog.at_level(logging.WARNING, logger="fl_imaging"):
        assert warn_dp_running_statistics(cfg) == warns
    assert ("running statistics" in caplog.text) == warns
