"""Flower ServerApp: build the model and the strategy from config, run the rounds, save results."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fl_imaging.config import RunConfig, config_to_yaml
from fl_imaging.flower.protocol import LOCAL_EPOCHS, resolve_config
from fl_imaging.flower.recording import RecordingStrategy
from fl_imaging.results import MetricRow, format_round_table, plot_curves, write_metrics
from strategies import build_strategy
from tasks import build_task

__all__ = ["app", "build_server_app", "run_federation"]

log = logging.getLogger("fl_imaging.server")


def run_federation(grid: Grid, cfg: RunConfig, site_names: list[str]) -> RecordingStrategy:
    """Run ``cfg.engine.rounds`` rounds of the configured strategy over ``grid`` and write the run's
    files into ``cfg.run_dir``: metrics.csv, curves.png, model.pt, config.yaml, summary.txt.

    ``site_names`` orders the columns of the printed table. Returns the recording strategy, whose
    ``rows`` hold every metric recorded.
    """
    torch.manual_seed(cfg.seed)
    task = build_task(cfg.task)
    model = task.build_model()
    strategy = build_strategy(
        cfg.strategy, num_sites=len(site_names), clients_per_round=cfg.engine.clients_per_round
    )
    main = task.main_metric
    rounds = cfg.engine.rounds

    def progress(rnd: int, rows: list[MetricRow]) -> None:
        values = {(r.site, r.metric): r.value for r in rows}
        per_site = "  ".join(
            f"{s} {values[(s, main)]:.3f}" for s in site_names if (s, main) in values
        )
        log.info(
            "round %d/%d  train loss %.4f | %s %s | %.1f s",
            rnd,
            rounds,
            values.get(("all", "train_loss"), float("nan")),
            main,
            per_site,
            values.get(("all", "round_seconds"), float("nan")),
        )

    recorder = RecordingStrategy(strategy, on_round_end=progress)
    result = recorder.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=rounds,
        timeout=cfg.engine.round_timeout,
        train_config=ConfigRecord({LOCAL_EPOCHS: cfg.task.local_epochs}),
    )
    model.load_state_dict(result.arrays.to_torch_state_dict())
    write_run_files(Path(cfg.run_dir), cfg, recorder, model, site_names, main)
    return recorder


def write_run_files(
    run_dir: Path,
    cfg: RunConfig,
    recorder: RecordingStrategy,
    model: torch.nn.Module,
    site_names: list[str],
    main_metric: str,
) -> None:
    """Write metrics.csv, curves.png, model.pt, config.yaml and summary.txt into ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_metrics(recorder.rows, run_dir / "metrics.csv")
    plot_curves(recorder.rows, main_metric, run_dir / "curves.png")
    torch.save(model.state_dict(), run_dir / "model.pt")
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    table = format_round_table(recorder.rows, main_metric, site_names)
    failures = "".join(
        f"\nround {rnd}: site {site} failed: {reason}" for rnd, site, reason in recorder.failures
    )
    (run_dir / "summary.txt").write_text(table + "\n" + failures)
    log.info("per-round results (validation %s per site):\n%s%s", main_metric, table, failures)


def build_server_app(
    config: RunConfig | None = None, site_names: list[str] | None = None
) -> ServerApp:
    """Return a ServerApp bound to ``config`` and the federation's site names (simulation), or
    reading the config from run_config (deployment, ``None``)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = resolve_config(config, context)
        names = site_names or [Path(p).name for p in cfg.data.sites]
        run_federation(grid, cfg, names)

    return server


#: The ServerApp for deployment: config comes in run_config.
app = build_server_app()
