"""Checkpoints and resume (fl_imaging/flower/checkpoint*.py): the strategy chain's state survives
the checkpoint files exactly (FedAdam's moments, FedAvgM's momentum, the center of centered
clipping, the DP accountant's history, and every other strategy's state), a damaged, altered,
foreign or older checkpoint is refused in one line naming the file and never unpickled, a disk
that fills up while a checkpoint is written keeps the previous one and stops the run with the
folder and the reason, a changed config is refused by name, and a real 2-round run resumed to 3
rounds ends with the model of an uninterrupted run.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest
import torch
from flower_fakes import Arrays, FakeGrid, numpy_of, record
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import Strategy

import fl_imaging.flower.checkpoint_files as checkpoint_files
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
from fl_imaging.flower.checkpoint_codec import StateDictOf
from fl_imaging.flower.server_app import run_federation
from fl_imaging.results import MetricRow, RunFolderError, read_metrics, write_run_files
from strategies import build_strategy
from strategies.privacy import privacy_spent

pytestmark = pytest.mark.usefixtures("task_identity")


def site_metrics(node: int) -> dict[str, float]:
    """What site ``node`` reports after training: ``10 * node`` cases, the equal weight DP-FedAvg
    aggregates by, and the clipped-or-not bit of client-side adaptive clipping."""
    return {"num-examples": 10 * node, "unit-weight": 1, "norm_bit": node % 2}


# --- helpers ----------------------------------------------------------------------------------


def respond(node: int, rnd: int, sent: Arrays) -> Arrays:
    """A site's training: a step that depends on the site and the round; counters stay."""
    rng = np.random.default_rng([node, rnd])
    return {
        k: v + rng.normal(size=v.shape).astype(v.dtype) if v.dtype.kind == "f" else v
        for k, v in sent.items()
    }


def train_round(strategy: Strategy, arrays: Arrays, rnd: int, sites: int = 2) -> Arrays:
    """One round of training (no evaluation) through ``strategy``; returns the new global.

    Two sites: Flower samples nodes in random order, and a sum of two replies does not depend on
    it (three would, in the last bit), so that rounds can be compared bit for bit."""
    grid = FakeGrid(sites, respond, site_metrics)
    messages = strategy.configure_train(rnd, record(arrays), ConfigRecord(), grid)
    out, _ = strategy.aggregate_train(rnd, grid.send_and_receive(messages))
    return arrays if out is None else numpy_of(out)


def quick(*overrides: str) -> RunConfig:
    return check_overrides(["experiment=quick", *overrides])


@functools.cache
def quick_default() -> RunConfig:
    """``quick()``, composed once (Hydra takes a while); never changed by a test."""
    return quick()


def save(folder: Path, strategy: Strategy, server_round: int = 1, **changes: Any) -> Path:
    """Save a checkpoint of ``strategy`` (and a small model, two rows, a failure) in ``folder``."""
    fields: dict[str, Any] = {
        "server_round": server_round,
        "arrays": record({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}),
        "strategy": strategy,
        "rows": [MetricRow(1, "site-1", "train_loss", 0.5), MetricRow(1, "all", "dice", math.nan)],
        "failures": [(1, "site-2", "out of memory")],
        "cfg": quick_default(),
    }
    return save_checkpoint(folder, **{**fields, **changes})


def saved_and_loaded(strategy: Strategy, folder: Path) -> dict:
    """The strategy's state as the checkpoint files hold it (written and read back)."""
    save(folder, strategy)
    return load_checkpoint(folder).strategy


def assert_same(got: Any, expected: Any, where: str = "state") -> None:
    """``got`` equals ``expected`` exactly: same types (np.float64 stays np.float64, tuples stay
    tuples), array dtypes and shapes, values bit for bit (NaN equals NaN), dict order."""
    assert type(got) is type(expected), f"{where}: {type(got)} != {type(expected)}"
    if isinstance(expected, np.ndarray | np.generic):
        assert got.dtype == expected.dtype and np.shape(got) == np.shape(expected), where
        assert np.array_equal(got, expected, equal_nan=expected.dtype.kind in "fc"), where
    elif isinstance(expected, ArrayRecord):
        assert list(got) == list(expected), where
        for key in expected:
            assert_same(got[key].numpy(), expected[key].numpy(), f"{where}[{key!r}]")
    elif isinstance(expected, StateDictOf):
        assert_same(got.state, expected.state, f"{where}.state_dict()")
    elif isinstance(expected, dict):
        assert list(got) == list(expected), where
        for key in expected:
            assert_same(got[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(got), where
    else:
        assert got == expected, where


START = {"w": np.zeros((3, 4), np.float32)}


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


# --- checkpoint files -------------------------------------------------------------------------


def checkpoint_after(rnd: int, cfg: RunConfig) -> Checkpoint:
    return Checkpoint(round=rnd, arrays={}, strategy={}, rows=[], config=config_to_yaml(cfg))


def test_save_and_load_a_checkpoint(tmp_path: Path) -> None:
    cfg = quick("strategy=fedadam")
    strategy = build_strategy(cfg.strategy, num_sites=2)
    train_round(strategy, START, 1, sites=2)
    run = tmp_path / "run"
    path = save(run, strategy, cfg=cfg)
    save(run, strategy, server_round=2, cfg=cfg)  # the next round's replaces it
    assert path == run / CHECKPOINT_FILE
    # round 1's arrays file is gone, no temporary file is left
    assert sorted(p.name[:16] for p in run.iterdir()) == ["checkpoint-0002-", CHECKPOINT_FILE]
    document = json.loads(path.read_text())
    assert (document["format"], document["version"]) == ("fl-imaging checkpoint", 1)
    loaded = load_checkpoint(run)
    assert loaded.round == 2 and loaded.rows[0] == MetricRow(1, "site-1", "train_loss", 0.5)
    assert math.isnan(loaded.rows[1].value)
    assert loaded.failures == [(1, "site-2", "out of memory")]
    np.testing.assert_array_equal(loaded.arrays["w"], np.arange(12).reshape(3, 4))
    assert loaded.arrays["w"].dtype == np.float32
    check_resumable(loaded, quick("strategy=fedadam", "engine.rounds=3"))  # may go on
    fresh = build_strategy(cfg.strategy, num_sites=2)
    restore_strategy_state(fresh, loaded.strategy)
    assert np.array_equal(fresh.inner.m_t["w"], strategy.inner.m_t["w"])
    with pytest.raises(ConfigError, match=r"resume=.*nowhere: no checkpoint.json there"):
        load_checkpoint(tmp_path / "nowhere")


def _arrays_file(run: Path) -> Path:
    (arrays,) = run.glob("checkpoint-*.npz")
    return arrays


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _set_version(path: Path) -> None:
    document = json.loads(path.read_text())
    document["version"] = 2
    path.write_text(json.dumps(document))


def _change_round(path: Path) -> None:
    path.write_text(path.read_text().replace('"round": 1,', '"round": 7,', 1))


DAMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "arrays: one byte changed": (
        lambda run: _flip_a_byte(_arrays_file(run)),
        r"checkpoint-0001-\w+\.npz is damaged \(checksum mismatch: the file was altered\): "
        "resume from an earlier copy",
    ),
    "arrays: truncated": (
        lambda run: _cut(_arrays_file(run)),
        r"checkpoint-0001-\w+\.npz is damaged \(truncated or altered: \d+ bytes, \d+ written\)",
    ),
    "arrays: missing": (
        lambda run: _arrays_file(run).unlink(),
        r"names checkpoint-0001-\w+\.npz, which is not there: copy the whole run folder",
    ),
    "json: a value changed": (
        lambda run: _change_round(run / CHECKPOINT_FILE),
        r"checkpoint.json is damaged \(checksum mismatch: the file was altered\)",
    ),
    "json: truncated": (
        lambda run: _cut(run / CHECKPOINT_FILE),
        r"checkpoint.json is damaged \(not complete JSON: truncated or altered\)",
    ),
    "json: another format version": (
        lambda run: _set_version(run / CHECKPOINT_FILE),
        r"checkpoint.json is a checkpoint of format version 2, and this fl-imaging reads "
        "version 1: resume with the fl-imaging that wrote it",
    ),
    "json: not a checkpoint": (
        lambda run: (run / CHECKPOINT_FILE).write_text('{"hello": "world"}'),
        r"checkpoint.json is not an fl-imaging checkpoint",
    ),
    "an earlier version's pickle": (
        lambda run: (run / CHECKPOINT_FILE).rename(run / "checkpoint.pkl"),
        r"its checkpoint.pkl is a pickle written by an earlier fl-imaging, which this version "
        r"does not read \(loading a pickle can run code\): start the run again",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_is_refused_in_one_line_naming_the_file(
    damage: str, tmp_path: Path
) -> None:
    strategy = build_strategy(check_overrides(["strategy=fedadam"]).strategy, num_sites=2)
    train_round(strategy, START, 1)
    save(tmp_path, strategy)
    load_checkpoint(tmp_path)  # whole: it loads
    change, message = DAMAGES[damage]
    change(tmp_path)
    with pytest.raises(ConfigError, match=message) as err:
        load_checkpoint(tmp_path)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


class _Payload:
    """What a forged checkpoint might hide in an array: code that runs when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _reseal(run: Path) -> None:
    """Recompute every checksum, as someone forging a checkpoint could (module docstring of
    fl_imaging.flower.checkpoint_files: sorted keys, no spaces)."""
    path = run / CHECKPOINT_FILE
    document = json.loads(path.read_text())
    arrays = run / document["arrays"]["file"]
    document["arrays"].update(
        bytes=arrays.stat().st_size, sha256=hashlib.sha256(arrays.read_bytes()).hexdigest()
    )
    del document["sha256"]
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    document["sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    path.write_text(json.dumps(document))


def test_a_forged_checkpoint_never_runs_code(tmp_path: Path) -> None:
    strategy = build_strategy(check_overrides(["strategy=fedadam"]).strategy, num_sites=2)
    train_round(strategy, START, 1)
    save(tmp_path, strategy)
    _reseal(tmp_path)
    load_checkpoint(tmp_path)  # resealing alone keeps it whole
    arrays = _arrays_file(tmp_path)
    with np.load(arrays) as npz:
        entries = {name: npz[name] for name in npz.files}
    marker = tmp_path / "code ran"
    entries["a0"] = np.array([_Payload(marker)], dtype=object)
    np.savez(arrays, **entries)  # pickles the object array
    _reseal(tmp_path)
    with pytest.raises(ConfigError, match=r"checkpoint-0001-\w+\.npz is damaged \(not a NumPy"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def _disk_full(monkeypatch: pytest.MonkeyPatch, fails: Callable[[Path], bool]) -> None:
    """Make the checkpoint's writes of the paths ``fails`` picks run out of space halfway."""
    real = checkpoint_files.write_atomically

    def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> Path:
        if not fails(path):
            return real(path, write)

        def half_then_full(handle: BinaryIO) -> None:
            handle.write(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real(path, half_then_full)

    monkeypatch.setattr(checkpoint_files, "write_atomically", write_atomically)


@pytest.mark.parametrize("failing", ["checkpoint-0002-", CHECKPOINT_FILE])
def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_nothing_behind(
    failing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    strategy = build_strategy(check_overrides(["strategy=fedadam"]).strategy, num_sites=2)
    train_round(strategy, START, 1)
    save(tmp_path, strategy)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    train_round(strategy, START, 2)
    _disk_full(monkeypatch, lambda path: path.name.startswith(failing))
    with pytest.raises(RunFolderError) as err:
        save(tmp_path, strategy, server_round=2)
    assert str(err.value) == (
        f"could not write the checkpoint of round 2 into {tmp_path}: No space left on device. "
        "The checkpoint of round 1 there is kept: free space (or make the folder writable), "
        f"then go on from it with resume={tmp_path}"
    )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert load_checkpoint(tmp_path).round == 1


def test_a_full_disk_during_a_run_stops_it_with_the_folder_and_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = replace(
        quick("engine.rounds=3", "engine.num_sites=2", "engine.test=false"), run_dir=str(tmp_path)
    )
    grid = FakeGrid(2, lambda node, rnd, sent: sent, lambda node: {"num-examples": 4})
    _disk_full(monkeypatch, lambda path: path.name.startswith("checkpoint-0002-"))
    with caplog.at_level(logging.ERROR), pytest.raises(RunFolderError) as err:
        run_federation(grid, cfg, [])
    message = (
        f"stopped after round 2 of 3: could not write the checkpoint of round 2 into {tmp_path}: "
        "No space left on device. The checkpoint of round 1 there is kept"
    )
    assert str(err.value).startswith(message)
    assert message in (tmp_path / "summary.txt").read_text()  # the results are written
    assert torch.load(tmp_path / "model.pt", weights_only=True)
    assert load_checkpoint(tmp_path).round == 1
    assert not list(tmp_path.glob(".*")) and not list(tmp_path.glob("checkpoint-0002-*"))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        str(err.value)
    ]


def test_a_full_disk_while_writing_the_results_names_the_folder_and_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = quick()
    model = torch.nn.Linear(2, 1)
    rows = [MetricRow(1, "site-1", "train_loss", 0.5)]
    write_run_files(tmp_path, cfg, rows, [], model, ["site-1"], "dice")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(obj: object, handle: BinaryIO) -> None:
        handle.write(b"half a model")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(RunFolderError) as err:
        write_run_files(tmp_path, cfg, rows * 2, [], model, ["site-1"], "dice")
    assert str(err.value) == (
        f"could not write the run's results into {tmp_path} (model.pt: No space left on "
        "device): free space there or give a folder you can write to (hydra.run.dir=...)"
    )
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(after) == set(before)  # no temporary file left
    assert after["model.pt"] == before["model.pt"]  # the earlier model.pt is whole


#: ``fl-imaging`` whose run stops as a full disk stops it (run in a process of its own: Hydra
#: takes over logging in the process it runs in).
FULL_DISK_CLI = """
import sys
import fl_imaging.cli.main as cli
from fl_imaging.results import RunFolderError

def run(cfg):
    raise RunFolderError(f"could not write the run's results into {cfg.run_dir}: full")

cli.run = run
sys.argv = ["fl-imaging", *sys.argv[1:]]
cli.main()
"""


def test_fl_imaging_exits_2_with_the_message_when_the_run_folder_cannot_be_written(
    tmp_path: Path,
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK_CLI, f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert f"[ERROR] - could not write the run's results into {tmp_path}: full" in output
    assert "Traceback" not in output


# --- config checks ----------------------------------------------------------------------------


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
