"""Whole runs of ``fl-imaging`` in the test's own process, the sites' real ClientApp included,
without Ray: :func:`local_run` goes through :func:`fl_imaging.run.run` (tracking and model
checks, demo data or site folders checked, ``partition.csv``, the plan, every result file) and
only the engine differs: instead of Flower's simulation engine (a Ray start, one actor process
per site: 10-15 s of a run's 15-20 s on 2 cores), the ServerApp that
:func:`~fl_imaging.flower.coordinator.server_app.build_server_app` builds runs on a
:class:`ClientAppSites` grid, whose sites answer with the ClientApp that
:func:`~fl_imaging.flower.site.client_app.build_client_app` builds, in-process.

For tests of what the coordinator and the sites do; what Ray and the command add (its
process, Hydra's composition, the actors, stopping) is tested through the command itself
(:mod:`cli_runs`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from unittest import mock

from flower_fakes import Answer, FakeGrid
from flwr.app import Context, Message, RecordDict
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.supercore.task_identity import TaskIdentity

from fl_imaging.config import RunConfig
from fl_imaging.config.compose import check_overrides
from fl_imaging.training.site_training import SiteTrainers

__all__ = ["ClientAppSites", "local_run", "sites_in_process"]

log = logging.getLogger("fl_imaging.engine")


class ClientAppSites(FakeGrid):
    """A :class:`~flower_fakes.FakeGrid` whose sites (one per entry of ``site_names``) answer
    every message with the real ClientApp of ``cfg``, each with its own Flower Context kept
    between messages (``partition-id``, ``num-partitions``, as Flower's simulation gives a
    virtual SuperNode) and the trainers of this grid only."""

    def __init__(self, cfg: RunConfig, site_names: list[str]) -> None:
        from fl_imaging.flower.site.client_app import build_client_app

        super().__init__(len(site_names), lambda site, rnd, sent: sent)
        self.app = build_client_app(cfg, SiteTrainers())
        self.contexts = {site: self.context_of(site) for site in self.node_of}

    def answer(self, msg: Message, site: int) -> Answer:
        return self.app(msg, self.contexts[site])


def in_process_engine(
    cfg: RunConfig, site_names: list[str], plan: object, local_ray: object = None
) -> None:
    """Stands in for :func:`fl_imaging.engines.simulation.run_simulation_engine`: the run's
    ServerApp on a :class:`ClientAppSites` grid, with the task identity Flower's runtime gives
    a ServerApp (a new run id, the SuperLink's node)."""
    from fl_imaging.flower.coordinator.server_app import build_server_app

    log.info("in-process sites (tests): %d sites, %d round(s)", len(site_names), cfg.engine.rounds)
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    TaskIdentity.node_id, TaskIdentity.task_id = SUPERLINK_NODE_ID, 1
    try:
        grid = ClientAppSites(cfg, site_names)
        server = build_server_app(cfg, site_names, plan)  # type: ignore[arg-type]
        server(grid, Context(grid.run.run_id, 0, {}, RecordDict(), {}))
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class _NoRay:
    """What :func:`fl_imaging.run.run` gets instead of Ray started beside the site checks."""

    def stop(self) -> None:
        """Nothing was started."""


@contextmanager
def sites_in_process() -> Iterator[None]:
    """While inside, a simulation that :func:`fl_imaging.run.run` starts runs its sites
    in-process (:func:`in_process_engine`) and starts no Ray."""
    with (
        mock.patch("fl_imaging.engines.local_ray.start_local_ray", lambda engine: _NoRay()),
        mock.patch("fl_imaging.engines.simulation.run_simulation_engine", in_process_engine),
    ):
        yield


def local_run(run_dir: Path, *overrides: str) -> Path:
    """Run ``fl-imaging OVERRIDES`` into ``run_dir`` with the sites in-process
    (:func:`sites_in_process`); returns the run folder. Raises what the run raises (a config
    or site error, :class:`~fl_imaging.review.results.SitesFailed` ...)."""
    from fl_imaging.run import run

    cfg = replace(check_overrides(list(overrides)), run_dir=str(run_dir))
    with sites_in_process():
        return run(cfg)
