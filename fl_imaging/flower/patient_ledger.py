"""Patient-level DP on the Flower side: a site's privacy ledger across rounds and resumed runs.

A site's DP-SGD accounting (:class:`~fl_imaging.patient_privacy.PrivacyLedger`: noise multiplier,
sample rate, steps) lives in its Flower ``context.state``, as FedBN's layers do
(:mod:`fl_imaging.flower.local_norms`): in simulation a site may run on another Ray worker every
round, so process memory would lose steps. Each training reply reports the ledger and the epsilon
spent (``patient_*`` metrics, see :data:`REPLY_METRICS`), so the coordinator's rows, progress line,
checkpoint and summary hold every site's privacy state.

A resumed run starts with fresh contexts (so does a SuperNode that restarts). The coordinator
therefore sends each site, with every round's training message, the ledger its rows recorded for
it (:func:`carried_ledgers`, one train-config entry per site, from the checkpoint's rows in a
resumed run), and the site adopts whichever of that and its own record has counted more steps, so
it never counts fewer steps than it has recorded itself. The coordinator is trusted for this
carry-over: a site starting in a fresh process has only its word for the steps taken before (a
ledger file kept by the site would remove that trust; not built).

A site whose next round would exceed ``task.dp_sgd.target_epsilon`` does not train: it answers
with the global weights it received and ``num-examples`` 0, so that no aggregator counts it
(:class:`~strategies.validation.ValidatingStrategy` leaves such replies out), and says
``patient_budget_spent`` = 1 (also in its last training round, when no further round fits).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping

from flwr.app import ConfigRecord, Context

from fl_imaging.config import RunConfig
from fl_imaging.patient_privacy import (
    PrivacyLedger,
    new_ledger,
    private_fit,
    site_privacy_problems,
    steps_per_epoch,
)
from fl_imaging.protocol import NUM_EXAMPLES
from fl_imaging.results import MetricRow
from fl_imaging.site_training import SiteTrainer
from tasks.base import ExtraLoss, TrainResult

__all__ = [
    "CARRIED_LEDGER",
    "LEDGER_STATE",
    "REPLY_METRICS",
    "SitePrivacy",
    "carried_ledgers",
    "patient_metrics",
    "site_privacy",
]

log = logging.getLogger("fl_imaging.client")

#: Key of the site's ledger in its ``context.state`` (a ConfigRecord).
LEDGER_STATE = "dp-sgd-ledger"
#: Train-config key prefix of a site's ledger carried over by a resumed run: ``<prefix><site>``
#: -> ``[noise multiplier, sample rate, steps]``.
CARRIED_LEDGER = "dp-sgd-ledger:"
#: What a DP-SGD site reports after every round (metrics.csv rows per site).
REPLY_METRICS = (
    "patient_epsilon",
    "patient_delta",
    "patient_noise",
    "patient_sample_rate",
    "patient_steps",
    "patient_budget_spent",
)


def _ledger_of(values: Iterable[float] | None) -> PrivacyLedger | None:
    if values is None:
        return None
    sigma, rate, steps = (float(v) for v in values)
    return PrivacyLedger(sigma, rate, int(steps))


class SitePrivacy:
    """One training round of a site under DP-SGD. ``context`` holds its ledger between rounds,
    ``settings`` is the round's train config (a carried-over ledger on resume).

    Raises :class:`~fl_imaging.config.ConfigError` naming the site when its DP-SGD cannot be
    accounted honestly (:func:`~fl_imaging.patient_privacy.site_privacy_problems`; a deployed
    site finds it here, in its first round).
    """

    def __init__(
        self, context: Context, cfg: RunConfig, trainer: SiteTrainer, settings: ConfigRecord
    ) -> None:
        from fl_imaging.config import ConfigError

        self.context, self.cfg, self.trainer = context, cfg, trainer
        own = None
        if LEDGER_STATE in context.state.config_records:
            record = context.state.config_records[LEDGER_STATE]
            own = _ledger_of([record["noise"], record["rate"], record["steps"]])
        carried = _ledger_of(settings.get(CARRIED_LEDGER + trainer.name))  # type: ignore[arg-type]
        known = [x for x in (own, carried) if x is not None]
        if known:
            self.ledger = max(known, key=lambda x: x.steps)
        else:
            problems = site_privacy_problems(cfg, trainer.name, trainer.num_train)
            if problems:
                raise ConfigError("; ".join(problems))
            self.ledger = new_ledger(cfg, trainer.num_train)
        self.trained = False
        self.spent = False

    def fit(
        self,
        epochs: int,
        *,
        seed: int,
        extra_loss: ExtraLoss | None = None,
        log: Callable[[str], None] | None = None,
    ) -> TrainResult:
        """Train ``epochs`` epochs with DP-SGD when they fit the site's budget and keep the
        ledger in ``context.state``; otherwise train nothing (``num_samples`` 0, loss NaN)."""
        dp, trainer = self.cfg.task.dp_sgd, self.trainer
        round_steps = epochs * steps_per_epoch(trainer.num_train, trainer.batch_size)
        if not self.ledger.fits(dp, round_steps):
            self.spent = True
            _log_spent(trainer.name, self.ledger.epsilon(dp), dp.target_epsilon)
            return TrainResult(loss=math.nan, num_samples=0)
        result, self.ledger = private_fit(
            trainer, self.ledger, dp, epochs, seed=seed, extra_loss=extra_loss, log=log
        )
        self.trained = True
        self.context.state[LEDGER_STATE] = ConfigRecord(
            {
                "noise": self.ledger.noise_multiplier,
                "rate": self.ledger.sample_rate,
                "steps": self.ledger.steps,
            }
        )
        self.spent = not self.ledger.fits(dp, round_steps)
        if self.spent:
            _log_spent(trainer.name, self.ledger.epsilon(dp), dp.target_epsilon)
        return result

    def reply_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The reply's metrics under DP-SGD: ``metrics`` without the training loss (computed on
        the patients without noise: kept at the site), ``num-examples`` the site's training
        cases (0 when it did not train), and the :data:`REPLY_METRICS`."""
        dp = self.cfg.task.dp_sgd
        kept = {k: v for k, v in metrics.items() if k != "train_loss"}
        kept[NUM_EXAMPLES] = self.trainer.num_train if self.trained else 0
        values = (
            self.ledger.epsilon(dp),
            dp.delta,
            self.ledger.noise_multiplier,
            self.ledger.sample_rate,
            self.ledger.steps,
            int(self.spent),
        )
        return {**kept, **dict(zip(REPLY_METRICS, values, strict=True))}


def _log_spent(site: str, epsilon: float, target: float | None) -> None:
    log.warning(
        "[site %s] patient-level privacy budget spent: epsilon %.3f, the next round would exceed "
        "task.dp_sgd.target_epsilon=%s; the site trains no more in this run",
        site,
        epsilon,
        target,
    )


def site_privacy(
    context: Context, cfg: RunConfig, trainer: SiteTrainer, settings: ConfigRecord
) -> SitePrivacy | None:
    """The site's :class:`SitePrivacy` for this round, or None without ``task.dp_sgd``."""
    return SitePrivacy(context, cfg, trainer, settings) if cfg.task.dp_sgd.enabled else None


def patient_metrics(privacy: SitePrivacy | None, metrics: dict[str, float]) -> dict[str, float]:
    """A training reply's metrics: ``metrics`` as they are without DP-SGD (``privacy`` None),
    else :meth:`SitePrivacy.reply_metrics`."""
    return metrics if privacy is None else privacy.reply_metrics(metrics)


def carried_ledgers(rows: Iterable[MetricRow]) -> dict[str, list[float]]:
    """Train-config entries carrying each site's last reported ledger (from a checkpoint's
    rows) into a resumed run: ``<CARRIED_LEDGER><site>`` -> [noise, sample rate, steps]."""
    latest: dict[str, dict[str, tuple[int, float]]] = {}
    for row in rows:
        if row.metric in ("patient_noise", "patient_sample_rate", "patient_steps"):
            seen = latest.setdefault(row.site, {})
            if row.metric not in seen or row.round >= seen[row.metric][0]:
                seen[row.metric] = (row.round, row.value)
    return {
        CARRIED_LEDGER + site: [
            m["patient_noise"][1],
            m["patient_sample_rate"][1],
            m["patient_steps"][1],
        ]
        for site, m in latest.items()
        if len(m) == 3 and site != "all"
    }
