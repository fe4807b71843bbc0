"""Result files of cross-site evaluation and of site contributions, and their summary lines.

- ``cross_site.csv``: one row per (model, site where it was scored, metric): ``model``
  (``global`` or the site whose model it is), ``kind`` (how that model was made), ``site``,
  ``metric``, ``value``, ``cases`` (that site's test cases);
- ``cross_site.png``: the main metric as a heatmap, models down, sites across, each site's own
  model at its own site outlined;
- ``contributions.csv``: one row per site: ``site``, ``method``, ``round`` (whose updates),
  ``aggregator``, ``metric``, ``scored_on`` (the sites and their validation cases), ``cases``,
  ``with_site`` and ``without_site`` (the metric of the aggregate with and without the site),
  ``contribution`` (their difference) and ``note`` (why a figure is missing).

Every file is written atomically (:func:`fl_imaging.common.atomic.write_atomically`).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from fl_imaging.common.atomic import write_atomically

__all__ = [
    "GLOBAL_MODEL",
    "Contribution",
    "CrossSiteRow",
    "contributions_line",
    "cross_site_line",
    "cross_site_matrix",
    "plot_cross_site",
    "read_cross_site",
    "write_contributions",
    "write_cross_site",
]

#: ``model`` of the global model's rows in cross_site.csv.
GLOBAL_MODEL = "global"


@dataclass(frozen=True)
class CrossSiteRow:
    """One score of cross-site evaluation: ``model`` (``global`` or a site name) made as
    ``kind``, scored on the test cases (``cases`` of them) of ``site``: ``metric`` = ``value``."""

    model: str
    kind: str
    site: str
    metric: str
    value: float
    cases: int


@dataclass(frozen=True)
class Contribution:
    """What the federation gains from ``site`` by ``method`` over round ``round``'s updates
    aggregated by ``aggregator``: ``metric`` (mean over the sites of ``scored_on``, ``cases``
    validation cases in all) of the aggregate with the site (``with_site``) minus that without
    it (``without_site``) = ``contribution`` (NaN with a ``note`` when it cannot be computed)."""

    site: str
    method: str
    round: int
    aggregator: str
    metric: str
    scored_on: str
    cases: int
    with_site: float
    without_site: float
    contribution: float
    note: str = ""


def _csv_text(header: tuple[str, ...], rows: list[tuple]) -> bytes:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    for row in rows:
        writer.writerow(f"{v:.6g}" if isinstance(v, float) else v for v in row)
    return text.getvalue().encode()


def write_cross_site(rows: list[CrossSiteRow], path: Path) -> Path:
    """Write ``rows`` to ``path`` as cross_site.csv (module docstring); returns ``path``.
    Raises ``OSError``."""
    header = tuple(f.name for f in fields(CrossSiteRow))
    ordered = sorted(rows, key=lambda r: (r.model != GLOBAL_MODEL, r.model, r.site, r.metric))
    data = _csv_text(header, [astuple(r) for r in ordered])
    return write_atomically(path, lambda handle: handle.write(data))


def read_cross_site(path: Path) -> list[CrossSiteRow]:
    """The rows of a cross_site.csv that :func:`write_cross_site` wrote. Raises ``OSError``,
    and ``KeyError`` or ``ValueError`` for a file of another layout."""
    with path.open(newline="") as handle:
        return [
            CrossSiteRow(
                r["model"], r["kind"], r["site"], r["metric"], float(r["value"]), int(r["cases"])
            )
            for r in csv.DictReader(handle)
        ]


def cross_site_matrix(
    rows: list[CrossSiteRow], metric: str
) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """The ``metric`` matrix of ``rows``: the models (``global`` first, then by name), the
    sites that scored them (by name), and (model, site) -> value (absent: not scored)."""
    chosen = [r for r in rows if r.metric == metric]
    models = sorted({r.model for r in chosen}, key=lambda m: (m != GLOBAL_MODEL, m))
    sites = sorted({r.site for r in chosen})
    return models, sites, {(r.model, r.site): r.value for r in chosen}


def plot_cross_site(rows: list[CrossSiteRow], metric: str, path: Path) -> Path:
    """Draw the ``metric`` matrix of ``rows`` as a heatmap PNG at ``path`` (models down, test
    sites across, values written in the cells, each site's model at its own site outlined);
    returns ``path``. Raises ``OSError``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    models, sites, values = cross_site_matrix(rows, metric)
    grid = np.array([[values.get((m, s), math.nan) for s in sites] for m in models], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * max(len(sites), 1), 1.2 + 0.55 * len(models)))
    bounded = metric != "loss" and not metric.endswith("loss")
    image = ax.imshow(
        np.ma.masked_invalid(grid),
        cmap="viridis",
        vmin=0.0 if bounded else None,
        vmax=1.0 if bounded else None,
        aspect="auto",
    )
    for i, model in enumerate(models):
        for j, site in enumerate(sites):
            value = grid[i, j]
            text = "-" if math.isnan(value) else f"{value:.3f}"
            light = bounded and not math.isnan(value) and value > 0.6  # viridis turns yellow
            colour = "black" if light else "white"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9)
            if model == site:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2, ec="red"))
    ax.set_xticks(range(len(sites)), sites, rotation=30, ha="right")
    labels = ["global model" if m == GLOBAL_MODEL else f"{m}'s model" for m in models]
    ax.set_yticks(range(len(models)), labels)
    ax.set_xlabel("test cases of")
    ax.set_title(f"cross-site evaluation: test {metric}")
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    try:
        write_atomically(path, lambda handle: fig.savefig(handle, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path


def _mean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def cross_site_line(rows: list[CrossSiteRow], metric: str) -> str:
    """The summary line of cross-site evaluation: the global model's mean ``metric`` over the
    sites, and the site models' mean at their own site and at the other sites."""
    models, sites, values = cross_site_matrix(rows, metric)
    if not values:
        return f"cross-site evaluation: no site sent a test {metric} (see the failures above)"
    own = [values[(m, m)] for m in models if (m, m) in values]
    others = [v for (m, s), v in values.items() if m != GLOBAL_MODEL and m != s]
    glob = [v for (m, _), v in values.items() if m == GLOBAL_MODEL]
    kinds = sorted({r.kind.split(" at ")[0] for r in rows if r.model != GLOBAL_MODEL})
    return (
        f"cross-site evaluation (test {metric}, {len(models)} models x {len(sites)} sites; "
        f"cross_site.csv, cross_site.png): global model {_mean(glob):.4f} (mean over sites); "
        f"each site's own model ({', '.join(kinds) or 'none'}) {_mean(own):.4f} at its own site, "
        f"{_mean(others):.4f} at the other sites"
    )


def write_contributions(contributions: list[Contribution], path: Path) -> Path:
    """Write ``contributions`` to ``path`` as contributions.csv (module docstring); returns
    ``path``. Raises ``OSError``."""
    header = tuple(f.name for f in fields(Contribution))
    data = _csv_text(header, [astuple(c) for c in contributions])
    return write_atomically(path, lambda handle: handle.write(data))


def contributions_line(contributions: list[Contribution]) -> str:
    """The summary line on the sites' contributions (empty for none)."""
    if not contributions:
        return ""
    first = contributions[0]
    shown = "  ".join(
        f"{c.site} {c.contribution:+.4f}" if not math.isnan(c.contribution) else f"{c.site} -"
        for c in contributions
    )
    return (
        f"site contributions ({first.method} over round {first.round}'s updates, "
        f"{first.aggregator}; {first.metric} on the {first.scored_on}; contributions.csv): "
        f"{shown}"
    )
