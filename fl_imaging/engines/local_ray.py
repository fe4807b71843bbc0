"""Ray on this machine for a simulation, started in the background while the run checks its sites.

A simulation needs Ray, and Ray's start (its GCS server and raylet, a few seconds) mostly waits
for those processes; the run meanwhile imports torch and MONAI and checks every site's data in
this process. :func:`start_local_ray` therefore starts Ray at once, in a thread of its own, and
the engine waits for it (:meth:`LocalRay.wait`) only when it hands the sites to Flower. Flower's
``RayBackend`` then finds Ray running and uses it (it calls ``ray.init`` only if Ray is not
initialised yet); Ray is started through that same method of Flower's, so the workers see this
process's ``sys.path`` exactly as they do when Flower starts Ray itself.

The thread stays until :meth:`LocalRay.stop`: Linux sends Ray's servers their parent-death
signal when the *thread* that started them ends, not the process. Ray's temporary folder is a
private one, removed afterwards, and the watcher of :mod:`fl_imaging.engines.ray_reaper` stops
Ray's processes also when this process is killed. Ours: neither Ray nor Flower starts Ray
beside other work.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

from fl_imaging.config import EngineConfig
from fl_imaging.engines.ray_reaper import finish_reaper, start_reaper

__all__ = ["LocalRay", "prepare_ray_environment", "start_local_ray"]

log = logging.getLogger("fl_imaging.engine")

#: Seconds :meth:`LocalRay.wait` and :meth:`LocalRay.stop` wait for Ray's start at most.
START_TIMEOUT_S = 300


class _DropRunSimulationDeprecation(logging.Filter):
    """Flower warns that ``run_simulation`` is deprecated in favour of ``flwr run``; we use it on
    purpose (see :func:`fl_imaging.engines.simulation.run_simulation_engine`), so the warning
    is dropped, and only that one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def prepare_ray_environment(verbose: bool) -> None:
    """Set what Ray and Flower read before they start: no telemetry or usage statistics, Ray's
    worker logs not deduplicated and, where it prints them (a cluster's other nodes), without
    colour codes, no warning about GPU variables; Flower's log at INFO with ``verbose`` or when
    its own terminal handler is set aside (``fl-imaging``'s console: the lines go to
    ``main.log``), else WARNING (set before Flower is imported: alembic logs as it is
    imported)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's FutureWarning
    flwr_logger = logging.getLogger("flwr")
    to_terminal = "flwr.supercore.logger" not in sys.modules or any(  # not imported: it will
        type(h).__name__ == "ConsoleHandler" for h in flwr_logger.handlers
    )
    flwr_logger.setLevel(logging.INFO if verbose or not to_terminal else logging.WARNING)
    if not any(isinstance(f, _DropRunSimulationDeprecation) for f in flwr_logger.filters):
        flwr_logger.addFilter(_DropRunSimulationDeprecation())
    logging.getLogger("alembic").setLevel(logging.WARNING)


class LocalRay:
    """Ray being started (or started) on this machine for one run.

    Attributes:
        temp_dir: Ray's private temporary folder (removed by :meth:`stop`).
        num_cpus: the CPUs Ray gets (``engine.num_cpus``, default all of this machine's).
        init_args: what went to ``ray.init``; Flower's ``backend_config`` carries the same.
    """

    def __init__(self, engine: EngineConfig) -> None:
        prepare_ray_environment(engine.verbose)
        import ray  # noqa: F401  (imported here, not beside other imports in the thread)

        from fl_imaging.flower.internals import RayBackend

        self.temp_dir = tempfile.mkdtemp(prefix="flimg-ray-")
        self.num_cpus = engine.num_cpus or os.cpu_count() or 1
        self.init_args: dict[str, object] = {
            "logging_level": logging.INFO if engine.verbose else logging.ERROR,
            "num_cpus": self.num_cpus,
            "include_dashboard": False,
            "_temp_dir": self.temp_dir,
            # the sites' lines come through the run folder (fl_imaging.console.site_lines)
            "log_to_driver": False,
        }
        self._reaper = start_reaper(Path(self.temp_dir))
        self._started = threading.Event()
        self._release = threading.Event()
        self._error: BaseException | None = None
        self._stopped = False
        threading.Thread(
            target=self._start, args=(RayBackend,), name="fl-imaging-ray-start", daemon=True
        ).start()

    def _start(self, backend: type) -> None:
        try:
            # Flower's own start (it only reads init_args_key from its instance)
            backend.init_ray(
                SimpleNamespace(init_args_key="init_args"), {"init_args": self.init_args}
            )
        except BaseException as err:  # noqa: BLE001  (given to the thread that waits)
            self._error = err
        finally:
            self._started.set()
        self._release.wait()  # Ray's servers end with this thread (parent-death signal)

    def wait(self) -> None:
        """Block until Ray runs; raises what stopped Ray's start, or :class:`TimeoutError`
        after :data:`START_TIMEOUT_S` seconds."""
        if not self._started.wait(timeout=START_TIMEOUT_S):
            raise TimeoutError(f"Ray did not start within {START_TIMEOUT_S} s")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Shut Ray down (waiting for its start to finish first), have the watcher stop the
        processes Ray leaves behind, and remove Ray's folder. Safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        import ray

        self._started.wait(timeout=START_TIMEOUT_S)
        if ray.is_initialized():
            ray.shutdown()
        self._release.set()
        if self._reaper is not None:
            finish_reaper(self._reaper)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_local_ray(engine: EngineConfig) -> LocalRay:
    """Start Ray for a simulation with ``engine``'s settings on this machine, in the background;
    returns at once. The caller must call :meth:`LocalRay.stop` (also when the run fails)."""
    log.debug("starting Ray on this machine in the background")
    return LocalRay(engine)
