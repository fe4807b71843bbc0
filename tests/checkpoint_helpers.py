"""Helpers of the checkpoint tests (test_resume.py, test_checkpoint_files.py): sites that train
on hand-made arrays, one round through a strategy, and a checkpoint of a strategy saved and
read back."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
from flower_fakes import Arrays, FakeGrid, numpy_of, record
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import Strategy

from fl_imaging.config import RunConfig
from fl_imaging.config.compose import check_overrides
from fl_imaging.flower.coordinator.checkpoint import (
    load_checkpoint,
    save_checkpoint,
)
from fl_imaging.flower.coordinator.checkpoint_codec import StateDictOf
from fl_imaging.review.results import MetricRow


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
