"""The tuning protocol of fl-imaging-bench (bench.tune): a 3-value smoke grid run end to end,
the choice on validation scores only, and the rules of the plan and the choice."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from local_runs import sites_in_process

from fl_imaging.benchmark.plan import TUNING, plan_cells, plan_trials
from fl_imaging.benchmark.tuning import Trial, choose, override_text, resolve_tune_keys
from fl_imaging.cli.bench import main
from fl_imaging.config import BenchConfig, ConfigError
from fl_imaging.review.results import AGGREGATE_SITE, read_metrics

GRID = [1.0e-05, 0.003, 0.3]
TUNE = "+bench.tune.fedavg={task.optimizer.lr:[1.0e-05,0.003,0.3]}"


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _last_round_dice(folder: Path) -> float:
    """The trial's score recomputed from its metrics.csv: the last round's validation Dice,
    mean over sites."""
    rows = [r for r in read_metrics(folder / "metrics.csv") if r.site != AGGREGATE_SITE]
    dice = [r for r in rows if r.metric == "dice" and not math.isnan(r.value)]
    last = max(r.round for r in dice)
    values = [r.value for r in dice if r.round == last]
    return sum(values) / len(values)


@pytest.mark.slow
def test_tuning_picks_the_grid_value_with_the_best_validation_score(tmp_path: Path) -> None:
    """A 3-value learning-rate grid on the smoke benchmark: every trial trains without a test
    round, the best last-round validation Dice is chosen, and only then the benchmark's cell
    runs with it, scored on the test split; tuning.csv and the summary say what was chosen."""
    out = tmp_path / "bench"
    args = ["experiment=smoke", f"bench.out_dir={out}", "bench.seeds=[0]", TUNE, "--only", "fedavg"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        with sites_in_process():
            assert main(args) == 0
    bench = out / "smoke"
    trials = {
        lr: bench / "cells" / "demo" / "fedavg" / "tuning" / f"task.optimizer.lr={lr}" / "seed0"
        for lr in GRID
    }
    scores = {}
    for lr, folder in trials.items():
        record = json.loads((folder / "cell.json").read_text())
        assert record["status"] == "done" and record["kind"] == TUNING
        assert f"task.optimizer.lr={lr}" in record["overrides"]
        metrics = {r.metric for r in read_metrics(folder / "metrics.csv")}
        assert not any(m.startswith("test_") for m in metrics), f"trial {lr} scored test cases"
        scores[lr] = _last_round_dice(folder)
    best = max(GRID, key=lambda lr: scores[lr])
    assert len(set(scores.values())) == 3, scores  # the grid values do train differently
    final = json.loads((bench / "cells" / "demo" / "fedavg" / "seed0" / "cell.json").read_text())
    assert final["status"] == "done"
    assert f"task.optimizer.lr={best}" in final["overrides"]
    assert "engine.test=true" in final["overrides"]
    table = _rows(bench / "tuning.csv")
    assert [float(r["value"]) for r in table] == GRID
    assert [int(r["chosen"]) for r in table] == [int(lr == best) for lr in GRID]
    for row in table:
        assert float(row["val_dice"]) == pytest.approx(scores[float(row["value"])], abs=1e-4)
    summary = {r["method"]: r for r in _rows(bench / "summary.csv")}
    assert summary["fedavg"]["tuned"] == f"task.optimizer.lr={best}"
    assert f"`task.optimizer.lr={best}`" in (bench / "summary.md").read_text()
    # Run again: every trial and the cell are reused, the same value is chosen.
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        assert main(args) == 0
    again = json.loads((bench / "cells" / "demo" / "fedavg" / "seed0" / "cell.json").read_text())
    assert again == final


def _bench(**fields) -> BenchConfig:
    base = {
        "name": "t",
        "seeds": [0, 1],
        "baselines": [],
        "reference": "fedavg",
        "strategies": {"fedavg": ["strategy=fedavg"], "fedprox": ["strategy=fedprox"]},
    }
    return BenchConfig(**{**base, **fields})


def test_trials_are_planned_per_grid_value_and_tuning_seed_without_a_test_round() -> None:
    bench = _bench(
        tune={"fedprox": {"strategy.params.proximal_mu": [0.001, 0.1]}}, tune_seeds=[0, 1]
    )
    trials = plan_trials(bench, ["experiment=x"])
    assert [(t.value, c.seed) for t, c in trials] == [(0.001, 0), (0.001, 1), (0.1, 0), (0.1, 1)]
    _, cell = trials[0]
    assert cell.key == "default/fedprox/tuning/strategy.params.proximal_mu=0.001/seed0"
    assert cell.overrides[-4:] == (
        "strategy.params.proximal_mu=0.001",
        "seed=0",
        "engine.test=false",
        "engine.finetune_epochs=0",
    )
    # Before a choice, a tuned strategy has no benchmark cells; after, they carry the choice.
    assert {c.method for c in plan_cells(bench, [])} == {"fedavg"}
    chosen = plan_cells(bench, [], {("default", "fedprox"): "strategy.params.proximal_mu=0.1"})
    fedprox = [c for c in chosen if c.method == "fedprox"]
    assert len(fedprox) == 2
    assert all(
        c.overrides[c.overrides.index("strategy=fedprox") + 1] == "strategy.params.proximal_mu=0.1"
        for c in fedprox
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tune": {"krum": {"strategy.params.f": [1, 2]}}}, "no strategy krum"),
        ({"tune": {"fedavg": {"a": [1, 2], "b": [1, 2]}}}, "one key per strategy"),
        ({"tune": {"fedavg": {"task.optimizer.lr": [0.1]}}}, "at least 2 values"),
        ({"tune": {"fedavg": {"task.optimizer.lr": [0.1, 0.1]}}}, "repeats a value"),
        (
            {"tune": {"fedavg": {"task.optimizer.lr": [0.1, 1]}}, "tune_seeds": []},
            "tune_seeds is empty",
        ),
        (
            {
                "tune": {"fedavg": {"task.optimizer.lr": [0.1, 1]}},
                "tune_seeds": [5],
                "baselines": ["public"],
            },
            "not in bench.seeds",
        ),
    ],
)
def test_a_wrong_tuning_grid_is_refused_before_anything_runs(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_trials(_bench(**fields), [])


def test_choice_is_the_best_mean_first_on_a_tie_lower_for_a_loss_and_waits_for_all() -> None:
    trials = [Trial("s", "m", "k", v) for v in (1, 2, 3)]
    dice = {1: [0.5, 0.7], 2: [0.8, 0.6], 3: [0.2, 0.3]}  # means 0.6, 0.7, 0.25
    assert choose(trials, lambda t: dice[t.value], "dice")[("s", "m")].value == 2
    assert choose(trials, lambda t: dice[t.value], "val_loss")[("s", "m")].value == 3
    tie = {1: [0.7], 2: [0.7], 3: [0.1]}
    assert choose(trials, lambda t: tie[t.value], "dice")[("s", "m")].value == 1
    unfinished = {1: [0.9], 2: [math.nan], 3: [0.1]}
    assert choose(trials, lambda t: unfinished[t.value], "dice") == {}
    assert choose(trials, lambda t: [] if t.value == 3 else [0.5], "dice") == {}


def test_override_text_reads_back_as_the_same_value() -> None:
    assert override_text("a.b", 0.001) == "a.b=0.001"
    assert override_text("a.b", True) == "a.b=true"
    assert override_text("a.b", None) == "a.b=null"
    assert override_text("a.b", [8, 16]) == "a.b=[8,16]"


def test_a_grid_alone_tunes_the_strategys_own_tune_key(tmp_path: Path, capsys) -> None:
    """``+bench.tune.LABEL=[...]`` tunes ``strategy.<tune_key>`` of that strategy (FedProx:
    ``params.proximal_mu``); a strategy without a tune_key must name the key."""
    args = ["experiment=smoke", f"bench.out_dir={tmp_path}", "bench.seeds=[0]"]
    fedprox = ["+bench.strategies.fedprox=['strategy=fedprox']", "+bench.tune.fedprox=[0.001,0.1]"]
    assert main([*args, *fedprox, "--list"]) == 0
    listed = capsys.readouterr().out
    assert "new      demo/fedprox/tuning/strategy.params.proximal_mu=0.001/seed0" in listed
    assert "new      demo/fedprox/tuning/strategy.params.proximal_mu=0.1/seed0" in listed
    assert "tuning   demo/fedprox/seed0 (waits for its trials)" in listed
    assert main([*args, "+bench.tune.fedbn=[0.1,0.2]", "--list"]) == 2


def test_resolving_a_grid_alone_needs_a_tune_key() -> None:
    bench = _bench(tune={"fedprox": [0.01, 0.1], "fedavg": {"task.optimizer.lr": [0.1, 1]}})
    keys = {"fedprox": "params.proximal_mu", "fedavg": None}
    resolved = resolve_tune_keys(bench, keys.get)
    assert resolved.tune == {
        "fedprox": {"strategy.params.proximal_mu": [0.01, 0.1]},
        "fedavg": {"task.optimizer.lr": [0.1, 1]},
    }
    with pytest.raises(ConfigError, match="no strategy.tune_key"):
        resolve_tune_keys(_bench(tune={"fedavg": [0.1, 1]}), keys.get)
    with pytest.raises(ConfigError, match="give a grid"):
        resolve_tune_keys(_bench(tune={"fedavg": 0.1}), keys.get)
