"""The cells of a benchmark: setups x (strategies + baselines) x seeds, each with its overrides.

A cell is one run: a federated run of one strategy, or a baseline (``public``: one model on the
public cases that ``data.public_fraction`` holds out of every site, whose weights then start
every federated cell of its setup and seed; ``pooled``: one model on every site's training
cases; ``local``: each site alone). Every cell of a setup shares the setup's sites and split; a
cell's overrides are the user's, then the setup's, then the strategy's (the public baseline's:
``bench.public_overrides``), then its seed and the test round, so a later one wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fl_imaging.config import BenchConfig, ConfigError

__all__ = ["BASELINES", "PUBLIC", "Cell", "cell_folder", "plan_cells"]

#: The baseline pretrained on the public share, which the federated cells start from.
PUBLIC = "public"
#: Baselines a benchmark may ask for, in the order they are run and reported (the public model
#: first: the federated cells need its weights).
BASELINES = (PUBLIC, "pooled", "local")


@dataclass(frozen=True)
class Cell:
    """One run of a benchmark: ``setup`` label, ``method`` (strategy label or baseline name),
    ``kind`` (``federated``, ``pooled`` or ``local``), ``seed`` and the full override list."""

    setup: str
    method: str
    kind: str
    seed: int
    overrides: tuple[str, ...]

    @property
    def key(self) -> str:
        """Folder of the cell under the benchmark's ``cells/``: ``SETUP/METHOD/seedN``."""
        return f"{self.setup}/{self.method}/seed{self.seed}"


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


def plan_cells(bench: BenchConfig, user_overrides: list[str]) -> list[Cell]:
    """Every cell of ``bench``, in run order: per setup, each seed's baselines then strategies;
    with the ``public`` baseline, every strategy of that setup and seed starts from its model
    (``task.model.init``; a strategy's own ``task.model.init`` wins).

    ``user_overrides`` (the command line, e.g. ``experiment=hippocampus_iid``) come first in each
    cell, less those of the ``bench`` section (a benchmark given one more seed reuses its cells).
    Raises :class:`ConfigError` when the benchmark names nothing to run, an unknown baseline or
    a reference that is none of its methods, or when a label cannot be a folder name.
    """
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
    test = ["engine.test=true", f"engine.finetune_epochs={bench.finetune_epochs}"]
    cells: list[Cell] = []
    for setup, setup_overrides in setups.items():
        for seed in bench.seeds:
            common = [*_run_overrides(user_overrides), *setup_overrides]
            tail = [f"seed={seed}", *test]
            start: list[str] = []
            for baseline in BASELINES:
                if baseline in bench.baselines:
                    own = list(bench.public_overrides) if baseline == PUBLIC else []
                    cell = Cell(setup, baseline, baseline, seed, tuple([*common, *own, *tail]))
                    cells.append(cell)
                    if baseline == PUBLIC:
                        start = [f"task.model.init={cell_folder(bench, cell.key) / 'model.pt'}"]
            for label, strategy_overrides in bench.strategies.items():
                overrides = tuple([*common, *start, *strategy_overrides, *tail])
                cells.append(Cell(setup, label, "federated", seed, overrides))
    return cells
