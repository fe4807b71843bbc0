"""Run ``fl-imaging-data stats`` on Flower's simulation engine: the run's sites prepared as for
training (:func:`fl_imaging.data.prepare.prepare_sites`), one virtual SuperNode per site running
the run's own ClientApp (so every site answers ``query.stats`` through its gate: its policy and
its record), and a ServerApp that only asks for the statistics.

The deployment engine is not wired here: the SuperNodes of a deployment answer ``query.stats``
with the same ClientApp, but ``flwr run`` starts the training ServerApp, which has no
statistics-only mode yet; a deployment config is refused with that reason.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_imaging.config import ConfigError, EngineName, RunConfig
from fl_imaging.flower.protocol import ReplySites
from fl_imaging.statistics.coordinator import SiteReleases, collect_statistics, wait_for_nodes
from fl_imaging.statistics.request import StatsRequest

__all__ = ["run_statistics"]

log = logging.getLogger("fl_imaging")


def _server_app(
    request: StatsRequest, expected: int, cfg: RunConfig, result: dict[str, object]
) -> ServerApp:
    """A ServerApp that waits for ``expected`` sites (``engine.wait_timeout``), asks them for
    ``request`` (replies within ``engine.round_timeout``) and puts the
    :class:`~fl_imaging.statistics.coordinator.SiteReleases` into ``result["collected"]`` (or
    what it raised into ``result["error"]``)."""
    from fl_imaging.flower.coordinator.polling import QuickPollGrid

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            polling = QuickPollGrid(grid)
            nodes = wait_for_nodes(polling, expected, cfg.engine.wait_timeout)
            result["collected"] = collect_statistics(
                polling, request, nodes, timeout=cfg.engine.round_timeout, sites=ReplySites()
            )
        except Exception as err:  # noqa: BLE001  (raised again in the caller's thread)
            result["error"] = err

    return server


def run_statistics(cfg: RunConfig, request: StatsRequest) -> SiteReleases:
    """Ask every site of ``cfg`` (a validated config; ``run_dir``: the output folder, for the
    sites' log lines) for ``request`` on the simulation engine. Returns what they released.
    Raises :class:`~fl_imaging.config.ConfigError` for a deployment config and what
    :func:`~fl_imaging.data.prepare.prepare_sites` raises for a site folder that cannot be
    read."""
    if cfg.engine.name != EngineName.simulation:
        raise ConfigError(
            "fl-imaging-data stats runs on the simulation engine (engine=simulation); in a "
            "deployment each SuperNode answers the statistics query, but flwr run starts the "
            "training ServerApp, which has no statistics-only mode yet"
        )
    from fl_imaging.console.site_lines import site_lines_into_log
    from fl_imaging.data.prepare import prepare_sites
    from fl_imaging.engines.local_ray import start_local_ray
    from fl_imaging.engines.message_handout import sites_asked_only_when_addressed
    from fl_imaging.engines.simulation import ray_backend_config
    from fl_imaging.flower.internals import run_simulation
    from fl_imaging.flower.site.client_app import build_client_app
    from fl_imaging.site.setup import absolute_site_paths, check_site_policies

    cfg = replace(cfg, run_dir=str(Path(cfg.run_dir).resolve()))
    cfg = replace(cfg, site=absolute_site_paths(cfg))
    check_site_policies(cfg)
    local_ray = start_local_ray(cfg.engine)  # beside the site checks
    result: dict[str, object] = {}
    # the sites' log lines come through the output folder; the last once Ray has stopped
    with site_lines_into_log(Path(cfg.run_dir)) as site_lines:
        try:
            cfg, sites, _ = prepare_sites(cfg)
            names = ", ".join(s.name for s in sites)
            log.info("statistics of %d site(s): %s", len(sites), names)
            local_ray.wait()
            with sites_asked_only_when_addressed():
                run_simulation(
                    server_app=_server_app(request, len(sites), cfg, result),
                    client_app=build_client_app(cfg, site_lines=site_lines),
                    num_supernodes=len(sites),
                    backend_config=ray_backend_config(cfg.engine, local_ray.init_args),  # type: ignore[arg-type]
                    verbose_logging=cfg.engine.verbose,
                )
        finally:
            local_ray.stop()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    collected = result.get("collected")
    assert isinstance(collected, SiteReleases), "the statistics ServerApp returned nothing"
    return collected
