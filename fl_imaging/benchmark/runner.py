"""Run a named benchmark, resumably, and write its tables (what ``fl-imaging-bench`` does).

A benchmark is an experiment preset (``conf/experiment/``) with a ``bench`` section: setups
(datasets x partitions), strategies and seeds, plus the pooled and local-only baselines on the
same sites. Every cell's config is composed and checked before the first one runs. Results go
to ``bench.out_dir/NAME/``: ``cells/SETUP/METHOD/seedN/`` (each a run folder), ``results.csv``
(one row per setup, method, seed and site), ``summary.md`` and ``summary.csv`` (mean and std
over seeds), ``convergence_SETUP.png`` and ``per_site_SETUP.png``; with ``bench.tune``, the
trials first (``cells/SETUP/METHOD/tuning/KEY=VALUE/seedN/``) and ``tuning.csv``.
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
from dataclasses import dataclass, field, replace
from pathlib import Path

from fl_imaging.benchmark.all_test_cases import all_test_cases_metrics
from fl_imaging.benchmark.cells import cell_status, read_cell, run_cell
from fl_imaging.benchmark.comparison import paired_differences
from fl_imaging.benchmark.plan import PUBLIC, TUNING, Cell, plan_cells, plan_trials
from fl_imaging.benchmark.report import (
    SiteResult,
    plot_convergence,
    plot_per_site,
    site_results,
    summarise,
    write_results_csv,
    write_summary,
)
from fl_imaging.benchmark.tuning import (
    Choice,
    Trial,
    choose,
    resolve_tune_keys,
    write_tuning_csv,
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
    if cfg.task.dp_sgd.enabled and cell.kind not in ("federated", TUNING):  # baselines: no DP-SGD
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


def _final_validation(folder: Path, metric: str) -> float:
    """A finished trial's score: the last round's validation ``metric``, mean over sites."""
    curve = _curve(read_metrics(folder / "metrics.csv"), metric)
    return curve[max(curve)] if curve else math.nan


def _tuning(
    out: Path, trials: list[tuple[Trial, Cell]], metric: str
) -> tuple[dict[tuple[str, str], Choice], dict[Trial, float]]:
    """The choice of every tuned (setup, method) whose trials all finished, and each trial's
    score (mean over its tuning seeds), from the trial cells' folders under ``out``."""
    per_trial: dict[Trial, list[float]] = defaultdict(list)
    for trial, cell in trials:
        folder = out / "cells" / cell.key
        done = cell_status(cell, folder) == "done"
        per_trial[trial].append(_final_validation(folder, metric) if done else math.nan)
    chosen = choose(list(per_trial), lambda trial: per_trial[trial], metric)
    means = {t: sum(v) / len(v) for t, v in per_trial.items()}
    return chosen, means


def _report(
    name: str,
    argv: list[str],
    out: Path,
    cells: list[tuple[Cell, RunConfig]],
    metrics: list[str],
    tuned: dict[tuple[str, str], Choice] | None = None,
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
        if cell.kind == TUNING or cell_status(cell, folder) != "done":
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
    bench = cells[0][1].bench if cells else None
    reference = bench.reference if bench else "pooled"
    differences = paired_differences(results, metrics[0], reference)
    compare_with = bench.compare_with if bench else None
    versus = None
    if (
        compare_with
        and compare_with != reference
        and any(r.method == compare_with for r in results)
    ):
        versus = (compare_with, paired_differences(results, metrics[0], compare_with))
    tuned_text = {key: choice.override for key, choice in (tuned or {}).items()}
    _, md_path = write_summary(
        summary, metrics, out, _header(name, argv), reference, differences, versus, tuned_text
    )
    for setup, by_method in curves.items():
        title = f"{name}: {setup}"
        plot_convergence(by_method, metrics[0], title, out / f"convergence_{setup}.png")
        plot_per_site(results, setup, metrics[0], title, out / f"per_site_{setup}.png")
    return md_path


@dataclass
class _Progress:
    """Where a benchmark stands: cells passed (``k`` of ``total``), run now (``ran`` of
    ``left``) since ``start`` (``time.perf_counter`` seconds)."""

    total: int
    left: int
    k: int = 0
    ran: int = 0
    start: float = field(default_factory=time.perf_counter)


def _run_cells(
    todo: list[tuple[Cell, RunConfig]], out: Path, progress: _Progress, failed: list[str]
) -> None:
    """Run every cell of ``todo`` not done before, logging ``[bench k/N]`` progress with the
    time left (``progress``, updated); a failed cell is appended to ``failed`` and the others
    go on."""
    for cell, cfg in todo:
        folder = out / "cells" / cell.key
        state = cell_status(cell, folder)
        progress.k += 1
        tag = f"[bench {progress.k}/{progress.total}] {cell.key}"
        if state == "done":
            log.info("%s: done before, reused", tag)
            continue
        if state == "changed":
            log.info("%s: ran before with other overrides, runs again", tag)
        log.info("%s: running (%s)", tag, cell.kind)
        status, seconds, error = run_cell(cell, cfg, folder)
        progress.ran += 1
        left = max(progress.left - progress.ran, 0)
        elapsed = time.perf_counter() - progress.start
        eta = f", about {elapsed / progress.ran * left / 60:.0f} min left" if left else ""
        if status == "done":
            log.info("%s: done in %.0f s (%d to go%s)", tag, seconds, left, eta)
        else:
            failed.append(f"{cell.key}: {error}")
            log.error("%s: FAILED after %.0f s: %s", tag, seconds, error)


def run_benchmark(overrides: list[str], only: str = "", list_only: bool = False) -> int:
    """Run the benchmark named by ``overrides`` (e.g. ``experiment=smoke``): every cell not done
    before, or only those of the comma-separated methods in ``only``, then the tables (every
    cell done so far); with ``list_only``, print the cells and their state and run nothing.
    With ``bench.tune``, the public baselines and the trials run first, then the tuned
    strategies' cells with the chosen values (:mod:`fl_imaging.benchmark.tuning`).
    Returns the exit code: 0 every cell done, 1 some cell failed, 2 a configuration error."""
    overrides = list(overrides)
    try:
        base = check_overrides(overrides)
        name = base.bench.name
        if not name:
            raise ConfigError(
                f"no benchmark chosen: add experiment=NAME ({', '.join(PRESETS)}) or set bench.name"
            )
        bench = resolve_tune_keys(
            base.bench,
            lambda label: (
                check_overrides([*overrides, *base.bench.strategies[label]]).strategy.tune_key
            ),
        )
        base = replace(base, bench=bench)
        trials = plan_trials(base.bench, overrides)
        # Until the trials have run, the tuned cells are checked with their first grid value.
        first: dict[tuple[str, str], str] = {}
        for trial, _ in trials:
            first.setdefault((trial.setup, trial.method), trial.override)
        planned = plan_cells(base.bench, overrides, first)
        methods = list(dict.fromkeys(c.method for c in planned))
        wanted = {m.strip() for m in only.split(",") if m.strip()} or set(methods)
        unknown = wanted - set(methods)
        if unknown:
            raise ConfigError(
                f"--only: no method {', '.join(sorted(unknown))}; known: {', '.join(methods)}"
            )
        log.info("benchmark %s: checking the config of %d cells", name, len(planned) + len(trials))
        checked = {cell: _checked(cell) for cell in [*planned, *(c for _, c in trials)]}
        check_tracking(resolve_tracking(base))  # once, before any cell: package, folder, server
    except USER_ERRORS as err:
        log.error("%s", err)
        return 2
    out = Path(base.bench.out_dir) / name
    metrics = _main_metrics(checked[planned[0]])
    chosen: dict[tuple[str, str], Choice] = {}
    scores: dict[Trial, float] = {}
    if list_only:
        chosen, _ = _tuning(out, trials, metrics[0])
        for _, cell in trials:
            print(f"{cell_status(cell, out / 'cells' / cell.key):8} {cell.key}")
        decided = plan_cells(base.bench, overrides, {k: c.override for k, c in chosen.items()})
        keys = {c.key for c in decided}
        for cell in planned:
            if cell.key in keys:
                cell = next(c for c in decided if c.key == cell.key)
                print(f"{cell_status(cell, out / 'cells' / cell.key):8} {cell.key}")
            else:
                print(f"{'tuning':8} {cell.key} (waits for its trials)")
        return 0
    everything = [*(c for _, c in trials), *planned]
    states = [cell_status(c, out / "cells" / c.key) for c in everything]
    todo = sum(s != "done" and c.method in wanted for c, s in zip(everything, states, strict=True))
    with_trials = f" ({len(trials)} tuning trials)" if trials else ""
    log.info(
        "benchmark %s: %d cells%s, %d done before, %d to run; results in %s",
        name,
        len(everything),
        with_trials,
        states.count("done"),
        todo,
        out,
    )
    failed: list[str] = []
    wanted_cells = [c for c in planned if c.method in wanted]
    progress = _Progress(total=len(everything), left=todo)
    if trials:
        publics = [(c, checked[c]) for c in wanted_cells if c.kind == PUBLIC]
        tuning = [(c, checked[c]) for _, c in trials if c.method in wanted]
        _run_cells([*publics, *tuning], out, progress, failed)
        chosen, scores = _tuning(out, trials, metrics[0])  # the trials are done from here on
        tuned = {(t.setup, t.method) for t, _ in trials if t.method in wanted}
        for setup, method in sorted(tuned - set(chosen)):
            failed.append(f"{setup}/{method}: not tuned (a trial failed), its cells did not run")
        for choice in chosen.values():
            log.info(
                "tuning %s/%s: %s (validation %s: %s)",
                choice.setup,
                choice.method,
                choice.override,
                metrics[0],
                ", ".join(f"{v}: {score:.4f}" for v, score in choice.scores),
            )
        decided = plan_cells(base.bench, overrides, {k: c.override for k, c in chosen.items()})
        try:
            for cell in decided:
                if cell not in checked:
                    checked[cell] = _checked(cell)
        except USER_ERRORS as err:
            log.error("%s", err)
            return 2
        planned = decided
    _run_cells([(c, checked[c]) for c in planned if c.method in wanted], out, progress, failed)
    md_path = _report(name, overrides, out, [(c, checked[c]) for c in planned], metrics, chosen)
    if trials:
        tuning_csv = write_tuning_csv(
            list(dict.fromkeys(t for t, _ in trials)),
            scores,
            chosen,
            metrics[0],
            out / "tuning.csv",
        )
        log.info("tuning: %s", tuning_csv)
    print(md_path.read_text())
    log.info("tables: %s, %s; per-site rows: %s", md_path, out / "summary.csv", out / "results.csv")
    if failed:
        log.error(
            "%d cell(s) failed (rerun to retry them):\n  %s", len(failed), "\n  ".join(failed)
        )
        return 1
    return 0
