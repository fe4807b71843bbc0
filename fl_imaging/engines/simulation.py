"""Run a federation on Flower's simulation engine (Ray backend), one virtual SuperNode per site."""

from __future__ import annotations

import logging
import socket
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fl_imaging.config import EngineConfig, RunConfig
from fl_imaging.console.site_lines import site_lines_into_log
from fl_imaging.engines.interrupts import RunInterrupted, stop_on_signal
from fl_imaging.engines.local_ray import LocalRay, prepare_ray_environment, start_local_ray
from fl_imaging.engines.message_handout import sites_asked_only_when_addressed
from fl_imaging.engines.ray_stop import busy_actors_stopped_first

if TYPE_CHECKING:
    from collections.abc import Callable

    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from fl_imaging.flower.coordinator.federation import FederationPlan

__all__ = [
    "SimulationError",
    "in_flight_limit",
    "ray_backend_config",
    "ray_cluster_cpus",
    "run_simulation_engine",
]

log = logging.getLogger("fl_imaging.engine")


def run_simulation_engine(
    cfg: RunConfig, site_names: list[str], plan: FederationPlan, local_ray: LocalRay | None = None
) -> None:
    """Run ``cfg`` on Flower's simulation engine, one virtual SuperNode per entry of
    ``cfg.data.sites``; the ServerApp runs the server side ``plan`` and writes the run's files
    into ``cfg.run_dir``.

    Uses Flower's in-process ``run_simulation`` (Ray backend) rather than ``flwr run``: the same
    engine, without a background SuperLink process or an app bundle, so a run costs one Ray start.
    Ray gets ``engine.num_cpus`` CPUs (default: all) and reserves ``engine.cpus_per_client`` CPUs
    and ``engine.gpus_per_client`` GPUs per ClientApp (:func:`ray_backend_config`); its files go
    to a private temporary folder removed afterwards (also when this process is killed:
    :mod:`fl_imaging.engines.ray_reaper`). ``local_ray``: Ray already being started on this
    machine for this run (:func:`~fl_imaging.engines.local_ray.start_local_ray`, while the sites
    were checked), stopped here; without it, and without ``engine.ray_address``, Ray starts here.
    Ctrl-C or SIGTERM stops the run within seconds, with the finished rounds' results written
    (:mod:`~.interrupts`), and raises :class:`~fl_imaging.engines.interrupts.RunInterrupted`.
    What the sites log reaches this process through a folder of the run, not through Ray
    (:mod:`fl_imaging.console.site_lines`).
    """
    engine = cfg.engine
    prepare_ray_environment(engine.verbose)
    from fl_imaging.flower.coordinator.server_app import build_server_app
    from fl_imaging.flower.site.client_app import build_client_app

    if engine.ray_address:  # an existing cluster: its own CPUs, folders and processes
        init_args: dict[str, object] = {
            "logging_level": logging.INFO if engine.verbose else logging.ERROR,
            "address": engine.ray_address,
        }
        num_cpus = int(ray_cluster_cpus(engine.ray_address))
        where = f"the Ray cluster at {engine.ray_address} ({num_cpus} CPUs)"
        stop_ray = _stop_cluster_connection
        client_cfg = cfg
    else:
        local_ray = local_ray or start_local_ray(engine)
        stop_ray = local_ray.stop
        try:
            local_ray.wait()
        except Exception as err:
            stop_ray()
            raise SimulationError(
                f"Ray could not start on this machine: {_root_cause(err)}. Rerun with "
                "engine.verbose=true to see Ray's own log."
            ) from err
        init_args, num_cpus = local_ray.init_args, local_ray.num_cpus
        where = "this machine"
        client_cfg = _with_decoded_cache(cfg, local_ray.temp_dir)
    backend_config = ray_backend_config(cfg.engine, init_args)
    parallel = max(1, num_cpus // engine.cpus_per_client)
    if engine.gpus_per_client > 0 and not engine.ray_address:  # a cluster's GPUs: unknown here
        parallel = min(parallel, max(1, int(_local_gpus() / engine.gpus_per_client)))
    log.info(
        "simulation engine on %s: %d sites, %d round(s), up to %d site(s) in parallel",
        where,
        len(site_names),
        engine.rounds,
        min(parallel, len(site_names)),
    )
    # the sites' log lines: from Ray's workers through a folder of the run, the last ones read
    # once Ray has stopped (on leaving the with, after the finally)
    with site_lines_into_log(plan.run_dir) as site_lines:
        try:
            _run_flower(
                plan,
                len(site_names),
                build_server_app(cfg, site_names, plan, max_in_flight=in_flight_limit(parallel)),
                build_client_app(client_cfg, site_lines=site_lines),
                backend_config,
                stop_ray,
            )
        finally:
            stop_ray()
    if plan.stop.is_set():
        raise RunInterrupted(plan.run_dir, plan.stopped or "interrupted before the first round")


def _run_flower(
    plan: FederationPlan,
    num_sites: int,
    server_app: ServerApp,
    client_app: ClientApp,
    backend_config: dict[str, object],
    stop_ray: Callable[[], None],
) -> None:
    """Flower's ``run_simulation`` of ``server_app`` and ``client_app`` (``num_sites`` virtual
    SuperNodes) on Ray with ``backend_config``; Ctrl-C and SIGTERM stop it through
    ``plan.stop`` (``stop_ray`` when it must be forced), and a failure of Flower's runtime
    becomes a :class:`SimulationError`."""
    from fl_imaging.flower.internals import run_simulation

    engine = plan.cfg.engine
    # On a cluster, the first signal lets the messages in flight finish (see stop_on_signal)
    with (
        stop_on_signal(
            plan.stop,
            force=stop_ray,
            interrupt_main=not engine.ray_address,
            on_signal=plan.note_signal,
        ),
        busy_actors_stopped_first(plan.stop),
        sites_asked_only_when_addressed(),
    ):
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_sites,
                backend_config=backend_config,  # type: ignore[arg-type]
                verbose_logging=engine.verbose,
            )
        except KeyboardInterrupt:
            if not plan.stop.is_set():
                raise
        except Exception as err:
            if plan.done.is_set():  # our ServerApp finished and raised: its own message
                raise
            # Flower's runtime failed (Ray could not start, ...): its ServerApp thread would
            # wait for replies for ever, and the process with it.
            reason = f"Flower's simulation engine failed: {_root_cause(err)}"
            plan.stopped = plan.stopped or reason
            plan.stop.set()
            plan.done.wait(timeout=STOP_WRITE_TIMEOUT)
            raise SimulationError(
                f"{reason}. Rerun with engine.verbose=true to see Flower's and Ray's own log."
            ) from err
        if plan.stop.is_set() and not plan.done.wait(timeout=STOP_WRITE_TIMEOUT):
            log.error("the ServerApp did not write its results within %d s", STOP_WRITE_TIMEOUT)


def in_flight_limit(parallel: int) -> int:
    """How many of a round's messages the simulation's coordinator keeps unanswered at a time,
    for ``parallel`` sites training at once: enough that no worker waits (four per worker, at
    least 8), few enough that Flower's in-memory state, which looks through every undelivered
    message for each site every 0.1 s, stays quick with 1,000 sites."""
    return max(8, 4 * parallel)


def ray_backend_config(engine: EngineConfig, init_args: dict[str, object]) -> dict[str, object]:
    """Flower's ``backend_config`` for Ray: every ClientApp (site actor) reserves
    ``engine.cpus_per_client`` CPUs and ``engine.gpus_per_client`` GPUs (a fraction: that many
    actors share one GPU, e.g. 0.5 for two; Ray then shows each actor only its GPU, as
    ``cuda:0``); ``init_args`` go to ``ray.init``."""
    return {
        "client_resources": {
            "num_cpus": engine.cpus_per_client,
            "num_gpus": float(engine.gpus_per_client),
        },
        "init_args": init_args,
    }


def _local_gpus() -> int:
    """The CUDA GPUs torch sees on this machine (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class SimulationError(RuntimeError):
    """Flower's simulation engine (Ray) failed; the message gives the first cause."""


def _root_cause(err: BaseException) -> str:
    """The innermost cause of ``err`` as one line (``Type: message``)."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _with_decoded_cache(cfg: RunConfig, ray_tmp: str) -> RunConfig:
    """``cfg`` for the ClientApps on this machine: with ``data.cache``, the sites' decoded cases
    go to a folder inside Ray's temporary folder (removed with it), so that each case is
    decoded once per run, not once per Ray worker that serves its site."""
    if not cfg.data.cache:
        return cfg
    cache = Path(ray_tmp) / "decoded"
    return replace(cfg, data=replace(cfg.data, decoded_cache=str(cache)))


def ray_cluster_cpus(address: str) -> float:
    """The CPUs of the Ray cluster at ``address``; raises :class:`SimulationError` naming the
    address when no cluster answers there."""
    import ray

    host, _, port = address.rpartition(":")
    if host and port.isdigit():  # Ray itself retries a silent address for minutes
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except OSError as err:
            raise SimulationError(
                f"engine.ray_address={address}: nothing answers there ({err}); start the "
                "cluster's head with `ray start --head` (docs/how-to/ray-cluster.md), check the "
                "address and the firewall, or leave engine.ray_address unset"
            ) from None
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        cpus = float(ray.cluster_resources().get("CPU", 0))
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SimulationError(
            f"engine.ray_address={address}: no Ray cluster answers there ({err}); start one "
            "with `ray start --head` (docs/how-to/ray-cluster.md) or leave engine.ray_address unset"
        ) from None
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return cpus


#: Seconds an interrupted run waits for the ServerApp to write what the finished rounds produced.
STOP_WRITE_TIMEOUT = 60


def _stop_cluster_connection() -> None:
    """Leave the Ray cluster if this process is still connected (the cluster keeps running)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
