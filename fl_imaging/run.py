"""The pipeline every run goes through: compose, check, prepare the sites, run the engine.

``fl-imaging`` (through Hydra), ``fl-imaging-bench`` (one call per cell), the baselines and the
scripts all come here; this module imports no command. The steps, in order:

1. compose the config from overrides and validate it
(:func:`fl_imaging.config.compose.check_overrides`;
   ``fl-imaging`` lets Hydra compose and checks the same way first), and check that its tracking
   can work (:func:`fl_imaging.review.tracking.check_tracking`: package, folder, server);
2. check what depends on the model alone (:func:`fl_imaging.training.model_checks.check_model`)
and, in
   a simulation, the GPUs it asks for (:func:`fl_imaging.config.devices.check_simulation_devices`),
   before any site's data is read;
3. prepare the sites (:func:`fl_imaging.data.prepare.prepare_sites`: demo data, public datasets
   split into sites, or the hospitals' own folders, each checked), except in a deployment, where
   every site reads its own folder;
4. plan the server side (:func:`fl_imaging.flower.coordinator.federation.plan_federation`: the
strategy chain
   and the checkpoint to resume from, checked here, once);
5. run the engine (simulation or deployment), which writes the results into the run folder.

A simulation on this machine starts Ray in the background between steps 2 and 3
(:func:`fl_imaging.engines.local_ray.start_local_ray`): its start overlaps the site checks, and
it is stopped whatever happens after.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fl_imaging.config import ConfigError, DataName, EngineName, RunConfig
from fl_imaging.config.compose import check_overrides
from fl_imaging.data.partition import PartitionError
from fl_imaging.data.sites import SiteDataError
from fl_imaging.engines.deployment import DeploymentError
from fl_imaging.engines.simulation import SimulationError
from fl_imaging.review.results import RunFolderError, SitesFailed
from fl_imaging.review.tracking import check_tracking, resolve_tracking
from strategies import StrategyError

if TYPE_CHECKING:
    from fl_imaging.engines.local_ray import LocalRay

__all__ = ["USER_ERRORS", "check_overrides", "run"]

log = logging.getLogger("fl_imaging")

#: The errors a user can fix (config, data, strategy, deployment, a run folder that cannot be
#: written, a failed engine or site): shown as one message, exit 2.
USER_ERRORS = (
    ConfigError,
    SiteDataError,
    PartitionError,
    StrategyError,
    DeploymentError,
    SimulationError,
    SitesFailed,
    RunFolderError,
)


def run(cfg: RunConfig) -> Path:
    """Run a validated config (steps 2-5 of the module docstring); returns the run folder.

    ``engine=deployment`` with ``data=folders``: the sites' folders stay at the sites (each
    SuperNode reads its own), so nothing is read here; ``data.sites`` may name the sites for the
    table, and ``engine.num_sites`` says how many to expect. Raises one of :data:`USER_ERRORS`
    for what the user must change.
    """
    # Imported here, so that a config error stops before torch and MONAI are imported.
    from fl_imaging.config.devices import check_simulation_devices
    from fl_imaging.site.setup import absolute_site_paths, check_site_policies
    from fl_imaging.training.model_checks import check_model
    from strategies.registry import check_strategy_name

    cfg = resolve_tracking(cfg)  # tracking.uri: a folder made absolute (default mlruns/)
    check_tracking(cfg)
    cfg = _with_bundle(cfg)  # task=bundle: what the bundle defines wins, its digest named
    if cfg.resume:  # a run folder of another model is named before this network is built
        from fl_imaging.flower.coordinator.checkpoint import check_same_model, load_checkpoint

        check_same_model(load_checkpoint(Path(cfg.resume)), cfg)
    check_strategy_name(cfg.strategy)  # before any site's data is read
    check_model(cfg)  # the network is built once here: one it cannot be stops the run
    cfg = replace(cfg, run_dir=str(Path(cfg.run_dir).resolve()))
    cfg = _absolute_init(cfg)  # the ServerApp may run elsewhere (Ray, a SuperLink's host)
    cfg = replace(cfg, site=absolute_site_paths(cfg))  # Ray's workers run elsewhere
    check_site_policies(cfg)  # a simulated site's policy file that cannot be used stops here
    local_ray = None
    if cfg.engine.name == EngineName.simulation:
        check_simulation_devices(cfg)  # every site runs here: a GPU it lacks stops the run now
        if not cfg.engine.ray_address:
            from fl_imaging.engines.local_ray import start_local_ray

            local_ray = start_local_ray(cfg.engine)  # beside the site checks
    try:
        return _sites_checked_and_run(cfg, local_ray)
    finally:
        if local_ray is not None:
            local_ray.stop()


def _absolute_init(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``task.model.init`` made absolute, from the folder the command was started
    in (Hydra's ``runtime.cwd`` inside a Hydra job, which may have changed the working folder
    with ``hydra.job.chdir=true``; else the working folder); as it was without one."""
    init = cfg.task.model.init
    if not init:
        return cfg
    model = replace(cfg.task.model, init=str(_launch_folder() / Path(init).expanduser()))
    return replace(cfg, task=replace(cfg.task, model=model))


def _launch_folder() -> Path:
    """The folder the command was started in: Hydra's ``runtime.cwd`` inside a Hydra job (which
    may have changed the working folder with ``hydra.job.chdir=true``), else the working
    folder."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.cwd) if HydraConfig.initialized() else Path.cwd()


def _with_bundle(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the settings of its MONAI bundle (``task.bundle``) and the digest of the
    coordinator's copy (:func:`tasks.bundle_files.with_bundle_settings`); in a simulation the
    path made absolute (Ray's workers run elsewhere), in a deployment kept as typed: each site
    reads its own copy there. Unchanged without a bundle."""
    if cfg.task.bundle is None:
        return cfg
    from tasks.bundle_files import with_bundle_settings

    task = cfg.task
    if cfg.engine.name == EngineName.simulation:
        task = replace(task, bundle=str((_launch_folder() / (task.bundle or "")).resolve()))
    return replace(cfg, task=with_bundle_settings(task))


def _sites_checked_and_run(cfg: RunConfig, local_ray: LocalRay | None) -> Path:
    """Steps 3-5 for a config whose tracking and model were checked; ``local_ray``: Ray being
    started for a simulation on this machine (handed to the engine). Returns the run folder."""
    from fl_imaging.data.prepare import partition_summary, prepare_sites, write_partition_summary
    from fl_imaging.evaluation.site_evaluations import check_test_cases
    from fl_imaging.flower.coordinator.federation import plan_federation
    from fl_imaging.privacy.dp_sgd import check_sites_privacy

    run_dir = Path(cfg.run_dir)
    deployment = cfg.engine.name == EngineName.deployment
    if deployment and cfg.data.name == DataName.folders:
        site_names = [Path(p).name for p in cfg.data.sites]
        log.info(
            "deployment: site data stays at the sites (each SuperNode reads its own folder); "
            "expecting %s site(s)%s",
            cfg.engine.num_sites or len(site_names) or "?",
            f": {', '.join(site_names)}" if site_names else "",
        )
    else:
        cfg, sites, reports = prepare_sites(cfg)
        check_sites_privacy(cfg, [(s.name, len(s.train)) for s in sites])  # DP-SGD accounting
        table = write_partition_summary(
            partition_summary(sites, reports), run_dir / "partition.csv"
        )
        log.info("sites of this run (cases per split):\n%s", table)
        site_names = [s.name for s in sites]
        check_test_cases(cfg, sites)  # engine.cross_site needs test cases
    if (cfg.engine.num_sites or len(site_names)) < 1:
        raise ConfigError(
            "engine=deployment with data=folders: say how many sites to expect with "
            "engine.num_sites=N (or name them: data.sites=[hospital-a,hospital-b])"
        )
    if cfg.resume:
        cfg = replace(cfg, resume=str(Path(cfg.resume).resolve()))
    plan = plan_federation(cfg, site_names)
    if deployment:
        from fl_imaging.engines.deployment import run_deployment_engine

        run_deployment_engine(cfg, site_names)  # the ServerApp plans again, on its own host
    else:
        from fl_imaging.engines.simulation import run_simulation_engine

        run_simulation_engine(cfg, site_names, plan, local_ray)
        plan.raise_if_sites_failed()
    log.info("results in %s: %s", run_dir, ", ".join(_result_files(run_dir)))
    return run_dir


#: The run folder's main files, in the order the closing line names them.
_MAIN_RESULTS = (
    "metrics.csv",
    "curves.png",
    "model.pt",
    "bundle/",
    "config.yaml",
    "summary.txt",
    "audit.jsonl",
    "report.html",
    "cross_site.csv",
    "contributions.csv",
)


def _result_files(run_dir: Path) -> list[str]:
    """The main result files (and the MONAI bundle's folder) ``run_dir`` holds now (a
    deployment's researcher may lack one the coordinator did not send), in
    :data:`_MAIN_RESULTS` order."""
    return [name for name in _MAIN_RESULTS if (run_dir / name).exists()]
