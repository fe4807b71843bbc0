"""The checkpoint on disk (fl_imaging/flower/coordinator/checkpoint_files.py): saved and read back,
a
damaged, altered, foreign or older checkpoint refused in one line naming the file and never
unpickled, and a disk that fills up while a checkpoint or the results are written keeps the
previous checkpoint and stops the run with the folder and the reason.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest
import torch
from checkpoint_helpers import (
    START,
    quick,
    save,
    train_round,
)
from cli_runs import run_cli
from flower_fakes import FakeGrid

import fl_imaging.flower.coordinator.checkpoint_files as checkpoint_files
from fl_imaging.config import ConfigError
from fl_imaging.config.compose import check_overrides
from fl_imaging.flower.coordinator.checkpoint import (
    CHECKPOINT_FILE,
    check_resumable,
    load_checkpoint,
    restore_strategy_state,
)
from fl_imaging.flower.coordinator.server_app import run_federation
from fl_imaging.review.results import MetricRow, RunFolderError, write_run_files
from strategies import build_strategy

pytestmark = pytest.mark.usefixtures("task_identity")


# --- checkpoint files -------------------------------------------------------------------------


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
    fl_imaging.flower.coordinator.checkpoint_files: sorted keys, no spaces)."""
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


#: Makes ``fl-imaging``'s run stop as a full disk stops it (run in a process of its own: Hydra
#: takes over logging in the process it runs in).
FULL_DISK = """
import fl_imaging.cli.main as cli
from fl_imaging.review.results import RunFolderError

def run(cfg):
    raise RunFolderError(f"could not write the run's results into {cfg.run_dir}: full")

cli.run = run
"""


def test_fl_imaging_exits_2_with_the_message_when_the_run_folder_cannot_be_written(
    tmp_path: Path,
) -> None:
    proc = run_cli(
        "fl-imaging", f"hydra.run.dir={tmp_path}", cwd=tmp_path, prelude=FULL_DISK, expect=2
    )
    output = proc.stdout + proc.stderr
    assert f"error: could not write the run's results into {tmp_path}: full" in output
    assert "Traceback" not in output
