"""Flower ServerApp: take the run's plan (model, strategy chain, checkpoint), hand it to Flower
for ``engine.rounds`` rounds, let every site score the final model, write the run's files.

Where things happen: the strategy chain is assembled in :mod:`strategies.chain`, the plan in
:mod:`fl_imaging.flower.coordinator.federation`, the rounds in
:mod:`fl_imaging.flower.coordinator.training_rounds`, the
test round in :mod:`fl_imaging.evaluation.final_scoring`, the evaluations after it in
:mod:`fl_imaging.evaluation.site_evaluations`, the result files in :mod:`fl_imaging.review.results`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_imaging.config import RunConfig
from fl_imaging.console.events import RUN_FINISHED, RUN_STARTED, Progress, emit
from fl_imaging.console.record_lines import stream_records
from fl_imaging.evaluation.final_scoring import score_test_cases
from fl_imaging.evaluation.site_evaluations import evaluate_across_sites
from fl_imaging.flower.app_config import resolve_config
from fl_imaging.flower.coordinator.federation import FederationPlan, plan_federation
from fl_imaging.flower.coordinator.polling import QuickPollGrid, StopRequested
from fl_imaging.flower.coordinator.training_rounds import train_rounds
from fl_imaging.he.coordinator import encrypted_model_note
from fl_imaging.review.bundle_export import export_bundle
from fl_imaging.review.result_transfer import send_results
from fl_imaging.review.results import RunFolderError, write_run_files
from strategies import RecordingStrategy

__all__ = ["app", "build_server_app", "run_federation"]

log = logging.getLogger("fl_imaging.server")


def run_federation(
    grid: Grid, cfg: RunConfig, site_names: list[str], plan: FederationPlan | None = None
) -> RecordingStrategy:
    """Run the rounds of ``plan`` (default: :func:`plan_federation` of ``cfg`` and
    ``site_names``) over ``grid``, then the test round (``engine.test``) and the evaluations of
    :mod:`.site_evaluations`, and write metrics.csv, curves.png, model.pt, config.yaml,
    summary.txt, the model as a MONAI bundle (``bundle/``), audit.jsonl and report.html into
    ``cfg.run_dir`` (the checkpoint after every
    round; tracked with ``tracking=...``). A DP run whose next round would exceed
    ``strategy.dp.max_epsilon`` stops there with its results written; so does a run that waited
    ``engine.wait_timeout`` seconds for ``engine.min_sites`` connected sites. Returns the
    recording strategy (``rows``: every metric).

    A checkpoint that cannot be written (disk full) stops the run too: its results are written
    if they can, then the :class:`~fl_imaging.review.results.RunFolderError` is raised, so that the
    command exits non-zero with its message.
    """
    plan = plan or plan_federation(cfg, site_names)
    try:
        with plan.records.session(plan):  # audit.jsonl and tracking: run_records.py
            _run_rounds(grid, plan)
    finally:
        plan.done.set()
    return plan.strategy


def _run_rounds(grid: Grid, plan: FederationPlan) -> None:
    """The rounds, the test round and the run's files; why the run stopped early goes to
    ``plan.stopped`` (and summary.txt)."""
    cfg, recorder = plan.cfg, plan.strategy
    emit(Progress(RUN_STARTED, recorder.offset, cfg.engine.rounds, sites=tuple(plan.site_names)))
    reachable, write_error = train_rounds(grid, plan)
    test = reachable and (cfg.engine.test or cfg.engine.cross_site)  # cross-site ends it
    finish = reachable  # the sites can still be asked (cross-site evaluation, contributions)
    if test and not plan.interrupted:
        try:
            score_test_cases(grid, plan)
        except StopRequested:
            plan.note_interrupted()
    ending: list[str] = []
    if finish and not plan.interrupted:  # engine.cross_site, engine.contributions
        try:
            ending = evaluate_across_sites(grid, plan)
        except StopRequested:
            plan.note_interrupted()
    emit(Progress(RUN_FINISHED, plan.rounds_done(), cfg.engine.rounds, detail=plan.stopped))
    assert recorder.global_arrays is not None
    encrypted = cfg.strategy.he.enabled  # the trained model is the sites' (fl_imaging/he)
    if not encrypted:
        plan.model.load_state_dict(recorder.global_arrays.to_torch_state_dict())
    notes = "\n".join(
        n
        for n in (
            plan.initial_model.line() if plan.initial_model else "",
            encrypted_model_note(cfg),
            plan.stopped,
            plan.absence_note(),
            *ending,
            plan.records.note(),
        )
        if n
    )
    write_run_files(
        plan.run_dir,
        cfg,
        recorder.rows,
        recorder.failures,
        None if encrypted else plan.model,
        plan.site_names,
        plan.main_metric,
        notes,
    )
    if cfg.engine.rounds == 0 and plan.initial_model is not None:  # evaluation only
        plan.initial_model.copy_to(plan.run_dir / "model.pt")  # the scored file, byte for byte
    if not encrypted:
        _export_bundle(plan)
    plan.records.finish(plan, ending)  # run_end record, report.html, tracked files
    if write_error is not None:
        raise write_error


def _export_bundle(plan: FederationPlan) -> None:
    """The final model as a MONAI bundle (:mod:`fl_imaging.review.bundle_export`), before the
    audit's ``run_end`` record hashes its files. Raises :class:`RunFolderError` when the folder
    cannot be written."""
    try:
        export_bundle(plan.run_dir, plan.cfg, plan.strategy.rows, plan.model, list(plan.site_names))
    except OSError as err:
        raise RunFolderError(
            f"could not write the MONAI bundle into {plan.run_dir / 'bundle'} ({err}): free "
            "space there or give a folder you can write to (hydra.run.dir=...)"
        ) from None


#: Bytes of result lines per second the ServerApp writes, and the seconds it waits after them:
#: Flower uploads the ServerApp's output every 0.2 s in one request, and when the ServerApp
#: returns it waits about 4 s for the upload in flight, then drops what is left. Paced, each
#: request stays small (one 64 MiB file written at once was cut off there). The wait is
#: :data:`RESULT_SETTLE_S` (more than two uploads) plus a second per :data:`RESULT_RATE` bytes
#: written, at most :data:`RESULT_SETTLE_MAX_S` (64 MiB paced and 2 s of wait arrived whole).
RESULT_RATE = 4 * 2**20
RESULT_SETTLE_S = 0.5
RESULT_SETTLE_MAX_S = 2.0


def _send_result_files(run_dir: Path) -> None:
    """Send ``run_dir``'s result files to the researcher over the run's log
    (:func:`~fl_imaging.review.result_transfer.send_results`), paced by :data:`RESULT_RATE`;
    say what was sent or withheld."""
    try:
        files, written, withheld = send_results(run_dir, rate=RESULT_RATE)
    except OSError as err:
        log.warning("the result files in %s could not be sent to the researcher: %s", run_dir, err)
        return
    time.sleep(min(RESULT_SETTLE_S + written / RESULT_RATE, RESULT_SETTLE_MAX_S))
    log.info(
        "sent %d result file(s) to the researcher over the run's log (%.1f MiB of lines)",
        files,
        written / 2**20,
    )
    for reason in withheld:
        log.warning("not sent to the researcher: %s", reason)


def build_server_app(
    config: RunConfig | None = None,
    site_names: list[str] | None = None,
    plan: FederationPlan | None = None,
    max_in_flight: int | None = None,
) -> ServerApp:
    """Return a ServerApp bound to ``config``, the federation's site names and, when already
    made, its ``plan`` (simulation), or reading the config from run_config (deployment, None).
    ``max_in_flight``: at most that many messages unanswered at a time (None: a round's messages
    all at once; see :class:`~fl_imaging.flower.coordinator.polling.QuickPollGrid`)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        if config is None:  # deployment: the researcher's console reads them from the stream
            stream_records(logging.getLogger("fl_imaging"))
        cfg = resolve_config(config, context)
        names = site_names or [Path(p).name for p in cfg.data.sites]
        # Flower's deployment Grid looks for replies every 3 s; ours every 0.2 s, and stops
        # waiting when the plan is asked to stop (Ctrl-C in simulation).
        run_plan = plan or plan_federation(cfg, names)
        run_plan.flower_run = int(context.run_id)  # what each site's own record names
        polling = QuickPollGrid(grid, stop=run_plan.stop, max_in_flight=max_in_flight)
        try:
            run_federation(polling, cfg, names, run_plan)
        finally:
            if config is None:  # deployment: the researcher's copy travels in the log
                _send_result_files(Path(cfg.run_dir))
        if config is None:  # deployment: a site that never trained fails the run's status
            run_plan.raise_if_sites_failed()

    return server


#: The ServerApp for deployment: config comes in run_config.
app = build_server_app()
