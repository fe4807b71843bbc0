"""The cells of a benchmark: setups x (strategies + baselines) x seeds, each with its overrides.

A cell is one run: a federated run of one strategy, or a baseline (``public``: one model on the
public cases that ``data.public_fraction`` holds out of every site, whose weights then start
every federated cell of its setup and seed; ``pooled``: one model on every site's training
cases; ``local``: each site alone). Every cell of a setup shares the setup's sites and split; a
cell's overrides are the user's, then the setup's, then the strategy's (the public baseline's:
``bench.public_overrides``), then its seed and the test round, so a later one wins. A
strategy tuned by ``bench.tune`` (:mod:`fl_imaging.benchmark.tuning`) first runs its trials, one
cell per grid value and tuning seed without a test round; its benchmark cells then carry the
chosen value after the strategy's own overrides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fl_imaging.benchmark.tuning import Trial, grid_of
from fl_imaging.config import BenchConfig, ConfigError

__all__ = ["BASELINES", "PUBLIC", "TUNING", "Cell", "cell_folder", "plan_cells", "plan_trials"]

#: The baseline pretrained on the public share, which the federated cells start from.
PUBLIC = "public"
#: Baselines a benchmark may ask for, in the order they are run and reported (the public model
#: first: the federated cells need its weights).
BASELINES = (PUBLIC, "pooled", "local")
#: The kind of a tuning trial's cell: a federated run scored on validation data only.
TUNING = "tuning"


@dataclass(frozen=True)
class Cell:
    """One run of a benchmark: ``setup`` label, ``method`` (strategy label or baseline name),
    ``kind`` (``federated``, ``pooled``, ``local``, ``public`` or ``tuning``), ``seed``, the
    full override list and, for a tuning trial, its label (``tuning/KEY=VALUE``)."""

    setup: str
    method: str
    kind: str
    seed: int
    overrides: tuple[str, ...]
    trial: str = ""

    @property
    def key(self) -> str:
        """Folder of the cell under the benchmark's ``cells/``: ``SETUP/METHOD/seedN`` (a trial:
        ``SETUP/METHOD/tuning/KEY=VALUE/seedN``)."""
        middle = f"{self.trial}/" if self.trial else ""
        return f"{self.setup}/{self.method}/{middle}seed{self.seed}"


def cell_folder(bench: BenchConfig, key: str) -> Path:
    """The absolute folder of the cell ``key`` (``SETUP/METHOD/seedN``):
    ``bench.out_dir/bench.name/cells/KEY``."""
    return (Path(bench.out_dir) / (bench.name or "bench") / "cells" / key).resolve()


def _check_label(label: str, what: str) -> None:
    if not label or "/" in label or label.startswith("."):
        raise ConfigError(f"bench.{what}: '{label}' cannot name a folder; use letters, digits, _-")


def _run_overrides(overrides: list[str]) -> list[str]:
    """The overrides that change a run: all but those of the ``bench`` section, which choose the
    cells (seeds, strategies, out_dir) and must not make a cell that ran look changed."""
    kept = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key != "bench" and not key.startswith("bench."):
            kept.append(override)
    return kept


def _check_bench(bench: BenchConfig) -> dict[str, list[str]]:
    """The setups of ``bench`` (``default`` when none); raises :class:`ConfigError` when the
    benchmark names nothing to run, an unknown baseline, no seed, a reference that is none of
    its methods, or a label that cannot be a folder name."""
    if not bench.strategies and not bench.baselines:
        raise ConfigError(
            "bench: no strategies and no baselines to run; pick a benchmark preset, e.g. "
            "`fl-imaging-bench experiment=smoke`, or set bench.strategies"
        )
    unknown = [b for b in bench.baselines if b not in BASELINES]
    if unknown:
        raise ConfigError(
            f"bench.baselines: unknown {', '.join(unknown)}; allowed: {', '.join(BASELINES)}"
        )
    if not bench.seeds:
        raise ConfigError("bench.seeds is empty: give at least one training seed, e.g. [0]")
    setups = dict(bench.setups) or {"default": []}
    for label in [*setups, *bench.strategies]:
        _check_label(label, "setups/strategies")
    clash = set(bench.strategies) & set(BASELINES)
    if clash:
        raise ConfigError(f"bench.strategies: {', '.join(clash)} is the name of a baseline")
    methods = [*bench.baselines, *bench.strategies]
    if bench.reference not in methods:
        raise ConfigError(
            f"bench.reference={bench.reference}: not a method of this benchmark; allowed "
            f"values: {', '.join(methods)} (bench.baselines and the labels of bench.strategies)"
        )
    for label in bench.strategies:
        grid_of(bench, label)  # refuses a wrong bench.tune before anything runs
    return setups


def _public_start(bench: BenchConfig, setup: str, seed: int) -> list[str]:
    """The override that starts a federated cell from the public baseline of (setup, seed), or
    nothing without that baseline."""
    if PUBLIC not in bench.baselines:
        return []
    key = Cell(setup, PUBLIC, PUBLIC, seed, ()).key
    return [f"task.model.init={cell_folder(bench, key) / 'model.pt'}"]


def plan_trials(bench: BenchConfig, user_overrides: list[str]) -> list[tuple[Trial, Cell]]:
    """Every tuning trial of ``bench`` (``bench.tune``) with its cells, one per tuning seed, in
    run order: per setup, each tuned strategy's grid values in grid order. A trial's overrides
    are the cell's (user, setup, public start, strategy) plus ``KEY=VALUE``, its seed, and no
    test round. Raises :class:`ConfigError` for a wrong ``bench.tune`` and, with the public
    baseline, for a tuning seed that is not a benchmark seed (its public model would not exist).
    """
    setups = _check_bench(bench)
    if bench.tune and PUBLIC in bench.baselines:
        missing = sorted(set(bench.tune_seeds) - set(bench.seeds))
        if missing:
            raise ConfigError(
                f"bench.tune_seeds: {missing} are not in bench.seeds {list(bench.seeds)}; with "
                "the public baseline every trial starts from the public model of its seed, so "
                "tune with seeds the benchmark runs"
            )
    no_test = ["engine.test=false", "engine.finetune_epochs=0"]
    planned: list[tuple[Trial, Cell]] = []
    for setup, setup_overrides in setups.items():
        common = [*_run_overrides(user_overrides), *setup_overrides]
        for label, strategy_overrides in bench.strategies.items():
            grid = grid_of(bench, label)
            if grid is None:
                continue
            key, values = grid
            for value in values:
                trial = Trial(setup, label, key, value)
                for seed in bench.tune_seeds:
                    overrides = [
                        *common,
                        *_public_start(bench, setup, seed),
                        *strategy_overrides,
                        trial.override,
                        f"seed={seed}",
                        *no_test,
                    ]
                    cell = Cell(setup, label, TUNING, seed, tuple(overrides), trial.label)
                    planned.append((trial, cell))
    return planned


def plan_cells(
    bench: BenchConfig,
    user_overrides: list[str],
    chosen: Mapping[tuple[str, str], str] | None = None,
) -> list[Cell]:
    """Every cell of ``bench``, in run order: per setup, each seed's baselines then strategies;
    with the ``public`` baseline, every strategy of that setup and seed starts from its model
    (``task.model.init``; a strategy's own ``task.model.init`` wins).

    ``user_overrides`` (the command line, e.g. ``experiment=hippocampus_iid``) come first in each
    cell, less those of the ``bench`` section (a benchmark given one more seed reuses its cells).
    ``chosen`` maps (setup, strategy label) to the override its tuning chose (``KEY=VALUE``),
    added after the strategy's overrides; a tuned strategy without a choice yet has no cells.
    Raises :class:`ConfigError` when the benchmark names nothing to run or an unknown baseline,
    or when a label cannot be a folder name.
    """
    setups = _check_bench(bench)
    chosen = chosen or {}
    test = ["engine.test=true", f"engine.finetune_epochs={bench.finetune_epochs}"]
    cells: list[Cell] = []
    for setup, setup_overrides in setups.items():
        for seed in bench.seeds:
            common = [*_run_overrides(user_overrides), *setup_overrides]
            tail = [f"seed={seed}", *test]
            for baseline in BASELINES:
                if baseline in bench.baselines:
                    own = list(bench.public_overrides) if baseline == PUBLIC else []
                    cells.append(Cell(setup, baseline, baseline, seed, (*common, *own, *tail)))
            start = _public_start(bench, setup, seed)
            for label, strategy_overrides in bench.strategies.items():
                tuned: list[str] = []
                if label in bench.tune:
                    if (setup, label) not in chosen:
                        continue
                    tuned = [chosen[(setup, label)]]
                overrides = (*common, *start, *strategy_overrides, *tuned, *tail)
                cells.append(Cell(setup, label, "federated", seed, overrides))
    return cells
