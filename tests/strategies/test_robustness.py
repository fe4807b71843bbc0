"""Robust aggregation under attack, whole runs on the demo task with the real sites in-process
(:mod:`local_runs`).

Two of six sites send sign-flipped updates scaled 10x (`attack=signflip attack.sites=[4,5]`).
Plain FedAvg is dragged backwards: the honest sites' validation loss rises and Dice falls round
after round. Median, trimmed mean (trimming 2 per side), Krum (f=2) and the geometric median
ignore the two attackers and keep improving.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from local_runs import local_run

from fl_imaging.review.results import read_metrics

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


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_two_sign_flipping_sites_break_fedavg_not_robust_strategies(
    strategy: str, demo_root: Path, tmp_path: Path
) -> None:
    run = local_run(
        tmp_path / "run",
        "experiment=quick",
        "data.num_sites=6",
        f"data.root={demo_root}",
        "engine.rounds=3",
        "attack=signflip",
        "attack.sites=[4,5]",
        f"strategy={strategy}",
        *STRATEGIES[strategy],
    )
    means = _honest_means(run)
    dice, loss = means["dice"], means["val_loss"]
    if strategy == "fedavg":
        assert loss[0] < loss[1] < loss[2], loss
        assert dice[2] < dice[0], dice
    else:
        assert dice[0] < dice[1] < dice[2], dice
        assert loss[0] > loss[1] > loss[2], loss
        assert dice[2] > 0.6, dice
