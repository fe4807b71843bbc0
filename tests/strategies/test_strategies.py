"""Every strategy on hand-made replies gives the value it should; update checks; registry.

No training and no simulation engine: replies are Flower Messages built from small NumPy arrays,
and a fake Grid answers the messages of ``Strategy.start``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flower_fakes import Arrays, FakeGrid, numpy_of, record
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    Strategy,
)
from scipy.optimize import minimize
from scipy.stats import trim_mean

from fl_imaging.config import StrategyConfig, UpdateValidationConfig
from fl_imaging.config.compose import check_overrides
from fl_imaging.flower.protocol import ReplySites, site_reply
from strategies import (
    STRATEGIES,
    CenteredClipping,
    GeometricMedian,
    NormBounding,
    StrategyError,
    UpdateCheck,
    ValidatingStrategy,
    build_strategy,
)
from strategies.geometric_median import geometric_median

pytestmark = pytest.mark.usefixtures("task_identity")
CONF_STRATEGIES = Path(__file__).resolve().parents[2] / "conf" / "strategy"


# --- helpers ----------------------------------------------------------------------------------


def reply(node_id: int, arrays: Arrays, num_examples: int = 10, **metrics: float) -> Message:
    """A train reply of site ``hospital-<node_id>`` carrying ``arrays`` and ``num-examples``."""
    instruction = Message(content=RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    content = {"num-examples": num_examples, **metrics}
    return site_reply(instruction, f"hospital-{node_id}", content, record(arrays))


def error_reply(node_id: int, reason: str) -> Message:
    """A train reply from ``node_id`` that carries an error instead of content."""
    instruction = Message(content=RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    return Message(Error(code=0, reason=reason), reply_to=instruction)


def send(strategy: Strategy, global_arrays: Arrays, num_nodes: int, rnd: int = 1) -> None:
    """Run ``configure_train`` so that the strategy (and its wrappers) remember what was sent."""
    list(
        strategy.configure_train(
            rnd, record(global_arrays), ConfigRecord(), FakeGrid(num_nodes, lambda n, r, s: s)
        )
    )


def aggregate(
    strategy: Strategy,
    global_arrays: Arrays,
    sites: list[Arrays],
    weights: list[int] | None = None,
    rnd: int = 1,
) -> Arrays | None:
    """Send ``global_arrays``, aggregate one reply per site; return the aggregate's arrays."""
    send(strategy, global_arrays, len(sites), rnd)
    weights = weights or [10] * len(sites)
    replies = [reply(i + 1, s, w) for i, (s, w) in enumerate(zip(sites, weights, strict=True))]
    arrays, _ = strategy.aggregate_train(rnd, replies)
    return None if arrays is None else numpy_of(arrays)


def build(name: str, num_sites: int, **params: object) -> Strategy:
    return build_strategy(StrategyConfig(name=name, params=dict(params)), num_sites=num_sites)


def model(w: Iterable[float], b: float = 0.0, count: int = 3) -> Arrays:
    """A tiny model: weight (2, 2) float32, bias (1,) float32, BatchNorm-like int64 counter."""
    return {
        "w": np.asarray(list(w), dtype=np.float32).reshape(2, 2),
        "b": np.asarray([b], dtype=np.float32),
        "count": np.asarray(count, dtype=np.int64),
    }


GLOBAL = model([0, 0, 0, 0])


# --- Flower's strategies on known values ------------------------------------------------------


def test_fedmedian_is_the_elementwise_median() -> None:
    sites = [model([1, 5, -2, 0], 1), model([2, -1, 7, 3], 4), model([9, 0, 1, 1], -3)]
    out = aggregate(build("fedmedian", 3), GLOBAL, sites)
    assert out is not None
    np.testing.assert_allclose(out["w"], [[2, 0], [1, 1]])
    np.testing.assert_allclose(out["b"], [1])


def test_fedtrimmedavg_is_the_trimmed_mean() -> None:
    rng = np.random.default_rng(0)
    sites = [model(rng.normal(size=4), float(rng.normal())) for _ in range(5)]
    out = aggregate(build("fedtrimmedavg", 5, beta=0.2), GLOBAL, sites)
    assert out is not None
    expected = trim_mean(np.stack([s["w"] for s in sites]), 0.2, axis=0)
    np.testing.assert_allclose(out["w"], expected, rtol=1e-6)


def clusters(num_honest: int, num_far: int) -> list[Arrays]:
    """Honest sites near 1.0 (noise 0.01), far sites near 100."""
    rng = np.random.default_rng(1)
    honest = [model(1 + 0.01 * rng.normal(size=4), 1.0) for _ in range(num_honest)]
    far = [model(100 + 0.01 * rng.normal(size=4), 100.0) for _ in range(num_far)]
    return honest + far


def test_krum_picks_an_honest_reply_when_two_of_six_are_far() -> None:
    sites = clusters(4, 2)
    out = aggregate(build("krum", 6, num_malicious_nodes=2), GLOBAL, sites)
    assert out is not None
    assert any(np.array_equal(out["w"], s["w"]) for s in sites[:4])


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("multikrum", {"num_malicious_nodes": 2, "num_nodes_to_select": 3}),
        ("bulyan", {"num_malicious_nodes": 1}),
    ],
)
def test_multikrum_and_bulyan_stay_in_the_honest_cluster(name: str, params: dict[str, int]) -> None:
    sites = clusters(6, 2)
    out = aggregate(build(name, 8, **params), GLOBAL, sites)
    assert out is not None
    honest = np.stack([s["w"] for s in sites[:6]])
    assert np.all(out["w"] >= honest.min(axis=0) - 1e-6)
    assert np.all(out["w"] <= honest.max(axis=0) + 1e-6)


def test_fedprox_sends_proximal_mu_in_the_train_config() -> None:
    strategy = build("fedprox", 2, proximal_mu=0.01)
    messages = list(
        strategy.configure_train(1, record(GLOBAL), ConfigRecord(), FakeGrid(2, lambda n, r, s: s))
    )
    assert [m.content["config"]["proximal-mu"] for m in messages] == [0.01, 0.01]


# --- ours -------------------------------------------------------------------------------------


def test_geometric_median_matches_a_direct_minimisation() -> None:
    rng = np.random.default_rng(2)
    sites = [model(rng.normal(size=4), float(rng.normal())) for _ in range(5)]
    sites.append(model([50, -40, 30, 20], 60.0))  # an outlier the median must resist
    weights = [10, 20, 5, 15, 10, 10]
    out = aggregate(build("geomedian", 6), GLOBAL, sites, weights)
    assert out is not None
    points = np.stack([np.concatenate([s["w"].ravel(), s["b"]]) for s in sites]).astype(float)
    w = np.asarray(weights, float) / sum(weights)

    def cost(z: np.ndarray) -> float:
        return float(w @ np.linalg.norm(points - z, axis=1))

    direct = minimize(
        cost,
        points.mean(axis=0),
        method="Nelder-Mead",
        options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 20000},
    ).x
    got = np.concatenate([out["w"].ravel(), out["b"]])
    np.testing.assert_allclose(got, direct, atol=1e-4)
    assert out["w"].dtype == np.float32 and out["count"].dtype == np.int64
    assert int(out["count"]) == 3  # counters come from the first reply


def test_geometric_median_known_medians_weighting_and_settings() -> None:
    square = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]])
    np.testing.assert_allclose(geometric_median(square), [0.0, 0.0], atol=1e-8)
    # Collinear models (every weight equal to t, bias t): the geometric median is the 1-D
    # (weighted) median of t, far from the (weighted) mean the iteration starts from.
    t = [0.0, 1.0, 2.0, 10.0, 100.0]
    sites = [model([v] * 4, v, count=3 + i) for i, v in enumerate(t)]
    weights = [10, 10, 10, 30, 10]  # t=10 holds 30 of 70: below half, yet the weighted median

    def value(out: Arrays | None) -> np.ndarray:
        assert out is not None
        assert out["w"].dtype == np.float32 and out["count"].dtype == np.int64
        assert int(out["count"]) == 3  # counters come from the first reply
        return np.concatenate([out["w"].ravel(), out["b"]])

    # Defaults weight by num-examples: median 10 (weighted mean 19.0).
    weighted = GeometricMedian()
    np.testing.assert_allclose(value(aggregate(weighted, GLOBAL, sites, weights)), 10, atol=1e-4)
    # Unweighted: median 2 (mean 22.6), whatever the num-examples.
    unweighted = GeometricMedian(weighted=False)
    np.testing.assert_allclose(value(aggregate(unweighted, GLOBAL, sites, weights)), 2, atol=1e-4)
    # max_iter reaches the iteration: one Weiszfeld step from the unweighted mean.
    z0 = np.mean(t)
    b = 1.0 / np.abs(np.asarray(t) - z0)
    one_step = GeometricMedian(weighted=False, max_iter=1)
    got = value(aggregate(one_step, GLOBAL, sites, weights))
    np.testing.assert_allclose(got, float(b @ t / b.sum()), rtol=1e-6)

    for bad in ({"max_iter": 0}, {"max_iter": -1}, {"tol": -1e-9}, {"eps": 0.0}, {"eps": -1e-6}):
        with pytest.raises(ValueError, match="max_iter >= 1, tol >= 0 and eps > 0"):
            GeometricMedian(**bad)
    GeometricMedian(max_iter=1, tol=0.0, eps=1e-12)  # the limits themselves are allowed


def direct_centered_clipping(
    updates: np.ndarray, v: np.ndarray, tau: float, iterations: int
) -> np.ndarray:
    for _ in range(iterations):
        step = np.zeros_like(v)
        for u in updates:
            d = u - v
            n = np.linalg.norm(d)
            step += d * min(1.0, tau / n) if n > 0 else d
        v = v + step / len(updates)
    return v


def test_centered_clipping_matches_the_formula_over_two_rounds() -> None:
    strategy = CenteredClipping(min_train_nodes=4, min_available_nodes=4, tau=1.0, iterations=3)
    rng = np.random.default_rng(3)
    global_arrays = {k: v.astype(np.float64) if k != "count" else v for k, v in GLOBAL.items()}
    v = np.zeros(5)
    for rnd in (1, 2):
        updates = rng.normal(scale=[1, 1, 1, 1, 1], size=(4, 5))
        updates[3] *= 30  # one site far away: clipped
        base = np.concatenate([global_arrays["w"].ravel(), global_arrays["b"]])
        sites = [
            {"w": (base + u)[:4].reshape(2, 2), "b": (base + u)[4:], "count": np.asarray(7)}
            for u in updates
        ]
        out = aggregate(strategy, global_arrays, sites, rnd=rnd)
        assert out is not None
        v = direct_centered_clipping(updates, v, tau=1.0, iterations=3)
        np.testing.assert_allclose(np.concatenate([out["w"].ravel(), out["b"]]), base + v)
        assert int(out["count"]) == 7
        global_arrays = out


class SpyStrategy(FedAvg):
    """FedAvg that keeps the arrays of the replies handed to it."""

    def __init__(self) -> None:
        super().__init__(min_train_nodes=3, min_available_nodes=3)
        self.seen: list[Arrays] = []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.seen = [numpy_of(m.content["arrays"]) for m in replies]
        return super().aggregate_train(server_round, replies)


def bound_sites() -> tuple[Arrays, list[Arrays]]:
    """Global model of float64 zeros; updates of norm 0.5, 0.3 and 50 (the last one big)."""
    g = {"w": np.zeros((2, 2)), "b": np.zeros(1), "count": np.asarray(3)}
    small1 = {"w": np.full((2, 2), 0.25), "b": np.zeros(1), "count": np.asarray(4)}
    small2 = {"w": np.zeros((2, 2)), "b": np.array([-0.3]), "count": np.asarray(4)}
    big = {"w": np.array([[30.0, 0], [0, 0]]), "b": np.array([40.0]), "count": np.asarray(4)}
    return g, [small1, small2, big]


def test_norm_bounding_clips_big_updates_to_exactly_the_bound() -> None:
    g, sites = bound_sites()
    spy = SpyStrategy()
    aggregate(NormBounding(spy, bound=2.0), g, sites)
    norms = [np.sqrt(sum(np.sum((s[k] - g[k]) ** 2) for k in ("w", "b"))) for s in spy.seen]
    assert norms == pytest.approx([0.5, 0.3, 2.0], rel=1e-12)
    for original, seen in zip(sites[:2], spy.seen[:2], strict=True):
        assert all(np.array_equal(original[k], seen[k]) for k in original)
    np.testing.assert_allclose(spy.seen[2]["w"], [[1.2, 0], [0, 0]])
    assert int(spy.seen[2]["count"]) == 4  # counters are the site's, untouched


def test_norm_bounding_on_fedavg_and_on_fedmedian() -> None:
    g, sites = bound_sites()
    clipped_big = {"w": np.array([[1.2, 0], [0, 0]]), "b": np.array([1.6])}
    clipped = [*sites[:2], {**sites[2], **clipped_big}]
    out = aggregate(build("normbound", 3, bound=2.0), g, sites)
    assert out is not None
    for k in ("w", "b"):
        np.testing.assert_allclose(out[k], np.mean([s[k] for s in clipped], axis=0))
    cfg = StrategyConfig(name="fedmedian", norm_bound=2.0)
    out = aggregate(build_strategy(cfg, num_sites=3), g, sites)
    assert out is not None
    for k in ("w", "b"):
        np.testing.assert_allclose(out[k], np.median([s[k] for s in clipped], axis=0))
    assert out["b"][0] == pytest.approx(0.0) and out["w"][0, 0] == pytest.approx(0.25)


# --- update validation ------------------------------------------------------------------------


def validating(
    checks: dict[int, list[UpdateCheck]], norm_outliers: str = "flag", num_sites: int = 6
) -> Strategy:
    cfg = StrategyConfig(name="fedavg", validation=UpdateValidationConfig(norm_outliers))
    return build_strategy(
        cfg,
        num_sites=num_sites,
        sites=ReplySites({node: f"hospital-{node}" for node in range(1, num_sites + 1)}),
        on_checks=lambda rnd, c: checks.__setitem__(rnd, c),
    )


def test_validation_rejects_nan_inf_wrong_shape_and_wrong_dtype() -> None:
    good = model([1, 1, 1, 1], 1)
    nan = model([1, np.nan, 1, 1], 1)
    inf = model([1, 1, np.inf, 1], 1)
    shape = {**good, "b": np.zeros(2, np.float32)}
    dtype = {**good, "w": good["w"].astype(np.float64)}
    checks: dict[int, list[UpdateCheck]] = {}
    out = aggregate(validating(checks), GLOBAL, [good, nan, inf, shape, dtype, good])
    assert out is not None
    np.testing.assert_allclose(out["w"], good["w"])  # only the two good replies averaged
    by_site = {c.site: c for c in checks[1]}
    expected = {
        "hospital-2": "NaN",
        "hospital-3": "Inf",
        "hospital-4": "shape",
        "hospital-5": "dtype",
    }
    for site, word in expected.items():
        assert by_site[site].status == "rejected"
        assert site in by_site[site].reason and word in by_site[site].reason
    assert [by_site[s].status for s in ("hospital-1", "hospital-6")] == ["accepted"] * 2


def test_validation_reports_error_replies_and_passes_on_the_others() -> None:
    checks: dict[int, list[UpdateCheck]] = {}
    strategy = validating(checks, num_sites=2)
    send(strategy, GLOBAL, 2)
    replies = [reply(1, model([2, 2, 2, 2])), error_reply(2, "out of memory")]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    np.testing.assert_allclose(numpy_of(arrays)["w"], np.full((2, 2), 2.0))
    failed = checks[1][1]
    assert failed.status == "rejected" and "hospital-2" in failed.reason
    assert "out of memory" in failed.reason and np.isnan(failed.update_norm)


def outlier_sites() -> list[Arrays]:
    """Four updates of norm 1 and one of norm 100."""
    sites = [model([1, 0, 0, 0]), model([0, 1, 0, 0]), model([0, 0, 1, 0]), model([0, 0, 0, 1])]
    return sites + [model([100, 0, 0, 0])]


def test_validation_flags_a_100x_update_by_default_and_fedavg_still_takes_it() -> None:
    checks: dict[int, list[UpdateCheck]] = {}
    out = aggregate(validating(checks, num_sites=5), GLOBAL, outlier_sites())
    assert out is not None
    assert out["w"][0, 0] == pytest.approx(101 / 5)  # the default does not protect FedAvg
    flagged = [c for c in checks[1] if c.status == "flagged"]
    assert [c.site for c in flagged] == ["hospital-5"]
    assert "hospital-5" in flagged[0].reason and "100.0x" in flagged[0].reason


def test_validation_rejects_a_100x_update_when_configured() -> None:
    checks: dict[int, list[UpdateCheck]] = {}
    out = aggregate(validating(checks, "reject", num_sites=5), GLOBAL, outlier_sites())
    assert out is not None
    np.testing.assert_allclose(out["w"], np.full((2, 2), 0.25))
    assert [c.status for c in checks[1]] == ["accepted"] * 4 + ["rejected"]


def test_validation_reports_update_norms_and_distances(caplog: pytest.LogCaptureFixture) -> None:
    checks: dict[int, list[UpdateCheck]] = {}
    sites = [model([3, 4, 0, 0]), model([0, 0, 0, 0], 2.0), model([1, 1, 1, 1], 1.0)]
    with caplog.at_level(logging.INFO, logger="fl_imaging.server"):
        out = aggregate(validating(checks, num_sites=3), GLOBAL, sites)
    assert out is not None
    flat = [np.concatenate([s["w"].ravel(), s["b"]]) for s in sites]
    mean = np.mean(flat, axis=0)
    assert [c.update_norm for c in checks[1]] == pytest.approx([5.0, 2.0, np.sqrt(5)])
    assert [c.distance_to_aggregate for c in checks[1]] == pytest.approx(
        [np.linalg.norm(f - mean) for f in flat], rel=1e-6
    )
    assert [c.node_id for c in checks[1]] == [1, 2, 3]
    lines = [r.getMessage() for r in caplog.records if "update norm" in r.getMessage()]
    assert len(lines) == 3 and "site hospital-1: update norm 5" in lines[0]
    assert out["count"].dtype == np.int64  # FedAvg's float64 counter cast back


def test_validation_wrapper_checks_its_settings() -> None:
    with pytest.raises(ValueError, match="norm_outliers"):
        ValidatingStrategy(FedMedian(), UpdateValidationConfig(norm_outliers="drop"))
    with pytest.raises(ValueError, match="norm_factor"):
        ValidatingStrategy(FedMedian(), UpdateValidationConfig(norm_factor=1.0))


# --- whole rounds through Strategy.start --------------------------------------------------------


def test_rounds_complete_with_rejected_replies() -> None:
    def respond(site: int, rnd: int, sent: Arrays) -> Arrays:
        out = {k: v + 1 if k != "count" else np.asarray(int(v) + 1) for k, v in sent.items()}
        if site == 3:
            out["w"] = np.full_like(sent["w"], np.nan)
        return out

    checks: dict[int, list[UpdateCheck]] = {}
    grid = FakeGrid(3, respond)
    strategy = validating(checks, num_sites=3)
    result = strategy.start(grid=grid, initial_arrays=record(GLOBAL), num_rounds=2)
    final = numpy_of(result.arrays)
    np.testing.assert_allclose(final["w"], np.full((2, 2), 2.0))
    assert final["count"].dtype == np.int64 and int(final["count"]) == 5
    for rnd in (1, 2):
        statuses = {grid.site_of[c.node_id]: c.status for c in checks[rnd]}
        assert statuses == {1: "accepted", 2: "accepted", 3: "rejected"}
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2]


def test_a_round_with_every_reply_rejected_keeps_the_previous_model() -> None:
    def respond(node: int, rnd: int, sent: Arrays) -> Arrays:
        out = {k: v + 1 if k != "count" else np.asarray(int(v) + 1) for k, v in sent.items()}
        if rnd == 1:
            out["b"] = np.full_like(sent["b"], np.inf)
        return out

    checks: dict[int, list[UpdateCheck]] = {}
    grid = FakeGrid(2, respond)
    result = validating(checks, num_sites=2).start(
        grid=grid, initial_arrays=record(GLOBAL), num_rounds=2
    )
    for k in GLOBAL:
        np.testing.assert_array_equal(grid.sent[2][k], GLOBAL[k])  # round 2 got the old model
    assert all(c.status == "rejected" for c in checks[1])
    np.testing.assert_allclose(numpy_of(result.arrays)["w"], np.ones((2, 2)))
    assert 1 not in result.train_metrics_clientapp and 2 in result.train_metrics_clientapp


# --- registry and config -------------------------------------------------------------------------


def test_unknown_strategy_name_or_parameter_raises_strategy_error() -> None:
    with pytest.raises(StrategyError, match="Allowed values for strategy.name: fedavg, fedavgm"):
        build("krumm", 3)
    with pytest.raises(StrategyError, match=r"strategy.params.tau.*Allowed parameters: .*beta"):
        build("fedtrimmedavg", 3, tau=1.0)
    with pytest.raises(StrategyError, match="engine.clients_per_round"):
        build("krum", 3, min_train_nodes=2)


def test_bulyan_with_too_few_sites_is_refused() -> None:
    with pytest.raises(StrategyError, match="at least 7 sites per round"):
        build("bulyan", 5, num_malicious_nodes=1)


def test_every_strategy_yaml_composes_and_builds() -> None:
    names = sorted(p.stem for p in CONF_STRATEGIES.glob("*.yaml"))
    assert names == sorted([*STRATEGIES, "dpfedavg"])
    for name in names:
        cfg = check_overrides([f"strategy={name}"]).strategy
        strategy = build_strategy(cfg, num_sites=8)
        assert isinstance(strategy, ValidatingStrategy)
        if name == "dpfedavg":  # FedAvg inside Flower's DP wrapper, sites weighted equally
            assert isinstance(strategy.inner, DifferentialPrivacyServerSideFixedClipping)
            assert type(strategy.inner.strategy) is FedAvg
            assert strategy.inner.strategy.weighted_by_key == "unit-weight"
            continue
        assert cfg.name == name
        assert isinstance(strategy.inner, STRATEGIES[name])
    cfg = check_overrides(["strategy=fedmedian", "strategy.norm_bound=5"]).strategy
    strategy = build_strategy(cfg, num_sites=3)
    assert isinstance(strategy, ValidatingStrategy) and isinstance(strategy.inner, NormBounding)
    assert isinstance(strategy.inner.inner, FedMedian) and strategy.inner.bound == 5.0
