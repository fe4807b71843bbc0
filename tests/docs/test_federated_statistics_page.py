"""docs/how-to/federated-statistics.md: the command of its "Try it on the demo" block, read
from the page and run as the page has it (our real command, as a process, in a fresh working
folder): every site answers, and the CSV, the plots and the HTML page are written."""

from __future__ import annotations

import csv
import re
import shlex
from pathlib import Path

import pytest
from cli_runs import run_cli

PAGE = Path(__file__).resolve().parents[2] / "docs" / "how-to" / "federated-statistics.md"


def page_command(page: Path = PAGE) -> list[str]:
    """The one command line of the bash block under the page's "Try it on the demo" heading."""
    section = page.read_text().split("## Try it on the demo", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"{page}: no bash block under 'Try it on the demo'"
    (line,) = [ln for ln in block.group(1).replace("\\\n", " ").splitlines() if ln.strip()]
    return shlex.split(line)


@pytest.mark.slow
def test_the_pages_command_writes_the_csv_the_plots_and_the_page(tmp_path: Path) -> None:
    command = page_command()
    assert command[:2] == ["fl-imaging-data", "stats"]
    out = run_cli(command[0], *command[1:], cwd=tmp_path).stdout
    shown = PAGE.read_text().split("It ends with:", 1)[1].split("```text\n", 1)[1]
    for line in shown.splitlines()[:2]:  # the page's transcript of the sites' lines
        assert line in out
    folder = tmp_path / "runs" / "stats-demo"
    assert f"statistics in {folder.relative_to(tmp_path)}:" in out
    with (folder / "stats.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    counts = {r["site"]: r["value"] for r in rows if r["statistic"] == "case_count"}
    assert counts == {"site-1": "12", "site-2": "12", "pooled": "24"}
    assert {r["statistic"] for r in rows} >= {"intensity_histogram", "intensity_mean"}
    for name in ("intensity_histogram", "spacing_histogram", "shape_histogram", "label_ml"):
        assert (folder / f"stats_{name}.png").stat().st_size > 1000
    assert "Federated statistics" in (folder / "statistics.html").read_text()
