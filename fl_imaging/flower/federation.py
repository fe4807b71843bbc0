"""The server side of a run, built before the first round: the model, the strategy chain, the
checkpoint it resumes from, and what happens after every round (progress line, checkpoint).

:func:`plan_federation` is where a run's server-side settings are checked, once per process: the
``fl-imaging`` pipeline calls it before the engine starts (so a refused strategy or resume stops
there) and, in simulation, hands the plan to the ServerApp; a deployed ServerApp, in its own
process on the SuperLink's host, makes its plan from the config it receives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord

from fl_imaging.config import RunConfig
from fl_imaging.flower.checkpoint import (
    Checkpoint,
    check_resumable,
    load_checkpoint,
    restore_strategy_state,
    save_checkpoint,
)
from fl_imaging.results import MetricRow, progress_line
from strategies import Federation, RecordingStrategy, build_strategy
from tasks import build_task

__all__ = ["FederationPlan", "plan_federation"]

log = logging.getLogger("fl_imaging.server")


@dataclass
class FederationPlan:
    """Everything the ServerApp hands to Flower: the validated config, the task's model (its
    initial weights, or the checkpoint's), the strategy chain (outermost layer: the recorder,
    see :mod:`strategies.chain`), the sites' names for the tables (extended as sites reply),
    the task's main metric and the checkpoint resumed from (None: a fresh run)."""

    cfg: RunConfig
    model: torch.nn.Module
    strategy: RecordingStrategy
    site_names: list[str]
    main_metric: str
    checkpoint: Checkpoint | None = None

    @property
    def run_dir(self) -> Path:
        """Where the run's files go (``cfg.run_dir``)."""
        return Path(self.cfg.run_dir)

    def after_round(self, rnd: int, rows: list[MetricRow]) -> None:
        """Print round ``rnd``'s progress line and save the checkpoint after it. Raises
        :class:`~fl_imaging.results.RunFolderError` when the checkpoint cannot be written (the
        previous one is kept)."""
        rounds = self.cfg.engine.rounds
        log.info(progress_line(rnd, rounds, rows, self.main_metric, self.site_names))
        assert self.strategy.global_arrays is not None
        save_checkpoint(
            self.run_dir,
            server_round=rnd,
            arrays=self.strategy.global_arrays,
            strategy=self.strategy,
            rows=self.strategy.rows,
            failures=self.strategy.failures,
            cfg=self.cfg,
        )


def plan_federation(cfg: RunConfig, site_names: list[str]) -> FederationPlan:
    """Build and check the server side of ``cfg``: the seeded model, the strategy chain for
    ``engine.num_sites`` sites (or as many as ``site_names``) and, with ``cfg.resume``, the
    checkpoint (config compared, strategy state, rows and model restored).

    Raises :class:`~strategies.registry.StrategyError` for a strategy that cannot run and
    :class:`~fl_imaging.config.ConfigError` for a run that cannot be resumed.
    """
    names = list(site_names)
    num_sites = cfg.engine.num_sites or len(names)
    torch.manual_seed(cfg.seed)
    task = build_task(cfg.task)
    model = task.build_model()
    checkpoint = load_checkpoint(Path(cfg.resume)) if cfg.resume else None
    arrays = ArrayRecord(model.state_dict())
    if checkpoint is not None:
        check_resumable(checkpoint, cfg)
        arrays = ArrayRecord({k: Array(v) for k, v in checkpoint.arrays.items()})
        log.info(
            "resuming %s after round %d of %d", cfg.resume, checkpoint.round, cfg.engine.rounds
        )
    federation = Federation(
        site_names=names,
        wait_timeout=cfg.engine.wait_timeout,
        round_timeout=cfg.engine.round_timeout,
        global_arrays=arrays,
        offset=checkpoint.round if checkpoint else 0,
        evaluate_until=cfg.engine.rounds if cfg.engine.evaluate_in_train else None,
    )
    strategy = build_strategy(
        cfg.strategy,
        num_sites=num_sites,
        clients_per_round=cfg.engine.clients_per_round,
        min_sites=cfg.engine.min_sites,
        federation=federation,
    )
    assert isinstance(strategy, RecordingStrategy)
    if checkpoint is not None:
        restore_strategy_state(strategy, checkpoint.strategy)
        strategy.rows = list(checkpoint.rows)
        strategy.failures = list(checkpoint.failures)
    plan = FederationPlan(cfg, model, strategy, names, task.main_metric, checkpoint)
    strategy.on_round_end = plan.after_round
    return plan
