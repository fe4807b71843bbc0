"""What each site keeps of a run: the metrics it sent, per round, in a CSV in its own state
folder, written by its ClientApp (the real one, in-process: :mod:`local_runs`)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from local_runs import local_run

from fl_imaging.review.results import read_metrics
from fl_imaging.review.site_metrics import SENT_METRICS_HEADER


def test_each_site_keeps_what_it_sent_per_round(tmp_path: Path) -> None:
    run = local_run(tmp_path / "run", "experiment=quick", f"data.root={tmp_path / 'demo'}")
    coordinator = read_metrics(run / "metrics.csv")
    for site in ("site-1", "site-2"):
        (path,) = (tmp_path / "site-state").glob(f"{site}-*/sent-metrics/run-*.csv")
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle))
        assert tuple(rows[0]) == SENT_METRICS_HEADER
        sent = {(int(r[1]), r[2], r[3]): float(r[4]) for r in rows[1:]}
        rounds = sorted({rnd for rnd, kind, _ in sent if kind == "train"})
        assert rounds == [1, 2]
        for rnd in rounds:
            got = {r.metric: r.value for r in coordinator if r.round == rnd and r.site == site}
            assert sent[(rnd, "train", "train_loss")] == pytest.approx(got["train_loss"], rel=1e-5)
            assert sent[(rnd, "train", "num-examples")] == got["num_train"]
            assert sent[(rnd, "evaluate", "dice")] == pytest.approx(got["dice"], rel=1e-5)
            assert sent[(rnd, "evaluate", "num-examples")] == got["num_val"]
