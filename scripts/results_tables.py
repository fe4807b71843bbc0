"""Draw the measured results kept as CSV under ``docs/results/``: Markdown tables and PNG plots.

    python scripts/results_tables.py            # fill every table in docs/, redraw the plots
    python scripts/results_tables.py --check    # exit 1 when a page's table differs from its CSV

Every row of a CSV keeps how it was measured: its ``command``, ``commit`` and ``machine`` (and
``notes``); the other columns are the table's. Two column conventions: ``X std`` is shown with
``X`` as ``value ± std``, ``X ratio`` as ``value (ratio)``. A page asks for a table with a pair of
markers, filled in place by this script::

    <!-- results-table: hippocampus_iid -->
    <!-- /results-table -->

Plots go to ``docs/results/plots/NAME.png`` (see :data:`PLOTS`). ``tests/docs/test_docs.py`` checks
that every table in the pages is what its CSV gives now.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["DOCS", "PLOTS", "RESULTS", "fill_markers", "read_rows", "render_table", "tables_in"]

ROOT = Path(__file__).resolve().parent.parent
#: The docs folder whose pages hold tables, and the folder of the CSV files.
DOCS = ROOT / "docs"
RESULTS = DOCS / "results"

#: Columns that say how a row was measured; listed under the table, not in it.
META = ("command", "commit", "machine", "notes")

_MARKERS = re.compile(
    r"(<!-- results-table: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results-table -->)", re.S
)


def read_rows(name: str) -> tuple[list[str], list[dict[str, str]]]:
    """Read ``docs/results/NAME.csv``; returns its header and its rows as dicts."""
    with (RESULTS / f"{name}.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _shown_columns(header: list[str]) -> list[str]:
    """The table's columns: every column but the metadata and the ``std``/``ratio`` partners."""
    partners = {f"{h} std" for h in header} | {f"{h} ratio" for h in header}
    return [h for h in header if h not in META and h not in partners]


def _cell(row: dict[str, str], column: str) -> str:
    value = row[column]
    std, ratio = row.get(f"{column} std", "-"), row.get(f"{column} ratio", "-")
    if value != "-" and std not in ("", "-"):
        value = f"{value} ± {std}"
    if value != "-" and ratio not in ("", "-"):
        value = f"{value} ({ratio})"
    return value.replace("|", "\\|")


def render_table(name: str) -> str:
    """The Markdown of one CSV: its table, then how each row was measured (command, commit,
    machine, notes), numbered when the rows come from more than one measurement."""
    header, rows = read_rows(name)
    columns = _shown_columns(header)
    runs: list[tuple[str, ...]] = []
    for row in rows:
        key = tuple(row.get(m, "") for m in META)
        if key not in runs:
            runs.append(key)
    numbered = len(runs) > 1
    shown = [*columns, "run"] if numbered else columns
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        cells = [_cell(row, c) for c in columns]
        if numbered:
            cells.append(str(runs.index(tuple(row.get(m, "") for m in META)) + 1))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for number, (command, commit, machine, notes) in enumerate(runs, start=1):
        lead = f"{number}. " if numbered else "Measured with "
        text = f"{lead}`{command}` at commit `{commit}`; {machine}"
        if notes and notes != "-":
            text += f"; {notes}"
        lines.append(text + ".")
    return "\n".join(lines) + "\n"


def fill_markers(text: str) -> str:
    """A page's text with every ``results-table`` marker pair filled from its CSV."""
    return _MARKERS.sub(lambda m: f"{m[1]}{render_table(m['name'])}{m[4]}", text)


def tables_in(text: str) -> list[str]:
    """The CSV names a page's markers ask for, in order."""
    return [m["name"] for m in _MARKERS.finditer(text)]


# --- plots ----------------------------------------------------------------------------------


def _number(text: str) -> float:
    """A table value as a float (``12,217`` -> 12217.0; ``-`` -> NaN)."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return math.nan


def _bars(name: str, title: str) -> Callable[[Axes], None]:
    """A bar per method of a strategy benchmark: its main figure (2nd column) ± its std."""

    def draw(ax: Axes) -> None:
        header, rows = read_rows(name)
        metric = header[1]
        values = [_number(r[metric]) for r in rows]
        errors = [_number(r.get(f"{metric} std", "-")) for r in rows]
        errors = [0.0 if math.isnan(e) else e for e in errors]
        ax.bar(range(len(rows)), values, yerr=errors, color="#4c72b0", capsize=3)
        ax.set_xticks(range(len(rows)), [r[header[0]] for r in rows], rotation=45, ha="right")
        ax.set_ylabel(metric)
        ax.set_title(title)

    return draw


def _dp_sgd(ax: Axes) -> None:
    header, rows = read_rows("dp_sgd_hippocampus")
    noised = [r for r in rows if r["noise multiplier sigma"] != "-"]
    sigma = [_number(r["noise multiplier sigma"]) for r in noised]
    dice = [_number(r["test Dice"]) for r in noised]
    ax.semilogx(sigma, dice, "o-", label="DP-SGD")
    for row in rows:
        if row["noise multiplier sigma"] == "-":
            ax.axhline(_number(row["test Dice"]), color="grey", ls="--", label=row["method"])
    for s, d, r in zip(sigma, dice, noised, strict=True):
        ax.annotate(
            f"eps {r[header[1]]}", (s, d), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax.set_xlabel("noise multiplier sigma")
    ax.set_ylabel("test Dice")
    ax.set_title("MSD Hippocampus: test Dice against DP-SGD noise")
    ax.legend()


def _robustness(ax: Axes) -> None:
    header, rows = read_rows("robustness")
    attacks = _shown_columns(header)[1:]
    grid = [[_number(r[f"{a} ratio"]) for a in attacks] for r in rows]
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [r["strategy"] for r in rows])
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            if not math.isnan(value):
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value < 0.6 else "black",
                )
    ax.set_title("Dice of the honest sites / clean FedAvg, 2 of 8 sites malicious")
    ax.get_figure().colorbar(image, ax=ax)


def _compression(ax: Axes) -> None:
    _, rows = read_rows("compression")
    for row in rows:
        x, y = _number(row["bytes up per site per round"]), _number(row["test Dice"])
        ax.plot(x, y, "o")
        ax.annotate(row["mode"], (x, y), xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("bytes up per site per round")
    ax.set_ylabel("test Dice")
    ax.set_title("Update compression on hippocampus_iid (FedAvg, seed 0)")


def _scale(ax: Axes) -> None:
    _, rows = read_rows("scale")
    for commit in dict.fromkeys(r["commit"] for r in rows):
        mine = [r for r in rows if r["commit"] == commit]
        ax.semilogx(
            [_number(r["sites"]) for r in mine],
            [_number(r["s per site per later round"]) for r in mine],
            "o-",
            label=f"commit {commit}",
        )
    ax.set_xlabel("simulated sites")
    ax.set_ylabel("seconds per site per later round")
    ax.set_ylim(bottom=0)
    ax.set_title("experiment=quick with many sites")
    ax.legend()


def _secagg_protocol(ax: Axes) -> None:
    header, rows = read_rows("secagg_protocol")
    sites = [_number(r["sites"]) for r in rows]
    for column in _shown_columns(header)[1:]:
        ax.loglog(sites, [_number(r[column]) for r in rows], "o-", label=column)
    ax.set_xlabel("sites in the round")
    ax.set_ylabel("seconds per round")
    ax.set_title("Secure aggregation: the protocol's own cost per round")
    ax.legend(fontsize=7)


#: Each plot: its file name under ``docs/results/plots/`` and what draws it on one matplotlib Axes.
PLOTS: dict[str, Callable[[Axes], None]] = {
    "hippocampus_iid": _bars("hippocampus_iid", "hippocampus_iid: test Dice (mean over 3 seeds)"),
    "hippocampus_shift": _bars(
        "hippocampus_shift", "hippocampus_shift: test Dice (mean over 3 seeds)"
    ),
    "adrenal3d_dirichlet": _bars(
        "adrenal3d_dirichlet", "adrenal3d_dirichlet: AUC on all test cases"
    ),
    "mednist_dirichlet": _bars(
        "mednist_dirichlet", "mednist_dirichlet: accuracy on all test cases"
    ),
    "dp_sgd_hippocampus": _dp_sgd,
    "robustness": _robustness,
    "compression": _compression,
    "scale": _scale,
    "secagg_protocol": _secagg_protocol,
}


def draw_plots(folder: Path) -> list[Path]:
    """Draw every plot of :data:`PLOTS` into ``folder``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in PLOTS.items():
        fig, ax = plt.subplots(figsize=(7, 4.2))
        draw(ax)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=110, metadata={"Software": None})
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Fill the tables of every page (or with ``--check`` compare them) and redraw the plots;
    returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare the tables, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        filled = fill_markers(text)
        if filled != text:
            stale.append(page)
            if not args.check:
                page.write_text(filled)
    if args.check:
        for page in stale:
            print(f"{page.relative_to(ROOT)}: a table differs from its CSV", file=sys.stderr)
        return 1 if stale else 0
    for page in stale:
        print(f"filled {page.relative_to(ROOT)}")
    for path in draw_plots(RESULTS / "plots"):
        print(f"drew {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
