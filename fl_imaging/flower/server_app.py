"""Flower ServerApp: build the model and the strategy from config, run the rounds, save results."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted

from fl_imaging.config import RunConfig, config_to_yaml
from fl_imaging.flower.availability import NotEnoughSites, SiteAvailability
from fl_imaging.flower.checkpoint import (
    CHECKPOINT_FILE,
    check_resumable,
    load_checkpoint,
    restore_strategy_state,
    save_checkpoint,
)
from fl_imaging.flower.final_test import test_final_model
from fl_imaging.flower.polling import QuickPollGrid
from fl_imaging.flower.protocol import EVALUATE_GLOBAL, LOCAL_EPOCHS, resolve_config
from fl_imaging.flower.recording import RecordingStrategy, site_name
from fl_imaging.results import (
    AGGREGATE_SITE,
    MetricRow,
    format_round_table,
    plot_curves,
    write_metrics,
)
from strategies import build_strategy
from strategies.registry import sites_needed
from tasks import build_task

__all__ = ["app", "build_server_app", "run_federation"]

log = logging.getLogger("fl_imaging.server")


def run_federation(grid: Grid, cfg: RunConfig, site_names: list[str]) -> RecordingStrategy:
    """Run ``cfg.engine.rounds`` rounds of the configured strategy over ``grid`` and write the run's
    files into ``cfg.run_dir``: metrics.csv, curves.png, model.pt, config.yaml, summary.txt, and
    checkpoint.pkl after every round.

    ``site_names`` orders the columns of the printed table (sites first seen in replies are
    added); the federation has ``engine.num_sites`` sites, or as many as ``site_names``. With
    ``cfg.resume`` set, the run goes on from that run's checkpoint. A DP run whose next round
    would exceed ``strategy.dp.max_epsilon`` stops there, with its results written; so does a run
    that waited ``engine.wait_timeout`` seconds for ``engine.min_sites`` connected sites
    (:class:`~fl_imaging.flower.availability.SiteAvailability`). Returns the recording
    strategy, whose ``rows`` hold every metric recorded.
    """
    site_names = list(site_names)
    num_sites = cfg.engine.num_sites or len(site_names)
    torch.manual_seed(cfg.seed)
    task = build_task(cfg.task)
    model = task.build_model()
    run_dir = Path(cfg.run_dir)
    recorder: RecordingStrategy | None = None
    strategy = build_strategy(
        cfg.strategy,
        num_sites=num_sites,
        clients_per_round=cfg.engine.clients_per_round,
        min_sites=cfg.engine.min_sites,
        site_of=site_name,
        on_checks=lambda rnd, checks: recorder.record_checks(rnd, checks) if recorder else None,
    )
    main = task.main_metric
    rounds = cfg.engine.rounds
    arrays = ArrayRecord(model.state_dict())
    checkpoint = load_checkpoint(Path(cfg.resume)) if cfg.resume else None
    if checkpoint is not None:
        check_resumable(checkpoint, cfg)
        restore_strategy_state(strategy, checkpoint.strategy)
        arrays = ArrayRecord({k: Array(v) for k, v in checkpoint.arrays.items()})
        log.info("resuming %s after round %d of %d", cfg.resume, checkpoint.round, rounds)

    def progress(rnd: int, rows: list[MetricRow]) -> None:
        values = {(r.site, r.metric): r.value for r in rows if r.round == rnd}
        # With one message per round, a round's model is evaluated in the next round.
        scored = max((r.round for r in rows if r.metric == main and r.round <= rnd), default=rnd)
        scores = {(r.site, r.metric): r.value for r in rows if r.round == scored}
        per_site = "  ".join(
            f"{s} {scores[(s, main)]:.3f}" for s in site_names if (s, main) in scores
        )
        label = main if scored == rnd else f"{main} (round {scored} model)"
        epsilon = values.get(("all", "epsilon"))
        log.info(
            "round %d/%d  train loss %.4f | %s %s | %s%.1f s",
            rnd,
            rounds,
            values.get(("all", "train_loss"), float("nan")),
            label,
            per_site or "-",
            f"epsilon {epsilon:.3f} | " if epsilon is not None else "",
            values.get(("all", "round_seconds"), float("nan")),
        )
        assert recorder is not None and recorder.global_arrays is not None
        save_checkpoint(
            run_dir / CHECKPOINT_FILE,
            server_round=rnd,
            arrays=recorder.global_arrays,
            strategy=strategy,
            rows=recorder.rows,
            failures=recorder.failures,
            cfg=cfg,
        )

    availability = SiteAvailability(
        strategy,
        min_sites=sites_needed(num_sites, cfg.engine.clients_per_round, cfg.engine.min_sites),
        min_replies=cfg.engine.min_sites or 1,
        wait_timeout=cfg.engine.wait_timeout,
        round_timeout=cfg.engine.round_timeout,
        site_names=site_names,
        failures=lambda: recorder.failures if recorder else [],
    )
    recorder = RecordingStrategy(
        availability,
        on_round_end=progress,
        global_arrays=arrays,
        offset=checkpoint.round if checkpoint else 0,
        evaluate_until=rounds if cfg.engine.evaluate_in_train else None,
    )
    if checkpoint is not None:
        recorder.rows = list(checkpoint.rows)
        recorder.failures = list(checkpoint.failures)
    stopped = ""
    sites_gone = False  # too few sites left: no test round either
    try:
        recorder.start(
            grid=grid,
            initial_arrays=arrays,
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
        stopped = str(err)
        sites_gone = True
        log.error("%s", stopped)
    assert recorder.global_arrays is not None
    if cfg.engine.test and sites_gone:
        log.warning("no test round: too few sites are connected")
    elif cfg.engine.test:
        _test_round(grid, cfg, recorder, main)
    model.load_state_dict(recorder.global_arrays.to_torch_state_dict())
    write_run_files(run_dir, cfg, recorder, model, site_names, main, stopped)
    return recorder


def _test_round(grid: Grid, cfg: RunConfig, recorder: RecordingStrategy, main: str) -> None:
    """Score the final model on every site's test cases (``engine.test``) and record it."""
    assert recorder.global_arrays is not None
    done = max((r.round for r in recorder.rows), default=0)
    epochs = cfg.engine.finetune_epochs
    log.info(
        "test round: every site scores the final model on its test cases%s",
        f", then after {epochs} epoch(s) of local fine-tuning" if epochs else "",
    )
    rows, failures = test_final_model(
        grid, recorder.global_arrays, done, epochs, cfg.engine.round_timeout
    )
    recorder.rows.extend(rows)
    recorder.failures.extend(failures)
    for prefix in ("test", "finetuned"):
        values = {r.site: r.value for r in rows if r.metric == f"{prefix}_{main}"}
        mean = values.pop(AGGREGATE_SITE, None)
        if values:
            log.info(
                "%s %s: %s%s",
                "test (final model)"
                if prefix == "test"
                else f"test after {epochs} epoch(s) of fine-tuning",
                main,
                "  ".join(f"{site} {value:.3f}" for site, value in sorted(values.items())),
                f"  | all sites {mean:.3f}" if mean is not None else "",
            )


def write_run_files(
    run_dir: Path,
    cfg: RunConfig,
    recorder: RecordingStrategy,
    model: torch.nn.Module,
    site_names: list[str],
    main_metric: str,
    stopped: str = "",
) -> None:
    """Write metrics.csv, curves.png, model.pt, config.yaml and summary.txt into ``run_dir``;
    ``stopped`` says why a run ended early (it goes into the summary)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_metrics(recorder.rows, run_dir / "metrics.csv")
    plot_curves(recorder.rows, main_metric, run_dir / "curves.png")
    torch.save(model.state_dict(), run_dir / "model.pt")
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    table = format_round_table(recorder.rows, main_metric, site_names)
    failures = "".join(
        f"\nround {rnd}: site {site} failed: {reason}" for rnd, site, reason in recorder.failures
    )
    privacy = _privacy_line(recorder.rows, cfg)
    notes = "".join(f"\n{line}" for line in (privacy, stopped) if line)
    (run_dir / "summary.txt").write_text(table + "\n" + failures + notes + "\n")
    log.info(
        "per-round results (validation %s per site):\n%s%s%s", main_metric, table, failures, notes
    )


def _privacy_line(rows: list[MetricRow], cfg: RunConfig) -> str:
    """One line on the privacy spent (DP runs), or an empty string."""
    dp = cfg.strategy.dp
    if dp.mode.value == "none":
        return ""
    spent = [r for r in rows if r.site == "all" and r.metric == "epsilon"]
    if not spent:
        return f"differential privacy: {dp.mode.value}, noise {dp.noise_multiplier}; not accounted"
    last = max(spent, key=lambda r: r.round)
    return (
        f"differential privacy: {dp.mode.value}, noise multiplier {dp.noise_multiplier}, clipping "
        f"norm {dp.clipping_norm}: epsilon {last.value:.4f} at delta {dp.target_delta:g} after "
        f"round {last.round}"
    )


def build_server_app(
    config: RunConfig | None = None, site_names: list[str] | None = None
) -> ServerApp:
    """Return a ServerApp bound to ``config`` and the federation's site names (simulation), or
    reading the config from run_config (deployment, ``None``)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        if config is None:
            _show_progress()
        cfg = resolve_config(config, context)
        names = site_names or [Path(p).name for p in cfg.data.sites]
        # Deployment: Flower's Grid looks for replies every 3 s; ours every 0.2 s.
        run_federation(QuickPollGrid(grid) if config is None else grid, cfg, names)

    return server


def _show_progress() -> None:
    """A deployment's ServerApp process starts without logging set up: send our progress lines
    to stderr, which Flower streams to ``flwr run --stream``."""
    logger = logging.getLogger("fl_imaging")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


#: The ServerApp for deployment: config comes in run_config.
app = build_server_app()
