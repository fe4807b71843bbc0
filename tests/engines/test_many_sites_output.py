"""What a run with many sites prints: a summary over the sites instead of one figure per site
in the progress line and the console, about 20 "checking site" lines, every site in the files."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fl_imaging.config.compose import check_overrides
from fl_imaging.review.results import LISTED_SITES, MetricRow, progress_line, write_run_files


def _rows(sites: int) -> list[MetricRow]:
    rows = [MetricRow(1, "all", "train_loss", 0.5), MetricRow(1, "all", "round_seconds", 2.0)]
    rows += [MetricRow(1, f"site-{i}", "dice", i / 100) for i in range(1, sites + 1)]
    return rows


def test_few_sites_are_listed_one_by_one() -> None:
    names = [f"site-{i}" for i in range(1, LISTED_SITES + 1)]
    line = progress_line(1, 2, _rows(LISTED_SITES), "dice", names)
    assert "site-1 0.010  site-2 0.020" in line and f"site-{LISTED_SITES} 0.120" in line


def test_many_sites_get_their_mean_lowest_and_highest() -> None:
    names = [f"site-{i}" for i in range(1, 31)]
    line = progress_line(1, 2, _rows(30), "dice", names)
    mean = sum(i / 100 for i in range(1, 31)) / 30
    assert (
        f"dice mean {mean:.3f} over 30 sites (lowest site-1 0.010, highest site-30 0.300)" in line
    )
    assert "site-2 0.020" not in line and line.endswith("2.0 s")


def test_many_sites_keep_every_column_in_summary_txt_not_on_the_console(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    names = [f"site-{i}" for i in range(1, 31)]
    cfg = replace(check_overrides([]), run_dir=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="fl_imaging.server"):
        write_run_files(tmp_path, cfg, _rows(30), [], torch.nn.Linear(2, 1), names, "dice")
    name, header = (tmp_path / "summary.txt").read_text().splitlines()[:2]
    assert name == "run: fedavg · demo segmentation · unet"  # no overrides recorded
    assert "site-1" in header and "site-30" in header
    console = "\n".join(r.getMessage() for r in caplog.records)
    assert "30 sites: the table, a column per site, is in summary.txt" in console
    assert "site-30" not in console


def test_checking_many_sites_logs_about_twenty_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fl_imaging.data.prepare import prepare_sites

    cfg = check_overrides(
        [
            "data.num_sites=41",
            "data.cases_per_site=3",
            "data.shape=[12,12,12]",
            "data.dicom_sites=[]",
            f"data.root={tmp_path / 'demo'}",
        ]
    )
    with caplog.at_level(logging.INFO, logger="fl_imaging.data"):
        _, sites, _ = prepare_sites(replace(cfg, run_dir=str(tmp_path / "run")))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checking site")]
    assert len(sites) == 41
    assert 15 <= len(lines) <= 22, lines
    assert lines[0].startswith("checking site 1/41") and lines[-1].startswith("checking site 41/41")
