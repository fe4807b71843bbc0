"""What a round costs, as recorded in metrics.csv: each site's fit and evaluate seconds and its
peak memory (measured by the site, :mod:`fl_imaging.training.site_costs`), and the
coordinator's aggregation seconds (:class:`~strategies.recording.RecordingStrategy`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from local_runs import local_run

from fl_imaging.review.results import AGGREGATE_SITE, read_metrics
from fl_imaging.training.site_costs import SITE_COST_METRICS, peak_rss_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_is_the_kernels_high_water_mark_in_bytes() -> None:
    """The peak is in bytes: within 10 % of the kernel's VmHWM (kB) of this process (the two
    are the same counter, read at nearly the same time)."""
    peak = peak_rss_bytes()
    status = Path("/proc/self/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    assert peak > 10e6  # a Python process with pytest loaded: well over 10 MB
    assert abs(peak - hwm * 1024) <= 0.1 * peak


def test_a_round_records_each_sites_seconds_memory_and_the_aggregation(tmp_path: Path) -> None:
    """One round of the quick demo: every site's fit and evaluate seconds and peak RSS are
    positive, the aggregation's seconds are recorded for the round (site ``all``) and shorter
    than the round, and no aggregate row is made of a site's own costs."""
    run = local_run(
        tmp_path / "run", "experiment=quick", "engine.rounds=1", f"data.root={tmp_path / 'demo'}"
    )
    rows = read_metrics(run / "metrics.csv")
    sites = {r.site for r in rows if r.metric == "bytes_up"}
    assert len(sites) == 2
    for metric in SITE_COST_METRICS:
        values = {r.site: r.value for r in rows if r.metric == metric}
        assert set(values) == sites, metric
        assert all(v > 0 for v in values.values()), (metric, values)
    peaks = [r.value for r in rows if r.metric == "peak_rss_bytes"]
    assert all(v > 10e6 for v in peaks), peaks  # bytes, not kibibytes
    [aggregation] = [r.value for r in rows if r.metric == "aggregation_seconds"]
    [round_seconds] = [r.value for r in rows if r.metric == "round_seconds"]
    assert 0 < aggregation < round_seconds
    fit = [r.value for r in rows if r.metric == "fit_seconds"]
    assert max(fit) < round_seconds
    assert all(r.site == AGGREGATE_SITE for r in rows if r.metric == "aggregation_seconds")
