"""Checkpoints and resume (fl_imaging/flower/checkpoint.py): the strategy chain's state survives a
save and load (FedAdam's moments, the DP accountant's history), a changed config is refused by
name, and a real 2-round run resumed to 3 rounds ends with the model of an uninterrupted run.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_fakes import Arrays, FakeGrid, numpy_of, record
from flwr.app import (
    ConfigRecord,
)
from flwr.serverapp.strategy import FedAdam, Strategy

from fl_imaging.compose import check_overrides
from fl_imaging.config import ConfigError, RunConfig, config_to_yaml
from fl_imaging.flower.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    check_resumable,
    load_checkpoint,
    restore_strategy_state,
    save_checkpoint,
    strategy_state,
)
from fl_imaging.results import MetricRow, read_metrics
from strategies import build_strategy
from strategies.privacy import privacy_spent

pytestmark = pytest.mark.usefixtures("task_identity")


def site_metrics(node: int) -> dict[str, float]:
    """What site ``node`` reports after training: ``10 * node`` cases, and the equal weight
    DP-FedAvg aggregates by."""
    return {"num-examples": 10 * node, "unit-weight": 1}


# --- helpers ----------------------------------------------------------------------------------


def respond(node: int, rnd: int, sent: Arrays) -> Arrays:
    """A site's training: a step that depends on the site and the round."""
    rng = np.random.default_rng([node, rnd])
    return {"w": sent["w"] + rng.normal(size=sent["w"].shape).astype(np.float32)}


def train_round(strategy: Strategy, arrays: Arrays, rnd: int, sites: int = 2) -> Arrays:
    """One round of training (no evaluation) through ``strategy``; returns the new global.

    Two sites: Flower samples nodes in random order, and a sum of two replies does not depend on
    it (three would, in the last bit), so that rounds can be compared bit for bit."""
    grid = FakeGrid(sites, respond, site_metrics)
    messages = strategy.configure_train(rnd, record(arrays), ConfigRecord(), grid)
    out, _ = strategy.aggregate_train(rnd, grid.send_and_receive(messages))
    assert out is not None
    return numpy_of(out)


def saved_and_loaded(strategy: Strategy) -> dict:
    """The strategy's state as a checkpoint file holds it (pickled and read back)."""
    return pickle.loads(pickle.dumps(strategy_state(strategy)))


START = {"w": np.zeros((3, 4), np.float32)}


# --- strategy state ---------------------------------------------------------------------------


def test_fedadam_moments_survive_a_checkpoint_and_the_next_round_is_identical() -> None:
    cfg = check_overrides(["strategy=fedadam"]).strategy
    first = build_strategy(cfg, num_sites=2)
    arrays = START
    for rnd in (1, 2):
        arrays = train_round(first, arrays, rnd)
    adam = first.inner
    assert isinstance(adam, FedAdam) and adam.m_t is not None and adam.v_t is not None

    second = build_strategy(cfg, num_sites=2)
    restore_strategy_state(second, saved_and_loaded(first))
    restored = second.inner
    assert isinstance(restored, FedAdam) and restored.m_t is not None and restored.v_t is not None
    for name in ("m_t", "v_t"):
        moments, back = getattr(adam, name), getattr(restored, name)
        assert set(back) == {"w"} and np.array_equal(back["w"], moments["w"])
        assert np.abs(back["w"]).sum() > 0
    # the third round from the restored strategy equals the third round of the original one
    third = train_round(first, arrays, 3)
    np.testing.assert_array_equal(train_round(second, arrays, 3)["w"], third["w"])
    # a fresh FedAdam (moments at zero) goes elsewhere: the restored state made the difference
    fresh = train_round(build_strategy(cfg, num_sites=2), arrays, 3)
    assert np.abs(fresh["w"] - third["w"]).max() > 1e-4


def test_dp_accountant_history_survives_a_checkpoint() -> None:
    cfg = check_overrides(["strategy=dpfedavg"]).strategy
    first = build_strategy(cfg, num_sites=2)
    arrays = START
    for rnd in (1, 2):
        arrays = train_round(first, arrays, rnd)
    before = privacy_spent(first)
    assert before is not None and before[0] > 0

    second = build_strategy(cfg, num_sites=2)
    assert privacy_spent(second) == (0.0, 1e-5)  # nothing spent yet
    restore_strategy_state(second, saved_and_loaded(first))
    assert privacy_spent(second) == before
    # round 3 from the restored accountant spends exactly what the uninterrupted one spends
    train_round(first, arrays, 3)
    train_round(second, arrays, 3)
    after_first, after_second = privacy_spent(first), privacy_spent(second)
    assert after_first is not None and after_second is not None
    assert after_second == after_first and after_second[0] > before[0]


@pytest.mark.parametrize(
    ("saved", "resumed"),
    [("fedadam", "fedavg"), ("dpfedavg", "fedavg"), ("fedavg", "dpfedavg")],
)
def test_restore_refuses_another_strategy_chain(saved: str, resumed: str) -> None:
    state = strategy_state(
        build_strategy(check_overrides([f"strategy={saved}"]).strategy, num_sites=3)
    )
    target = build_strategy(check_overrides([f"strategy={resumed}"]).strategy, num_sites=3)
    with pytest.raises(ConfigError, match="checkpoint's strategy .* is not this run's"):
        restore_strategy_state(target, state)


# --- checkpoint files and config checks -------------------------------------------------------


def quick(*overrides: str) -> RunConfig:
    return check_overrides(["experiment=quick", *overrides])


def checkpoint_after(rnd: int, cfg: RunConfig) -> Checkpoint:
    return Checkpoint(round=rnd, arrays={}, strategy={}, rows=[], config=config_to_yaml(cfg))


def test_save_and_load_a_checkpoint(tmp_path: Path) -> None:
    cfg = quick("strategy=fedadam")
    strategy = build_strategy(cfg.strategy, num_sites=2)
    train_round(strategy, START, 1, sites=2)
    rows = [MetricRow(1, "site-1", "train_loss", 0.5), MetricRow(1, "all", "dice", 0.25)]
    path = save_checkpoint(
        tmp_path / "run" / CHECKPOINT_FILE,
        server_round=1,
        arrays=record({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}),
        strategy=strategy,
        rows=rows,
        failures=[(1, "site-2", "out of memory")],
        cfg=cfg,
    )
    assert path.is_file() and not path.with_suffix(".partial").exists()
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded.round == 1 and loaded.rows == rows
    assert loaded.failures == [(1, "site-2", "out of memory")]
    np.testing.assert_array_equal(loaded.arrays["w"], np.arange(12).reshape(3, 4))
    check_resumable(loaded, quick("strategy=fedadam", "engine.rounds=3"))  # may go on
    fresh = build_strategy(cfg.strategy, num_sites=2)
    restore_strategy_state(fresh, loaded.strategy)
    assert np.array_equal(fresh.inner.m_t["w"], strategy.inner.m_t["w"])
    with pytest.raises(ConfigError, match=r"resume=.*nowhere: no checkpoint.pkl there"):
        load_checkpoint(tmp_path / "nowhere")


def test_check_resumable_names_every_changed_key() -> None:
    checkpoint = checkpoint_after(2, quick("strategy=fedadam"))
    changed = quick("strategy=fedadam", "engine.rounds=5", "seed=1", "task.local_epochs=2")
    with pytest.raises(ConfigError) as err:
        check_resumable(checkpoint, changed)
    message = str(err.value)
    assert "seed: 0 -> 1" in message and "task.local_epochs: 3 -> 2" in message
    assert "only engine.rounds may change" in message and "engine.rounds:" not in message
    with pytest.raises(ConfigError, match=r"strategy.params.eta: 0.01 -> 0.1"):
        check_resumable(checkpoint, quick("strategy=fedadam", "strategy.params.eta=0.1"))
    # rounds, the run folder and the resume key itself may differ
    same = quick("strategy=fedadam", "engine.rounds=3", "resume=/runs/first")
    same.run_dir = "/runs/second"
    check_resumable(checkpoint, same)


@pytest.mark.parametrize("rounds", [1, 2])
def test_check_resumable_refuses_when_no_round_is_left(rounds: int) -> None:
    checkpoint = checkpoint_after(2, quick())
    with pytest.raises(ConfigError, match=f"already holds round 2 of engine.rounds={rounds}"):
        check_resumable(checkpoint, quick(f"engine.rounds={rounds}"))


# --- end to end: resumed == uninterrupted ----------------------------------------------------


def fl_imaging(tmp_path: Path, run: str, *overrides: str) -> Path:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fl_imaging.cli",
            "experiment=quick",
            "strategy=fedadam",
            *overrides,
            f"data.root={tmp_path / 'demo'}",
            f"hydra.run.dir={tmp_path / run}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path / run


@pytest.mark.slow
def test_two_rounds_resumed_to_three_give_the_uninterrupted_model(tmp_path: Path) -> None:
    straight = fl_imaging(tmp_path, "straight", "engine.rounds=3")
    first = fl_imaging(tmp_path, "first", "engine.rounds=2")
    resumed = fl_imaging(tmp_path, "resumed", f"resume={first}", "engine.rounds=3")

    expected = torch.load(straight / "model.pt", weights_only=True)
    got = torch.load(resumed / "model.pt", weights_only=True)
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    # the first run's model differs: the resumed run did train a third round
    two_rounds = torch.load(first / "model.pt", weights_only=True)
    assert not all(torch.equal(two_rounds[k], v) for k, v in expected.items())

    rows = read_metrics(resumed / "metrics.csv")
    assert sorted({r.round for r in rows}) == [1, 2, 3]
    loss = {r.round: r.value for r in rows if r.site == "all" and r.metric == "train_loss"}
    straight_loss = {
        r.round: r.value
        for r in read_metrics(straight / "metrics.csv")
        if r.site == "all" and r.metric == "train_loss"
    }
    assert loss == pytest.approx(straight_loss, rel=1e-6)
    assert load_checkpoint(resumed).round == 3
