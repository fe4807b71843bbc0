"""Cross-site evaluation and site contributions on real Flower processes on 127.0.0.1 (its own
small federation: 2 sites with held-out test cases, a TLS SuperLink with SuperNode
authentication): the models reach every SuperNode through the SuperLink, only scores come back,
and the matrix's diagonal is each site's own test round figure. Slow; every wait is bounded."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from cli_runs import run_cli

from fl_imaging.data.demo import make_demo_data
from fl_imaging.deploy.local import start_local
from fl_imaging.deploy.processes import flower_env
from fl_imaging.review.results import read_metrics


@pytest.mark.slow
def test_cross_site_matrix_and_contributions_in_a_deployment(tmp_path: Path) -> None:
    sites = make_demo_data(
        tmp_path / "data",
        num_sites=2,
        cases_per_site=6,
        shape=(24, 24, 24),
        dicom_sites=(),
        test_cases=2,
    )
    fed = start_local(sites, tmp_path / "state", check=False)
    try:
        args = fed.fl_imaging_args(
            "experiment=quick",
            "engine.cross_site=true",
            "engine.contributions=true",
            "engine.finetune_epochs=1",
        )
        run_cli(
            "fl-imaging",
            *args,
            f"hydra.run.dir={tmp_path / 'run'}",
            cwd=tmp_path,
            env=flower_env(tmp_path / "flwr-home", {"HOME": str(tmp_path)}),
        )
        logs = {name: "".join(p.log_text() for p in fed.site_processes[name]) for name in fed.specs}
    finally:
        procs = fed.processes
        fed.stop()
        assert not any(p.alive() for p in procs)
    out = tmp_path / "run"
    tested = {(r.site, r.metric): r.value for r in read_metrics(out / "metrics.csv")}
    with (out / "cross_site.csv").open(newline="") as handle:
        matrix = {
            (row["model"], row["site"]): float(row["value"])
            for row in csv.DictReader(handle)
            if row["metric"] == "dice"
        }
    names = list(fed.specs)
    assert set(matrix) == {(m, s) for m in ("global", *names) for s in names}
    for site in names:
        assert matrix[("global", site)] == pytest.approx(tested[(site, "test_dice")], abs=1e-5)
        assert matrix[(site, site)] == pytest.approx(tested[(site, "finetuned_dice")], abs=1e-5)
        assert "fine-tuned the final model 1 epoch(s) for cross-site" in logs[site]
        assert "scored 3 model(s) on 2 test cases" in logs[site]  # global + 2 site models
        assert "scored 3 model(s) on 1 val cases" in logs[site]  # all + 2 leave-one-out
    with (out / "contributions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["site"] for r in rows] == names
    assert all(r["note"] == "" and r["contribution"] != "nan" for r in rows)
    summary = (out / "summary.txt").read_text()
    assert "cross-site evaluation (test dice, 3 models x 2 sites" in summary
    assert "site contributions (leave-one-out over round 2's updates" in summary
