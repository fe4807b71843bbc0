"""Build a Flower strategy from the ``strategy`` config group.

Each entry maps a config name (``conf/strategy/NAME.yaml``) to a Flower (or our own) ``Strategy``
class. Site sampling is not a strategy parameter here: it comes from ``engine.clients_per_round``
so that every strategy samples the same way. Whatever the strategy, the built object validates
every update first (:class:`~strategies.validation.ValidatingStrategy`) and, with
``strategy.norm_bound`` set, bounds each update's norm
(:class:`~strategies.norm_bounding.NormBounding`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from flwr.app import Message
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from fl_imaging.config import DPMode, StrategyConfig
from fl_imaging.flower.protocol import UNIT_WEIGHT
from strategies.centered_clipping import CenteredClipping
from strategies.geometric_median import GeometricMedian
from strategies.norm_bounding import NormBoundedFedAvg, NormBounding
from strategies.privacy import check_accountable, wrap_with_dp
from strategies.validation import UpdateCheck, ValidatingStrategy, node_site

__all__ = ["STRATEGIES", "SAMPLING_PARAMS", "StrategyError", "build_strategy", "sites_needed"]

#: Config name -> strategy class, Flower's first, then ours.
STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
    "bulyan": Bulyan,
    "geomedian": GeometricMedian,
    "centeredclip": CenteredClipping,
    "normbound": NormBoundedFedAvg,
}

#: Constructor arguments set from the engine config, never from ``strategy.params``.
SAMPLING_PARAMS = (
    "fraction_train",
    "fraction_evaluate",
    "min_train_nodes",
    "min_evaluate_nodes",
    "min_available_nodes",
)


class StrategyError(ValueError):
    """A strategy name or parameter that does not exist; the message lists the allowed ones."""


def _check_params(cfg: StrategyConfig, accepted: list[str]) -> None:
    tunable = [p for p in accepted if p not in SAMPLING_PARAMS]
    for key in cfg.params:
        if key in SAMPLING_PARAMS:
            raise StrategyError(
                f"strategy.params.{key} is set from the engine: use engine.clients_per_round "
                "instead."
            )
        if key not in accepted:
            raise StrategyError(
                f"Unknown parameter strategy.params.{key} for strategy '{cfg.name}'. "
                f"Allowed parameters: {', '.join(tunable) or '(none)'}."
            )


def _check_enough_sites(strategy: Strategy, per_round: int) -> None:
    if isinstance(strategy, Bulyan):
        needed = 4 * strategy.num_malicious_nodes + 3
        if per_round < needed:
            raise StrategyError(
                f"strategy 'bulyan' with num_malicious_nodes={strategy.num_malicious_nodes} needs "
                f"at least {needed} sites per round (4f+3), but a round has {per_round}; Flower "
                "would skip every aggregation. Lower strategy.params.num_malicious_nodes or add "
                "sites."
            )


def sites_needed(num_sites: int, clients_per_round: int | None, min_sites: int | None) -> int:
    """Connected sites a round needs: ``min_sites`` when set, else every site of a round
    (``clients_per_round``, default all ``num_sites``). Raises :class:`StrategyError` when
    ``min_sites`` is below 1 or above the sites per round."""
    per_round = num_sites if clients_per_round is None else clients_per_round
    if min_sites is None:
        return per_round
    if not 1 <= min_sites <= per_round:
        raise StrategyError(
            f"engine.min_sites={min_sites}: must be between 1 and the {per_round} site(s) of a "
            "round (engine.clients_per_round, or every site)"
        )
    return min_sites


def build_strategy(
    cfg: StrategyConfig,
    *,
    num_sites: int,
    clients_per_round: int | None = None,
    min_sites: int | None = None,
    site_of: Callable[[Message], str] | None = None,
    on_checks: Callable[[int, list[UpdateCheck]], None] | None = None,
) -> Strategy:
    """Instantiate the strategy ``cfg.name`` with ``cfg.params``, wrapped in the update checks.

    ``num_sites`` is the number of sites in the federation; ``clients_per_round`` how many take
    part in each round's training and evaluation (None: all); ``min_sites`` how few may (None:
    as many as ``clients_per_round``): the strategy then samples every connected site up to
    ``clients_per_round`` as long as ``min_sites`` are connected (Flower's
    ``min_available_nodes``, ``min_train_nodes`` and ``min_evaluate_nodes``). ``site_of`` names
    a reply's site in the checks (default ``node-<id>``); ``on_checks(round, checks)``
    receives each round's :class:`~strategies.validation.UpdateCheck` list. Returns the Flower
    ``Strategy`` ``ValidatingStrategy(DP(NormBounding(inner)))``, without ``NormBounding`` when
    ``cfg.norm_bound`` is None and without the DP wrapper when ``cfg.dp.mode`` is ``none``
    (DP sites are weighted equally: ``unit-weight``). Raises :class:`StrategyError` for an
    unknown name or parameter, a federation too small for the strategy, or a DP setting that
    cannot be accounted.
    """
    if cfg.name not in STRATEGIES:
        raise StrategyError(
            f"Unknown strategy '{cfg.name}'. Allowed values for strategy.name: "
            f"{', '.join(STRATEGIES)}."
        )
    cls = STRATEGIES[cfg.name]
    params: dict[str, Any] = dict(cfg.params)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    _check_params(cfg, accepted)
    per_round = num_sites if clients_per_round is None else clients_per_round
    if per_round > num_sites:
        raise StrategyError(
            f"engine.clients_per_round={per_round} but the federation has only {num_sites} "
            "site(s): lower it or add sites."
        )
    needed = sites_needed(num_sites, clients_per_round, min_sites)
    if cfg.dp.mode != DPMode.none and needed < per_round:
        raise StrategyError(
            f"strategy.dp.mode={cfg.dp.mode.value} with engine.min_sites={min_sites}: the privacy "
            f"accountant assumes exactly {per_round} site(s) in every round; leave "
            "engine.min_sites unset (null) for DP runs"
        )
    sampling = {
        "fraction_train": per_round / num_sites,
        "fraction_evaluate": per_round / num_sites,
        "min_train_nodes": needed,
        "min_evaluate_nodes": needed,
        "min_available_nodes": needed,
    }
    if cfg.dp.mode != DPMode.none:
        params.setdefault("weighted_by_key", UNIT_WEIGHT)
    try:
        check_accountable(cfg, num_sites, per_round)
        strategy = cls(**{k: v for k, v in sampling.items() if k in accepted}, **params)
        _check_enough_sites(strategy, per_round)
        if cfg.norm_bound is not None:
            strategy = NormBounding(strategy, cfg.norm_bound)
        strategy = wrap_with_dp(strategy, cfg.dp, num_sites=num_sites, per_round=per_round)
        return ValidatingStrategy(
            strategy, cfg.validation, site_of=site_of or node_site, on_checks=on_checks
        )
    except ValueError as err:
        if isinstance(err, StrategyError):
            raise
        raise StrategyError(f"strategy '{cfg.name}': {err}") from None
