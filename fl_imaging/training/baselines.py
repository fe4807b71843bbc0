"""The two baselines a federated result is read against: pooled and local-only training.

* pooled (centralised): one model on every site's training cases together, the upper reference
  where data could be pooled (public data, benchmarks; never real hospital data);
* local: each site trains alone on its own cases, the lower reference that federation must beat.

Both use the same task, model, batch size and number of passes over each case as a federated
run (``engine.rounds`` x ``task.local_epochs`` epochs), evaluate on each site's validation cases
after every pass of ``task.local_epochs`` epochs, and score the final model(s) on each site's
test cases. Rows have the form of a federated run's metrics.csv (``round`` = pass); no Flower.
Both train on ``task.device`` as this machine resolves it
(:func:`fl_imaging.config.devices.site_device`).
"""

from __future__ import annotations

import logging
import time

import torch

from fl_imaging.config import RunConfig
from fl_imaging.config.devices import site_device
from fl_imaging.data.sites import SiteData
from fl_imaging.review.results import AGGREGATE_SITE, MetricRow
from fl_imaging.training.site_training import SiteTrainer, finetune_seed, training_seed
from tasks import build_task
from tasks.base import ImagingTask

__all__ = ["train_local", "train_pooled"]

log = logging.getLogger("fl_imaging.baselines")


def _site_trainer(cfg: RunConfig, task: ImagingTask, site: SiteData) -> SiteTrainer:
    """A trainer on one site's own training, validation and test cases."""
    return SiteTrainer(
        site.name,
        site.train,
        site.val,
        task,
        batch_size=cfg.task.batch_size,
        cache=cfg.data.cache,
        test_cases=site.test,
    )


def _val_rows(rnd: int, trainer: SiteTrainer) -> list[MetricRow]:
    """The trainer's validation metrics as rows (``loss`` as ``val_loss``)."""
    return [MetricRow(rnd, trainer.name, k, v) for k, v in trainer.validation_metrics().items()]


def _test_rows(
    rnd: int, trainer: SiteTrainer, finetune_epochs: int = 0, seed: int = 0
) -> list[MetricRow]:
    """Rows of :meth:`SiteTrainer.test_metrics` (``test_*``, ``finetuned_*``) and ``num_test``."""
    metrics = trainer.test_metrics(finetune_epochs, seed=seed)
    metrics["num_test"] = float(trainer.num_test)
    return [MetricRow(rnd, trainer.name, k, v) for k, v in metrics.items()]


def train_pooled(
    cfg: RunConfig,
    sites: list[SiteData],
    finetune_epochs: int = 0,
    train_sites: list[SiteData] | None = None,
) -> tuple[list[MetricRow], torch.nn.Module]:
    """Train one model on the pooled training cases of ``train_sites`` (default: ``sites``;
    e.g. the public share that no site holds), scored on ``sites``.

    Runs ``cfg.engine.rounds`` passes of ``cfg.task.local_epochs`` epochs; after each pass the
    model is scored on every site's validation cases, and after the last on every site's test
    cases (``test_<metric>``) and, with ``finetune_epochs`` > 0, after fine-tuning a copy that
    many epochs on the site's own training cases (``finetuned_<metric>``). Returns the rows
    (site ``all``: the pooled training loss and the pass's seconds) and the pooled model.
    """
    torch.manual_seed(cfg.seed)
    task = build_task(cfg.task, site_device(cfg.task, "pooled baseline"))
    pooled = SiteTrainer(
        "pooled",
        [c for s in (sites if train_sites is None else train_sites) for c in s.train],
        [],
        task,
        batch_size=cfg.task.batch_size,
        cache=cfg.data.cache,
    )
    site_trainers = [_site_trainer(cfg, task, site) for site in sites]
    rows: list[MetricRow] = []
    rounds = cfg.engine.rounds
    for rnd in range(1, rounds + 1):
        start = time.perf_counter()
        result = pooled.fit(cfg.task.local_epochs, seed=training_seed(cfg.seed, rnd, 0))
        rows.append(MetricRow(rnd, AGGREGATE_SITE, "train_loss", result.loss))
        state = pooled.state()
        for trainer in site_trainers:
            trainer.load_state(state)
            rows.extend(_val_rows(rnd, trainer))
        seconds = time.perf_counter() - start
        rows.append(MetricRow(rnd, AGGREGATE_SITE, "round_seconds", seconds))
        log.info("pooled pass %d/%d: loss %.4f (%.1f s)", rnd, rounds, result.loss, seconds)
    for index, trainer in enumerate(site_trainers):
        seed = finetune_seed(cfg.seed, index)
        rows.extend(_test_rows(rounds, trainer, finetune_epochs, seed))
    return rows, pooled.model


def train_local(
    cfg: RunConfig, sites: list[SiteData]
) -> tuple[list[MetricRow], dict[str, torch.nn.Module]]:
    """Train one model per site on that site's training cases only.

    Each site runs ``cfg.engine.rounds`` passes of ``cfg.task.local_epochs`` epochs from the same
    initial weights; after each pass its model is scored on its validation cases, after the
    last on its test cases (``test_<metric>``). Returns the rows (per site, with its
    ``train_loss``; site ``all``: each pass's seconds) and each site's model by name.
    """
    torch.manual_seed(cfg.seed)
    task = build_task(cfg.task, site_device(cfg.task, "local baseline"))
    initial = {k: v.clone() for k, v in task.build_model().state_dict().items()}
    trainers = [_site_trainer(cfg, task, site) for site in sites]
    for trainer in trainers:
        trainer.load_state(initial)
    rows: list[MetricRow] = []
    rounds = cfg.engine.rounds
    for rnd in range(1, rounds + 1):
        start = time.perf_counter()
        for index, trainer in enumerate(trainers):
            result = trainer.fit(cfg.task.local_epochs, seed=training_seed(cfg.seed, rnd, index))
            rows.append(MetricRow(rnd, trainer.name, "train_loss", result.loss))
            rows.extend(_val_rows(rnd, trainer))
        seconds = time.perf_counter() - start
        rows.append(MetricRow(rnd, AGGREGATE_SITE, "round_seconds", seconds))
        log.info("local training, pass %d/%d (every site alone): %.1f s", rnd, rounds, seconds)
    for trainer in trainers:
        rows.extend(_test_rows(rounds, trainer))
    return rows, {t.name: t.model for t in trainers}
