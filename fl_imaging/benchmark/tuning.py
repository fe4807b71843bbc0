"""The tuning protocol of a benchmark: each tuned strategy's setting chosen on validation data.

``bench.tune`` maps a strategy label to one override key and its grid, e.g.
``{fedadam: {strategy.params.eta: [0.001, 0.01, 0.1]}}``. For every setup, each grid value
trains once per ``bench.tune_seeds`` seed (a *trial*: the strategy's overrides plus
``KEY=VALUE``, no test round, so no test case is ever scored while tuning); its score is the
final round's validation main metric, averaged over sites, then over the tuning seeds. The
value with the best score (higher is better, lower for losses; a tie goes to the first value in
the grid) is then added to that strategy's cells for every benchmark seed, which are scored on
the test split as any other. The trials, their scores and the choice go to ``tuning.csv`` and
to the summary (column ``tuned on validation``).

Ours: FLamby tunes each strategy's learning rate by hand before its benchmark; no library here
runs a grid over federated runs inside a benchmark, so the protocol is written here.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fl_imaging.config import BenchConfig, ConfigError

__all__ = [
    "Choice",
    "Trial",
    "choose",
    "grid_of",
    "override_text",
    "resolve_tune_keys",
    "write_tuning_csv",
]


@dataclass(frozen=True)
class Trial:
    """One grid value of one tuned strategy in one setup: ``key`` (an override key), ``value``
    and the tuning seeds it trains with."""

    setup: str
    method: str
    key: str
    value: Any

    @property
    def override(self) -> str:
        """The override that makes this trial: ``KEY=VALUE``."""
        return override_text(self.key, self.value)

    @property
    def label(self) -> str:
        """The trial's folder name under its method: ``tuning/KEY=VALUE``."""
        return f"tuning/{self.override}"


@dataclass(frozen=True)
class Choice:
    """The tuned value of one (setup, method): the override chosen, each grid value's score
    (NaN where a trial did not finish) and whether every trial finished."""

    setup: str
    method: str
    key: str
    scores: tuple[tuple[Any, float], ...]
    value: Any

    @property
    def override(self) -> str:
        """The override added to the method's benchmark cells: ``KEY=VALUE``."""
        return override_text(self.key, self.value)


def override_text(key: str, value: Any) -> str:
    """``KEY=VALUE`` as Hydra parses it back to ``value`` (lists as ``[a,b]``, None as null)."""
    if value is None:
        return f"{key}=null"
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    if isinstance(value, list | tuple):
        return f"{key}=[{','.join(str(v) for v in value)}]"
    return f"{key}={value}"


def resolve_tune_keys(bench: BenchConfig, tune_key_of: Callable[[str], str | None]) -> BenchConfig:
    """``bench`` with every grid given alone (``{fedadam: [0.001, 0.01]}``) keyed by its
    strategy's own setting: ``strategy.`` + ``tune_key_of(label)`` (the label's
    ``strategy.tune_key``, e.g. ``params.eta``). Raises :class:`ConfigError` for a strategy
    without a ``tune_key`` or a grid that is neither a list nor a mapping."""
    resolved: dict[str, Any] = {}
    for label, grid in bench.tune.items():
        if isinstance(grid, Mapping):
            resolved[label] = dict(grid)
            continue
        if not isinstance(grid, list | tuple):
            raise ConfigError(
                f"bench.tune.{label}: give a grid, e.g. [0.001,0.01,0.1] for the strategy's own "
                f"strategy.tune_key, or {{KEY:[...]}}; got {grid!r}"
            )
        key = tune_key_of(label) if label in bench.strategies else None
        if label in bench.strategies and key is None:
            raise ConfigError(
                f"bench.tune.{label}: this strategy has no strategy.tune_key to tune, so name "
                f"the key: '+bench.tune.{label}={{task.optimizer.lr:[0.001,0.01]}}'"
            )
        resolved[label] = {f"strategy.{key}": list(grid)} if key else list(grid)
    return replace(bench, tune=resolved)


def grid_of(bench: BenchConfig, label: str) -> tuple[str, list[Any]] | None:
    """The (override key, grid values) that ``bench.tune`` gives the strategy ``label``, or
    None when it is not tuned. Raises :class:`ConfigError` for a label the benchmark does not
    run, more or fewer than one key, an empty grid, or a repeated value."""
    unknown = sorted(set(bench.tune) - set(bench.strategies))
    if unknown:
        raise ConfigError(
            f"bench.tune: no strategy {', '.join(unknown)} in this benchmark; tuned labels must "
            f"be among bench.strategies ({', '.join(bench.strategies) or 'none'})"
        )
    if label not in bench.tune:
        return None
    grid = bench.tune[label]
    if not isinstance(grid, Mapping):
        raise ConfigError(
            f"bench.tune.{label}: name the key of the grid {grid!r}, e.g. "
            f"'+bench.tune.{label}={{strategy.params.eta:[0.001,0.01]}}'"
        )
    grid = dict(grid)
    if len(grid) != 1:
        raise ConfigError(
            f"bench.tune.{label}: tune one key per strategy, e.g. "
            f"'+bench.tune.{label}={{strategy.params.eta:[0.001,0.01,0.1]}}'; got "
            f"{', '.join(grid) or 'none'}"
        )
    ((key, values),) = grid.items()
    values = list(values)
    if len(values) < 2:
        raise ConfigError(
            f"bench.tune.{label}.{key}: a grid needs at least 2 values to choose from, got {values}"
        )
    if len({repr(v) for v in values}) != len(values):
        raise ConfigError(f"bench.tune.{label}.{key}: the grid {values} repeats a value")
    if not bench.tune_seeds:
        raise ConfigError("bench.tune_seeds is empty: give at least one tuning seed, e.g. [0]")
    return key, values


def _better(metric: str, a: float, b: float) -> bool:
    lower = metric.endswith("loss")
    return a < b if lower else a > b


def choose(
    trials: Sequence[Trial],
    score: Callable[[Trial], Sequence[float]],
    metric: str,
) -> dict[tuple[str, str], Choice]:
    """The choice per (setup, method) from its ``trials``: ``score(trial)`` gives the trial's
    validation ``metric`` per tuning seed (an empty list or NaN where it did not finish). A
    (setup, method) is chosen only when every trial has every seed's score; the best mean wins
    (lower for a loss), the first in grid order on a tie."""
    groups: dict[tuple[str, str], list[Trial]] = {}
    for trial in trials:
        groups.setdefault((trial.setup, trial.method), []).append(trial)
    chosen: dict[tuple[str, str], Choice] = {}
    for (setup, method), group in groups.items():
        scores: list[tuple[Any, float]] = []
        complete = True
        for trial in group:
            values = list(score(trial))
            if not values or any(math.isnan(v) for v in values):
                complete = False
                scores.append((trial.value, math.nan))
            else:
                scores.append((trial.value, sum(values) / len(values)))
        if not complete:
            continue
        best_value, best_score = scores[0]
        for value, figure in scores[1:]:
            if _better(metric, figure, best_score):
                best_value, best_score = value, figure
        chosen[(setup, method)] = Choice(setup, method, group[0].key, tuple(scores), best_value)
    return chosen


def write_tuning_csv(
    trials: Sequence[Trial],
    scores: Mapping[Trial, float],
    chosen: Mapping[tuple[str, str], Choice],
    metric: str,
    path: Path,
) -> Path:
    """``tuning.csv``: one row per trial (setup, method, key, value, ``val_<metric>``: its
    validation score averaged over tuning seeds, empty when it did not finish, and chosen:
    1 for the value the benchmark's cells use). Returns ``path``."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["setup", "method", "key", "value", f"val_{metric}", "chosen"])
        for trial in trials:
            figure = scores.get(trial, math.nan)
            choice = chosen.get((trial.setup, trial.method))
            picked = choice is not None and repr(choice.value) == repr(trial.value)
            writer.writerow(
                [
                    trial.setup,
                    trial.method,
                    trial.key,
                    override_text(trial.key, trial.value).split("=", 1)[1],
                    "" if math.isnan(figure) else f"{figure:.4f}",
                    int(picked),
                ]
            )
    return path
