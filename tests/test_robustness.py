"""Robust aggregation under attack, end to end through the simulation engine on the demo task.

Two of six sites send sign-flipped updates scaled 10x (`attack=signflip attack.sites=[4,5]`).
Plain FedAvg is dragged backwards: the honest sites' validation loss rises and Dice falls round
after round. Median, trimmed mean (trimming 2 per side), Krum (f=2) and the geometric median
ignore the two attackers and keep improving.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fl_imaging.review.results import read_metrics

pytestmark = pytest.mark.slow

STRATEGIES = {
    "fedavg": [],
    "fedmedian": [],
    "fedtrimmedavg": ["strategy.params.beta=0.34"],
    "krum": ["strategy.params.num_malicious_nodes=2"],
    "geomedian": [],
}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo6")


def _honest_means(run: Path) -> dict[str, list[float]]:
    """Per round, the mean over honest sites of dice and val_loss."""
    rows = read_metrics(run / "metrics.csv")
    malicious = {r.site for r in rows if r.metric == "malicious" and r.value == 1.0}
    assert malicious == {"site-5", "site-6"}
    means: dict[str, list[float]] = {}
    for metric in ("dice", "val_loss"):
        for rnd in (1, 2, 3):
            values = [
                r.value
                for r in rows
                if r.round == rnd and r.metric == metric and r.site not in malicious | {"all"}
            ]
            assert len(values) == 4
            means.setdefault(metric, []).append(sum(values) / len(values))
    return means


@pytest.mark.parametrize(
    "strategy",
    [  # two of the four robust aggregators in the default run, all of them with -m extended
        pytest.param(name, marks=pytest.mark.extended)
        if name in ("fedtrimmedavg", "geomedian")
        else name
        for name in STRATEGIES
    ],
)
def test_two_sign_flipping_sites_break_fedavg_not_robust_strategies(
    strategy: str, demo_root: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fl_imaging.cli",
            "experiment=quick",
            "data.num_sites=6",
            f"data.root={demo_root}",
            "engine.rounds=3",
            "attack=signflip",
            "attack.sites=[4,5]",
            f"strategy={strategy}",
            *STRATEGIES[strategy],
            f"hydra.run.dir={run}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    means = _honest_means(run)
    dice, loss = means["dice"], means["val_loss"]
    if strategy == "fedavg":
        assert loss[0] < loss[1] < loss[2], loss
        assert dice[2] < dice[0], dice
    else:
        assert dice[0] < dice[1] < dice[2], dice
        assert loss[0] > loss[1] > loss[2], loss
        assert dice[2] > 0.6, dice
