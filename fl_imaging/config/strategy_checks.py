"""The rules of ``strategy.tune_key`` and of what SCAFFOLD and Ditto cannot combine with.

:func:`strategy_rule_problems` lists them for :func:`fl_imaging.config.checks.config_problems`,
one message per broken rule, each naming the keys and the reason.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

from fl_imaging.config.schema import CompressionMode, DPMode, RunConfig, StrategyConfig

__all__ = ["strategy_rule_problems", "tune_key_problem", "tune_value"]


def tune_value(strategy: StrategyConfig) -> Any:
    """The value ``strategy.tune_key`` names (a dotted key under ``strategy.``). Raises
    KeyError when no such key exists; returns None when ``tune_key`` is None."""
    if strategy.tune_key is None:
        return None
    node: Any = strategy
    for part in strategy.tune_key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif is_dataclass(node) and part in {f.name for f in fields(node)}:
            node = getattr(node, part)
        else:
            raise KeyError(part)
    return node


def tune_key_problem(strategy: StrategyConfig) -> str | None:
    """Why ``strategy.tune_key`` is unusable for a tuner (None: it is, or it is null): it
    must name a key under ``strategy.`` holding a number (its default)."""
    if strategy.tune_key is None:
        return None
    key = f"strategy.{strategy.tune_key}"
    try:
        value = tune_value(strategy)
    except KeyError:
        return (
            f"strategy.tune_key={strategy.tune_key}: {key} does not exist for "
            f"strategy={strategy.name}; name a key under strategy. (e.g. params.proximal_mu) "
            "and set its default in conf/strategy/NAME.yaml, or null"
        )
    if isinstance(value, bool) or not isinstance(value, int | float):
        return (
            f"strategy.tune_key={strategy.tune_key}: {key} is {value!r}, not a number a tuner "
            "can vary; give it a numeric default"
        )
    return None


def _scaffold_problems(run: RunConfig) -> list[str]:
    strategy = run.strategy
    why = "strategy=scaffold with"
    refused = [
        (
            strategy.secagg.enabled,
            f"{why} strategy.secagg.enabled=true: the coordinator needs the mean of the sites' "
            "control variate changes (c_i+ - c_i) beside their updates, but the secure sum "
            "(fl_imaging/secagg) masks only the packed model update, so each site's change, "
            "which reveals its mean local gradient as much as its update does, would travel "
            "in the clear; use strategy=fedavg or fedprox with secure aggregation",
        ),
        (
            strategy.compression != CompressionMode.none,
            f"{why} strategy.compression={strategy.compression.value}: a compressed reply "
            "carries the encoded model update only (fl_imaging/compression/site.py), and error "
            "feedback shifts the update that c_i was computed from; use "
            "strategy.compression=none",
        ),
        (
            strategy.norm_bound is not None,
            f"{why} strategy.norm_bound={strategy.norm_bound}: the bound clips each site's update "
            "but not its control variate change, so a clipped site would still move c by its "
            "full change; leave strategy.norm_bound unset (null)",
        ),
        (
            strategy.dp.mode != DPMode.none,
            f"{why} strategy.dp.mode={strategy.dp.mode.value}: Flower's DP wrappers clip and "
            "noise the model update only; the control variate change is a second function of "
            "the site's data, outside the clipping, the noise and the epsilon; use "
            "strategy.dp.mode=none (task.dp_sgd works: its correction uses no patient data)",
        ),
        (
            strategy.fedbn,
            f"{why} strategy.fedbn=true: a site trains its own normalisation layers, not the "
            "global ones it receives, so (x - y_i) of those layers measures no local drift and "
            "their control variates would be noise; use strategy.fedbn=false",
        ),
    ]
    return [message for on, message in refused if on]


def _ditto_problems(run: RunConfig) -> list[str]:
    problems: list[str] = []
    if run.task.dp_sgd.enabled:
        problems.append(
            "strategy=ditto with task.dp_sgd.enabled=true: the personal model trains on the "
            "site's patients without DP-SGD and its test scores leave the site, outside every "
            "site's epsilon; use another strategy with DP-SGD"
        )
    return problems


def strategy_rule_problems(run: RunConfig) -> list[str]:
    """Every rule of ``strategy.tune_key``, SCAFFOLD and Ditto that ``run`` breaks."""
    problems: list[str] = []
    if (problem := tune_key_problem(run.strategy)) is not None:
        problems.append(problem)
    if run.strategy.name == "scaffold":
        problems += _scaffold_problems(run)
    if run.strategy.name == "ditto":
        problems += _ditto_problems(run)
    return problems
