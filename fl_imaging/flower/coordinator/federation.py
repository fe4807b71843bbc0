"""The server side of a run, built before the first round: the model, the strategy chain, the
checkpoint it resumes from, and what happens after every round (progress line, checkpoint).

:func:`plan_federation` is where a run's server-side settings are checked, once per process: the
``fl-imaging`` pipeline calls it before the engine starts (so a refused strategy or resume stops
there) and, in simulation, hands the plan to the ServerApp; a deployed ServerApp, in its own
process on the SuperLink's host, makes its plan from the config it receives.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from fl_imaging.config import ConfigError, DPMode, RunConfig
from fl_imaging.console.events import ROUND_ENDED, Progress, progress_extra
from fl_imaging.flower.coordinator.checkpoint import (
    Checkpoint,
    check_resumable,
    load_checkpoint,
    restore_strategy_state,
    save_checkpoint,
)
from fl_imaging.flower.coordinator.initial_model import InitialModel, load_initial_model
from fl_imaging.flower.protocol import RUN_KEY
from fl_imaging.privacy.report import spent_sites
from fl_imaging.review.results import AGGREGATE_SITE, MetricRow, SitesFailed, progress_line
from fl_imaging.review.run_records import RunRecords
from strategies import Federation, RecordingStrategy, build_strategy
from tasks import build_task

__all__ = ["FederationPlan", "PatientBudgetsSpent", "budgets_spent", "plan_federation"]

log = logging.getLogger("fl_imaging.server")


class PatientBudgetsSpent(RuntimeError):
    """Every site's DP-SGD budget is spent before the last round (no site would train again),
    or one site's is in a run with client-level DP. The message says after which round the run
    stops and why."""


def budgets_spent(cfg: RunConfig, rows: list[MetricRow], site_names: list[str]) -> str:
    """Why a DP-SGD run cannot go on, from the sites' ``patient_budget_spent`` rows: every site's
    budget is spent, or, with accounted client-level DP, one site's (DP-FedAvg's noise and
    accountant assume every site's update in every round; a site sitting out would make its
    epsilon wrong). Empty when the run can go on."""
    spent = spent_sites(rows)
    budget = f"task.dp_sgd.target_epsilon={cfg.task.dp_sgd.target_epsilon}"
    if spent and set(spent) >= set(site_names):
        return f"every site's patient-level privacy budget is spent ({budget})"
    if spent and cfg.strategy.dp.mode != DPMode.none and cfg.strategy.dp.account:
        return (
            f"the patient-level privacy budget of {', '.join(spent)} is spent ({budget}), and "
            f"client-level DP (strategy.dp.mode={cfg.strategy.dp.mode.value}) accounts every "
            "site's update in every round: no round can run without it"
        )
    return ""


@dataclass
class FederationPlan:
    """Everything the ServerApp hands to Flower: the validated config, the task's model (its
    initial weights, or the checkpoint's), the strategy chain (outermost layer: the recorder,
    see :mod:`strategies.chain`), the sites' names for the tables (extended as sites reply),
    the task's main metric and the checkpoint resumed from (None: a fresh run).

    How the run ends: ``stop`` is set to ask a running ServerApp to stop (Ctrl-C); ``stopped``
    then holds why it ended early (empty when it ran all rounds), ``interrupted`` whether it was
    asked to, and ``done`` is set once its files are written.
    """

    cfg: RunConfig
    model: torch.nn.Module
    strategy: RecordingStrategy
    site_names: list[str]
    main_metric: str
    checkpoint: Checkpoint | None = None
    #: The warm start the run began from (``task.model.init``; None: random weights, or resumed).
    initial_model: InitialModel | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    stopped: str = ""
    interrupted: bool = False
    #: The signal that asked the run to stop, as a person knows it (``Ctrl-C``, ``SIGTERM``);
    #: empty when none did.
    stop_signal: str = ""
    #: A site's refusal that stopped the run (its own policy or secure aggregation check).
    refused: str = ""
    #: The run's key (a resumed run keeps the checkpoint's), sent with every training message.
    run_key: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: Flower's run id (set by the ServerApp; 0 before): what each site's record names the run.
    flower_run: int = 0
    #: The audit log and tracking of the run (opened by the ServerApp, fed after every round).
    records: RunRecords = field(default_factory=RunRecords)
    #: The config of every round's training messages (Flower sends this one object each round).
    train_config: ConfigRecord = field(default_factory=ConfigRecord)

    def round_config(self, settings: dict[str, bool | int | float | str]) -> ConfigRecord:
        """The training messages' config: ``settings`` and the run's key (a resumed run keeps
        its run's: a DP-SGD site's ledger goes on counting in the same entry,
        :mod:`fl_imaging.privacy.site_dp`)."""
        self.train_config = ConfigRecord({**settings, RUN_KEY: self.run_key})
        return self.train_config

    @property
    def run_dir(self) -> Path:
        """Where the run's files go (``cfg.run_dir``)."""
        return Path(self.cfg.run_dir)

    def rounds_done(self) -> int:
        """The last round with recorded results (0 before the first)."""
        return max((r.round for r in self.strategy.rows), default=0)

    def absent_sites(self) -> dict[str, str]:
        """The sites that failed (or never answered) in every round they were asked to train
        in, by name, with the first reason; empty when every site trained at least once."""
        # DP-SGD sites keep their training loss: their training replies give num_train only
        trained = {r.site for r in self.strategy.rows if r.metric in ("train_loss", "num_train")}
        absent: dict[str, str] = {}
        for _, site, reason in self.strategy.failures:
            if site not in trained | {AGGREGATE_SITE} and not reason.startswith("test round"):
                absent.setdefault(site, reason)
        return absent

    def absence_note(self) -> str:
        """Lines for summary.txt on :meth:`absent_sites` (empty when none): each site, its
        reason, and whether the run counts it as a failure (every site was needed) or went on
        without it under ``engine.min_sites``."""
        absent = self.absent_sites()
        if not absent:
            return ""
        tolerated = self.cfg.engine.min_sites is not None
        lines = [
            f"site {site} took part in no round ({reason}); "
            + (
                f"the model was trained without it (engine.min_sites={self.cfg.engine.min_sites})"
                if tolerated
                else "the run fails: fix the site (fl-imaging-data inspect on its folder), or set "
                "engine.min_sites to let a run go on without a site"
            )
            for site, reason in sorted(absent.items())
        ]
        return "\n".join(lines)

    def raise_if_sites_failed(self) -> None:
        """Raise :class:`SitesFailed` when a site took part in no round and the run needed every
        site (``engine.min_sites`` unset); an interrupted run is not judged."""
        if self.refused:
            raise SitesFailed(f"{self.refused}\nresults so far are in {self.run_dir}")
        absent = self.absent_sites()
        if absent and self.cfg.engine.min_sites is None and not self.interrupted:
            raise SitesFailed(
                f"{self.absence_note()}\nresults of the other sites are in {self.run_dir}"
            )

    def note_signal(self, label: str) -> None:
        """Note that the signal ``label`` (as a person knows it: ``Ctrl-C``, ``SIGTERM``,
        ``SIGHUP``) asked the run to stop, for :meth:`note_interrupted` to name it."""
        self.stop_signal = label

    def note_interrupted(self) -> None:
        """Note that the run was asked to stop (by the signal :meth:`note_signal` named, or the
        engine failed: ``stopped`` says so already), after which round, and how to go on."""
        self.interrupted = True
        why = self.stopped or f"interrupted ({self.stop_signal or 'asked to stop'})"
        self.stopped = (
            f"{why} after round {self.rounds_done()} of {self.cfg.engine.rounds}: the results "
            f"and the checkpoint of the finished rounds are kept; go on with resume={self.run_dir}"
        )
        log.warning("%s", self.stopped)

    def after_round(self, rnd: int, rows: list[MetricRow]) -> None:
        """Print round ``rnd``'s progress line, append its audit record (and send its metrics to
        the tracker), and save the checkpoint after it. Raises
        :class:`~fl_imaging.review.results.RunFolderError` when the audit log or the checkpoint
        cannot
        be written (the previous checkpoint is kept), :class:`PatientBudgetsSpent` when every site
        reported its DP-SGD budget spent before the last round."""
        rounds = self.cfg.engine.rounds
        line = progress_line(rnd, rounds, rows, self.main_metric, self.site_names)
        log.info("%s", line, extra=progress_extra(Progress(ROUND_ENDED, rnd, rounds, detail=line)))
        self.records.after_round(self, rnd)
        assert self.strategy.global_arrays is not None
        save_checkpoint(
            self.run_dir,
            server_round=rnd,
            arrays=self.strategy.global_arrays,
            strategy=self.strategy,
            rows=self.strategy.rows,
            failures=self.strategy.failures,
            cfg=self.cfg,
            run_key=self.run_key,
        )
        why = budgets_spent(self.cfg, rows, self.site_names)
        if rnd < rounds and why:
            raise PatientBudgetsSpent(f"stopped after round {rnd} of {rounds}: {why}")


def plan_federation(cfg: RunConfig, site_names: list[str]) -> FederationPlan:
    """Build and check the server side of ``cfg``: the seeded model, the strategy chain for
    ``engine.num_sites`` sites (or as many as ``site_names``) and, with ``cfg.resume``, the
    checkpoint (config compared, strategy state, rows and model restored), else with
    ``task.model.init`` the initial weights (checked against the network,
    :mod:`.initial_model`).

    Raises :class:`~strategies.registry.StrategyError` for a strategy that cannot run and
    :class:`~fl_imaging.config.ConfigError` for a run that cannot be resumed or initial weights
    that cannot be read or do not fit.
    """
    names = list(site_names)
    num_sites = cfg.engine.num_sites or len(names)
    torch.manual_seed(cfg.seed)
    task = build_task(cfg.task)
    model = task.build_model()
    checkpoint = load_checkpoint(Path(cfg.resume)) if cfg.resume else None
    init = cfg.task.model.init
    initial = None
    if init and checkpoint is not None:
        log.info(
            "resume=%s wins over task.model.init=%s: the run goes on from the checkpoint's "
            "weights, not from the initial model",
            cfg.resume,
            init,
        )
    elif init:
        initial = load_initial_model(model, init)  # checked against the network, once
        log.info("starting from %s", initial.line().removeprefix("initial model: "))
    arrays = ArrayRecord(model.state_dict())
    if checkpoint is not None:
        check_resumable(checkpoint, cfg)
        if why := budgets_spent(cfg, checkpoint.rows, names):  # DP-SGD: nothing left to train
            raise ConfigError(f"cannot resume {cfg.resume}: {why}")
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
        keep_updates=cfg.engine.contributions or cfg.engine.cross_site,
    )
    assert isinstance(strategy, RecordingStrategy)
    if checkpoint is not None:
        restore_strategy_state(strategy, checkpoint.strategy)
        strategy.rows = list(checkpoint.rows)
        strategy.failures = list(checkpoint.failures)
    plan = FederationPlan(cfg, model, strategy, names, task.main_metric, checkpoint, initial)
    if checkpoint is not None and checkpoint.run_key:
        plan.run_key = checkpoint.run_key
    strategy.on_round_end = plan.after_round
    return plan
