"""Flower ServerApp: take the run's plan (model, strategy chain, checkpoint), hand it to Flower
for ``engine.rounds`` rounds, let every site score the final model, write the run's files.

Where things happen: the strategy chain is assembled in :mod:`strategies.chain`, the plan in
:mod:`fl_imaging.flower.federation`, the test round in :mod:`fl_imaging.flower.final_scoring`,
the result files in :mod:`fl_imaging.results`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted

from fl_imaging.config import RunConfig
from fl_imaging.flower.federation import FederationPlan, plan_federation
from fl_imaging.flower.final_scoring import score_final_model
from fl_imaging.flower.polling import QuickPollGrid
from fl_imaging.logs import show_progress
from fl_imaging.protocol import EVALUATE_GLOBAL, LOCAL_EPOCHS, resolve_config
from fl_imaging.results import AGGREGATE_SITE, RunFolderError, write_run_files
from strategies import NotEnoughSites, RecordingStrategy

__all__ = ["app", "build_server_app", "run_federation"]

log = logging.getLogger("fl_imaging.server")


def run_federation(
    grid: Grid, cfg: RunConfig, site_names: list[str], plan: FederationPlan | None = None
) -> RecordingStrategy:
    """Run the rounds of ``plan`` (default: :func:`plan_federation` of ``cfg`` and
    ``site_names``) over ``grid``, then the test round (``engine.test``), and write metrics.csv,
    curves.png, model.pt, config.yaml and summary.txt into ``cfg.run_dir`` (the checkpoint after
    every round). A DP run whose next round would exceed ``strategy.dp.max_epsilon`` stops there
    with its results written; so does a run that waited ``engine.wait_timeout`` seconds for
    ``engine.min_sites`` connected sites. Returns the recording strategy (``rows``: every metric).

    A checkpoint that cannot be written (disk full) stops the run too: its results are written
    if they can, then the :class:`~fl_imaging.results.RunFolderError` is raised, so that the
    command exits non-zero with its message.
    """
    plan = plan or plan_federation(cfg, site_names)
    cfg, recorder = plan.cfg, plan.strategy
    rounds = cfg.engine.rounds
    stopped = ""
    sites_gone = False  # too few sites left: no test round either
    write_error: RunFolderError | None = None
    try:
        recorder.start(
            grid=grid,
            initial_arrays=recorder.global_arrays,
            num_rounds=rounds - recorder.offset,
            timeout=cfg.engine.round_timeout,
            train_config=ConfigRecord(
                {LOCAL_EPOCHS: cfg.task.local_epochs, EVALUATE_GLOBAL: cfg.engine.evaluate_in_train}
            ),
        )
    except PrivacyBudgetExhausted as err:
        done = max((r.round for r in recorder.rows), default=0)
        stopped = (
            f"stopped after round {done} of {rounds}: the privacy budget "
            f"strategy.dp.max_epsilon={cfg.strategy.dp.max_epsilon} would be exceeded by the "
            f"next round ({err})"
        )
        log.warning("%s", stopped)
    except NotEnoughSites as err:
        stopped, sites_gone = str(err), True
        log.error("%s", stopped)
    except RunFolderError as err:  # the checkpoint after a round could not be written
        done = max((r.round for r in recorder.rows), default=0)
        write_error = RunFolderError(f"stopped after round {done} of {rounds}: {err}")
        stopped = str(write_error)
        log.error("%s", stopped)
    if cfg.engine.test and write_error is not None:
        log.warning("no test round: the run folder cannot be written")
    elif cfg.engine.test and sites_gone:
        log.warning("no test round: too few sites are connected")
    elif cfg.engine.test:
        _test_round(grid, plan)
    assert recorder.global_arrays is not None
    plan.model.load_state_dict(recorder.global_arrays.to_torch_state_dict())
    write_run_files(
        plan.run_dir,
        cfg,
        recorder.rows,
        recorder.failures,
        plan.model,
        plan.site_names,
        plan.main_metric,
        stopped,
    )
    if write_error is not None:
        raise write_error
    return recorder


def _test_round(grid: Grid, plan: FederationPlan) -> None:
    """Every site scores the final model on its test cases (``engine.test``); record and log."""
    recorder, epochs = plan.strategy, plan.cfg.engine.finetune_epochs
    assert recorder.global_arrays is not None
    log.info(
        "test round: every site scores the final model on its test cases%s",
        f", then after {epochs} epoch(s) of local fine-tuning" if epochs else "",
    )
    done = max((r.round for r in recorder.rows), default=0)
    rows, failures = score_final_model(
        grid, recorder.global_arrays, done, epochs, plan.cfg.engine.round_timeout, recorder.sites
    )
    recorder.rows.extend(rows)
    recorder.failures.extend(failures)
    labels = {
        "test": "test (final model)",
        "finetuned": f"test after {epochs} epoch(s) of fine-tuning",
    }
    for prefix, label in labels.items():
        values = {r.site: r.value for r in rows if r.metric == f"{prefix}_{plan.main_metric}"}
        mean = values.pop(AGGREGATE_SITE, None)
        if values:
            log.info(
                "%s %s: %s%s",
                label,
                plan.main_metric,
                "  ".join(f"{site} {value:.3f}" for site, value in sorted(values.items())),
                f"  | all sites {mean:.3f}" if mean is not None else "",
            )


def build_server_app(
    config: RunConfig | None = None,
    site_names: list[str] | None = None,
    plan: FederationPlan | None = None,
) -> ServerApp:
    """Return a ServerApp bound to ``config``, the federation's site names and, when already
    made, its ``plan`` (simulation), or reading the config from run_config (deployment, None)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        if config is None:
            show_progress(logging.getLogger("fl_imaging"))
        cfg = resolve_config(config, context)
        names = site_names or [Path(p).name for p in cfg.data.sites]
        # Deployment: Flower's Grid looks for replies every 3 s; ours every 0.2 s.
        run_federation(QuickPollGrid(grid) if config is None else grid, cfg, names, plan)

    return server


#: The ServerApp for deployment: config comes in run_config.
app = build_server_app()
