"""Flower strategies of fl-imaging, selected by ``strategy=NAME`` (see ``conf/strategy/``)."""

from strategies.registry import STRATEGIES, StrategyError, build_strategy

__all__ = ["STRATEGIES", "StrategyError", "build_strategy"]
