"""The training rounds of a run: Flower's strategy loop over the plan's chain, and why it stopped.

Every way the rounds can end early is turned into ``plan.stopped`` (a sentence for the log and
summary.txt): a privacy budget (client-level ``strategy.dp.max_epsilon``, or every site's DP-SGD
budget), too few connected sites, a site's refusal (its own policy), a run folder that cannot be
written, Ctrl-C.
"""

from __future__ import annotations

import logging

from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted

from fl_imaging.flower.coordinator.federation import FederationPlan, PatientBudgetsSpent
from fl_imaging.flower.coordinator.polling import StopRequested
from fl_imaging.flower.protocol import EVALUATE_GLOBAL, LOCAL_EPOCHS, SiteRefused
from fl_imaging.review.results import RunFolderError
from strategies import NotEnoughSites, SiteAvailability
from strategies.wrapper import wrapper_chain

__all__ = ["train_rounds"]

log = logging.getLogger("fl_imaging.server")


def train_rounds(grid: Grid, plan: FederationPlan) -> tuple[bool, RunFolderError | None]:
    """Run the plan's remaining rounds over ``grid``. Returns whether the sites can still be
    asked afterwards (False when too few are connected or the run folder cannot be written) and
    the :class:`~fl_imaging.review.results.RunFolderError` to raise once the results are written (or
    None). Why the rounds ended early goes to ``plan.stopped``; Ctrl-C to ``plan.interrupted``."""
    cfg, recorder = plan.cfg, plan.strategy
    reachable = True
    write_error: RunFolderError | None = None
    try:
        if cfg.engine.rounds == 0:  # evaluation only: no site is asked to train
            _wait_for_sites(grid, plan)
            return reachable, write_error
        recorder.start(
            grid=grid,
            initial_arrays=recorder.global_arrays,
            num_rounds=cfg.engine.rounds - recorder.offset,
            timeout=cfg.engine.round_timeout,
            train_config=plan.round_config(
                {LOCAL_EPOCHS: cfg.task.local_epochs, EVALUATE_GLOBAL: cfg.engine.evaluate_in_train}
            ),
        )
    except PatientBudgetsSpent as err:  # DP-SGD: no site would train again
        plan.stopped = str(err)
        log.warning("%s", plan.stopped)
    except PrivacyBudgetExhausted as err:
        plan.stopped = (
            f"stopped after round {plan.rounds_done()} of {cfg.engine.rounds}: the privacy "
            f"budget strategy.dp.max_epsilon={cfg.strategy.dp.max_epsilon} would be exceeded by "
            f"the next round ({err})"
        )
        log.warning("%s", plan.stopped)
    except SiteRefused as err:  # a site's policy or its secure aggregation checks
        plan.stopped = f"stopped: {err}"
        plan.refused = plan.stopped
        log.error("%s", plan.stopped)
    except NotEnoughSites as err:
        plan.stopped, reachable = str(err), False
        log.error("%s", plan.stopped)
        if cfg.engine.test:
            log.warning("no test round: too few sites are connected")
    except RunFolderError as err:  # the checkpoint after a round could not be written
        write_error = RunFolderError(
            f"stopped after round {plan.rounds_done()} of {cfg.engine.rounds}: {err}"
        )
        plan.stopped, reachable = str(write_error), False
        log.error("%s", plan.stopped)
        if cfg.engine.test:
            log.warning("no test round: the run folder cannot be written")
    except StopRequested:
        plan.note_interrupted()
    return reachable, write_error


def _wait_for_sites(grid: Grid, plan: FederationPlan) -> None:
    """An evaluation-only run (``engine.rounds=0``): no training round; wait, as a round would,
    for ``engine.min_sites`` (or every expected site) to be connected before the test round
    (:meth:`~strategies.availability.SiteAvailability.wait_for_sites`). Raises
    :class:`~strategies.NotEnoughSites` after ``engine.wait_timeout`` seconds."""
    log.info(
        "evaluation only (engine.rounds=0): no training round; every site scores %s",
        plan.initial_model.path if plan.initial_model else "the initial model",
    )
    waiting = next(
        (n for n in wrapper_chain(plan.strategy) if isinstance(n, SiteAvailability)), None
    )
    if waiting is not None:
        waiting.wait_for_sites(grid, 1)
