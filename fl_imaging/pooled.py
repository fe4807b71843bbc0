"""Centralised (pooled) training: every site's cases in one place, one process, no Flower.

The reference a federated run is compared with: the same task, model, cases, batch size and
number of passes over the data (``engine.rounds x task.local_epochs`` epochs), evaluated after each
pass on each site's validation cases. Only possible where all data may be pooled (public data,
benchmarks); never for real hospital data.
"""

from __future__ import annotations

import logging
import time

import torch

from fl_imaging.config import RunConfig
from fl_imaging.data.sites import SiteData
from fl_imaging.results import AGGREGATE_SITE, MetricRow
from fl_imaging.site_training import SiteTrainer
from tasks import build_task

__all__ = ["train_pooled"]

log = logging.getLogger("fl_imaging.pooled")


def train_pooled(cfg: RunConfig, sites: list[SiteData]) -> tuple[list[MetricRow], torch.nn.Module]:
    """Train one model on the pooled training cases of ``sites``.

    Runs ``cfg.engine.rounds`` passes of ``cfg.task.local_epochs`` epochs each; after each pass the
    model is evaluated on every site's validation cases. Returns metric rows in the same form as a
    federated run (``round`` = pass, site ``all`` for the pooled training loss) and the model.
    """
    torch.manual_seed(cfg.seed)
    task = build_task(cfg.task)
    pooled = SiteTrainer(
        "pooled",
        [c for s in sites for c in s.train],
        [],
        task,
        batch_size=cfg.task.batch_size,
        cache=cfg.data.cache,
    )
    evaluators = [
        SiteTrainer(s.name, [], s.val, task, batch_size=1, cache=cfg.data.cache) for s in sites
    ]
    rows: list[MetricRow] = []
    for rnd in range(1, cfg.engine.rounds + 1):
        start = time.perf_counter()
        result = pooled.fit(cfg.task.local_epochs, seed=cfg.seed * 100_003 + rnd * 1_009)
        rows.append(MetricRow(rnd, AGGREGATE_SITE, "train_loss", result.loss))
        state = pooled.state()
        for evaluator in evaluators:
            evaluator.load_state(state)
            for name, value in evaluator.evaluate().items():
                metric = "val_loss" if name == "loss" else name
                rows.append(MetricRow(rnd, evaluator.name, metric, value))
        seconds = time.perf_counter() - start
        rows.append(MetricRow(rnd, AGGREGATE_SITE, "round_seconds", seconds))
        log.info(
            "pooled pass %d/%d: loss %.4f (%.1f s)", rnd, cfg.engine.rounds, result.loss, seconds
        )
    return rows, pooled.model
