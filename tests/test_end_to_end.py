"""End to end through Flower's real simulation engine (Ray): the `fl-imaging` command, tiny data."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from cli_runs import run_cli

from fl_imaging.config import config_from_yaml
from fl_imaging.review.results import read_metrics
from tasks import build_task

pytestmark = pytest.mark.slow


def _fl_imaging(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    return run_cli("fl-imaging", *overrides, cwd=tmp_path, timeout=400)


def test_two_rounds_three_sites_write_every_result(tmp_path: Path) -> None:
    """Two rounds, one message per round (engine.evaluate_in_train): every result file, and every
    round's per-site metrics."""
    proc = _fl_imaging(
        tmp_path,
        "experiment=quick",
        "data.num_sites=3",
        "task.local_epochs=2",
        "engine.evaluate_in_train=true",
        f"data.root={tmp_path / 'demo'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    run = tmp_path / "run"
    rows = read_metrics(run / "metrics.csv")
    sites = {"site-1", "site-2", "site-3"}
    for rnd in (1, 2):
        for metric in ("train_loss", "dice", "val_loss", "num_train", "num_val"):
            assert {r.site for r in rows if r.round == rnd and r.metric == metric} >= sites
    loss = {r.round: r.value for r in rows if r.site == "all" and r.metric == "train_loss"}
    assert loss[2] < loss[1]
    # num-examples counts cases, not batches: 6 cases per site, 1 or 2 of them for validation
    assert {r.value for r in rows if r.metric == "num_train"} <= {4.0, 5.0}

    cfg = config_from_yaml((run / "config.yaml").read_text())
    assert cfg.data.sites and all(Path(s).is_dir() for s in cfg.data.sites)
    model = build_task(cfg.task).build_model()
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    assert (run / "curves.png").stat().st_size > 10_000
    assert (run / "partition.csv").read_text().startswith("site,folder,train,val,test")
    summary = (run / "summary.txt").read_text()
    assert "mean dice" in summary and "dice site-3" in summary
    assert "mean dice" in proc.stdout + proc.stderr  # the table is printed too
    # one message per round: round 1's model is scored inside round 2's training message, so the
    # progress line of round 1 has no dice yet (the metrics above hold it for round 1)
    output = proc.stdout + proc.stderr
    assert "round 1/2  train loss" in output and "| dice - |" in output
    # one site of the demo is stored as DICOM series
    assert any(p.is_dir() for p in (tmp_path / "demo" / "site-1" / "images").iterdir())
    # each of the 2 Ray actors decodes a site once, however many messages it serves it (3 here);
    # every line of every site (Ray's workers) is in main.log, none on the console
    log = (run / "main.log").read_text()
    for site in sites:
        loads = len(re.findall(rf"\[site {site}\] \d+ training, .* ready in", log))
        assert 1 <= loads <= 2, (site, loads)
        for rnd in (1, 2):
            for epoch in (1, 2):
                assert f"[site {site}] round {rnd} epoch {epoch}/2: loss" in log
    assert "epoch 1/2" not in output and "ClientAppActor" not in output
    # redirected: plain lines, no colour or other escape code, and no leftover folder
    assert "\x1b" not in output and not (run / "site-lines").exists()


def test_multirun_sweeps_and_classification_runs(tmp_path: Path) -> None:
    _fl_imaging(
        tmp_path,
        "--multirun",
        "experiment=quick",
        "task=classification",
        "task.model.channels=[4,8]",
        "engine.rounds=1",
        "engine.clients_per_round=1,2",
        f"data.root={tmp_path / 'demo'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    for job in ("0", "1"):
        rows = read_metrics(tmp_path / "sweep" / job / "metrics.csv")
        assert {r.metric for r in rows} >= {"accuracy", "auc", "train_loss"}
    first = read_metrics(tmp_path / "sweep" / "0" / "metrics.csv")
    assert len({r.site for r in first if r.metric == "train_loss" and r.site != "all"}) == 1


SHARED = Path(
    os.environ.get("FL_IMAGING_SHARED_DATA", Path(__file__).parents[1] / ".." / "shared" / "data")
)


@pytest.mark.skipif(
    not (SHARED / "msd_task04_hippocampus" / "dataset.json").is_file(),
    reason=f"MSD hippocampus not found under {SHARED}",
)
def test_short_federated_run_on_hippocampus_split_into_three_sites(tmp_path: Path) -> None:
    """Real MRI: 45 hippocampus cases split IID into 3 simulated sites, 2 rounds of a small
    3D U-Net with 3 classes; every site trains and reports Dice for both structures."""
    _fl_imaging(
        tmp_path,
        "experiment=hippocampus",
        f"data.root={SHARED / 'msd_task04_hippocampus'}",
        "data.max_cases=45",
        f"data.sites_dir={tmp_path / 'sites'}",
        "engine.rounds=2",
        "task.local_epochs=1",
        "task.model.channels=[8,16,32]",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    sites = {"site-1", "site-2", "site-3"}
    for metric in ("dice_1", "dice_2", "train_loss"):
        assert {r.site for r in rows if r.round == 2 and r.metric == metric} >= sites
    assert {r.value for r in rows if r.metric == "num_train"} == {12.0}  # 15 cases, 3 for val
    loss = {r.round: r.value for r in rows if r.site == "all" and r.metric == "train_loss"}
    assert loss[2] < loss[1]
    partition = (tmp_path / "run" / "partition.csv").read_text().splitlines()
    assert partition[0].startswith("site,folder,train,val,test,voxels_%_0,voxels_%_1,voxels_%_2")
    assert len(partition) == 4
