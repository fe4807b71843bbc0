"""SCAFFOLD and Ditto on real Flower processes on 127.0.0.1 (the session's federation of
deployment_fixtures.py: TLS, SuperNode authentication, 3 SuperNodes): what a site keeps between
rounds lives in its SuperNode's context, which a deployment keeps as the simulation does."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_runs import run_cli
from deployment_fixtures import command_env

from fl_imaging.deploy.local import LocalFederation
from fl_imaging.review.results import read_metrics


@pytest.mark.slow
@pytest.mark.extended
def test_scaffold_runs_two_rounds_on_real_processes(
    federation: LocalFederation, tmp_path: Path
) -> None:
    run = tmp_path / "scaffold"
    args = federation.fl_imaging_args(
        "experiment=quick", "strategy=scaffold", "task.optimizer.name=sgd"
    )
    run_cli("fl-imaging", *args, f"hydra.run.dir={run}", cwd=tmp_path, env=command_env(tmp_path))
    rows = read_metrics(run / "metrics.csv")
    accepted = {(r.round, r.site) for r in rows if r.metric == "update_accepted" and r.value == 1}
    assert accepted == {(rnd, site) for rnd in (1, 2) for site in federation.specs}
    log = (run / "main.log").read_text()
    assert "SCAFFOLD" in log and "left out of SCAFFOLD" not in log


@pytest.mark.slow
@pytest.mark.extended
def test_ditto_scores_every_site_s_personal_model_on_real_processes(
    federation: LocalFederation, tmp_path: Path
) -> None:
    run = tmp_path / "ditto"
    args = federation.fl_imaging_args("experiment=quick", "strategy=ditto", "engine.test=true")
    run_cli("fl-imaging", *args, f"hydra.run.dir={run}", cwd=tmp_path, env=command_env(tmp_path))
    rows = read_metrics(run / "metrics.csv")
    for metric in ("test_dice", "personal_dice"):
        assert {r.site for r in rows if r.metric == metric} == {*federation.specs, "all"}
