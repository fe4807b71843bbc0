"""Run one benchmark cell into its own folder, and know whether it already ran.

A cell's folder holds what any run holds (metrics.csv with the test rows, config.yaml, the
model, report.html; a federated cell also audit.jsonl) and ``cell.json``: its overrides, status
(``done`` or ``failed`` with the error) and wall time. A cell whose ``cell.json`` says ``done``
for the same overrides is not run again, so an interrupted benchmark goes on where it stopped; a
cell whose overrides changed runs again. With ``tracking=...`` each cell is one tracked run,
tagged with the benchmark, setup, method, kind and seed.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from fl_imaging.benchmark.plan import PUBLIC, TUNING, Cell
from fl_imaging.config import RunConfig, config_to_yaml
from fl_imaging.engines.interrupts import RunInterrupted
from fl_imaging.review.report_page import write_report
from fl_imaging.review.results import write_metrics
from fl_imaging.review.tracking import add_tracking_tags, open_tracker

__all__ = ["CELL_FILE", "cell_status", "cell_tracking", "run_cell"]

log = logging.getLogger("fl_imaging.bench")

CELL_FILE = "cell.json"


def cell_status(cell: Cell, folder: Path) -> str:
    """``done`` when ``folder`` holds a finished run of ``cell`` with the same overrides,
    ``failed`` after a failed one, ``changed`` when it ran with other overrides, else ``new``."""
    record = folder / CELL_FILE
    if not record.is_file():
        return "new"
    try:
        saved = json.loads(record.read_text())
    except json.JSONDecodeError:
        return "new"
    if saved.get("overrides") != list(cell.overrides):
        return "changed"
    return "done" if saved.get("status") == "done" else "failed"


def read_cell(folder: Path) -> dict:
    """The ``cell.json`` record of a cell's folder."""
    return json.loads((folder / CELL_FILE).read_text())


def _run_baseline(cfg: RunConfig, kind: str, folder: Path) -> None:
    from fl_imaging.data.prepare import (
        partition_summary,
        prepare_public_site,
        prepare_sites,
        write_partition_summary,
    )
    from fl_imaging.training.baselines import train_local, train_pooled

    cfg, sites, reports = prepare_sites(cfg)
    write_partition_summary(partition_summary(sites, reports), folder / "partition.csv")
    threads = cfg.engine.num_cpus or torch.get_num_threads()
    torch.set_num_threads(threads)
    if kind in ("pooled", PUBLIC):
        train_sites = [prepare_public_site(cfg)] if kind == PUBLIC else None
        rows, model = train_pooled(
            cfg, sites, finetune_epochs=cfg.engine.finetune_epochs, train_sites=train_sites
        )
        torch.save(model.state_dict(), folder / "model.pt")
    else:
        rows, models = train_local(cfg, sites)
        (folder / "models").mkdir(exist_ok=True)
        for name, site_model in models.items():
            torch.save(site_model.state_dict(), folder / "models" / f"{name}.pt")
    write_metrics(rows, folder / "metrics.csv")
    (folder / "config.yaml").write_text(config_to_yaml(cfg))
    # Tracked and reported like a run; no audit log: nothing went between sites and a server.
    tracker = open_tracker(cfg, folder)
    if tracker is not None:
        tracker.log_rows(rows)
    write_report(folder)
    if tracker is not None:
        tracker.finish("FINISHED")


def cell_tracking(cfg: RunConfig, cell: Cell) -> RunConfig:
    """``cfg`` with the cell's tracking tags (``benchmark``, ``setup``, ``method``, ``kind``,
    ``seed``) and run name ``BENCHMARK/SETUP/METHOD/seedN``: one tracked run per cell, found
    by its tags (a benchmark that goes on later reuses its cells, so no parent run)."""
    name = cfg.bench.name or "bench"
    tags = {
        "benchmark": name,
        "setup": cell.setup,
        "method": cell.method,
        "kind": cell.kind,
        "seed": str(cell.seed),
    }
    return add_tracking_tags(cfg, tags, run_name=f"{name}/{cell.key}")


def run_cell(cell: Cell, cfg: RunConfig, folder: Path) -> tuple[str, float, str]:
    """Run ``cell`` (its validated config ``cfg``) into ``folder``, replacing what was there.

    Returns (status ``done`` or ``failed``, wall seconds, error text). A failure is recorded in
    ``cell.json`` and returned, not raised, so the benchmark goes on with the other cells.
    """
    from fl_imaging.run import run

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    cfg = cell_tracking(replace(cfg, run_dir=str(folder.resolve())), cell)
    start = time.perf_counter()
    error = ""
    try:
        if cell.kind in ("federated", TUNING):
            run(cfg)
        else:
            _run_baseline(cfg, cell.kind, folder)
        status = "done"
    except RunInterrupted:  # the user stopped it: the benchmark stops too
        raise
    except Exception as err:  # one broken cell must not end the benchmark
        log.exception("cell %s failed", cell.key)
        status, error = "failed", f"{type(err).__name__}: {err}"
    seconds = time.perf_counter() - start
    record = {
        "setup": cell.setup,
        "method": cell.method,
        "kind": cell.kind,
        "seed": cell.seed,
        "overrides": list(cell.overrides),
        "status": status,
        "error": error,
        "seconds": round(seconds, 2),
    }
    (folder / CELL_FILE).write_text(json.dumps(record, indent=1))
    return status, seconds, error
