"""The two baselines a federated result is read against: pooled and local-only training.

* pooled (centralised): one model on every site's training cases together, the upper reference
  where data could be pooled (public data, benchmarks; never real hospital data);
* local: each site trains alone on its own cases, the lower reference that federation must beat.

Both use the same task, model, batch size and number of passes over each case as a federated
run (``engine.rounds`` x ``task.local_epochs`` epochs), evaluate on each site's validation cases
after every pass of ``task.local_epochs`` epochs, and score the final model(s) on each site's
test cases. Rows have the form of a federated run's metrics.csv (``round`` = pass); no Flower.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch

from fl_imaging.config import RunConfig
from fl_imaging.data.sites import SiteData
from fl_imaging.results import AGGREGATE_SITE, MetricRow
from fl_imaging.site_training import SiteTrainer
from tasks import build_task

__all__ = ["train_local", "train_pooled"]

log = logging.getLogger("fl_imaging.baselines")


def _seed(cfg: RunConfig, rnd: int, site: int = 0) -> int:
    return cfg.seed * 100_003 + rnd * 1_009 + site


def _val_rows(rnd: int, trainer: SiteTrainer) -> list[MetricRow]:
    """The trainer's validation metrics as rows (``loss`` as ``val_loss``)."""
    metrics = trainer.evaluate("val")
    return [
        MetricRow(rnd, trainer.name, "val_loss" if k == "loss" else k, v)
        for k, v in metrics.items()
    ]


def _test_rows(rnd: int, trainer: SiteTrainer, prefix: str) -> list[MetricRow]:
    """``<prefix>_<metric>`` rows of the trainer's model on its test cases (none without)."""
    if trainer.num_test == 0:
        return []
    metrics = trainer.evaluate("test")
    return [MetricRow(rnd, trainer.name, f"{prefix}_{k}", v) for k, v in metrics.items()]


def _num_test(rnd: int, trainer: SiteTrainer) -> list[MetricRow]:
    return [MetricRow(rnd, trainer.name, "num_test", float(trainer.num_test))]


def _site_evaluators(cfg: RunConfig, sites: Iterable[SiteData]) -> list[SiteTrainer]:
    task = build_task(cfg.task)
    return [
        SiteTrainer(s.name, [], s.val, task, batch_size=1, cache=cfg.data.cache, test_cases=s.test)
        for s in sites
    ]


def train_pooled(
    cfg: RunConfig, sites: list[SiteData], finetune_epochs: int = 0
) -> tuple[list[MetricRow], torch.nn.Module]:
    """Train one model on the pooled training cases of ``sites``.

    Runs ``cfg.engine.rounds`` passes of ``cfg.task.local_epochs`` epochs; after each pass the
    model is scored on every site's validation cases, and after the last on every site's test
    cases (``test_<metric>``) and, with ``finetune_epochs`` > 0, after fine-tuning a copy that
    many epochs on the site's own training cases (``finetuned_<metric>``). Returns the rows
    (site ``all``: the pooled training loss and the pass's seconds) and the pooled model.
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
    evaluators = _site_evaluators(cfg, sites)
    rows: list[MetricRow] = []
    rounds = cfg.engine.rounds
    for rnd in range(1, rounds + 1):
        start = time.perf_counter()
        result = pooled.fit(cfg.task.local_epochs, seed=_seed(cfg, rnd))
        rows.append(MetricRow(rnd, AGGREGATE_SITE, "train_loss", result.loss))
        state = pooled.state()
        for evaluator in evaluators:
            evaluator.load_state(state)
            rows.extend(_val_rows(rnd, evaluator))
        seconds = time.perf_counter() - start
        rows.append(MetricRow(rnd, AGGREGATE_SITE, "round_seconds", seconds))
        log.info("pooled pass %d/%d: loss %.4f (%.1f s)", rnd, rounds, result.loss, seconds)
    state = pooled.state()
    for index, (site, evaluator) in enumerate(zip(sites, evaluators, strict=True)):
        evaluator.load_state(state)
        rows.extend(_test_rows(rounds, evaluator, "test") + _num_test(rounds, evaluator))
        if finetune_epochs > 0 and evaluator.num_test:
            tuner = SiteTrainer(
                site.name,
                site.train,
                [],
                task,
                batch_size=cfg.task.batch_size,
                cache=cfg.data.cache,
                test_cases=site.test,
            )
            tuner.load_state(state)
            tuner.fit(finetune_epochs, seed=cfg.seed * 100_003 + 7_919 + index)
            rows.extend(_test_rows(rounds, tuner, "finetuned"))
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
    task = build_task(cfg.task)
    initial = {k: v.clone() for k, v in task.build_model().state_dict().items()}
    trainers = []
    for site in sites:
        trainer = SiteTrainer(
            site.name,
            site.train,
            site.val,
            task,
            batch_size=cfg.task.batch_size,
            cache=cfg.data.cache,
            test_cases=site.test,
        )
        trainer.load_state(initial)
        trainers.append(trainer)
    rows: list[MetricRow] = []
    rounds = cfg.engine.rounds
    for rnd in range(1, rounds + 1):
        start = time.perf_counter()
        for index, trainer in enumerate(trainers):
            result = trainer.fit(cfg.task.local_epochs, seed=_seed(cfg, rnd, index))
            rows.append(MetricRow(rnd, trainer.name, "train_loss", result.loss))
            rows.extend(_val_rows(rnd, trainer))
        seconds = time.perf_counter() - start
        rows.append(MetricRow(rnd, AGGREGATE_SITE, "round_seconds", seconds))
        log.info("local training, pass %d/%d (every site alone): %.1f s", rnd, rounds, seconds)
    for trainer in trainers:
        rows.extend(_test_rows(rounds, trainer, "test") + _num_test(rounds, trainer))
    return rows, {t.name: t.model for t in trainers}
