"""A benchmark's results: one row per (setup, method, seed, site), a summary over seeds and
sites (Markdown and CSV), and plots (convergence per method, per-site results).

Figures are unweighted over sites, as in FLamby: a hospital counts once whatever its size. The
"final" figure of a site is its test metric of the final model (federated: the global model after
the last round; pooled: the pooled model; local: the site's own model); the best round is the
round with the best validation figure, reported, never used to pick the model.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fl_imaging.benchmark.comparison import Difference  # noqa: E402
from fl_imaging.review.results import AGGREGATE_SITE, MetricRow  # noqa: E402

__all__ = [
    "SiteResult",
    "plot_convergence",
    "plot_per_site",
    "site_results",
    "summarise",
    "write_results_csv",
    "write_summary",
]

#: Metrics where lower is better (the best round minimises them).
_LOWER_IS_BETTER = ("loss",)


@dataclass
class SiteResult:
    """One site's figures in one cell: test metrics of the final model (``test``), after local
    fine-tuning (``finetuned``), the best validation round of the main metric and its value,
    the cell's wall time, the site's traffic and the privacy spent (NaN when not a DP run)."""

    setup: str
    method: str
    kind: str
    seed: int
    site: str
    dataset: str
    partition: str
    num_test: int
    test: dict[str, float] = field(default_factory=dict)
    finetuned: dict[str, float] = field(default_factory=dict)
    best_round: int = 0
    best_val: float = math.nan
    wall_s: float = math.nan
    mb_up: float = 0.0
    mb_down: float = 0.0
    epsilon: float = math.nan
    #: The site's patient-level (DP-SGD) epsilon after its last round; NaN without DP-SGD.
    patient_epsilon: float = math.nan


def _better(metric: str, a: float, b: float) -> bool:
    lower = metric.endswith(_LOWER_IS_BETTER)
    return a < b if lower else a > b


def site_results(
    rows: Sequence[MetricRow],
    *,
    setup: str,
    method: str,
    kind: str,
    seed: int,
    dataset: str,
    partition: str,
    main: str,
    wall_s: float,
) -> list[SiteResult]:
    """Turn one cell's metric rows into one :class:`SiteResult` per site that has test figures.

    ``main`` is the validation metric whose best round is reported; ``wall_s`` the cell's time.
    """
    per_site: dict[str, list[MetricRow]] = defaultdict(list)
    epsilon = math.nan
    for row in rows:
        if row.site == AGGREGATE_SITE:
            if row.metric == "epsilon":
                epsilon = row.value
            continue
        per_site[row.site].append(row)
    results = []
    for site, site_rows in sorted(per_site.items()):
        test = {r.metric[5:]: r.value for r in site_rows if r.metric.startswith("test_")}
        if not test:
            continue
        result = SiteResult(
            setup=setup,
            method=method,
            kind=kind,
            seed=seed,
            site=site,
            dataset=dataset,
            partition=partition,
            num_test=int(next((r.value for r in site_rows if r.metric == "num_test"), 0)),
            test=test,
            finetuned={
                r.metric[10:]: r.value for r in site_rows if r.metric.startswith("finetuned_")
            },
            wall_s=wall_s,
            epsilon=epsilon,
        )
        patient = [r for r in site_rows if r.metric == "patient_epsilon"]
        if patient:
            result.patient_epsilon = max(patient, key=lambda r: r.round).value
        for row in site_rows:
            if row.metric == main and not math.isnan(row.value):
                if result.best_round == 0 or _better(main, row.value, result.best_val):
                    result.best_round, result.best_val = row.round, row.value
            elif row.metric == "bytes_up":
                result.mb_up += row.value / 1e6
            elif row.metric.startswith("bytes_down"):
                result.mb_down += row.value / 1e6
        results.append(result)
    return results


def write_results_csv(results: Sequence[SiteResult], metrics: Sequence[str], path: Path) -> Path:
    """Write one row per (setup, method, seed, site): test and fine-tuned ``metrics``, best
    round, wall time, MB sent each way and epsilon. Returns ``path``."""
    header = [
        "dataset",
        "partition",
        "setup",
        "method",
        "kind",
        "seed",
        "site",
        "num_test",
        *(f"test_{m}" for m in metrics),
        *(f"finetuned_{m}" for m in metrics),
        "best_round",
        f"best_val_{metrics[0]}",
        "wall_s",
        "mb_up",
        "mb_down",
        "epsilon",
        "patient_epsilon",
    ]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for r in results:
            writer.writerow(
                [
                    r.dataset,
                    r.partition,
                    r.setup,
                    r.method,
                    r.kind,
                    r.seed,
                    r.site,
                    r.num_test,
                    *(_num(r.test.get(m)) for m in metrics),
                    *(_num(r.finetuned.get(m)) for m in metrics),
                    r.best_round,
                    _num(r.best_val),
                    f"{r.wall_s:.1f}",
                    f"{r.mb_up:.3f}",
                    f"{r.mb_down:.3f}",
                    _num(r.epsilon),
                    _num(r.patient_epsilon),
                ]
            )
    return path


def _num(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.4f}"


def _mean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return math.fsum(kept) / len(kept) if kept else math.nan


def _std(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.stdev(kept) if len(kept) > 1 else (0.0 if kept else math.nan)


@dataclass(frozen=True)
class SummaryRow:
    """One (setup, method): each figure as (mean, std) over seeds."""

    setup: str
    method: str
    kind: str
    seeds: int
    figures: dict[str, tuple[float, float]]


def summarise(
    results: Sequence[SiteResult],
    metrics: Sequence[str],
    whole: Mapping[tuple[str, str, int], Mapping[str, float]] | None = None,
) -> list[SummaryRow]:
    """Per (setup, method) and seed: the mean over sites of each test metric, the worst site and
    the best-minus-worst gap of the main metric, the mean after fine-tuning, the cell's wall
    time, MB sent per site (both ways, and up only) and epsilon, and each metric over all
    sites' test cases at once (``whole_<metric>``, from ``whole[(setup, method, seed)]`` where
    given); then mean and std of each over seeds."""
    main = metrics[0]
    whole = whole or {}
    cells: dict[tuple[str, str], dict[int, list[SiteResult]]] = defaultdict(
        lambda: defaultdict(list)
    )
    kinds: dict[tuple[str, str], str] = {}
    for r in results:
        cells[(r.setup, r.method)][r.seed].append(r)
        kinds[(r.setup, r.method)] = r.kind
    summary = []
    for (setup, method), seeds in cells.items():
        per_seed: dict[str, list[float]] = defaultdict(list)
        for seed, sites in seeds.items():
            for m in metrics:
                per_seed[m].append(_mean([s.test.get(m, math.nan) for s in sites]))
                per_seed[f"whole_{m}"].append(whole.get((setup, method, seed), {}).get(m, math.nan))
            mains = [s.test.get(main, math.nan) for s in sites]
            kept = [v for v in mains if not math.isnan(v)]
            per_seed["worst"].append(min(kept) if kept else math.nan)
            per_seed["gap"].append(max(kept) - min(kept) if kept else math.nan)
            per_seed["finetuned"].append(_mean([s.finetuned.get(main, math.nan) for s in sites]))
            per_seed["wall_s"].append(sites[0].wall_s)
            per_seed["mb_per_site"].append(_mean([s.mb_up + s.mb_down for s in sites]))
            per_seed["mb_up_per_site"].append(_mean([s.mb_up for s in sites]))
            per_seed["epsilon"].append(sites[0].epsilon)
            patient = [s.patient_epsilon for s in sites if not math.isnan(s.patient_epsilon)]
            per_seed["patient_epsilon"].append(max(patient) if patient else math.nan)
        figures = {k: (_mean(v), _std(v)) for k, v in per_seed.items()}
        summary.append(SummaryRow(setup, method, kinds[(setup, method)], len(seeds), figures))
    return summary


def _pm(figure: tuple[float, float], digits: int = 3) -> str:
    mean, std = figure
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_summary(
    summary: Sequence[SummaryRow],
    metrics: Sequence[str],
    folder: Path,
    header: str,
    reference: str = "pooled",
    differences: Mapping[tuple[str, str], Difference] | None = None,
    versus: tuple[str, Mapping[tuple[str, str], Difference]] | None = None,
    tuned: Mapping[tuple[str, str], str] | None = None,
) -> tuple[Path, Path]:
    """Write ``summary.csv`` and ``summary.md`` (``header`` on top: command, commit, machine)
    into ``folder``: one table per setup, the main figure of the method ``reference`` (default:
    the pooled baseline) as the reference (``vs <reference>``: the method's mean over sites
    divided by the reference's), and, from ``differences`` (setup, method) -> the paired
    difference to the reference over seeds (:func:`fl_imaging.benchmark.comparison.
    paired_differences`), its mean and 95 % interval (columns ``diff_mean``, ``diff_low``,
    ``diff_high`` in the CSV); ``versus`` (a method, e.g. ``fedavg``, and its differences) the
    same against that method (column ``METRIC - METHOD``; ``vs_mean``, ``vs_low``, ``vs_high``);
    ``tuned`` (setup, method) -> the override the tuning protocol chose (column ``tuned on
    validation``, ``tuned`` in the CSV). Returns both paths."""
    differences = differences or {}
    tuned = tuned or {}
    versus_method, versus_diffs = versus if versus else ("", {})
    nothing = Difference(math.nan, math.nan, math.nan, 0)
    main = metrics[0]
    wholes = [f"whole_{m}" for m in metrics]
    columns = [
        *metrics,
        *wholes,
        *("worst", "gap", "finetuned", "wall_s", "mb_per_site", "mb_up_per_site", "epsilon"),
        "patient_epsilon",
    ]
    csv_path = folder / "summary.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["setup", "method", "kind", "seeds"]
            + [f"{c}_{s}" for c in columns for s in ("mean", "std")]
            + ["diff_mean", "diff_low", "diff_high", "vs", "vs_mean", "vs_low", "vs_high"]
            + ["tuned"]
        )
        for row in summary:
            values = [row.figures.get(c, (math.nan, math.nan)) for c in columns]
            diff = differences.get((row.setup, row.method), nothing)
            other = versus_diffs.get((row.setup, row.method), nothing)
            writer.writerow(
                [row.setup, row.method, row.kind, row.seeds]
                + [_num(v) for pair in values for v in pair]
                + [_num(diff.mean), _num(diff.low), _num(diff.high), versus_method]
                + [_num(other.mean), _num(other.low), _num(other.high)]
                + [tuned.get((row.setup, row.method), "")]
            )
    lines = [header.rstrip(), ""]
    titles = {
        "worst": f"worst site {main}",
        "gap": "best - worst site",
        "finetuned": f"{main} after fine-tuning",
        "wall_s": "wall time (s)",
        "mb_per_site": "MB per site",
        "mb_up_per_site": "MB up per site",
        "epsilon": "epsilon",
        "patient_epsilon": "patient epsilon (max over sites)",
        **{f"whole_{m}": f"{m}, all test cases at once" for m in metrics},
    }
    for setup in dict.fromkeys(r.setup for r in summary):
        rows = [r for r in summary if r.setup == setup]
        base = next((r for r in rows if r.method == reference), None)
        reference_figure = base.figures[main][0] if base else math.nan
        shown = [
            c
            for c in columns
            if any(not math.isnan(r.figures.get(c, (math.nan, 0))[0]) for r in rows)
        ]
        lines += [f"### {setup}", ""]
        head = ["method", "seeds", *(f"{c} (mean over sites)" for c in metrics[:1])]
        head += [f"vs {reference}", f"{main} - {reference} (95 % CI over seeds)"]
        if versus_method:
            head.append(f"{main} - {versus_method} (95 % CI over seeds)")
        with_tuning = any((setup, r.method) in tuned for r in rows)
        if with_tuning:
            head.append("tuned on validation")
        head += [titles.get(c, c) for c in shown if c != main]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for row in rows:
            ratio = row.figures[main][0] / reference_figure if reference_figure else math.nan
            cells = [row.method, str(row.seeds), _pm(row.figures[main])]
            cells.append("-" if math.isnan(ratio) else f"{ratio:.3f}")
            cells.append(differences.get((row.setup, row.method), nothing).text())
            if versus_method:
                cells.append(versus_diffs.get((row.setup, row.method), nothing).text())
            if with_tuning:
                cells.append(
                    f"`{tuned[(setup, row.method)]}`" if (setup, row.method) in tuned else "-"
                )
            for c in shown:
                if c == main:
                    continue
                two_digits = ("mb_per_site", "mb_up_per_site", "epsilon", "patient_epsilon")
                digits = 1 if c == "wall_s" else 2 if c in two_digits else 3
                cells.append(_pm(row.figures[c], digits))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    md_path = folder / "summary.md"
    md_path.write_text("\n".join(lines))
    return csv_path, md_path


def _colours(methods: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """One distinct colour per method (matplotlib's 20-colour ``tab20``, then ``hsv``), so that
    a benchmark's 13 methods never share one (the default cycle has 10)."""
    names = list(dict.fromkeys(methods))
    cmap = plt.get_cmap("tab20" if len(names) <= 20 else "hsv")
    step = 1 if len(names) > 10 else 2  # up to 10: tab20's darker shades only
    return {
        m: cmap((i * step % 20) / 20 if len(names) <= 20 else i / len(names))
        for i, m in enumerate(names)
    }


def plot_convergence(
    curves: dict[str, dict[int, list[float]]], metric: str, title: str, path: Path
) -> Path:
    """Plot, per method, the validation ``metric`` per round (mean over sites, then over seeds:
    ``curves[method][round]`` holds one value per seed) into ``path`` (PNG)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = _colours(list(curves))
    for method, by_round in curves.items():
        rounds = sorted(by_round)
        means = [_mean(by_round[r]) for r in rounds]
        style = "--" if method in ("public", "pooled", "local") else "-"
        ax.plot(rounds, means, style, marker="o", markersize=3, label=method, color=colours[method])
    ax.set_xlabel("round (pass of local epochs, for the baselines)")
    ax.set_ylabel(f"validation {metric} (mean over sites)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_per_site(
    results: Sequence[SiteResult], setup: str, metric: str, title: str, path: Path
) -> Path:
    """Bar chart of each site's test ``metric`` per method (mean over seeds) into ``path``."""
    rows = [r for r in results if r.setup == setup]
    methods = list(dict.fromkeys(r.method for r in rows))
    sites = sorted({r.site for r in rows})
    fig, ax = plt.subplots(figsize=(min(16, max(7, 0.2 * len(methods) * len(sites))), 4.5))
    width = 0.8 / max(len(methods), 1)
    colours = _colours(methods)
    for k, method in enumerate(methods):
        chosen = [r for r in rows if r.method == method]
        heights = [
            _mean([r.test.get(metric, math.nan) for r in chosen if r.site == s]) for s in sites
        ]
        positions = [i + k * width for i in range(len(sites))]
        ax.bar(positions, heights, width, label=method, color=colours[method])
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sites))], sites)
    ax.set_ylabel(f"test {metric} (mean over seeds)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
