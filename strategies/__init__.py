"""Flower strategies of fl-imaging, selected by ``strategy=NAME`` (see ``conf/strategy/``).

Flower's own strategies plus ours (:class:`GeometricMedian`, :class:`CenteredClipping`), and two
wrappers usable on top of any strategy: :class:`NormBounding` and :class:`ValidatingStrategy`,
both built on :class:`StrategyWrapper`, which passes every call on to the wrapped strategy.
"""

from strategies.centered_clipping import CenteredClipping
from strategies.geometric_median import GeometricMedian
from strategies.norm_bounding import NormBoundedFedAvg, NormBounding
from strategies.registry import STRATEGIES, StrategyError, build_strategy
from strategies.validation import UpdateCheck, ValidatingStrategy
from strategies.wrapper import StrategyWrapper

__all__ = [
    "STRATEGIES",
    "CenteredClipping",
    "GeometricMedian",
    "NormBoundedFedAvg",
    "NormBounding",
    "StrategyError",
    "StrategyWrapper",
    "UpdateCheck",
    "ValidatingStrategy",
    "build_strategy",
]
