"""The aggregators ``strategy=NAME`` selects, and how one is built from its config.

Each entry maps a config name (``conf/strategy/NAME.yaml``) to a Flower (or our own) ``Strategy``
class. Site sampling is not a strategy parameter here: it comes from ``engine.clients_per_round``
so that every strategy samples the same way. What wraps the aggregator (update checks, norm
bounding, DP, site availability, recording) is assembled in :mod:`strategies.chain`.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

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
from strategies.ditto import Ditto
from strategies.geometric_median import GeometricMedian
from strategies.norm_bounding import NormBoundedFedAvg
from strategies.scaffold import Scaffold

__all__ = [
    "STRATEGIES",
    "SAMPLING_PARAMS",
    "StrategyError",
    "accepted_params",
    "build_aggregator",
    "check_strategy_name",
    "sites_needed",
]

log = logging.getLogger("fl_imaging.server")

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
    "scaffold": Scaffold,
    "ditto": Ditto,
}

#: Constructor arguments set from the engine config, never from ``strategy.params``
#: (``num_sites``: the federation's size, for SCAFFOLD's share ``|S| / N``).
SAMPLING_PARAMS = (
    "fraction_train",
    "fraction_evaluate",
    "min_train_nodes",
    "min_evaluate_nodes",
    "min_available_nodes",
    "num_sites",
)


class StrategyError(ValueError):
    """A strategy name or parameter that does not exist; the message lists the allowed ones."""


def accepted_params(cls: type[Strategy]) -> list[str]:
    """The keyword parameters ``cls`` takes: those of its constructor and, when it passes
    ``**fedavg`` on to Flower's FedAvg (our aggregators do), FedAvg's too."""
    params = inspect.signature(cls.__init__).parameters
    names = [
        name
        for name, p in params.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    if any(p.kind == p.VAR_KEYWORD for p in params.values()) and cls is not FedAvg:
        names += [name for name in accepted_params(FedAvg) if name not in names]
    return names


def _check_params(cfg: StrategyConfig, accepted: list[str]) -> None:
    tunable = [p for p in accepted if p not in SAMPLING_PARAMS]
    for key in cfg.params:
        if key in SAMPLING_PARAMS:
            raise StrategyError(
                f"strategy.params.{key} is set from the engine: use engine.clients_per_round "
                "instead."
                if key != "num_sites"
                else "strategy.params.num_sites is the federation's number of sites, set from "
                "the run: leave it out."
            )
        if key not in accepted:
            raise StrategyError(
                f"Unknown parameter strategy.params.{key} for strategy '{cfg.name}'. "
                f"Allowed parameters: {', '.join(tunable) or '(none)'}."
            )


def _check_enough_sites(strategy: Strategy, per_round: int) -> None:
    """Refuse a robust aggregator that cannot work with ``per_round`` sites (Flower would skip
    every aggregation of Bulyan, or quietly clamp Krum's neighbours to 1), and warn when Krum
    runs below the number of sites its guarantee needs."""
    if isinstance(strategy, Bulyan):
        needed = 4 * strategy.num_malicious_nodes + 3
        if per_round < needed:
            raise StrategyError(
                f"strategy 'bulyan' with num_malicious_nodes={strategy.num_malicious_nodes} needs "
                f"at least {needed} sites per round (4f+3), but a round has {per_round}; Flower "
                "would skip every aggregation. Lower strategy.params.num_malicious_nodes or add "
                "sites."
            )
    elif isinstance(strategy, Krum | MultiKrum):
        name = "krum" if isinstance(strategy, Krum) else "multikrum"
        malicious = strategy.num_malicious_nodes
        neighbours = per_round - malicious - 2
        if malicious < 0 or neighbours < 1:
            raise StrategyError(
                f"strategy '{name}' with num_malicious_nodes={malicious} scores each update "
                f"against its n - f - 2 nearest others, {neighbours} with {per_round} sites per "
                "round; Flower would quietly use 1. Lower strategy.params.num_malicious_nodes or "
                "add sites."
            )
        if per_round < 2 * malicious + 3:
            log.warning(
                "strategy '%s' with num_malicious_nodes=%d and %d sites per round: Krum's "
                "guarantee (Blanchard et al. 2017) needs at least 2f+3 = %d sites; it runs, but "
                "it may pick a malicious update",
                name,
                malicious,
                per_round,
                2 * malicious + 3,
            )
        if not 1 <= strategy.num_nodes_to_select <= per_round - malicious:
            raise StrategyError(
                f"strategy '{name}': num_nodes_to_select={strategy.num_nodes_to_select} must be "
                f"between 1 and the {per_round - malicious} honest sites of a round (sites per "
                "round minus num_malicious_nodes)"
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


def check_strategy_name(cfg: StrategyConfig) -> None:
    """Raise :class:`StrategyError` naming ``strategy.name`` and every allowed value
    (:data:`STRATEGIES`) when ``cfg.name`` is none of them."""
    if cfg.name not in STRATEGIES:
        raise StrategyError(
            f"Unknown strategy '{cfg.name}'. Allowed values for strategy.name: "
            f"{', '.join(STRATEGIES)}."
        )


def build_aggregator(
    cfg: StrategyConfig, *, num_sites: int, clients_per_round: int | None, min_sites: int | None
) -> Strategy:
    """Instantiate the aggregator ``cfg.name`` with ``cfg.params`` and the sampling of the engine.

    ``num_sites`` is the number of sites in the federation; ``clients_per_round`` how many take
    part in each round's training and evaluation (None: all); ``min_sites`` how few may (None:
    as many as ``clients_per_round``): the strategy then samples every connected site up to
    ``clients_per_round`` as long as ``min_sites`` are connected (Flower's
    ``min_available_nodes``, ``min_train_nodes`` and ``min_evaluate_nodes``). DP runs weight
    sites equally (``unit-weight``). Raises :class:`StrategyError` for an unknown name or
    parameter or a federation too small for the strategy; Flower's own ``ValueError`` for a
    parameter value it refuses.
    """
    check_strategy_name(cfg)
    cls = STRATEGIES[cfg.name]
    params: dict[str, Any] = dict(cfg.params)
    accepted = accepted_params(cls)
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
        "num_sites": num_sites,
    }
    if cfg.dp.mode != DPMode.none:
        params.setdefault("weighted_by_key", UNIT_WEIGHT)
    strategy = cls(**{k: v for k, v in sampling.items() if k in accepted}, **params)
    _check_enough_sites(strategy, per_round)
    return strategy
