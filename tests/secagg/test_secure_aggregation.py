"""Secure aggregation (fl_imaging/secagg/coordinator.py, fl_imaging/secagg/site.py): the
coordinator and the sites run the real stages in-process (the sites' handlers on their own
Flower contexts); the unmasked aggregate equals plain FedAvg within the quantisation, what the
coordinator holds of one site is unrelated to its update, dropouts are unmasked from the shares
or stop the round below the threshold, and what needs single updates is refused."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from cli_runs import run_cli
from flower_fakes import Arrays, FakeGrid, numpy_of, record
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import PrivacyConfig, RdpAccountant
from flwr.serverapp.strategy import Strategy
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    SamplingMethod,
)
from local_runs import local_run
from secagg_fakes import SecureSites, step

from fl_imaging.config import DPConfig, DPMode, SecAggConfig, StrategyConfig
from fl_imaging.review.results import read_metrics
from fl_imaging.secagg.arithmetic import SECAGG, SecAggSettings, pack, threshold_of, weight_factor
from fl_imaging.secagg.site import SecAggRefused, reveal_shares
from strategies import StrategyError, build_strategy
from strategies.privacy import privacy_spent
from strategies.recording import RecordingStrategy

pytestmark = pytest.mark.usefixtures("task_identity")

SETTINGS = SecAggSettings()
STEP = 2 * SETTINGS.clipping_range / SETTINGS.quantization_range  # one quantisation level


GLOBAL = {"w": np.linspace(-1, 1, 2000, dtype=np.float32).reshape(40, 50), "b": np.ones(10, "f4")}


def fedavg(secagg: bool, **changes: object) -> StrategyConfig:
    cfg = StrategyConfig(name="fedavg", secagg=SecAggConfig(enabled=secagg))
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def one_round(strategy: Strategy, grid: FakeGrid, rnd: int = 1, arrays: Arrays = GLOBAL):
    messages = strategy.configure_train(rnd, record(arrays), ConfigRecord(), grid)
    return strategy.aggregate_train(rnd, grid.send_and_receive(messages))


@pytest.mark.parametrize("sites", [3, 5])
def test_the_unmasked_sum_equals_plain_fedavg_within_the_quantisation(sites: int) -> None:
    weights = {n: 7 * n + 3 for n in range(1, sites + 1)}  # unequal sites
    plain, _ = one_round(
        build_strategy(fedavg(False), num_sites=sites), SecureSites(sites, step, weights)
    )
    grid = SecureSites(sites, step, weights)
    secure, metrics = one_round(build_strategy(fedavg(True), num_sites=sites), grid)
    assert plain is not None and secure is not None
    total_factor = sum(weights.values()) / SETTINGS.max_weight
    # each site's value is off by at most one level, the sum by at most `sites` levels
    tolerance = sites * STEP / total_factor
    for key, value in numpy_of(plain).items():
        got = numpy_of(secure)[key]
        assert got.dtype == value.dtype and got.shape == value.shape
        np.testing.assert_allclose(got, value, atol=tolerance, rtol=0)
    assert np.abs(numpy_of(secure)["w"] - GLOBAL["w"]).max() > 100 * tolerance  # it did move
    assert metrics is not None and metrics["train_loss"] == pytest.approx((sites + 1) / 2)


def test_a_site_with_weight_zero_adds_nothing_to_the_secure_sum() -> None:
    # DP-SGD: a site whose budget is spent replies with the global model and weight 0
    weights = {1: 10, 2: 0, 3: 30}
    plain, _ = one_round(build_strategy(fedavg(False), num_sites=3), SecureSites(3, step, weights))
    secure, _ = one_round(build_strategy(fedavg(True), num_sites=3), SecureSites(3, step, weights))
    assert plain is not None and secure is not None
    tolerance = 3 * STEP / (40 / SETTINGS.max_weight)
    for key, value in numpy_of(plain).items():
        np.testing.assert_allclose(numpy_of(secure)[key], value, atol=tolerance, rtol=0)


def test_what_the_coordinator_holds_of_a_site_is_not_its_update() -> None:
    grid = SecureSites(3, step, {1: 10, 2: 20, 3: 30})
    strategy = build_strategy(fedavg(True), num_sites=3)
    one_round(strategy, grid, 1)
    one_round(strategy, grid, 2)
    for rnd in (1, 2):
        update = np.concatenate([grid.updates[rnd][1][k].ravel() for k in GLOBAL])
        clear = pack(10 / SETTINGS.max_weight, update, SETTINGS)[1:].astype(
            float
        )  # what masking hides
        held = grid.held[rnd][1][1:].astype(float)
        assert abs(np.corrcoef(clear, held)[0, 1]) < 0.1  # 2010 values: chance is about 0.02
        assert abs(np.corrcoef(update, held)[0, 1]) < 0.1
        # uniform over the modulus, unlike the clear values (all near the middle of [0, Q])
        assert held.max() > SETTINGS.modulus * 0.9 and held.min() < SETTINGS.modulus * 0.1
    assert not np.array_equal(grid.held[1][1], grid.held[2][1])  # new masks every round


def test_a_site_lost_after_sharing_its_keys_is_unmasked_from_the_others_shares() -> None:
    weights = {1: 10, 2: 25, 3: 40, 4: 15}
    summed: dict[int, tuple[list[str], list[str], str]] = {}
    strategy = build_strategy(fedavg(True), num_sites=4)
    strategy.on_round = lambda rnd, s, d, why, _: summed.__setitem__(rnd, (s, d, why))
    grid = SecureSites(4, step, weights)
    one_round(strategy, grid, 1)  # keys set among the 4 sites
    grid.fail = {"train": {3}}  # site 3 is lost before sending its masked update
    secure, _ = one_round(strategy, grid, 2)
    plain_grid = SecureSites(4, step, weights, fail={"train": {3}})
    plain, _ = one_round(build_strategy(fedavg(False), num_sites=4), plain_grid, 2)
    assert secure is not None and plain is not None
    tolerance = 3 * STEP / ((10 + 25 + 15) / SETTINGS.max_weight)
    np.testing.assert_allclose(numpy_of(secure)["w"], numpy_of(plain)["w"], atol=tolerance)
    names, dropped, why = summed[2]  # in the order of Flower's node ids
    assert (sorted(names), dropped, why) == (["site-1", "site-2", "site-4"], ["site-3"], "")
    # site 3's round-2 mask key is known now; every site makes new keys for round 3
    grid.fail = {}
    assert one_round(strategy, grid, 3)[0] is not None
    names, dropped, why = summed[3]
    assert (sorted(names), dropped, why) == (["site-1", "site-2", "site-3", "site-4"], [], "")


def test_below_the_threshold_the_round_stops_with_the_reason_and_keeps_the_model() -> None:
    summed: dict[int, tuple[list[str], list[str], str]] = {}
    strategy = build_strategy(fedavg(True), num_sites=5)  # threshold: ceil(0.66 x 5) = 4
    strategy.on_round = lambda rnd, s, d, why, _: summed.__setitem__(rnd, (s, d, why))
    grid = SecureSites(5, step, dict.fromkeys(range(1, 6), 10), fail={"train": {2, 5}})
    assert one_round(strategy, grid) == (None, None)
    assert "3 of 5 sites answered, fewer than the threshold of 4" in summed[1][2]
    # enough masked updates, but too few sites help to unmask: the same
    grid = SecureSites(5, step, dict.fromkeys(range(1, 6), 10), fail={"secagg_unmask": {1, 2}})
    strategy = build_strategy(fedavg(True), num_sites=5)
    strategy.on_round = lambda rnd, s, d, why, _: summed.__setitem__(rnd, (s, d, why))
    assert one_round(strategy, grid) == (None, None)
    assert "only 3 site(s) helped to unmask" in summed[1][2]


def test_a_site_refuses_to_reveal_both_shares_of_one_site() -> None:
    grid = SecureSites(3, step, {1: 10, 2: 10, 3: 10})
    strategy = build_strategy(fedavg(True), num_sites=3)
    one_round(strategy, grid)
    request = Message(
        RecordDict({SECAGG: ConfigRecord({"round": 1, "survivors": [1, 2, 3], "dropped": [3]})}),
        dst_node_id=1,
        message_type="query.secagg_unmask",
    )
    with pytest.raises(SecAggRefused, match=r"nodes \[3\] are named both survivor and dropout"):
        reveal_shares(request, grid.contexts[1], grid.guards[1])


@pytest.mark.parametrize(
    ("cfg", "words"),
    [
        (StrategyConfig(name="fedmedian"), "strategy=fedmedian needs every site's own update"),
        (StrategyConfig(name="krum"), "strategy=krum needs every site's own update"),
        (StrategyConfig(name="fedavg", norm_bound=5.0), "bounds each update on the coordinator"),
        (
            StrategyConfig(name="fedavg", dp=DPConfig(mode=DPMode.server_fixed)),
            "only client_fixed works",
        ),
        (
            StrategyConfig(name="fedavg", dp=DPConfig(mode=DPMode.client_adaptive)),
            "only client_fixed works",
        ),
    ],
)
def test_what_needs_single_updates_is_refused_with_the_reason(
    cfg: StrategyConfig, words: str
) -> None:
    cfg.secagg = SecAggConfig(enabled=True)
    with pytest.raises(StrategyError, match=words):
        build_strategy(cfg, num_sites=6)


def test_outlier_rejection_and_a_wrapping_sum_are_refused() -> None:
    cfg = fedavg(True)
    cfg.validation.norm_outliers = "reject"
    with pytest.raises(StrategyError, match="norm_outliers=reject compares each site's update"):
        build_strategy(cfg, num_sites=3)
    cfg = fedavg(True)
    cfg.secagg.quantization_range = 2**30
    with pytest.raises(StrategyError, match="4 sites per round .* reach the modulus"):
        build_strategy(cfg, num_sites=4)


def test_dp_on_the_secure_sum_gives_the_accountants_epsilon() -> None:
    cfg = fedavg(True)
    cfg.dp = DPConfig(mode=DPMode.client_fixed, noise_multiplier=1.0, clipping_norm=10.0)
    recorder = RecordingStrategy(build_strategy(cfg, num_sites=3))
    grid = SecureSites(3, step, {1: 1, 2: 1, 3: 1})
    for rnd in (1, 2):
        one_round(recorder, grid, rnd)
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=1e-5,
            population_size=3,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    for _ in range(2):
        accountant.compose(GaussianPrivacyEvent(1.0, 3, 3))
    epsilon = accountant.get_privacy_spent().epsilon
    spent = privacy_spent(recorder)
    assert spent is not None and spent[0] == pytest.approx(epsilon, rel=1e-9)
    assert math.isfinite(epsilon) and epsilon > 0


def test_under_client_level_dp_the_secure_mean_weighs_every_site_equally() -> None:
    cfg = fedavg(True)
    cfg.dp = DPConfig(
        mode=DPMode.client_fixed, noise_multiplier=0.0, clipping_norm=100.0, account=False
    )
    grid = SecureSites(3, step, {1: 5, 2: 5, 3: 90})  # the large site would weigh 0.9 by cases
    secure, _ = one_round(build_strategy(cfg, num_sites=3), grid)
    assert secure is not None
    mean = {k: np.mean([grid.updates[1][n][k] for n in (1, 2, 3)], axis=0) for k in GLOBAL}
    for key, value in GLOBAL.items():
        np.testing.assert_allclose(numpy_of(secure)[key] - value, mean[key], atol=3 * STEP)
    cfg.secagg.weighting = "cases"
    with pytest.raises(StrategyError, match="client-level DP's noise assumes equal site weights"):
        build_strategy(cfg, num_sites=3)


def test_the_threshold_is_a_fraction_or_a_count() -> None:
    assert threshold_of(0.66, 3) == 2 and threshold_of(0.66, 5) == 4
    assert threshold_of(3, 5) == 3 and threshold_of(9, 5) == 5
    assert threshold_of(0.1, 4) == 3  # never half or fewer: the sites refuse that


def test_a_value_outside_the_clipping_range_is_refused_not_clipped() -> None:
    with pytest.raises(ValueError, match="outside strategy.secagg.clipping_range=8"):
        pack(1.0, np.array([9.0]), SETTINGS)
    with pytest.raises(ValueError, match="outside 0..strategy.secagg.max_weight=1000"):
        weight_factor(2000, "cases", SETTINGS)
    with pytest.raises(ValueError, match="weight factor -1 "):
        pack(-1, np.array([0.1]), SETTINGS)
    assert weight_factor(90, "equal", SETTINGS) == 1.0 and weight_factor(0, "equal", SETTINGS) == 0
    assert MessageType.TRAIN == "train"


def test_a_whole_run_with_secure_aggregation_ends_within_0_005_dice_of_the_plain_run(
    tmp_path: Path,
) -> None:
    """Whole runs with the real sites (in-process, :mod:`local_runs`), plain and secure."""
    dice = {}
    for name, extra in (("plain", []), ("secure", ["strategy.secagg.enabled=true"])):
        run = local_run(
            tmp_path / name, "experiment=quick", "engine.rounds=3", *extra,
            f"data.root={tmp_path / 'demo'}",
        )  # fmt: skip
        rows = read_metrics(run / "metrics.csv")
        dice[name] = next(
            r.value for r in rows if r.round == 3 and r.site == "all" and r.metric == "dice"
        )
        summary = (run / "summary.txt").read_text()
    assert abs(dice["secure"] - dice["plain"]) < 0.005, dice
    assert dice["secure"] > 0.5  # it trained
    assert "honest but curious: only the sum of 2 sites' updates in every round" in summary


def client_level_epsilon(noise: float, rounds: int, delta: float = 1e-5) -> float:
    """Epsilon of ``rounds`` Gaussian mechanisms of noise multiplier ``noise`` on the sum of
    every site's clipped update (no sampling of sites), from Google's ``dp_accounting``."""
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise), rounds)
    return float(accountant.get_epsilon(delta))


@pytest.mark.slow
def test_dp_fedavg_on_the_secure_sum_runs_with_equal_weights_and_the_accountants_epsilon(
    tmp_path: Path,
) -> None:
    """DP-FedAvg (clipping at the sites, Flower's fixedclipping_mod) on the secure sum of 3
    sites of 4, 6 and 12 cases, in the simulation engine: it runs, every round is unmasked,
    and its epsilon is the one dp_accounting gives for what was done."""
    from fl_imaging.data.demo import make_demo_data

    sites = []
    for name, cases in (("hospital-a", 4), ("hospital-b", 6), ("hospital-c", 12)):
        (made,) = make_demo_data(
            tmp_path / name, num_sites=1, cases_per_site=cases, shape=(24,) * 3
        )
        sites.append(made.rename(tmp_path / name / name))
    run_cli(
        "fl-imaging",
        "experiment=quick",
        "data=folders",
        f"data.sites=[{','.join(str(s) for s in sites)}]",
        "strategy=dpfedavg",
        "strategy.dp.mode=client_fixed",
        "strategy.dp.noise_multiplier=1.0",
        "strategy.secagg.enabled=true",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert {r.round: r.value for r in rows if r.metric == "secagg_sites"} == {1: 3.0, 2: 3.0}
    epsilon = {r.round: r.value for r in rows if r.metric == "epsilon" and r.site == "all"}
    assert epsilon[2] == pytest.approx(client_level_epsilon(1.0, 2), rel=1e-3)
    assert not [r for r in rows if r.metric == "num_train"]  # case counts stay at the sites
    summary = (tmp_path / "run" / "summary.txt").read_text()
    assert "weights equal" in summary and "holds the un-noised sum" in summary
