"""Flower strategies of fl-imaging, selected by ``strategy=NAME`` (see ``conf/strategy/``).

Flower's own strategies plus ours (:class:`GeometricMedian`, :class:`CenteredClipping`), the
wrappers around any of them (:class:`NormBounding`, :class:`ValidatingStrategy`,
:class:`SiteAvailability`, :class:`RecordingStrategy`, all built on :class:`StrategyWrapper`),
and :func:`build_strategy`, the one function that assembles the chain (:mod:`strategies.chain`).
"""

from strategies.availability import NotEnoughSites, SiteAvailability
from strategies.centered_clipping import CenteredClipping
from strategies.chain import Federation, build_strategy
from strategies.geometric_median import GeometricMedian
from strategies.norm_bounding import NormBoundedFedAvg, NormBounding
from strategies.recording import RecordingStrategy
from strategies.registry import STRATEGIES, StrategyError
from strategies.validation import UpdateCheck, ValidatingStrategy
from strategies.wrapper import StrategyWrapper

__all__ = [
    "STRATEGIES",
    "CenteredClipping",
    "Federation",
    "GeometricMedian",
    "NormBoundedFedAvg",
    "NormBounding",
    "NotEnoughSites",
    "RecordingStrategy",
    "SiteAvailability",
    "StrategyError",
    "StrategyWrapper",
    "UpdateCheck",
    "ValidatingStrategy",
    "build_strategy",
]
