"""The files of ``fl-imaging-data stats``: ``stats.csv``, ``stats_withheld.csv``, one PNG per
statistic with the sites overlaid, and the HTML section (``statistics.html``, and the
"Federated statistics" section of a run's ``report.html`` when its folder holds ``stats.csv``).

``stats.csv`` columns: ``site`` (a site, or ``pooled``), ``statistic``, ``key`` (modality, axis,
class or label value), ``bin_low``, ``bin_high`` (a histogram's bin; the first bin's low is
``-inf`` and the last bin's high ``inf``: they are open; empty for a single number),
``value``, and ``sites`` (how many sites a pooled value sums). ``intensity_moments`` is written
as ``intensity_voxels``, ``intensity_sum``, ``intensity_sum_sq`` and the ``intensity_mean`` and
``intensity_std`` they give. ``stats_withheld.csv``: ``site``, ``statistic``, ``key``,
``reason`` (what each site kept, and why) and the sites that failed or refused.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from fl_imaging.common.atomic import write_atomically
from fl_imaging.statistics.coordinator import Pooled, SiteReleases, moments, pool
from fl_imaging.statistics.request import StatsRequest

__all__ = [
    "POOLED",
    "STATS_CSV",
    "STATS_HTML",
    "WITHHELD_CSV",
    "statistics_rows",
    "statistics_section",
    "write_statistics",
]

STATS_CSV = "stats.csv"
WITHHELD_CSV = "stats_withheld.csv"
STATS_HTML = "statistics.html"
#: The ``site`` of the pooled rows.
POOLED = "pooled"
COLUMNS = ("site", "statistic", "key", "bin_low", "bin_high", "value", "sites")
#: The request's edges of each histogram statistic.
_EDGES = {
    "intensity_histogram": "intensity_edges",
    "spacing_histogram": "spacing_edges",
    "shape_histogram": "shape_edges",
}
#: Axis labels of each statistic's plot.
_UNITS = {
    "intensity_histogram": ("stored intensity", "fraction of voxels"),
    "spacing_histogram": ("voxel spacing (mm)", "fraction of cases"),
    "shape_histogram": ("size (voxels)", "fraction of cases"),
}


def _bins(edges: tuple[float, ...]) -> list[tuple[str, str]]:
    low = ["-inf", *(f"{e:g}" for e in edges[1:-1])]
    high = [*(f"{e:g}" for e in edges[1:-1]), "inf"]
    return list(zip(low, high, strict=True))


def _rows_of(
    site: str, ident: tuple[str, str], values: Iterable[float], request: StatsRequest, sites: str
) -> list[list[str]]:
    name, key = ident
    values = list(values)
    if name in _EDGES:
        edges = request.edges()[_EDGES[name]]
        return [
            [site, name, key, low, high, f"{v:g}", sites]
            for (low, high), v in zip(_bins(edges), values, strict=True)
        ]
    if name == "intensity_moments":
        mean, std = moments(values)
        named = zip(("intensity_voxels", "intensity_sum", "intensity_sum_sq"), values, strict=True)
        rows = [[site, n, key, "", "", f"{v:.10g}", sites] for n, v in named]
        return rows + [
            [site, "intensity_mean", key, "", "", f"{mean:.6g}", sites],
            [site, "intensity_std", key, "", "", f"{std:.6g}", sites],
        ]
    return [[site, name, key, "", "", f"{v:.10g}", sites] for v in values]


def statistics_rows(
    request: StatsRequest, collected: SiteReleases, pooled: dict[tuple[str, str], Pooled]
) -> list[list[str]]:
    """The rows of ``stats.csv`` (:data:`COLUMNS`): each site's released statistics in site
    order, then the pooled ones."""
    rows: list[list[str]] = []
    for site in sorted(collected.releases):
        for ident, values in sorted(collected.releases[site].values.items()):
            rows += _rows_of(site, ident, values, request, "")
    for ident, summed in sorted(pooled.items()):
        rows += _rows_of(POOLED, ident, summed.values, request, str(len(summed.sites)))
    return rows


def _write_csv(path: Path, header: Iterable[str], rows: list[list[str]]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(list(header))
    writer.writerows(rows)
    data = text.getvalue().encode()
    write_atomically(path, lambda handle: handle.write(data))


def write_statistics(out_dir: Path, request: StatsRequest, collected: SiteReleases) -> list[Path]:
    """Write ``stats.csv``, ``stats_withheld.csv``, ``stats_<statistic>.png`` (one per
    statistic that some site released) and ``statistics.html`` into ``out_dir`` (made if
    missing). Returns the paths written. Raises ``OSError`` when the folder cannot be
    written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pooled = pool(collected.releases)
    _write_csv(out_dir / STATS_CSV, COLUMNS, statistics_rows(request, collected, pooled))
    withheld = [
        [site, name, key, reason]
        for site in sorted(collected.releases)
        for (name, key), reason in sorted(collected.releases[site].withheld.items())
    ]
    withheld += [[site, "", "", f"no statistics: {why}"] for site, why in collected.failures]
    _write_csv(out_dir / WITHHELD_CSV, ("site", "statistic", "key", "reason"), withheld)
    written = [out_dir / STATS_CSV, out_dir / WITHHELD_CSV]
    names = sorted({name for name, _ in pooled})
    for name in names:
        path = out_dir / f"stats_{name}.png"
        path.write_bytes(_plot(name, request, collected))
        written.append(path)
    html_text = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Federated '
        "statistics</title></head><body><h1>Federated statistics</h1>"
        f"{statistics_section(out_dir)}</body></html>\n"
    ).encode()
    write_atomically(out_dir / STATS_HTML, lambda handle: handle.write(html_text))
    written.append(out_dir / STATS_HTML)
    return written


def _plot(name: str, request: StatsRequest, collected: SiteReleases) -> bytes:
    """The PNG of statistic ``name``: one panel per key, the sites overlaid (histograms as
    each site's fraction per bin, ``intensity_moments`` as mean +- std, numbers as bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_key: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for site in sorted(collected.releases):
        for (stat, key), values in collected.releases[site].values.items():
            if stat == name:
                per_key[key][site] = values
    keys = sorted(per_key)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        sites = per_key[key]
        if name in _EDGES:
            edges = list(request.edges()[_EDGES[name]])
            for site, values in sites.items():
                total = sum(values) or 1.0
                ax.stairs([v / total for v in values], edges, label=site)
            ax.set_xlabel(f"{_UNITS[name][0]} (outer bins open)")
            ax.set_ylabel(_UNITS[name][1])
        elif name == "intensity_moments":
            stats = [moments(v) for v in sites.values()]
            ax.errorbar(
                range(len(sites)), [m for m, _ in stats], yerr=[s for _, s in stats], fmt="o"
            )
            ax.set_xticks(range(len(sites)), list(sites), rotation=30)
            ax.set_ylabel("mean +- std of intensity")
        else:
            ax.bar(range(len(sites)), [v[0] for v in sites.values()])
            ax.set_xticks(range(len(sites)), list(sites), rotation=30)
        ax.set_title(f"{name} {key}", fontsize=9)
        if name in _EDGES:
            ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def statistics_section(run_dir: Path) -> str:
    """The HTML of the federated statistics in ``run_dir`` (its ``stats.csv``,
    ``stats_withheld.csv`` and PNGs): cases and intensity per site and pooled, what was
    withheld and why, the plots. Empty when ``run_dir`` holds no ``stats.csv``."""
    if not (run_dir / STATS_CSV).is_file():
        return ""
    rows = _read_csv(run_dir / STATS_CSV)
    summary: dict[str, dict[str, str]] = defaultdict(dict)
    for row in rows:
        if row["statistic"] in ("case_count", "intensity_mean", "intensity_std"):
            label = row["statistic"] + (
                "" if row["statistic"] == "case_count" else f" {row['key']}"
            )
            summary[row["site"]][label] = row["value"]
    columns = sorted({c for values in summary.values() for c in values})
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in ["site", *columns])
    body = "".join(
        f"<tr><td>{e(site)}</td>"
        + "".join(f"<td>{e(_short(values.get(c, '')))}</td>" for c in columns)
        + "</tr>"
        for site, values in summary.items()
    )
    parts = [
        "<p>Computed at each site before training, released only within the site's own "
        "policy (statistics.min_count); pooled rows sum the sites that released them. "
        f"All values: {STATS_CSV}.</p>",
        f"<table><tr>{head}</tr>{body}</table>",
    ]
    if (run_dir / WITHHELD_CSV).is_file():
        kept = _read_csv(run_dir / WITHHELD_CSV)
        if kept:
            items = "".join(
                f"<li>{e(r['site'])} {e(r['statistic'])} {e(r['key'])}: {e(r['reason'])}</li>"
                for r in kept
            )
            parts.append(f"<p>Withheld ({len(kept)}):</p><ul>{items}</ul>")
    for png in sorted(run_dir.glob("stats_*.png")):
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(f'<p><img alt="{e(png.stem)}" src="data:image/png;base64,{data}"></p>')
    return "".join(parts)


def _short(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    return value if math.isnan(number) else f"{number:.4g}"
