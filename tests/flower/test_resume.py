"""Checkpoints and resume (fl_imaging/flower/checkpoint*.py): the strategy chain's state survives
the checkpoint files exactly (FedAdam's moments, FedAvgM's momentum, the center of centered
clipping, the DP accountant's history, and every other strategy's state), a changed config is
refused by name, and a real 2-round run resumed to 3 rounds ends with the model of an
uninterrupted run. Damaged files and full disks: test_checkpoint_files.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_helpers import (
    START,
    assert_same,
    quick,
    save,
    saved_and_loaded,
    train_round,
)
from cli_runs import run_cli
from local_runs import local_run

from fl_imaging.config import ConfigError, RunConfig, config_to_yaml
from fl_imaging.config.compose import check_overrides
from fl_imaging.flower.coordinator.checkpoint import (
    Checkpoint,
    check_resumable,
    load_checkpoint,
    restore_strategy_state,
    strategy_state,
)
from fl_imaging.review.results import read_metrics
from strategies import build_strategy
from strategies.privacy import privacy_spent

pytestmark = pytest.mark.usefixtures("task_identity")


# --- strategy state ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "attribute"),
    [
        (["strategy=fedadam"], "m_t"),
        (["strategy=fedavgm"], "momentum_vector"),
        # a small tau, so that clipping (and with it the center) matters
        (["strategy=centeredclip", "strategy.params.tau=0.5"], "center"),
    ],
    ids=["fedadam", "fedavgm", "centeredclip"],
)
def test_server_state_survives_a_checkpoint_and_the_next_round_is_identical(
    overrides: list[str], attribute: str, tmp_path: Path
) -> None:
    cfg = check_overrides(overrides).strategy
    first = build_strategy(cfg, num_sites=2)
    arrays = START
    for rnd in (1, 2):
        arrays = train_round(first, arrays, rnd)
    assert getattr(first.inner, attribute) is not None

    second = build_strategy(cfg, num_sites=2)
    restore_strategy_state(second, saved_and_loaded(first, tmp_path))
    assert_same(getattr(second.inner, attribute), getattr(first.inner, attribute), attribute)
    # the third round from the restored strategy equals the third round of the original one
    third = train_round(first, arrays, 3)
    np.testing.assert_array_equal(train_round(second, arrays, 3)["w"], third["w"])
    # a fresh strategy (no state yet) goes elsewhere: the restored state made the difference
    fresh = train_round(build_strategy(cfg, num_sites=2), arrays, 3)
    assert np.abs(fresh["w"] - third["w"]).max() > 1e-4


def test_dp_accountant_history_survives_a_checkpoint(tmp_path: Path) -> None:
    cfg = check_overrides(["strategy=dpfedavg"]).strategy
    first = build_strategy(cfg, num_sites=2)
    arrays = START
    for rnd in (1, 2):
        arrays = train_round(first, arrays, rnd)
    before = privacy_spent(first)
    assert before is not None and before[0] > 0

    second = build_strategy(cfg, num_sites=2)
    assert privacy_spent(second) == (0.0, 1e-5)  # nothing spent yet
    restore_strategy_state(second, saved_and_loaded(first, tmp_path))
    assert privacy_spent(second) == before
    # round 3 from the restored accountant spends exactly what the uninterrupted one spends
    train_round(first, arrays, 3)
    train_round(second, arrays, 3)
    after_first, after_second = privacy_spent(first), privacy_spent(second)
    assert after_first is not None and after_second is not None
    assert after_second == after_first and after_second[0] > before[0]


EVERY_CHAIN = [
    *(
        [f"strategy={name}"]
        for name in (
            "fedavg fedavgm fedprox fedadam fedyogi fedadagrad fedmedian fedtrimmedavg krum "
            "multikrum bulyan geomedian centeredclip normbound dpfedavg"
        ).split()
    ),
    ["strategy=fedavg", "strategy.norm_bound=1.0"],
    ["strategy=dpfedavg", "strategy.dp.mode=client_fixed"],
    ["strategy=dpfedavg", "strategy.dp.account=false"],
    *(
        [
            "strategy=fedavg",
            f"strategy.dp.mode={mode}",
            "strategy.dp.account=false",
            "strategy.dp.noise_multiplier=0.1",
            "strategy.dp.clipped_count_stddev=5",
        ]
        for mode in ("server_adaptive", "client_adaptive")
    ),
]


@pytest.mark.parametrize("overrides", EVERY_CHAIN, ids=lambda o: ",".join(o[1:] or o))
def test_every_strategy_state_goes_through_the_files_unchanged(
    overrides: list[str], tmp_path: Path
) -> None:
    """Whatever a chain holds after two rounds (Flower's attributes included) is JSON or NPZ
    and comes back with the same types and bits; nothing in it needs pickle."""
    cfg = check_overrides(overrides).strategy
    first = build_strategy(cfg, num_sites=7)  # Bulyan needs 4f + 3 sites
    arrays = {"w": np.zeros((3, 4), np.float32), "n": np.array(0, np.int64)}
    for rnd in (1, 2):
        arrays = train_round(first, arrays, rnd, sites=7)
    second = build_strategy(cfg, num_sites=7)
    restore_strategy_state(second, saved_and_loaded(first, tmp_path))
    assert_same(strategy_state(second), strategy_state(first))


def test_a_checkpoint_leaves_out_the_logs_and_the_arrays_of_the_finished_round() -> None:
    strategy = build_strategy(
        check_overrides(["strategy=centeredclip", "strategy.norm_bound=1.0"]).strategy,
        num_sites=2,
    )
    train_round(strategy, START, 1)
    state = strategy_state(strategy)
    assert list(state) == ["0:ValidatingStrategy", "1:NormBounding", "2:CenteredClipping"]
    assert {"history", "sent", "cfg", "sites", "inner"}.isdisjoint(state["0:ValidatingStrategy"])
    assert "sent" not in state["1:NormBounding"] and state["1:NormBounding"]["bound"] == 1.0
    assert "sent" not in state["2:CenteredClipping"] and "center" in state["2:CenteredClipping"]


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


def test_restore_sets_only_what_the_chain_itself_saves() -> None:
    cfg = check_overrides(["strategy=fedadam"]).strategy
    state = strategy_state(build_strategy(cfg, num_sites=2))
    state["1:FedAdam"]["train_metrics_aggr_fn"] = "not a function"  # as a forged file could
    target = build_strategy(cfg, num_sites=2)
    with pytest.raises(ConfigError, match=r"holds 1:FedAdam.train_metrics_aggr_fn, which this"):
        restore_strategy_state(target, state)
    assert callable(target.inner.train_metrics_aggr_fn)


# --- config checks ----------------------------------------------------------------------------


def checkpoint_after(rnd: int, cfg: RunConfig) -> Checkpoint:
    return Checkpoint(round=rnd, arrays={}, strategy={}, rows=[], config=config_to_yaml(cfg))


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


@pytest.mark.parametrize(
    ("model", "named"),
    [
        # a network this run could build, but not the one the run folder trained
        (["task.model.channels=[8,16,32]"], "task.model.channels is [4, 8, 16] there, [8, 16, 32]"),
        # one whose constructor would refuse its channels (SegResNet's group norm of 8)
        (
            ["task.model.name=segresnet", "task.model.channels=[4,8]"],
            "task.model.name is 'unet' there, 'segresnet' here",
        ),
    ],
    ids=["other-channels", "unbuildable"],
)
def test_resume_from_a_run_folder_of_another_model_names_the_keys(
    tmp_path: Path, model: list[str], named: str
) -> None:
    """``fl-imaging resume=`` the folder of a run of another network stops before any site's
    data is read, exit 2, one message naming the model keys that differ (both values)."""
    first = tmp_path / "first"
    save(first, build_strategy(quick().strategy, num_sites=2))  # experiment=quick's model
    demo = tmp_path / "demo"
    proc = run_cli(
        "fl-imaging",
        "experiment=quick",
        "engine.rounds=3",
        f"data.root={demo}",
        f"resume={first}",
        *model,
        cwd=tmp_path,
        expect=2,
    )
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    assert f"resume={first}: that run folder holds another model" in proc.stderr
    assert named in proc.stderr and "resume with the same model settings" in proc.stderr
    assert not demo.exists()  # refused before any site's data was made or read


# --- end to end: resumed == uninterrupted ----------------------------------------------------


def fl_imaging(tmp_path: Path, run: str, *overrides: str) -> Path:
    """A FedAdam run of ``experiment=quick`` with ``overrides`` into ``tmp_path / run``, the
    real sites in-process (:mod:`local_runs`); the run folder. A resume through the command and
    Flower's simulation engine: test_interrupts.py."""
    demo = f"data.root={tmp_path / 'demo'}"
    return local_run(tmp_path / run, "experiment=quick", "strategy=fedadam", *overrides, demo)


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
