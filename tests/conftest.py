"""Fixtures shared by the test files (and, from deployment_fixtures.py, the session's
federation of real Flower processes and the run on it: ``federation``, ``deployed_run``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from deployment_fixtures import deployed_run, federation  # noqa: F401 (fixtures, shared)
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower 1.41 builds instruction Messages from TaskIdentity, set by its runtime: fake it
    (the ServerApp's: run 1, sent from the SuperLink's node)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture(autouse=True)
def site_state_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated sites of in-process tests keep their state (ledger, record, identity) under
    the test's tmp folder, not beside a run folder of ".": tests never write outside it."""
    from fl_imaging.site import setup

    real = setup.site_state_root
    monkeypatch.setattr(
        setup,
        "site_state_root",
        lambda cfg: real(cfg) if cfg.site.state_dir else tmp_path / "site-state",
    )
