"""Cross-site evaluation and site contributions on real Flower processes on 127.0.0.1 (the
session's federation and run, deployment_fixtures.py: 3 sites with held-out test cases, a TLS
SuperLink with SuperNode authentication): the models reach every SuperNode through the
SuperLink, only scores come back, and the matrix's diagonal is each site's own test round
figure. Slow; every wait is bounded."""

from __future__ import annotations

import csv

import pytest
from deployment_fixtures import DeployedRun

from fl_imaging.deploy.local import LocalFederation
from fl_imaging.review.results import read_metrics


@pytest.mark.slow
def test_cross_site_matrix_and_contributions_in_a_deployment(
    federation: LocalFederation, deployed_run: DeployedRun
) -> None:
    out = deployed_run.folder
    tested = {(r.site, r.metric): r.value for r in read_metrics(out / "metrics.csv")}
    with (out / "cross_site.csv").open(newline="") as handle:
        matrix = {
            (row["model"], row["site"]): float(row["value"])
            for row in csv.DictReader(handle)
            if row["metric"] == "dice"
        }
    names = list(federation.specs)
    models = len(names) + 1  # the global model and each site's fine-tuned one
    assert set(matrix) == {(m, s) for m in ("global", *names) for s in names}
    for site in names:
        logs = deployed_run.site_logs[site]
        assert matrix[("global", site)] == pytest.approx(tested[(site, "test_dice")], abs=1e-5)
        assert matrix[(site, site)] == pytest.approx(tested[(site, "finetuned_dice")], abs=1e-5)
        assert "fine-tuned the final model 1 epoch(s) for cross-site" in logs
        assert f"scored {models} model(s) on 2 test cases" in logs
        assert f"scored {models} model(s) on 1 val cases" in logs  # all + 1 leave-one-out each
    with (out / "contributions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["site"] for r in rows] == names
    assert all(r["note"] == "" and r["contribution"] != "nan" for r in rows)
    summary = (out / "summary.txt").read_text()
    assert f"cross-site evaluation (test dice, {models} models x {len(names)} sites" in summary
    assert "site contributions (leave-one-out over round 2's updates" in summary
