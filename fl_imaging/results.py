"""Result files of a run: the metrics table, the per-round summary, curves, model and config.

Rows are kept in long form, one value per (round, site, metric), so that any number of sites and
metrics fits one CSV a person can open in a spreadsheet. Site ``all`` holds the sample-weighted
aggregate over the sites of that round.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = [
    "AGGREGATE_SITE",
    "MetricRow",
    "format_round_table",
    "plot_curves",
    "read_metrics",
    "write_metrics",
]

#: Site name of the rows that hold the aggregate over the sites of a round.
AGGREGATE_SITE = "all"
FIELDS = ("round", "site", "metric", "value")


@dataclass(frozen=True)
class MetricRow:
    """One value: ``round`` (1-based), ``site`` name or ``all``, ``metric`` name, ``value``."""

    round: int
    site: str
    metric: str
    value: float


def write_metrics(rows: list[MetricRow], path: Path) -> Path:
    """Write rows to a CSV with columns round, site, metric, value; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(FIELDS)
        for row in sorted(
            rows, key=lambda r: (r.round, r.site == AGGREGATE_SITE, r.site, r.metric)
        ):
            writer.writerow((row.round, row.site, row.metric, f"{row.value:.6g}"))
    return path


def read_metrics(path: Path) -> list[MetricRow]:
    """Read a CSV written by :func:`write_metrics` back into rows."""
    with path.open(newline="") as handle:
        return [
            MetricRow(int(r["round"]), r["site"], r["metric"], float(r["value"]))
            for r in csv.DictReader(handle)
        ]


def _by_round(rows: list[MetricRow]) -> dict[int, dict[tuple[str, str], float]]:
    table: dict[int, dict[tuple[str, str], float]] = defaultdict(dict)
    for row in rows:
        table[row.round][(row.site, row.metric)] = row.value
    return table


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def format_round_table(rows: list[MetricRow], main_metric: str, sites: list[str]) -> str:
    """Return a plain-text table: one line per round with the aggregate train loss, each site's
    validation ``main_metric`` and their mean over sites."""
    header = ["round", "train loss", *(f"{main_metric} {s}" for s in sites), f"mean {main_metric}"]
    lines = [header]
    for rnd, values in sorted(_by_round(rows).items()):
        per_site = [values.get((s, main_metric)) for s in sites]
        present = [v for v in per_site if v is not None and not math.isnan(v)]
        mean = sum(present) / len(present) if present else None
        lines.append(
            [
                str(rnd),
                _fmt(values.get((AGGREGATE_SITE, "train_loss"))),
                *(_fmt(v) for v in per_site),
                _fmt(mean),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    )


def plot_curves(rows: list[MetricRow], main_metric: str, path: Path) -> Path:
    """Plot, per site, the training loss and the validation ``main_metric`` against the round,
    into a PNG at ``path``; returns ``path``."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        series[(row.metric, row.site)].append((row.round, row.value))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in (
        (axes[0], "train_loss", "training loss"),
        (axes[1], main_metric, f"validation {main_metric}"),
    ):
        for (name, site), points in sorted(series.items()):
            if name != metric:
                continue
            points.sort()
            style = {"color": "black", "linewidth": 2.5} if site == AGGREGATE_SITE else {}
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=site, **style)
        ax.set_xlabel("round")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
