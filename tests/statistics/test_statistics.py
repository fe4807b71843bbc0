"""Federated statistics: a site computes them from its own cases and releases only what its own
policy allows (``statistics.min_count``), whatever the coordinator asks; pooled values are the
sums of the sites' values; the query goes through the real ClientApp over Flower's Grid."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from flower_fakes import FakeGrid

from fl_imaging.config import TaskName
from fl_imaging.config.compose import check_overrides
from fl_imaging.data.demo import make_demo_data
from fl_imaging.flower.protocol import ReplySites
from fl_imaging.flower.site.client_app import build_client_app
from fl_imaging.review.report_page import render_report
from fl_imaging.site.policy import PolicyError, load_policy
from fl_imaging.statistics.coordinator import collect_statistics, moments, pool
from fl_imaging.statistics.files import POOLED, STATS_CSV, write_statistics
from fl_imaging.statistics.request import StatsRequest, even_edges
from fl_imaging.statistics.site import histogram, release, site_statistics

SMALL = {"cases_per_site": 4, "shape": (12, 14, 10), "dicom_sites": ()}
COARSE = StatsRequest(tuple(even_edges(0.0, 300.0, 3)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two demo sites of 4 cases (12 x 14 x 10 voxels, 1.5 mm spacing)."""
    return make_demo_data(tmp_path_factory.mktemp("demo"), num_sites=2, seed=0, **SMALL)


def _policy(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_histogram_bins_are_half_open_and_the_outer_bins_take_the_rest() -> None:
    values = np.array([-5.0, 0.0, 0.99, 1.0, 2.5, 3.0, 99.0])
    assert histogram(values, [0.0, 1.0, 2.0, 3.0]) == [3, 1, 3]


def test_the_statistics_are_the_cases_counted_by_hand(demo: list[Path]) -> None:
    site = demo[0]
    stats = site_statistics(site, TaskName.segmentation, COARSE, site="site-1", num_classes=2)
    got = {(s.name, s.key): s.values for s in stats.statistics}
    images = [np.asarray(nib.load(p).dataobj, np.float64) for p in sorted(site.glob("images/*"))]
    labels = [np.asarray(nib.load(p).dataobj) for p in sorted(site.glob("labels/*"))]
    voxels = np.concatenate([i.ravel() for i in images])
    assert got["case_count", "cases"] == (4,)
    assert got["intensity_moments", "image"] == pytest.approx(
        (voxels.size, voxels.sum(), np.square(voxels).sum())
    )
    assert got["intensity_histogram", "image"] == tuple(histogram(voxels, COARSE.intensity_edges))
    foreground = sum(int((label == 1).sum()) for label in labels)
    assert got["label_voxels", "1"] == (foreground,)
    spacing = nib.load(sorted(site.glob("labels/*"))[0]).header.get_zooms()
    assert got["label_ml", "1"] == pytest.approx((foreground * float(np.prod(spacing)) / 1000,))
    assert got["shape_histogram", "axis-1"] == (4, 0, 0, 0, 0, 0, 0)  # 14 voxels: [0, 16)
    assert got["cases_missing", "label"] == (0,)


def test_a_bin_below_the_sites_minimum_withholds_the_histogram(
    demo: list[Path], tmp_path: Path
) -> None:
    """The attacks: a coordinator asking for very fine bins (a few voxels, one case each) and
    for a minimum count below the site's own: the site's policy wins."""
    policy = load_policy(_policy(tmp_path, "statistics:\n  min_count: 3\n"))
    assert policy.statistics.min_count == 3
    fine = StatsRequest(tuple(even_edges(0.0, 300.0, 20000)), min_count=1)  # below the 3
    stats = site_statistics(demo[0], TaskName.segmentation, fine, site="site-1", num_classes=2)
    released = release(stats, policy.statistics.min_count, fine.min_count)
    assert released.min_count == 3
    key = ("intensity_histogram", "image")
    assert key not in released.values
    assert "between 1 and 2" in released.withheld[key] and "coarser" in released.withheld[key]
    assert released.values["spacing_histogram", "axis-0"] == [0, 0, 0, 0, 0, 4, 0, 0, 0]
    assert released.values["case_count", "cases"] == [4.0]
    coarse = release(
        site_statistics(demo[0], TaskName.segmentation, COARSE, site="s", num_classes=2), 3, 1
    )
    assert ("intensity_histogram", "image") in coarse.values
    # fewer cases than the minimum: nothing leaves, whatever the coordinator asks for
    few = release(stats, 5, 1)
    assert not few.values and len(few.withheld) == len(stats.statistics)
    assert all("fewer than 5 cases" in why for why in few.withheld.values())
    # a coordinator can raise the minimum, never lower it
    assert release(stats, 1, 5).min_count == 5


def test_a_policy_min_count_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="statistics.min_count must be at least 1"):
        load_policy(_policy(tmp_path, "statistics:\n  min_count: 0\n"))


class StatsGrid(FakeGrid):
    """Flower's in-memory Grid whose sites answer with the real ClientApp of ``cfg``."""

    def __init__(self, cfg: object) -> None:
        super().__init__(len(cfg.data.sites), lambda *a: a[2])  # type: ignore[attr-defined]
        self.app = build_client_app(cfg)  # type: ignore[arg-type]

    def answer(self, msg, site):  # noqa: ANN001, ANN201
        return self.app(msg, self.context_of(site))


@pytest.mark.usefixtures("task_identity")
def test_sites_answer_through_the_client_app_and_pooled_values_are_their_sums(
    demo: list[Path], tmp_path: Path
) -> None:
    third = make_demo_data(tmp_path / "more", num_sites=3, seed=1, **SMALL)[2]
    cfg = check_overrides([])
    cfg.data.sites = [str(demo[0]), str(demo[1]), str(third)]
    cfg.site.policies = {
        "site-1": str(  # what a training run must meet does not decide statistics
            _policy(
                tmp_path,
                "statistics:\n  min_count: 2\ndp_sgd:\n  required: true\nmax_rounds: 1\n"
                "accept:\n  config_hashes: [none]\n",
                "a.yaml",
            )
        ),
        "site-2": str(_policy(tmp_path, "statistics:\n  min_count: 50\n", "b.yaml")),
        "site-3": str(_policy(tmp_path, "statistics:\n  allow: false\n", "c.yaml")),
    }
    grid = StatsGrid(cfg)
    got = collect_statistics(grid, COARSE, grid.nodes, timeout=60, sites=ReplySites())
    assert sorted(got.releases) == ["site-1", "site-2"]
    assert [s for s, _ in got.failures] == ["site-3"]
    assert "statistics.allow" in got.failures[0][1]
    assert got.releases["site-1"].min_count == 2 and got.releases["site-1"].values
    assert not got.releases["site-2"].values  # 4 cases < 50: everything withheld
    assert got.releases["site-2"].min_count == 50

    # both sites release: the pooled value of every statistic is the sum of the sites' values
    cfg.site.policies["site-2"] = cfg.site.policies["site-1"]
    grid = StatsGrid(cfg)
    got = collect_statistics(grid, COARSE, grid.nodes[:2], timeout=60, sites=ReplySites())
    a, b = (got.releases[s].values for s in ("site-1", "site-2"))
    pooled = pool(got.releases)
    assert set(pooled) == set(a) == set(b)
    for ident, summed in pooled.items():
        assert summed.sites == ("site-1", "site-2")
        both = zip(a[ident], b[ident], strict=True)
        assert summed.values == pytest.approx(tuple(x + y for x, y in both))
    assert pooled["case_count", "cases"].values == (8.0,)

    # stats.csv: the pooled rows are the sums of the site rows
    write_statistics(tmp_path / "out", COARSE, got)
    with (tmp_path / "out" / STATS_CSV).open() as handle:
        rows = list(csv.DictReader(handle))
    sums: dict[tuple[str, str, str], float] = {}
    for row in rows:
        if row["site"] != POOLED and row["statistic"] not in ("intensity_mean", "intensity_std"):
            where = (row["statistic"], row["key"], row["bin_low"])
            sums[where] = sums.get(where, 0.0) + float(row["value"])
    pooled_rows = {
        (r["statistic"], r["key"], r["bin_low"]): float(r["value"])
        for r in rows
        if r["site"] == POOLED and r["statistic"] not in ("intensity_mean", "intensity_std")
    }
    assert pooled_rows == pytest.approx(sums)
    mean, std = moments(pooled["intensity_moments", "image"].values)
    means = [r for r in rows if r["site"] == POOLED and r["statistic"] == "intensity_mean"]
    assert float(means[0]["value"]) == pytest.approx(mean, rel=1e-5) and std > 0
    assert (tmp_path / "out" / "stats_intensity_histogram.png").stat().st_size > 1000
    # a run folder holding stats.csv: its report.html has the section
    page = render_report(tmp_path / "out")
    assert 'id="federated-statistics"' in page and "stats_intensity_histogram" in page


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["engine=deployment"], "runs on the simulation engine"),
        (["--intensity-range", "5", "1"], "high > low"),
        (["task.modle=1"], "task.modle"),
    ],
)
def test_stats_refuses_what_it_cannot_run_with_one_message(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fl_imaging.cli.data import main

    assert main(["stats", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fl-imaging-data stats: error: ") and message in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
