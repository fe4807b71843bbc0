"""Build a Flower strategy from the ``strategy`` config group.

Each entry maps a config name to a Flower (or our own) ``Strategy`` class. Site sampling is not a
strategy parameter here: it comes from ``engine.clients_per_round`` so that every strategy samples
the same way.
"""

from __future__ import annotations

import inspect
from typing import Any

from flwr.serverapp.strategy import FedAvg, Strategy

from fl_imaging.config import StrategyConfig

__all__ = ["STRATEGIES", "SAMPLING_PARAMS", "StrategyError", "build_strategy"]

#: Config name -> strategy class.
STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
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


def build_strategy(
    cfg: StrategyConfig, *, num_sites: int, clients_per_round: int | None = None
) -> Strategy:
    """Instantiate the strategy ``cfg.name`` with ``cfg.params``.

    ``num_sites`` is the number of sites in the federation; ``clients_per_round`` how many take
    part in each round's training and evaluation (None: all). Returns the Flower ``Strategy``.
    Raises :class:`StrategyError` for an unknown name or parameter.
    """
    if cfg.name not in STRATEGIES:
        raise StrategyError(
            f"Unknown strategy '{cfg.name}'. Allowed values for strategy.name: "
            f"{', '.join(sorted(STRATEGIES))}."
        )
    cls = STRATEGIES[cfg.name]
    params: dict[str, Any] = dict(cfg.params)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    tunable = [p for p in accepted if p not in SAMPLING_PARAMS]
    for key in params:
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
    per_round = num_sites if clients_per_round is None else clients_per_round
    if per_round > num_sites:
        raise StrategyError(
            f"engine.clients_per_round={per_round} but the federation has only {num_sites} "
            "site(s): lower it or add sites."
        )
    sampling = {
        "fraction_train": per_round / num_sites,
        "fraction_evaluate": per_round / num_sites,
        "min_train_nodes": per_round,
        "min_evaluate_nodes": per_round,
        "min_available_nodes": per_round,
    }
    return cls(**{k: v for k, v in sampling.items() if k in accepted}, **params)
