"""The researcher's copy of a deployed run's results, on the session's real deployment
(deployment_fixtures.py): the files the run's command wrote as the log arrived, and
``fl-imaging-deploy pull RUN_ID`` afterwards, both checked against the coordinator's files;
each site's CSV of what it sent, in its own state folder. Slow (it needs the session's run)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from cli_runs import run_cli
from deployment_fixtures import DeployedRun, command_env

from fl_imaging.deploy.local import LocalFederation
from fl_imaging.review.result_transfer import RESULT_FILES


@pytest.mark.slow
def test_pull_fetches_the_coordinators_result_files(
    federation: LocalFederation, deployed_run: DeployedRun, tmp_path: Path
) -> None:
    run = deployed_run.folder
    expected = [name for name in RESULT_FILES if (run / name).is_file()]
    assert {"metrics.csv", "report.html", "model.pt", "audit.jsonl", "cross_site.csv"} <= set(
        expected
    )
    log = (run / "main.log").read_text()
    assert f"results from the coordinator in {run}: {len(expected)} file(s)" in log
    assert "fl-imaging-result" not in log  # the chunk lines are files, not log lines
    out = tmp_path / "pulled"
    pulled = run_cli(
        "fl-imaging-deploy",
        "pull",
        deployed_run.run_id,
        "--superlink",
        federation.superlink,
        "--ca",
        federation.ca_cert,
        "--out",
        out,
        cwd=tmp_path,
        env=command_env(tmp_path),
    )
    assert f"{len(expected)} file(s) in {out}, SHA-256 checked" in pulled.stdout
    pulled_files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    assert sorted(pulled_files) == sorted(expected)
    assert "bundle/models/model.pt" in expected  # the MONAI bundle travels too
    for name in expected:
        assert (out / name).read_bytes() == (run / name).read_bytes(), name
    unknown = run_cli(
        "fl-imaging-deploy",
        "pull",
        "123456789",
        "--superlink",
        federation.superlink,
        "--ca",
        federation.ca_cert,
        "--out",
        tmp_path / "none",
        cwd=tmp_path,
        env=command_env(tmp_path),
        expect=2,
    )
    assert "`flwr log 123456789 --show` failed" in unknown.stderr


@pytest.mark.slow
def test_each_site_keeps_what_it_sent_in_its_state_folder(
    federation: LocalFederation, deployed_run: DeployedRun
) -> None:
    for spec in federation.specs.values():
        path = spec.state_dir / "sent-metrics" / f"run-{deployed_run.run_id}.csv"
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        trained = {int(r["round"]) for r in rows if r["message"] == "train"}
        assert trained == {1, 2}, path
        assert any(r["metric"] == "dice" for r in rows)
