"""Patient-level DP on the Flower side: a site trains with DP-SGD from its own ledger and its own
policy; nothing of its accounting comes from the coordinator.

A site's DP-SGD accounting lives in its privacy ledger file (:mod:`fl_imaging.privacy.ledger`, in
its own state folder): one entry per run on its data (the run's noise multiplier, sample rate
and steps), read again before every round and written after it, so it survives a restarted
SuperNode, a Ray worker that changes between rounds and a resumed run (which sends the same
``run-key`` as the run it continues, so its steps go on in the same entry).

Each round, the site:

- takes its noise multiplier for a new run from the run's config (``task.dp_sgd``: a noise
  multiplier, or the target epsilon it derives one from with its own case count), raised to the
  least one that keeps the whole planned run within its policy's ``dp_sgd.max_epsilon`` (at the
  policy's delta) on top of every earlier run in its ledger: a coordinator that lowers the
  noise in the config gets the policy's floor;
- trains only when the round keeps both the run's epsilon within ``task.dp_sgd.target_epsilon``
  (the researcher's request) and the composition of all its runs within
  ``dp_sgd.max_epsilon`` (the site's promise to its patients); otherwise it answers with the
  global weights it received and ``num-examples`` 0, so that no aggregator counts it
  (:class:`~strategies.validation.ValidatingStrategy` leaves such replies out), and says
  ``patient_budget_spent`` = 1 (also in its last training round, when no further round fits);
- reports the run's epsilon and its lifetime epsilon (:data:`REPLY_METRICS`).

Ours: the per-run entries and the floor's search; the epsilons are Opacus' accountants.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from flwr.app import ConfigRecord

from fl_imaging.config import RunConfig
from fl_imaging.flower.protocol import NUM_EXAMPLES, RUN_KEY
from fl_imaging.privacy.dp_sgd import (
    PrivacyLedger,
    new_ledger,
    planned_steps,
    private_fit,
    site_privacy_problems,
    steps_per_epoch,
)
from fl_imaging.privacy.ledger import LedgerEntry, history
from fl_imaging.site.policy import DPSGDPolicy
from fl_imaging.site.setup import SiteSetup
from fl_imaging.training.site_training import SiteTrainer
from tasks.base import ExtraLoss, TrainResult

__all__ = ["REPLY_METRICS", "SitePrivacy", "lifetime_epsilon", "patient_metrics", "site_privacy"]

log = logging.getLogger("fl_imaging.client")

#: What a DP-SGD site reports after every round (metrics.csv rows per site).
REPLY_METRICS = (
    "patient_epsilon",
    "patient_delta",
    "patient_noise",
    "patient_sample_rate",
    "patient_steps",
    "patient_budget_spent",
    "patient_lifetime_epsilon",
)
#: The largest noise multiplier the floor's search tries.
MAX_NOISE = 1e4


def lifetime_epsilon(entries: Sequence[tuple[float, float, int]], policy: DPSGDPolicy) -> float:
    """Epsilon at ``policy.delta`` of every ``(noise, sample rate, steps)`` entry composed, by
    ``policy.accountant`` (0.0 without a step)."""
    from opacus.accountants import create_accountant

    entries = [e for e in entries if e[2] > 0]
    if not entries:
        return 0.0
    accountant = create_accountant(mechanism=policy.accountant.value)
    accountant.history = list(entries)
    return float(accountant.get_epsilon(delta=policy.delta))


def noise_floor(
    earlier: Sequence[tuple[float, float, int]], rate: float, steps: int, policy: DPSGDPolicy
) -> float:
    """The least noise multiplier (within 1%) that keeps ``earlier`` runs plus ``steps`` steps
    at sample ``rate`` within ``policy.max_epsilon``: 0 without a maximum, ``inf`` when even
    :data:`MAX_NOISE` does not."""
    if policy.max_epsilon is None or steps <= 0:
        return 0.0

    def fits(sigma: float) -> bool:
        return lifetime_epsilon([*earlier, (sigma, rate, steps)], policy) <= policy.max_epsilon

    if not fits(MAX_NOISE):
        return math.inf
    low, high = 0.05, MAX_NOISE
    if fits(low):
        return low
    while high / low > 1.01:
        middle = math.sqrt(low * high)
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


class SitePrivacy:
    """One training round of a site under DP-SGD (see the module): ``setup`` is the site's own
    (ledger, policy), ``settings`` the round's train config (its ``run-key``), ``flower_run``
    the Flower run id (the run's key when the coordinator sends none).

    Raises :class:`~fl_imaging.config.ConfigError` naming the site when its DP-SGD cannot be
    accounted honestly (:func:`~fl_imaging.privacy.dp_sgd.site_privacy_problems`; a deployed
    site finds it here, in its first round), :class:`~fl_imaging.privacy.ledger.LedgerError` when
    its ledger does not read back.
    """

    def __init__(
        self,
        setup: SiteSetup,
        cfg: RunConfig,
        trainer: SiteTrainer,
        settings: ConfigRecord,
        flower_run: int,
    ) -> None:
        from fl_imaging.config import ConfigError

        self.cfg, self.trainer, self.policy = cfg, trainer, setup.policy.dp_sgd
        self.file = setup.ledger()
        self.run = str(settings.get(RUN_KEY) or f"flower-run-{flower_run}")
        entries = self.file.entries()
        self.earlier = history([e for e in entries if e.run != self.run])
        own = next((e for e in entries if e.run == self.run), None)
        if own is not None:
            self.ledger = PrivacyLedger(own.noise, own.sample_rate, own.steps)
        else:
            problems = site_privacy_problems(cfg, trainer.name, trainer.num_train)
            if problems:
                raise ConfigError("; ".join(problems))
            asked = new_ledger(cfg, trainer.num_train)
            steps = planned_steps(cfg, trainer.num_train)
            floor = noise_floor(self.earlier, asked.sample_rate, steps, self.policy)
            if floor > asked.noise_multiplier and math.isfinite(floor):
                log.warning(
                    "[site %s] the run asks for noise multiplier %.4g; the site's policy "
                    "dp_sgd.max_epsilon=%g (over every run on its data) needs at least %.4g for "
                    "the %d planned steps: it trains with %.4g",
                    trainer.name,
                    asked.noise_multiplier,
                    self.policy.max_epsilon,
                    floor,
                    steps,
                    floor,
                )
            noise = max(asked.noise_multiplier, floor if math.isfinite(floor) else MAX_NOISE)
            self.ledger = replace(asked, noise_multiplier=noise)
        self.trained = False
        self.spent = False

    def _entry(self, extra_steps: int = 0) -> tuple[float, float, int]:
        ledger = self.ledger
        return (ledger.noise_multiplier, ledger.sample_rate, ledger.steps + extra_steps)

    def lifetime(self, extra_steps: int = 0) -> float:
        """Epsilon of every run on the site's data, this one with ``extra_steps`` more steps."""
        return lifetime_epsilon([*self.earlier, self._entry(extra_steps)], self.policy)

    def _fits(self, steps: int) -> bool:
        within_run = self.ledger.fits(self.cfg.task.dp_sgd, steps)
        cap = self.policy.max_epsilon
        return within_run and (cap is None or self.lifetime(steps) <= cap)

    def fit(
        self,
        epochs: int,
        *,
        seed: int,
        extra_loss: ExtraLoss | None = None,
        log: Callable[[str], None] | None = None,
    ) -> TrainResult:
        """Train ``epochs`` epochs with DP-SGD when they fit the run's and the site's budgets,
        and record the steps in the site's ledger; otherwise train nothing (``num_samples`` 0,
        loss NaN)."""
        dp, trainer = self.cfg.task.dp_sgd, self.trainer
        round_steps = epochs * steps_per_epoch(trainer.num_train, trainer.batch_size)
        if not self._fits(round_steps):
            self.spent = True
            self._log_spent()
            return TrainResult(loss=math.nan, num_samples=0)
        result, self.ledger = private_fit(
            trainer, self.ledger, dp, epochs, seed=seed, extra_loss=extra_loss, log=log
        )
        self.file.record(LedgerEntry(self.run, *self._entry()))
        self.trained = True
        self.spent = not self._fits(round_steps)
        if self.spent:
            self._log_spent()
        return result

    def _log_spent(self) -> None:
        log.warning(
            "[site %s] patient-level privacy budget spent: epsilon %.3f in this run "
            "(task.dp_sgd.target_epsilon=%s), %.3f over every run on its data (policy "
            "dp_sgd.max_epsilon=%s); the next round would exceed one of them, the site trains "
            "no more in this run",
            self.trainer.name,
            self.ledger.epsilon(self.cfg.task.dp_sgd),
            self.cfg.task.dp_sgd.target_epsilon,
            self.lifetime(),
            self.policy.max_epsilon,
        )

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
            self.lifetime(),
        )
        return {**kept, **dict(zip(REPLY_METRICS, values, strict=True))}


def site_privacy(
    setup: SiteSetup, cfg: RunConfig, trainer: SiteTrainer, settings: ConfigRecord, flower_run: int
) -> SitePrivacy | None:
    """The site's :class:`SitePrivacy` for this round, or None without ``task.dp_sgd``."""
    if not cfg.task.dp_sgd.enabled:
        return None
    return SitePrivacy(setup, cfg, trainer, settings, flower_run)


def patient_metrics(privacy: SitePrivacy | None, metrics: dict[str, float]) -> dict[str, float]:
    """A training reply's metrics: ``metrics`` as they are without DP-SGD (``privacy`` None),
    else :meth:`SitePrivacy.reply_metrics`."""
    return metrics if privacy is None else privacy.reply_metrics(metrics)
