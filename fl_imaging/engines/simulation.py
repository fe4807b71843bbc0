"""Run a federation on Flower's simulation engine (Ray backend), one virtual SuperNode per site."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import TYPE_CHECKING

from fl_imaging.config import RunConfig

if TYPE_CHECKING:
    from fl_imaging.flower.federation import FederationPlan

__all__ = ["run_simulation_engine"]

log = logging.getLogger("fl_imaging.engine")


class _DropRunSimulationDeprecation(logging.Filter):
    """Flower warns that ``run_simulation`` is deprecated in favour of ``flwr run``; we use it on
    purpose (see :func:`run_simulation_engine`), so the warning is dropped, and only that one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def _quiet_flower(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(level)
    if not any(isinstance(f, _DropRunSimulationDeprecation) for f in flwr_logger.filters):
        flwr_logger.addFilter(_DropRunSimulationDeprecation())
    logging.getLogger("alembic").setLevel(logging.WARNING)


def run_simulation_engine(
    cfg: RunConfig, site_names: list[str], plan: FederationPlan | None = None
) -> None:
    """Run ``cfg`` on Flower's simulation engine, one virtual SuperNode per entry of
    ``cfg.data.sites``; the ServerApp (with the server side ``plan`` already made, or its own)
    writes the run's files into ``cfg.run_dir``.

    Uses Flower's in-process ``run_simulation`` (Ray backend) rather than ``flwr run``: the same
    engine, without a background SuperLink process or an app bundle, so a run costs one Ray start.
    Ray gets ``engine.num_cpus`` CPUs (default: all) and reserves ``engine.cpus_per_client`` per
    ClientApp; its files go to a private temporary folder removed afterwards.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's FutureWarning
    _quiet_flower(cfg.engine.verbose)  # before the import: alembic logs as it is imported
    from flwr.simulation import run_simulation

    from fl_imaging.flower.client_app import build_client_app
    from fl_imaging.flower.server_app import build_server_app

    engine = cfg.engine
    num_cpus = engine.num_cpus or os.cpu_count() or 1
    ray_tmp = tempfile.mkdtemp(prefix="flimg-ray-")
    backend_config = {
        "client_resources": {"num_cpus": engine.cpus_per_client, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": num_cpus,
            "include_dashboard": False,
            "logging_level": logging.INFO if engine.verbose else logging.ERROR,
            "_temp_dir": ray_tmp,
        },
    }
    parallel = max(1, num_cpus // engine.cpus_per_client)
    log.info(
        "simulation engine: %d sites, %d round(s), up to %d site(s) in parallel",
        len(site_names),
        engine.rounds,
        min(parallel, len(site_names)),
    )
    try:
        run_simulation(
            server_app=build_server_app(cfg, site_names, plan),
            client_app=build_client_app(cfg),
            num_supernodes=len(site_names),
            backend_config=backend_config,  # type: ignore[arg-type]
            verbose_logging=engine.verbose,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
