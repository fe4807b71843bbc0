"""Run a named benchmark, resumably, and write its tables (what ``fl-imaging-bench`` does).

A benchmark is an experiment preset (``conf/experiment/``) with a ``bench`` section: setups
(datasets x partitions), strategies and seeds, plus the pooled and local-only baselines on the
same sites. Every cell's config is composed and checked before the first one runs. Results go
to ``bench.out_dir/NAME/``: ``cells/SETUP/METHOD/seedN/`` (each a run folder), ``results.csv``
(one row per setup, method, seed and site), ``summary.md`` and ``summary.csv`` (mean and std
over seeds), ``convergence_SETUP.png`` and ``per_site_SETUP.png``.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import platform
import shlex
import subprocess
import time
from collections import defaultdict
from pathlib import Path

from fl_imaging.benchmark.all_test_cases import all_test_cases_metrics
from fl_imaging.benchmark.cells import cell_status, read_cell, run_cell
from fl_imaging.benchmark.comparison import paired_differences
from fl_imaging.benchmark.plan import PUBLIC, Cell, plan_cells
from fl_imaging.benchmark.report import (
    SiteResult,
    plot_convergence,
    plot_per_site,
    site_results,
    summarise,
    write_results_csv,
    write_summary,
)
from fl_imaging.config import ConfigError, DataName, RunConfig
from fl_imaging.review.results import AGGREGATE_SITE, read_metrics
from fl_imaging.review.tracking import check_tracking, resolve_tracking
from fl_imaging.run import USER_ERRORS, check_overrides
from fl_imaging.training.model_checks import build_network, check_fedbn
from strategies.registry import check_strategy_name

__all__ = ["PRESETS", "run_benchmark"]

#: The benchmark presets shipped in ``conf/experiment/``.
PRESETS = (
    "smoke",
    "hippocampus_iid",
    "hippocampus_shift",
    "hippocampus_dpsgd",
    "hippocampus_dpsgd_warm",
    "adrenal3d_dirichlet",
    "mednist_dirichlet",
)

log = logging.getLogger("fl_imaging.bench")


def _dataset_label(cfg: RunConfig) -> tuple[str, str]:
    """(dataset, partition) names of a cell's config for the tables."""
    data = cfg.data
    if data.name in (DataName.demo, DataName.folders):
        return data.name.value, "sites"
    return data.flag or Path(data.root or data.name.value).name, data.partition.name.value


def _checked(cell: Cell) -> RunConfig:
    """The validated config of ``cell``; raises what ``fl-imaging`` would refuse before running
    (a :class:`ConfigError` from its override list names the cell)."""
    try:
        cfg = check_overrides(list(cell.overrides))
    except ConfigError as err:
        raise ConfigError(f"bench cell {cell.key}: {err}") from None
    check_strategy_name(cfg.strategy)
    build_network(cfg)  # a network its settings cannot build stops the benchmark now
    if cfg.strategy.fedbn:
        check_fedbn(cfg)
    if cell.kind == PUBLIC and not cfg.data.public_fraction:
        raise ConfigError(
            f"bench cell {cell.key}: the public baseline pretrains on the cases that "
            "data.public_fraction holds out of every site, and data.public_fraction is 0: set "
            "it (e.g. data.public_fraction=0.2) or drop public from bench.baselines"
        )
    if cfg.task.dp_sgd.enabled and cell.kind != "federated":  # baselines train without DP-SGD
        raise ConfigError(
            f"bench cell {cell.key}: the {cell.kind} baseline trains without DP-SGD, but its "
            "config has task.dp_sgd.enabled=true; put task.dp_sgd.* in bench.strategies, not in "
            "the benchmark's common overrides"
        )
    return cfg


def _header(name: str, argv: list[str]) -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    import torch

    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )
    return (
        f"## Benchmark `{name}`\n\n"
        f"- command: `fl-imaging-bench {shlex.join(argv)}`\n"
        f"- commit: {commit or 'unknown'}; machine: {machine}\n"
        f"- written: {datetime.datetime.now().isoformat(timespec='minutes')}\n"
        "- figures: test metrics of the final model, unweighted mean over sites, then mean ± "
        "std over seeds; worst site and best - worst gap of the main metric; fine-tuned: after "
        "local fine-tuning at each site; all test cases at once: the final model (local: each "
        "site's, averaged) scored on every site's test cases together, as published figures "
        "are (FedBN: none, its sites keep their own norms); MB per site: model traffic both "
        "ways; MB up per site: what each site sent (compressed with strategy.compression)\n"
    )


def _main_metrics(cfg: RunConfig) -> list[str]:
    if cfg.bench.metrics:
        return list(cfg.bench.metrics)
    from tasks import build_task

    return [build_task(cfg.task).main_metric]


def _curve(rows: list, metric: str) -> dict[int, float]:
    """Round -> validation ``metric`` averaged over sites (NaN-free rounds only)."""
    values: dict[int, list[float]] = defaultdict(list)
    for row in rows:
        if row.metric == metric and row.site != AGGREGATE_SITE and not math.isnan(row.value):
            values[row.round].append(row.value)
    return {rnd: sum(v) / len(v) for rnd, v in sorted(values.items())}


def _report(
    name: str,
    argv: list[str],
    out: Path,
    cells: list[tuple[Cell, RunConfig]],
    metrics: list[str],
) -> Path:
    """Collect every finished cell into results.csv, summary.md/.csv and the plots."""
    out.mkdir(parents=True, exist_ok=True)
    results: list[SiteResult] = []
    whole: dict[tuple[str, str, int], dict[str, float]] = {}
    curves: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for cell, cfg in cells:
        folder = out / "cells" / cell.key
        if cell_status(cell, folder) != "done":
            continue
        rows = read_metrics(folder / "metrics.csv")
        dataset, partition = _dataset_label(cfg)
        results += site_results(
            rows,
            setup=cell.setup,
            method=cell.method,
            kind=cell.kind,
            seed=cell.seed,
            dataset=dataset,
            partition=partition,
            main=metrics[0],
            wall_s=float(read_cell(folder)["seconds"]),
        )
        for rnd, value in _curve(rows, metrics[0]).items():
            curves[cell.setup][cell.method][rnd].append(value)
        try:
            whole[(cell.setup, cell.method, cell.seed)] = all_test_cases_metrics(
                cfg, folder, cell.kind
            )
        except Exception as err:  # a table without this figure beats no table
            log.error("cell %s: not scored on all test cases at once: %s", cell.key, err)
    write_results_csv(results, metrics, out / "results.csv")
    summary = summarise(results, metrics, whole)
    reference = cells[0][1].bench.reference if cells else "pooled"
    differences = paired_differences(results, metrics[0], reference)
    _, md_path = write_summary(summary, metrics, out, _header(name, argv), reference, differences)
    for setup, by_method in curves.items():
        title = f"{name}: {setup}"
        plot_convergence(by_method, metrics[0], title, out / f"convergence_{setup}.png")
        plot_per_site(results, setup, metrics[0], title, out / f"per_site_{setup}.png")
    return md_path


def run_benchmark(overrides: list[str], only: str = "", list_only: bool = False) -> int:
    """Run the benchmark named by ``overrides`` (e.g. ``experiment=smoke``): every cell not done
    before, or only those of the comma-separated methods in ``only``, then the tables (every
    cell done so far); with ``list_only``, print the cells and their state and run nothing.
    Returns the exit code: 0 every cell done, 1 some cell failed, 2 a configuration error."""
    overrides = list(overrides)
    try:
        base = check_overrides(overrides)
        name = base.bench.name
        if not name:
            raise ConfigError(
                f"no benchmark chosen: add experiment=NAME ({', '.join(PRESETS)}) or set bench.name"
            )
        planned = plan_cells(base.bench, overrides)
        methods = list(dict.fromkeys(c.method for c in planned))
        wanted = {m.strip() for m in only.split(",") if m.strip()} or set(methods)
        unknown = wanted - set(methods)
        if unknown:
            raise ConfigError(
                f"--only: no method {', '.join(sorted(unknown))}; known: {', '.join(methods)}"
            )
        log.info("benchmark %s: checking the config of %d cells", name, len(planned))
        cells = [(cell, _checked(cell)) for cell in planned]
        check_tracking(resolve_tracking(base))  # once, before any cell: package, folder, server
    except USER_ERRORS as err:
        log.error("%s", err)
        return 2
    out = Path(base.bench.out_dir) / name
    metrics = _main_metrics(cells[0][1])
    states = [cell_status(cell, out / "cells" / cell.key) for cell, _ in cells]
    if list_only:
        for (cell, _), state in zip(cells, states, strict=True):
            print(f"{state:8} {cell.key}")
        return 0
    todo = sum(s != "done" and c.method in wanted for (c, _), s in zip(cells, states, strict=True))
    log.info(
        "benchmark %s: %d cells, %d done before, %d to run; results in %s",
        name,
        len(cells),
        states.count("done"),
        todo,
        out,
    )
    failed: list[str] = []
    start = time.perf_counter()
    ran = 0
    for k, ((cell, cfg), state) in enumerate(zip(cells, states, strict=True), start=1):
        tag = f"[bench {k}/{len(cells)}] {cell.key}"
        if cell.method not in wanted:
            continue
        if state == "done":
            log.info("%s: done before, reused", tag)
            continue
        if state == "changed":
            log.info("%s: ran before with other overrides, runs again", tag)
        log.info("%s: running (%s)", tag, cell.kind)
        status, seconds, error = run_cell(cell, cfg, out / "cells" / cell.key)
        ran += 1
        left = todo - ran
        elapsed = time.perf_counter() - start
        eta = f", about {elapsed / ran * left / 60:.0f} min left" if left else ""
        if status == "done":
            log.info("%s: done in %.0f s (%d to go%s)", tag, seconds, left, eta)
        else:
            failed.append(f"{cell.key}: {error}")
            log.error("%s: FAILED after %.0f s: %s", tag, seconds, error)
    md_path = _report(name, overrides, out, cells, metrics)
    print(md_path.read_text())
    log.info("tables: %s, %s; per-site rows: %s", md_path, out / "summary.csv", out / "results.csv")
    if failed:
        log.error(
            "%d cell(s) failed (rerun to retry them):\n  %s", len(failed), "\n  ".join(failed)
        )
        return 1
    return 0
