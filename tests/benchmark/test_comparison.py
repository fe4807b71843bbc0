"""Each method against the reference over seeds (fl_imaging/benchmark/comparison.py): the paired
difference and its t-interval, checked against a hand computation, and shown in summary.md."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from fl_imaging.benchmark.comparison import paired_differences
from fl_imaging.benchmark.report import SiteResult, summarise, write_summary


def _row(method: str, seed: int, site: str, dice: float) -> SiteResult:
    return SiteResult("iid", method, "federated", seed, site, "demo", "iid", 4, test={"dice": dice})


#: Per seed, sites' Dice: fedavg's site means 0.70, 0.72, 0.74; fedprox's 0.71, 0.74, 0.77
#: (differences 0.01, 0.02, 0.03); local has seed 0 only.
RESULTS = [
    *(
        _row("fedavg", s, site, v)
        for s, (a, b) in enumerate([(0.6, 0.8), (0.7, 0.74), (0.74, 0.74)])
        for site, v in (("site-1", a), ("site-2", b))
    ),
    *(
        _row("fedprox", s, site, v)
        for s, (a, b) in enumerate([(0.61, 0.81), (0.74, 0.74), (0.76, 0.78)])
        for site, v in (("site-1", a), ("site-2", b))
    ),
    _row("local", 0, "site-1", 0.5),
    _row("local", 0, "site-2", math.nan),  # a site without the metric is left out of its mean
]


def test_the_paired_difference_and_its_interval_are_the_hand_computed_ones() -> None:
    diffs = paired_differences(RESULTS, "dice", "fedavg")
    assert set(diffs) == {("iid", "fedprox"), ("iid", "local")}
    fedprox = diffs[("iid", "fedprox")]
    # differences 0.01, 0.02, 0.03: mean 0.02, std 0.01, t(0.975, 2 dof) = 4.302653
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert fedprox.seeds == 3
    assert fedprox.mean == pytest.approx(0.02)
    assert (fedprox.low, fedprox.high) == pytest.approx((0.02 - half, 0.02 + half), abs=1e-6)
    assert fedprox.text() == "+0.020 [-0.005, +0.045]"
    local = diffs[("iid", "local")]  # one seed: a difference, no interval
    assert local.seeds == 1 and local.mean == pytest.approx(0.5 - 0.7)
    assert math.isnan(local.low) and local.text() == "-0.200 (1 seed)"


def test_the_summary_shows_the_difference_and_the_csv_holds_it(tmp_path: Path) -> None:
    diffs = paired_differences(RESULTS, "dice", "fedavg")
    summary = summarise(RESULTS, ["dice"])
    csv_path, md_path = write_summary(summary, ["dice"], tmp_path, "# header", "fedavg", diffs)
    markdown = md_path.read_text()
    assert "| dice - fedavg (95 % CI over seeds) |" in markdown
    fedprox = next(line for line in markdown.splitlines() if line.startswith("| fedprox |"))
    assert "+0.020 [-0.005, +0.045]" in fedprox
    reference = next(line for line in markdown.splitlines() if line.startswith("| fedavg |"))
    assert "| 1.000 | - |" in reference
    rows = {r["method"]: r for r in csv.DictReader(csv_path.open())}
    assert float(rows["fedprox"]["diff_mean"]) == pytest.approx(0.02)
    assert rows["fedavg"]["diff_mean"] == "" and rows["local"]["diff_low"] == ""
